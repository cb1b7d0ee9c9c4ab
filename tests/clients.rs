//! Real clients: curl through the proxy to an HTTP server on loopback.

mod common;

use common::*;
use std::process::Command;

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn curl_socks5_by_address() {
    let proxy = Proxy::start();
    let http = http_server("hello from loopback\n");
    let (ok, body) = curl(&["--socks5", &proxy.addr.to_string(), &format!("http://{http}/")]);
    assert!(ok);
    assert_eq!(body, "hello from loopback\n");
}

#[test]
fn curl_socks5_hostname_by_name() {
    let proxy = Proxy::start();
    let http = http_server("resolved by the proxy\n");
    let (ok, body) =
        curl(&["--socks5-hostname", &proxy.addr.to_string(), &format!("http://localhost:{}/", http.port())]);
    assert!(ok);
    assert_eq!(body, "resolved by the proxy\n");
}

#[test]
fn curl_socks5h_url_with_numeric_host() {
    let proxy = Proxy::with(|c| c.resolver_threads = 0);
    let http = http_server("numeric\n");
    let (ok, body) = curl(&["--proxy", &format!("socks5h://{}", proxy.addr), &format!("http://{http}/")]);
    assert!(ok);
    assert_eq!(body, "numeric\n");
}

#[test]
fn curl_sees_refusal() {
    let proxy = Proxy::start();
    let (ok, _) = curl(&["--socks5", &proxy.addr.to_string(), &format!("http://{}/", closed_port())]);
    assert!(!ok);
    proxy.wait_sessions(0);
}

#[test]
fn many_curl_fetches_in_a_row() {
    let proxy = Proxy::start();
    let http = http_server("again\n");
    let url = format!("http://{http}/");
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), 20).collect();
    let mut args = vec!["--socks5-hostname", "PROXY"];
    let p = proxy.addr.to_string();
    args[1] = &p;
    args.extend(urls);
    let (ok, body) = curl(&args);
    assert!(ok);
    assert_eq!(body, "again\n".repeat(20));
}

#[test]
fn curl_proxy_user_succeeds_and_fails() {
    let proxy = Proxy::with(|c| c.users = Some(slabsocks::users::Users::from_pairs([("ann", "s:cret word")])));
    let http = http_server("authenticated\n");
    let url = format!("http://localhost:{}/", http.port());
    let p = proxy.addr.to_string();
    let (ok, body) = curl(&["--socks5-hostname", &p, "--proxy-user", "ann:s:cret word", &url]);
    assert!(ok);
    assert_eq!(body, "authenticated\n");
    let (ok, body) = curl(&["--socks5-hostname", &p, "--proxy-user", "ann:wrong", &url]);
    assert!(!ok);
    assert!(body.is_empty());
    let (ok, _) = curl(&["--socks5-hostname", &p, &url]);
    assert!(!ok, "no credentials, no service");
}

#[test]
fn curl_socks4_and_socks4a() {
    let proxy = Proxy::start();
    let http = http_server("over socks4\n");
    let p = proxy.addr.to_string();
    let (ok, body) = curl(&["--socks4", &p, &format!("http://{http}/")]);
    assert!(ok);
    assert_eq!(body, "over socks4\n");
    let (ok, body) = curl(&["--socks4a", &p, &format!("http://localhost:{}/", http.port())]);
    assert!(ok, "curl --socks4a: the proxy resolves the name");
    assert_eq!(body, "over socks4\n");
}

/// An HTTP proxy client tunnelling through CONNECT (`-p`), with the users
/// file's credentials; without them, 407.
#[test]
fn curl_http_connect_with_and_without_credentials() {
    let proxy = Proxy::with(|c| c.users = Some(slabsocks::users::Users::from_pairs([("ann", "pw")])));
    let http = http_server("through CONNECT\n");
    let url = format!("http://{http}/");
    let (ok, body) = curl(&["-p", "--proxy", &format!("http://ann:pw@{}", proxy.addr), &url]);
    assert!(ok);
    assert_eq!(body, "through CONNECT\n");
    let (ok, _) = curl(&["-p", "--proxy", &format!("http://ann:nope@{}", proxy.addr), &url]);
    assert!(!ok, "wrong credentials: 407");
    let (ok, _) = curl(&["-p", "--proxy", &format!("http://{}", proxy.addr), &url]);
    assert!(!ok, "no credentials: 407");
}

/// PySocks in SOCKS4 mode with remote DNS (SOCKS4a). Skipped without
/// PySocks unless `SLABSOCKS_REQUIRE_PYSOCKS` is set (as in CI).
#[test]
fn pysocks_socks4a_with_remote_dns() {
    let have = Command::new("python3").args(["-c", "import socks"]).output().is_ok_and(|o| o.status.success());
    if !have {
        assert!(std::env::var_os("SLABSOCKS_REQUIRE_PYSOCKS").is_none(), "PySocks is required here");
        eprintln!("pysocks_socks4a: python3 with PySocks missing (pip install PySocks): skipping");
        return;
    }
    let proxy = Proxy::start();
    let http = http_server("pysocks4a\n");
    let script = r#"
import socks, sys
s = socks.socksocket()
s.set_proxy(socks.SOCKS4, sys.argv[1], int(sys.argv[2]), rdns=True)
s.settimeout(10)
s.connect(("localhost", int(sys.argv[3])))
s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode())
"#;
    let out = Command::new("python3")
        .args(["-c", script, &proxy.addr.ip().to_string(), &proxy.addr.port().to_string(), &http.port().to_string()])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.ends_with("pysocks4a\n"), "{text}");
}
