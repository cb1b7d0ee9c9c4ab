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
