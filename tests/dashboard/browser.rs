//! Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
//! JSON messages ended by a NUL byte, written to the browser's fd 3 and read from its fd 4),
//! so no WebSocket client is needed; and the browser scenario of tests/dashboard.rs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agent_orchestra::bus::{FetchOptions, OutgoingMessage};
use agent_orchestra::dashboard::{self, DashboardOptions};
use agent_orchestra::testkit::harness::{broker_url, BrokerKind};
use agent_orchestra::{
    connect, handler_fn, BackendUrls, ConnectOptions, Dispatcher, Priority, QueueName, TaskStatus,
    Worker, WorkerConfig,
};
use serde_json::{json, Value};

use super::PATIENCE;

/// The browser's binary on PATH, if any (Debian names it `chromium`).
pub fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

pub struct Browser {
    child: Child,
    to_browser: std::io::PipeWriter,
    from_browser: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
    /// Console errors, uncaught exceptions and error log entries seen so far.
    pub problems: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    pub fn launch(binary: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let (from_us, to_browser) = std::io::pipe().unwrap();
        let (from_browser, to_us) = std::io::pipe().unwrap();
        let (read_fd, write_fd) = {
            use std::os::fd::AsRawFd;
            (from_us.as_raw_fd(), to_us.as_raw_fd())
        };
        let mut command = Command::new(binary);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-pipe",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: dup2 is async-signal-safe; the new descriptors 3 and 4 are what
        // --remote-debugging-pipe reads and writes (dup2 clears close-on-exec on them).
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(read_fd, 3) < 0 || libc::dup2(write_fd, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start chromium");
        drop(from_us);
        drop(to_us);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from_browser);
            loop {
                let mut message = Vec::new();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                message.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&message) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        let mut browser = Browser {
            child,
            to_browser,
            from_browser: rx,
            next_id: 0,
            session: String::new(),
            problems: Vec::new(),
            _profile: profile,
        };
        let target = browser.call_browser("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = browser.call_browser(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            browser.call(domain, json!({}));
        }
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        );
        browser
    }

    fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            message["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .expect("write to chromium");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self
                .from_browser
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("chromium did not answer {method} ({e})"));
            if m["id"] == json!(id) {
                if let Some(error) = m.get("error") {
                    panic!("{method}: {error}");
                }
                return m["result"].clone();
            }
            self.note_event(&m);
        }
    }

    fn note_event(&mut self, m: &Value) {
        let p = &m["params"];
        match m["method"].as_str() {
            Some("Runtime.exceptionThrown") => self
                .problems
                .push(format!("exception: {}", p["exceptionDetails"])),
            Some("Runtime.consoleAPICalled") if p["type"] == "error" => {
                self.problems.push(format!("console.error: {}", p["args"]))
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => {
                self.problems.push(format!("log: {}", p["entry"]))
            }
            _ => {}
        }
    }

    fn call_browser(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None)
    }

    /// A command to the page.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let session = Some(self.session.clone());
        self.send(method, params, session)
    }

    /// Evaluates `expression` in the page and returns its value (promises awaited).
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page, within the patience.
    pub fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if self.eval(expression) == json!(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let shown = self.eval("document.getElementById('view').innerText");
        panic!("{what}: not seen within {PATIENCE:?}; the page shows: {shown}");
    }

    pub fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }

    pub fn screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Script errors the page itself reported into #js-errors.
    pub fn page_errors(&mut self) -> String {
        self.eval("document.getElementById('js-errors').innerText")
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// Where to write screenshots, when asked.
fn screenshots() -> Option<PathBuf> {
    let dir = std::env::var_os("ORCHESTRA_DASHBOARD_SCREENSHOTS")?;
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    Some(dir)
}

pub fn scenario(rt: &tokio::runtime::Runtime, chromium: &Path, prefix: &str) {
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let opts = ConnectOptions {
        prefix: prefix.to_string(),
        ..ConnectOptions::default()
    };
    let backends = rt
        .block_on(connect(&BackendUrls::all(url.clone()), &opts))
        .unwrap();
    let work = QueueName::parse("dash_work").unwrap();
    let idle = QueueName::parse("dash_idle").unwrap();
    let options = DashboardOptions::default()
        .with_queues([work.clone(), idle.clone()])
        .with_urls(BackendUrls::all(url));
    let app = {
        let _guard = rt.enter();
        dashboard::router(backends.clone(), options)
    };
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}/", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await });
    let dispatcher = Dispatcher::new(backends.clone());

    let mut b = Browser::launch(chromium);

    // A dispatched task shows, PENDING, with no worker on its queue yet.
    let first = rt
        .block_on(
            dispatcher
                .task(work.as_str())
                .payload(&json!({"n": 1}))
                .send(),
        )
        .unwrap();
    b.open(&format!("{base}#/tasks?queue={work}"));
    let row = format!("document.querySelector('tr[data-task-id=\"{first}\"]')");
    b.wait_for(
        "the dispatched task",
        &format!("!!{row} && {row}.innerText.includes('PENDING')"),
    );
    b.eval("window.__sameLoad = 42; true");

    // A worker completes it: the row turns COMPLETED by the event stream, without a reload.
    let config = WorkerConfig {
        announce_every: Some(Duration::from_millis(500)),
        ..WorkerConfig::default()
    };
    let worker = {
        let _guard = rt.enter();
        Worker::new(backends.clone(), config)
            .handle(
                work.as_str(),
                handler_fn(|ctx| async move {
                    if ctx.task.payload["hold"] == json!(true) {
                        // Runs until cancelled (the cancel click below).
                        ctx.cancelled().await;
                        return Ok(json!("cancelled"));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(json!({"echo": ctx.task.payload.clone()}))
                }),
            )
            .unwrap()
            .start()
            .unwrap()
    };
    b.wait_for(
        "the task COMPLETED, live",
        &format!("!!{row} && {row}.innerText.includes('COMPLETED') && window.__sameLoad === 42"),
    );
    assert_eq!(
        rt.block_on(dispatcher.get(&first)).unwrap().status(),
        TaskStatus::Completed
    );

    // A cancel click cancels a pending task (its queue has no worker).
    let victim = rt
        .block_on(
            dispatcher
                .task(idle.as_str())
                .payload(&json!({"cancel": "me"}))
                .send(),
        )
        .unwrap();
    b.open(&format!("{base}#/task/{victim}"));
    let button =
        format!("document.querySelector('button[data-action=\"cancel\"][data-task=\"{victim}\"]')");
    b.wait_for("the cancel button", &format!("!!{button}"));
    b.eval(&format!("{button}.click(); true"));
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = rt.block_on(dispatcher.get(&victim)).unwrap().status();
        if status == TaskStatus::Cancelled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the click did not cancel {victim}: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.wait_for(
        "the page shows it CANCELLED",
        "document.getElementById('task-detail')?.dataset.status === 'CANCELLED'",
    );

    // A cancel click cancels a RUNNING task: its handler hears it and the task ends CANCELLED.
    let held = rt
        .block_on(
            dispatcher
                .task(work.as_str())
                .payload(&json!({"hold": true}))
                .send(),
        )
        .unwrap();
    b.open(&format!("{base}#/task/{held}"));
    let button =
        format!("document.querySelector('button[data-action=\"cancel\"][data-task=\"{held}\"]')");
    b.wait_for(
        "the running task with its cancel button",
        &format!(
            "document.getElementById('task-detail')?.dataset.status === 'RUNNING' && !!{button}"
        ),
    );
    b.eval(&format!("{button}.click(); true"));
    b.wait_for(
        "the page shows the running task CANCELLED",
        "document.getElementById('task-detail')?.dataset.status === 'CANCELLED'",
    );
    let deadline = Instant::now() + PATIENCE;
    while worker.metrics().cancelled != 1 {
        assert!(
            Instant::now() < deadline,
            "the worker did not end the cancelled attempt"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every page renders (some work for the chart, a dead letter to inspect).
    rt.block_on(async {
        for n in 0..40 {
            dispatcher
                .task(work.as_str())
                .payload(&json!({"n": n}))
                .send()
                .await
                .unwrap();
        }
        let dead = QueueName::parse("dash_idle").unwrap();
        let bus = &backends.bus;
        bus.enqueue(
            &dead,
            OutgoingMessage::new(b"{\"not\":\"a task\"}".to_vec(), Priority::DEFAULT),
        )
        .await
        .unwrap();
        let options = FetchOptions {
            max: 10,
            wait: Duration::from_secs(5),
            lease: Duration::from_secs(30),
        };
        for d in bus.fetch(&dead, options).await.unwrap() {
            if !d.payload.starts_with(b"{\"task_id\"") {
                bus.dead_letter(&d, "malformed message: expected {\"task_id\": \"...\"}")
                    .await
                    .unwrap();
            } else {
                bus.nack(&d, Duration::ZERO).await.unwrap();
            }
        }
    });
    let shots = screenshots();
    for (page, ready) in [
        ("overview", "!!document.getElementById('count-COMPLETED') && document.getElementById('count-COMPLETED').innerText !== '0'"),
        ("queues", "!!document.querySelector('#queues tr[data-queue]')"),
        ("workers", "!!document.querySelector('#workers tr[data-worker]')"),
        ("tasks", "!!document.querySelector('#tasks tr[data-task-id]')"),
        ("dead-letters", "!!document.querySelector('#dead-letters td')"),
    ] {
        b.open(&format!("{base}#/{page}"));
        b.wait_for(page, &format!("document.body.dataset.page === '{page}' && {ready}"));
        if let Some(dir) = &shots {
            std::thread::sleep(Duration::from_millis(300));
            b.screenshot(&dir.join(format!("dashboard-{page}.png")));
        }
    }
    // A requeue click puts the dead letter back on its queue.
    b.open(&format!("{base}#/dead-letters?queue={idle}"));
    let requeue = "document.querySelector('#dead-letters button[data-action=\"requeue\"]')";
    b.wait_for("the requeue button", &format!("!!{requeue}"));
    b.eval(&format!("{requeue}.click(); true"));
    let deadline = Instant::now() + PATIENCE;
    while rt.block_on(backends.bus.stats(&idle)).unwrap().dead != 0 {
        assert!(
            Instant::now() < deadline,
            "the click did not requeue the dead letter"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.wait_for(
        "the page shows the dead letter gone",
        "document.getElementById('view').innerText.includes('No dead letter on dash_idle')",
    );

    b.open(&format!("{base}#/task/{first}"));
    b.wait_for(
        "the task's detail",
        "document.getElementById('payload')?.innerText.includes('\"n\": 1')",
    );
    let result = b.eval("document.getElementById('result').innerText");
    assert!(result.as_str().unwrap().contains("echo"), "{result}");
    if let Some(dir) = &shots {
        b.screenshot(&dir.join("dashboard-task.png"));
    }

    // No script error, neither reported by the page nor seen by the browser.
    let reported = b.page_errors();
    assert!(reported.trim().is_empty(), "the page reported: {reported}");
    b.eval("true"); // drain the events that arrived
    assert!(b.problems.is_empty(), "the browser saw: {:#?}", b.problems);
    drop(b);
    rt.block_on(worker.shutdown());
}
