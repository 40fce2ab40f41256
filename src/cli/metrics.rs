//! `--metrics ADDR` of `worker` and `monitor`: the engine's metrics
//! ([`agent_orchestra::engine::metrics::prometheus`]) in the OpenMetrics text format at
//! `http://ADDR/metrics`, served by hyper. Each connection is served by a task of its own: an
//! idle or slow client holds only its own connection (closed when it has not sent a request
//! within [`HEADER_TIMEOUT`]), never the scrapes of others. The body is made at each scrape:
//! the backend gauges are read then, the worker's counters are read from its live metrics.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agent_orchestra::engine::metrics::prometheus::{BackendGauges, WorkerCollector};
use agent_orchestra::engine::WorkerHandle;
use agent_orchestra::{Backends, QueueName};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::CliError;

/// Makes a scrape's body.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// How long a client may take to send its request.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may last in all (a client that does not read its response).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head read (a scraper sends a few hundred bytes; hyper's least is 8 KiB).
const MAX_HEAD: usize = 16 * 1024;
/// The OpenMetrics text format, which Prometheus asks for and reads.
const CONTENT_TYPE_OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

/// A scrape's body: the backend gauges of `queues`, read from `backends` at each scrape, and
/// the counters and attempt-duration histogram of `worker`, if any.
pub fn render(backends: Backends, queues: Vec<QueueName>, worker: Option<&WorkerHandle>) -> Render {
    let mut registry = Registry::default();
    if let Some(w) = worker {
        WorkerCollector::register(&mut registry).add(w);
    }
    let gauges = BackendGauges::register(&mut registry);
    let registry = Arc::new(registry);
    let queues: Arc<[QueueName]> = queues.into();
    Arc::new(move || {
        let (registry, gauges, backends, queues) = (
            registry.clone(),
            gauges.clone(),
            backends.clone(),
            queues.clone(),
        );
        Box::pin(async move {
            gauges.refresh(&backends, &queues).await;
            let mut text = String::new();
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
            text
        })
    })
}

/// Serves scrapes until the returned task is aborted (or dropped with the runtime).
pub fn serve(listener: TcpListener, render: Render) -> tokio::task::JoinHandle<()> {
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
            let render = render.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let render = render.clone();
                    async move { Ok::<_, Infallible>(answer(&request, &render).await) }
                });
                let mut http = hyper::server::conn::http1::Builder::new();
                // One response per connection, as a scraper needs: nothing idles between
                // scrapes.
                http.timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .keep_alive(false);
                let connection = http.serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "metrics: request not answered")
                    }
                    Err(_) => tracing::debug!(%peer, "metrics: connection timed out"),
                }
            });
        }
    })
}

/// The response to one request: the metrics for `GET /metrics` (headers only for `HEAD`).
async fn answer(request: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if request.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "metrics are at /metrics\n");
    }
    let body = match *request.method() {
        Method::GET => render().await,
        // Hyper sends no body for HEAD; the backends need not be asked.
        Method::HEAD => String::new(),
        _ => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[test]
    fn addresses_are_parsed_and_bad_ones_say_what_is_expected() {
        assert!(addr_arg("127.0.0.1:9464").is_ok());
        assert!(addr_arg("[::1]:0").is_ok());
        let e = addr_arg("localhost").unwrap_err();
        assert!(e.contains("IP:PORT"), "{e}");
        assert!(addr_arg("127.0.0.1:99999").is_err());
    }

    /// Sends `request` and reads the whole response (the server closes the connection after
    /// it), within a generous bound: a server that stalls fails the test rather than hanging it.
    async fn get(addr: SocketAddr, request: &str) -> String {
        let exchange = async {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        };
        tokio::time::timeout(Duration::from_secs(8), exchange)
            .await
            .unwrap_or_else(|_| panic!("no response to {request:?} within 8 s"))
    }

    fn fixed(body: &'static str) -> Render {
        Arc::new(move || Box::pin(async move { body.to_string() }))
    }

    async fn start(render: Render) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, serve(listener, render))
    }

    #[tokio::test]
    async fn answers_metrics_and_refuses_the_rest() {
        let (addr, server) = start(fixed("orchestra_x 1\n# EOF\n")).await;
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let lower = ok.to_ascii_lowercase();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(lower.contains("content-length: 20\r\n"), "{ok}");
        assert!(
            lower.contains("content-type: application/openmetrics-text; version=1.0.0"),
            "{ok}"
        );
        assert!(ok.ends_with("\r\n\r\norchestra_x 1\n# EOF\n"), "{ok}");
        let q = get(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(q.contains(" 200 OK\r\n"), "{q}");
        let head = get(addr, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "no body for HEAD: {head}");
        let nf = get(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(nf.starts_with("HTTP/1.1 404 "), "{nf}");
        let post = get(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        let big = format!("GET /metrics HTTP/1.1\r\nX: {}", "a".repeat(40_000));
        let out = get(addr, &big).await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        server.abort();
    }

    /// Idle connections (a scraper's stale keep-alive, a port scanner) each hold only their own
    /// connection: a scrape behind twenty of them is answered (before, a pool of 16 turns was
    /// held by them and the scrape waited 10 s for their timeout).
    #[tokio::test]
    async fn a_scrape_is_answered_behind_twenty_idle_connections() {
        let (addr, server) = start(fixed("orchestra_x 1\n# EOF\n")).await;
        let mut idle = Vec::new();
        for _ in 0..20 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // One more that sent half a request.
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /metr").await.unwrap();
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("orchestra_x 1\n# EOF\n"), "{ok}");
        drop(idle);
        server.abort();
    }

    /// The body a worker's endpoint serves: its counters, histogram and the backend gauges,
    /// with HELP lines.
    #[tokio::test]
    async fn the_rendered_body_has_help_lines_and_the_backend_gauges() {
        let backends = Backends::memory();
        let q = QueueName::parse("mq").unwrap();
        let body = render(backends, vec![q], None)().await;
        for line in [
            "# HELP orchestra_tasks Tasks by status, from the registry's counts.",
            "orchestra_tasks{status=\"COMPLETED\"} 0",
            "orchestra_queue_messages{queue=\"mq\",state=\"waiting\"} 0",
            "orchestra_registry_up 1",
            "orchestra_bus_up 1",
            "# EOF",
        ] {
            assert!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
        }
        assert!(!body.contains("orchestra_worker_"), "no worker: {body}");
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
