//! The web dashboard (feature `dashboard`): its JSON API, access rules and event stream on
//! memory and on Redis, the `orchestra dashboard` command, and its page in headless Chromium
//! against Redis (the page loads with no script error, shows a dispatched task, updates live
//! when it completes, and a cancel click cancels a pending task).
//!
//! The browser test needs Debian's `chromium` (`.ci/chromium` installs it). Without it, it is
//! skipped with a message, except in CI (`CI` set), where it fails. With
//! `ORCHESTRA_DASHBOARD_SCREENSHOTS=docs/img` it writes a screenshot of each page there.
//!
//! Run: `cargo test --features full --test dashboard`.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use agent_orchestra::bus::{FetchOptions, OutgoingMessage};
use agent_orchestra::dashboard::{self, check_listen, DashboardOptions};
use agent_orchestra::testkit::harness::{broker_url, unique_prefix, BrokerKind};
use agent_orchestra::{
    connect, handler_fn, BackendUrls, Backends, ConnectOptions, Dispatcher, Priority, QueueName,
    TaskStatus, Worker, WorkerConfig,
};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt as _;

/// The longest any single wait in these tests lasts before it fails (generous: a shared,
/// noisy machine; never a timing assertion).
const PATIENCE: Duration = Duration::from_secs(30);

