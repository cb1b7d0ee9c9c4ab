//! `fast-socks5-peer ADDR`: SOCKS5, no authentication, CONNECT only, on
//! tokio's multi-threaded runtime (one worker per CPU the process may use,
//! as a tokio server runs by default).

use fast_socks5::server::{run_tcp_proxy, DnsResolveHelper as _, Socks5ServerProtocol};
use fast_socks5::{ReplyError, Socks5Command};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:1080".into());
    let listener = TcpListener::bind(&addr).await?;
    loop {
        let (socket, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = serve(socket).await;
        });
    }
}

async fn serve(socket: tokio::net::TcpStream) -> fast_socks5::Result<()> {
    let (proto, cmd, target) =
        Socks5ServerProtocol::accept_no_auth(socket).await?.read_command().await?.resolve_dns().await?;
    match cmd {
        Socks5Command::TCPConnect => {
            run_tcp_proxy(proto, &target, std::time::Duration::from_secs(10), false).await?;
        }
        _ => {
            proto.reply_error(&ReplyError::CommandNotSupported).await?;
        }
    }
    Ok(())
}
