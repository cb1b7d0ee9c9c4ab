#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| slabsocks_fuzz::proxy(data));