fn queue(name: &str) -> QueueName {
    QueueName::parse(name).unwrap()
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One request through the router, as from the page on 127.0.0.1 unless `headers` say more.
async fn call(app: &Router, method: &str, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", "127.0.0.1:8080");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
        .await
        .unwrap();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// Waits until the dashboard listens to the bus (events published before are not heard).
async fn listening(app: &Router) {
    tokio::time::timeout(PATIENCE, async {
        while call(app, "GET", "/api/overview", &[]).await.json()["listening"] != true {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the dashboard listening to the bus");
}

const SAME_ORIGIN: (&str, &str) = ("origin", "http://127.0.0.1:8080");

/// What every backend must answer the same: pages, listing and filtering, detail, cancel and
/// retry with the origin rule, queue sizes, dead letters, metrics, the event stream, workers.
async fn api_behaves(backends: Backends) {
    use futures::StreamExt as _;
    let q = queue("dash_api");
    let dead_q = queue("dash_api_dead");
    let app = dashboard::router(
        backends.clone(),
        DashboardOptions::default().with_queues([q.clone(), dead_q.clone()]),
    );

    // The page and its files, with a policy that allows nothing from elsewhere.
    let page = call(&app, "GET", "/", &[]).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("assets/app.js"), "{}", page.body);
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    for asset in ["/assets/app.js", "/assets/app.css", "/assets/icon.svg"] {
        assert_eq!(
            call(&app, "GET", asset, &[]).await.status,
            StatusCode::OK,
            "{asset}"
        );
    }
    assert_eq!(
        call(&app, "GET", "/nope", &[]).await.status,
        StatusCode::NOT_FOUND
    );

    listening(&app).await;

    // The event stream says hello, then carries the dispatch's event.
    let stream = app
        .clone()
        .oneshot(
            Request::get("/api/stream")
                .header("host", "localhost:1")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut frames = stream.into_body().into_data_stream();
    let first = tokio::time::timeout(PATIENCE, frames.next()).await.unwrap();
    let first = String::from_utf8_lossy(&first.unwrap().unwrap()).into_owned();
    assert!(first.starts_with("event: hello"), "{first}");

    let dispatcher = Dispatcher::new(backends.clone());
    let id = dispatcher
        .task(q.as_str())
        .payload(&json!({"topic": "dashboards"}))
        .send()
        .await
        .unwrap();
    let heard = tokio::time::timeout(PATIENCE, async {
        loop {
            let frame = frames.next().await.unwrap().unwrap();
            let text = String::from_utf8_lossy(&frame).into_owned();
            if text.contains(id.as_str()) {
                return text;
            }
        }
    })
    .await
    .expect("the dispatch's event on the stream");
    assert!(
        heard.starts_with("event: task") && heard.contains("PENDING"),
        "{heard}"
    );

    // Listing, filters, the id prefix.
    let listed = call(&app, "GET", &format!("/api/tasks?queue={q}"), &[]).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
    let tasks = listed.json()["tasks"].as_array().unwrap().clone();
    assert!(
        tasks
            .iter()
            .any(|t| t["task_id"] == id.as_str() && t["status"] == "PENDING"),
        "{tasks:?}"
    );
    let pending = call(
        &app,
        "GET",
        &format!("/api/tasks?status=pending&queue={q}"),
        &[],
    )
    .await;
    assert_eq!(pending.json()["tasks"].as_array().unwrap().len(), 1);
    let prefix = &id.as_str()[..8];
    let by_prefix = call(&app, "GET", &format!("/api/tasks?prefix={prefix}"), &[]).await;
    assert_eq!(by_prefix.json()["tasks"][0]["task_id"], id.as_str());
    let none = call(&app, "GET", "/api/tasks?prefix=zz_no_such", &[]).await;
    assert_eq!(none.json()["tasks"].as_array().unwrap().len(), 0);
    for bad in [
        "/api/tasks?status=SLEEPING",
        "/api/tasks?prefix=a%2Fb",
        "/api/tasks?queue=a%20b",
    ] {
        let r = call(&app, "GET", bad, &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
        assert!(
            r.json()["error"].as_str().unwrap().contains("invalid"),
            "{}",
            r.body
        );
    }

    // Detail: payload, attempts, a timeline with the event heard.
    let detail = call(&app, "GET", &format!("/api/tasks/{id}"), &[])
        .await
        .json();
    assert_eq!(detail["task"]["payload"], json!({"topic": "dashboards"}));
    assert_eq!(detail["task"]["status"], "PENDING");
    let timeline = detail["timeline"].as_array().unwrap();
    assert!(
        timeline.iter().any(|e| e["what"] == "created"),
        "{timeline:?}"
    );
    assert!(timeline.iter().any(|e| e["event"] == true), "{timeline:?}");
    assert_eq!(
        call(&app, "GET", "/api/tasks/no_such_task", &[])
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&app, "GET", "/api/tasks/bad%20id", &[]).await.status,
        StatusCode::BAD_REQUEST
    );

    // Cancel: refused without the page's origin (CSRF), done with it, refused twice.
    let path = format!("/api/tasks/{id}/cancel");
    let forged = call(&app, "POST", &path, &[("origin", "http://evil.example")]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN, "{}", forged.body);
    assert_eq!(
        call(&app, "POST", &path, &[]).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        dispatcher.get(&id).await.unwrap().status(),
        TaskStatus::Pending
    );
    let done = call(&app, "POST", &path, &[SAME_ORIGIN]).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(done.json()["status"], "CANCELLED");
    assert_eq!(
        dispatcher.get(&id).await.unwrap().status(),
        TaskStatus::Cancelled
    );
    let again = call(&app, "POST", &path, &[SAME_ORIGIN]).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.body);
    let fetch_site = [("sec-fetch-site", "same-origin")];
    let retried = call(&app, "POST", &format!("/api/tasks/{id}/retry"), &fetch_site).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.body);
    assert_eq!(
        dispatcher.get(&id).await.unwrap().status(),
        TaskStatus::Pending
    );
    assert_eq!(
        call(&app, "GET", &path, &[]).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );

    // A page of another host (DNS rebinding) reads nothing.
    let rebound = call(
        &app,
        "GET",
        "/api/overview",
        &[("host", "evil.example:8080")],
    )
    .await;
    assert_eq!(rebound.status, StatusCode::FORBIDDEN);

    // Queue sizes, overview, metrics.
    let queues = call(&app, "GET", "/api/queues", &[]).await.json();
    let row = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["queue"] == q.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{queues}"));
    assert!(row["waiting"].as_u64().unwrap() >= 1, "{row}");
    assert_eq!(queues["actions"]["pause_resume"], true);
    assert_eq!(row["paused"], false, "{row}");
    assert_eq!(row["tasks"]["PENDING"], 1, "{row}");

    // Pause and resume: the flag every worker reads; a POST from the page only.
    let pause = format!("/api/queues/{q}/pause");
    assert_eq!(
        call(&app, "POST", &pause, &[]).await.status,
        StatusCode::FORBIDDEN
    );
    let paused = call(&app, "POST", &pause, &[SAME_ORIGIN]).await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.body);
    assert_eq!(paused.json()["changed"], true);
    assert!(agent_orchestra::engine::Control::new(backends.clone())
        .paused()
        .await
        .unwrap()
        .contains(&q));
    let queues = call(&app, "GET", "/api/queues", &[]).await.json();
    assert!(
        queues["queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["queue"] == q.as_str() && r["paused"] == true),
        "{queues}"
    );
    let resumed = call(
        &app,
        "POST",
        &format!("/api/queues/{q}/resume"),
        &[SAME_ORIGIN],
    )
    .await;
    assert_eq!(resumed.json()["changed"], true, "{}", resumed.body);
    assert!(agent_orchestra::engine::Control::new(backends.clone())
        .paused()
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        call(&app, "POST", "/api/queues/bad%20q/pause", &[SAME_ORIGIN])
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let overview = call(&app, "GET", "/api/overview", &[]).await.json();
    assert_eq!(overview["counts"]["PENDING"], 1, "{overview}");
    assert_eq!(overview["roles"][0]["backend"], backends.bus.backend());
    assert!(!overview["roles"][0]["guarantees"]
        .as_str()
        .unwrap()
        .is_empty());
    assert_eq!(overview["token_required"], false);
    assert_eq!(overview["history"]["buckets"].as_array().unwrap().len(), 90);
    let metrics = call(&app, "GET", "/metrics", &[]).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let line = format!("orchestra_queue_messages{{queue=\"{q}\",state=\"waiting\"}}");
    assert!(metrics.body.contains(&line), "{}", metrics.body);
    assert!(
        metrics
            .body
            .contains("orchestra_tasks{status=\"PENDING\"} 1"),
        "{}",
        metrics.body
    );

    // Dead letters: a malformed message, with its reason and delivery count.
    let bus = &backends.bus;
    bus.enqueue(
        &dead_q,
        OutgoingMessage::new(b"not a task".to_vec(), Priority::DEFAULT),
    )
    .await
    .unwrap();
    let options = FetchOptions {
        max: 1,
        wait: Duration::from_secs(5),
        lease: Duration::from_secs(30),
    };
    let got = bus.fetch(&dead_q, options).await.unwrap();
    bus.dead_letter(&got[0], "dashboard test: malformed")
        .await
        .unwrap();
    let dead = call(
        &app,
        "GET",
        &format!("/api/dead-letters?queue={dead_q}"),
        &[],
    )
    .await;
    assert_eq!(dead.status, StatusCode::OK, "{}", dead.body);
    let letter = &dead.json()["dead_letters"][0];
    assert_eq!(letter["reason"], "dashboard test: malformed");
    assert_eq!(letter["payload"], "not a task");
    assert_eq!(letter["delivery_count"], 1);
    assert_eq!(
        call(&app, "GET", "/api/dead-letters", &[]).await.status,
        StatusCode::BAD_REQUEST
    );

    // Requeue and delete: one letter by id, or all; a selection is required.
    let message_id = letter["message_id"].as_str().unwrap().to_string();
    let none = call(
        &app,
        "POST",
        &format!("/api/dead-letters/{dead_q}/requeue"),
        &[SAME_ORIGIN],
    )
    .await;
    assert_eq!(none.status, StatusCode::BAD_REQUEST, "{}", none.body);
    let requeued = call(
        &app,
        "POST",
        &format!("/api/dead-letters/{dead_q}/requeue?id={message_id}"),
        &[SAME_ORIGIN],
    )
    .await;
    assert_eq!(requeued.status, StatusCode::OK, "{}", requeued.body);
    assert_eq!(
        requeued.json()["outcomes"][0]["outcome"],
        "requeued",
        "{}",
        requeued.body
    );
    assert_eq!(bus.stats(&dead_q).await.unwrap().dead, 0);
    let back = bus.fetch(&dead_q, options).await.unwrap();
    assert_eq!(back.len(), 1, "the requeued message is on its queue again");
    bus.dead_letter(&back[0], "dashboard test: again")
        .await
        .unwrap();
    let deleted = call(
        &app,
        "POST",
        &format!("/api/dead-letters/{dead_q}/delete?all=true"),
        &[SAME_ORIGIN],
    )
    .await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.body);
    assert_eq!(deleted.json()["outcomes"][0]["outcome"], "deleted");
    assert_eq!(bus.stats(&dead_q).await.unwrap().dead, 0);

    // Workers, as they announce themselves.
    let config = WorkerConfig {
        announce_every: Some(Duration::from_millis(200)),
        ..WorkerConfig::default()
    };
    let worker = Worker::new(backends.clone(), config)
        .handle(
            "dash_api_w",
            handler_fn(|_ctx| async { Ok(json!({"ok": true})) }),
        )
        .unwrap()
        .start()
        .unwrap();
    let listed = tokio::time::timeout(PATIENCE, async {
        loop {
            let w = call(&app, "GET", "/api/workers", &[]).await.json();
            if w["workers"].as_array().is_some_and(|a| !a.is_empty()) {
                return w;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the worker heard within the patience");
    assert_eq!(listed["workers"][0]["queues"], json!(["dash_api_w"]));
    worker.shutdown().await;
}

fn on_redis<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Backends) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let prefix = unique_prefix(name);
    let for_test = prefix.clone();
    agent_orchestra::testkit::run_suite_test(
        name,
        async move {
            let url = broker_url(BrokerKind::Redis).await;
            let opts = ConnectOptions {
                prefix: for_test,
                ..ConnectOptions::default()
            };
            test(connect(&BackendUrls::all(url), &opts).await.unwrap()).await;
        },
        async move { support::redis(&prefix).await },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_on_memory() {
    api_behaves(Backends::memory()).await;
}

#[test]
fn api_on_redis() {
    on_redis("dash_api_redis", api_behaves);
}

#[tokio::test]
async fn secrets_in_urls_never_reach_the_page() {
    let options = DashboardOptions::default().with_urls(BackendUrls {
        bus: "redis://user:hunter2@127.0.0.1:6379/0".into(),
        registry: "nats://s3cr3t-token@127.0.0.1:4222".into(),
        locks: "amqp://guest:pa55word@127.0.0.1:5672/%2f?token=tok3n".into(),
    });
    assert!(!format!("{options:?}").contains("hunter2"));
    let app = dashboard::router(Backends::memory(), options);
    let body = call(&app, "GET", "/api/overview", &[]).await.body;
    for secret in ["hunter2", "s3cr3t-token", "pa55word", "tok3n"] {
        assert!(!body.contains(secret), "{secret} in {body}");
    }
    assert!(body.contains("redis://user:***@127.0.0.1:6379/0"), "{body}");
}

#[tokio::test]
async fn with_a_token_actions_need_it_and_other_hosts_may_read() {
    let token = "0123456789abcdef-dashboard";
    let backends = Backends::memory();
    let app = dashboard::router(
        backends.clone(),
        DashboardOptions::default().with_token(token),
    );
    let id = Dispatcher::new(backends).task("tq").send().await.unwrap();
    let host = ("host", "ops.example.com");
    let read = call(&app, "GET", "/api/overview", &[host]).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.json()["token_required"], true);
    let path = format!("/api/tasks/{id}/cancel");
    let origin = ("origin", "http://ops.example.com");
    let no_token = call(&app, "POST", &path, &[host, origin]).await;
    assert_eq!(
        no_token.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        no_token.body
    );
    let wrong = call(
        &app,
        "POST",
        &path,
        &[host, ("x-orchestra-token", "0123456789abcdef-dashboarX")],
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let right = call(&app, "POST", &path, &[host, ("x-orchestra-token", token)]).await;
    assert_eq!(right.status, StatusCode::OK, "{}", right.body);
}

#[tokio::test]
async fn a_short_token_is_refused_with_a_clear_reason() {
    let short = DashboardOptions::default().with_token("short");
    let e = check_listen("127.0.0.1:0".parse().unwrap(), &short).unwrap_err();
    assert!(matches!(e, agent_orchestra::Error::Config { .. }), "{e}");
    assert!(e.to_string().contains("at least 16"), "{e}");
    let app = dashboard::router(Backends::memory(), short);
    let r = call(&app, "GET", "/api/overview", &[]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.body.contains("at least 16"), "{}", r.body);
    let open = DashboardOptions::default();
    let e = check_listen("0.0.0.0:8080".parse().unwrap(), &open).unwrap_err();
    assert!(e.to_string().contains("needs a token"), "{e}");
    assert!(check_listen("[::1]:8080".parse().unwrap(), &open).is_ok());
}

#[tokio::test]
async fn it_mounts_under_a_path_of_a_service() {
    let ops = dashboard::router(Backends::memory(), DashboardOptions::default());
    let app = Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .nest("/ops", ops);
    let page = call(&app, "GET", "/ops", &[]).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        page.body.contains("\"/ops/assets/app.js\""),
        "{}",
        page.body
    );
    assert!(page.body.contains("content=\"/ops/\""), "{}", page.body);
    let alone = dashboard::router(Backends::memory(), DashboardOptions::default());
    let root = call(&alone, "GET", "/", &[]).await;
    assert!(root.body.contains("\"/assets/app.js\""), "{}", root.body);
    assert_eq!(
        call(&app, "GET", "/ops/assets/app.js", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, "GET", "/ops/api/overview", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(call(&app, "GET", "/health", &[]).await.body, "ok");
}

// ---------------------------------------------------------------------------------------------
// The command

fn orchestra() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_orchestra"));
    c.env_remove("ORCHESTRA_DASHBOARD_TOKEN")
        .env_remove("ORCHESTRA_URL")
        .env_remove("ORCHESTRA_CONFIG");
    c
}

#[test]
fn the_command_refuses_a_public_address_without_a_token() {
    let out = orchestra()
        .args(["dashboard", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--token"),
        "{err}"
    );
    let out = orchestra()
        .args(["dashboard", "--listen", "0.0.0.0:0"])
        .env("ORCHESTRA_DASHBOARD_TOKEN", "too-short")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn the_command_serves_the_dashboard_of_a_redis_namespace() {
    use std::io::{BufRead, Read, Write};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("dash_cmd");
    let mut child = orchestra()
        .args([
            "--url",
            &url,
            "--prefix",
            &prefix,
            "dashboard",
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        s,
        "GET /api/overview HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let _ = child.kill();
    let _ = child.wait();
    rt.block_on(support::redis(&prefix));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"backend\":\"redis\""), "{answer}");
}

// ---------------------------------------------------------------------------------------------
// The page in a real browser

#[path = "dashboard/browser.rs"]
mod browser;

#[test]
fn the_page_in_chromium_shows_live_tasks_and_cancels_one() {
    let Some(chromium) = browser::find_chromium() else {
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!("chromium is not installed, and CI must run the browser test: .ci/chromium installs it");
        }
        eprintln!("SKIPPED the_page_in_chromium_shows_live_tasks_and_cancels_one: no chromium on PATH (apt-get install chromium, or run .ci/chromium)");
        return;
    };
    let prefix = unique_prefix("dash_browser");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        browser::scenario(&rt, &chromium, &prefix)
    }));
    rt.block_on(support::redis(&prefix));
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
