//! `--metrics ADDR` of `worker` and `monitor`: Prometheus' text format over plain HTTP/1.1 at
//! `http://ADDR/metrics`, one response per connection. The body is made on each scrape: the
//! worker's counters ([`agent_orchestra::engine::MetricsSnapshot::to_prometheus`]) and gauges
//! read from the backends then ([`agent_orchestra::engine::backend_gauges`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::CliError;

/// Makes a scrape's body.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// The longest request head read (a scraper sends a few hundred bytes).
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request, and to read the response.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes answered at once; more connections wait for a turn.
const MAX_CONNECTIONS: usize = 16;

/// Parses `--metrics`: a socket address (`127.0.0.1:9464`, `[::1]:9464`, `0.0.0.0:9464`).
pub fn addr_arg(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("{s:?} is not an address to listen on; expected IP:PORT, e.g. 127.0.0.1:9464")
    })
}

/// Listens on `addr` (exit 1 with the reason when it cannot: the port taken, an address not
/// this machine's).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, CliError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::Failed(format!("--metrics: cannot listen on {addr}: {e}")))
}

/// The URL scrapers use for `listener`.
pub fn url(listener: &TcpListener) -> String {
    match listener.local_addr() {
        Ok(a) => format!("http://{a}/metrics"),
        Err(_) => "(unknown address)".into(),
    }
}

/// Serves scrapes until the returned task is aborted (or dropped with the runtime).
pub fn serve(listener: TcpListener, render: Render) -> tokio::task::JoinHandle<()> {
    let turns = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: pass, and try again shortly.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(turn) = turns.clone().acquire_owned().await else {
                return;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let _turn = turn;
                if let Err(e) = tokio::time::timeout(IO_TIMEOUT, answer(stream, &render))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()))
                {
                    tracing::debug!(%peer, error = %e, "metrics: request not answered");
                }
            });
        }
    })
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, render: &Render) -> Result<(), String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "").await;
        }
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the end of the request".into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let body = render().await;
            respond(&mut stream, "200 OK", &body).await
        }
        ("HEAD", "/metrics") => respond_head(&mut stream, "200 OK", 0).await,
        (_, "/metrics") => respond(&mut stream, "405 Method Not Allowed", "use GET\n").await,
        _ => respond(&mut stream, "404 Not Found", "metrics are at /metrics\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> Result<(), String> {
    respond_head(stream, status, body.len()).await?;
    stream
        .write_all(body.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.shutdown().await.map_err(|e| e.to_string())
}

async fn respond_head(stream: &mut TcpStream, status: &str, len: usize) -> Result<(), String> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_parsed_and_bad_ones_say_what_is_expected() {
        assert!(addr_arg("127.0.0.1:9464").is_ok());
        assert!(addr_arg("[::1]:0").is_ok());
        let e = addr_arg("localhost").unwrap_err();
        assert!(e.contains("IP:PORT"), "{e}");
        assert!(addr_arg("127.0.0.1:99999").is_err());
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_metrics_and_refuses_the_rest() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render: Render = Arc::new(|| Box::pin(async { "orchestra_x 1\n".to_string() }));
        let server = serve(listener, render);
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Length: 14\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\norchestra_x 1\n"), "{ok}");
        let q = get(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(q.starts_with("HTTP/1.1 200 OK\r\n"), "{q}");
        let nf = get(addr, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(nf.starts_with("HTTP/1.1 404 "), "{nf}");
        let post = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        let big = format!("GET /metrics HTTP/1.1\r\nX: {}", "a".repeat(40_000));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(big.as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        // A client that sends nothing does not stop others from being answered.
        let _idle = TcpStream::connect(addr).await.unwrap();
        let again = get(addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(again.starts_with("HTTP/1.1 200 OK\r\n"), "{again}");
        server.abort();
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let e = bind(addr).await.unwrap_err();
        let CliError::Failed(m) = e else {
            panic!("expected Failed")
        };
        assert!(
            m.contains("--metrics") && m.contains(&addr.to_string()),
            "{m}"
        );
    }
}
