//! What the fuzz targets found (README: "Fuzzing"), each test named after
//! its finding and driven through the public API.

use slabsocks::proto::{HttpError, MAX_HTTP_HEADERS, parse_connect};

/// Found by `handshake_chain` (all at once against one byte at a time) and
/// `http_connect` (an error that is not final). A head whose method is not
/// CONNECT is refused as soon as the method has arrived (`GET ` gives
/// `NotConnect`, 405), but the same head parsed whole can fail on a later
/// byte first (`Malformed`, 400; `TooManyHeaders`, 431). So the status a
/// client gets depends on how its bytes were cut into segments. Every
/// prefix that fails must fail as the whole does, as for the SOCKS parsers.
#[test]
fn http_error_does_not_depend_on_how_the_head_arrives() {
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..=MAX_HTTP_HEADERS {
        many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let inputs: [&[u8]; 4] = [
        // The fuzzer's input, minimized: a bad byte in the request target.
        b"GET \x01",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"CONNEe x HTTP/1.1\r\n\x01: y\r\n\r\n",
        &many,
    ];
    for input in inputs {
        let whole = parse_connect(input);
        assert!(whole.is_err(), "{:?}", input.escape_ascii().to_string());
        for k in 0..input.len() {
            if let Err(e) = parse_connect(&input[..k]) {
                assert_eq!(
                    whole.map(|_| ()).map_err(HttpError::status),
                    Err(e.status()),
                    "{:?} fails with {e:?} after {k} bytes",
                    input.escape_ascii().to_string()
                );
            }
        }
    }
}

/// Found by fuzzing the PROXY protocol header: `PROXY UNKNOWN T0 \n8 \r\n`
/// was an error while its CRLF had not arrived (a bare LF in the line) and
/// a LOCAL header once it had (the rest of an UNKNOWN line is ignored). An
/// error must be final: the answer cannot depend on the segments.
#[test]
fn a_proxy_header_error_is_final() {
    use slabsocks::proto::{Status, parse_proxy};
    let input = b"PROXY UNKNOWN T0 \n8 \r\n";
    let whole = parse_proxy(input);
    assert!(whole.is_err(), "{whole:?}");
    for k in 0..input.len() {
        let part = parse_proxy(&input[..k]);
        assert!(part.is_err() || part == Ok(Status::Partial), "{k}: {part:?}");
    }
}
