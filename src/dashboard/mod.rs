//! The web dashboard (feature `dashboard`): a live view of a namespace in a browser, served by
//! axum, with its page, script and styles embedded in the binary (no CDN, no build step).
//!
//! [`router`] returns an [`axum::Router`] to serve alone (`orchestra dashboard`) or to mount in
//! a service's own router:
//!
//! ```no_run
//! use agent_orchestra::dashboard::{self, DashboardOptions};
//! use agent_orchestra::Backends;
//!
//! # async fn run(backends: Backends) -> Result<(), Box<dyn std::error::Error>> {
//! let ops = dashboard::router(
//!     backends,
//!     DashboardOptions::default().with_token("a long random string, 16+ chars"),
//! );
//! let app = axum::Router::new().nest("/ops", ops); // the dashboard at /ops
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! What it serves (relative to where it is mounted): the page at `/`, JSON under `/api/`
//! (overview, queues, workers, tasks, a task's detail, dead letters, and the actions: cancel
//! and retry a task), a server-sent event stream of the bus's task events at `/api/stream`,
//! and the backend gauges at `/metrics` (OpenMetrics text).
//!
//! **Access.** Without a token the dashboard answers only requests whose `Host` is a loopback
//! name (`localhost`, `127.0.0.1`, `[::1]`), which also defeats DNS rebinding, and accepts a
//! state-changing request only from its own page (same-origin `Origin` or
//! `Sec-Fetch-Site: same-origin`). With a token ([`DashboardOptions::with_token`]) any host
//! may read, and every state-changing request must carry the token in the
//! `X-Orchestra-Token` header (a cross-site page cannot send that header). [`check_listen`]
//! refuses a non-loopback address without a token. The page shows payloads and results to
//! whoever can read it; URLs are shown with their secrets redacted.

mod access;
mod api;
mod assets;
mod live;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::connect::BackendUrls;
use crate::error::{Error, Result};
use crate::model::QueueName;
use crate::Backends;

/// The shortest token [`check_listen`] and [`router`] accept.
pub const MIN_TOKEN_LEN: usize = 16;

/// How a dashboard is set up.
#[derive(Clone, Default)]
pub struct DashboardOptions {
    token: Option<String>,
    /// Queues shown from the start; others appear when the dashboard hears of them (a task
    /// event, a worker's announcement).
    pub queues: Vec<QueueName>,
    /// The URLs of the three roles, shown on the overview with their secrets redacted.
    pub urls: Option<BackendUrls>,
}

impl std::fmt::Debug for DashboardOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DashboardOptions")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("queues", &self.queues)
            .field("urls", &self.urls.as_ref().map(redacted_urls))
            .finish()
    }
}

impl DashboardOptions {
    /// The token state-changing requests must carry (header `X-Orchestra-Token`). With one,
    /// the dashboard answers any `Host`; without, only loopback ones.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Queues to show from the start.
    pub fn with_queues(mut self, queues: impl IntoIterator<Item = QueueName>) -> Self {
        self.queues.extend(queues);
        self
    }

    /// The roles' URLs, shown redacted on the overview.
    pub fn with_urls(mut self, urls: BackendUrls) -> Self {
        self.urls = Some(urls);
        self
    }

    /// The token, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Checks the token's length ([`MIN_TOKEN_LEN`]) and characters (visible ASCII, as an HTTP
    /// header carries it).
    pub fn validate(&self) -> Result<()> {
        let Some(t) = &self.token else { return Ok(()) };
        if t.chars().count() < MIN_TOKEN_LEN {
            return Err(Error::Config {
                key: "dashboard.token".into(),
                reason: format!(
                    "must have at least {MIN_TOKEN_LEN} characters, has {}",
                    t.chars().count()
                ),
            });
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Config {
                key: "dashboard.token".into(),
                reason:
                    "must be visible ASCII characters (no spaces), as an HTTP header carries it"
                        .into(),
            });
        }
        Ok(())
    }
}

fn redacted_urls(u: &BackendUrls) -> BackendUrls {
    BackendUrls {
        bus: crate::redact_url(&u.bus),
        registry: crate::redact_url(&u.registry),
        locks: crate::redact_url(&u.locks),
    }
}

/// Refuses to serve on `addr` when it is not a loopback address and there is no token (or a
/// token [`DashboardOptions::validate`] refuses): [`Error::Config`] saying what to do.
///
/// ```
/// use agent_orchestra::dashboard::{check_listen, DashboardOptions};
/// let open = DashboardOptions::default();
/// assert!(check_listen("127.0.0.1:8080".parse().unwrap(), &open).is_ok());
/// assert!(check_listen("0.0.0.0:8080".parse().unwrap(), &open).is_err());
/// let locked = open.with_token("0123456789abcdef-secret");
/// assert!(check_listen("0.0.0.0:8080".parse().unwrap(), &locked).is_ok());
/// ```
pub fn check_listen(addr: SocketAddr, options: &DashboardOptions) -> Result<()> {
    options.validate()?;
    if options.token.is_none() && !addr.ip().is_loopback() {
        return Err(Error::Config {
            key: "dashboard.listen".into(),
            reason: format!(
                "{addr} is not a loopback address: serving the dashboard there needs a token (--token, or ORCHESTRA_DASHBOARD_TOKEN), which every state-changing request must carry"
            ),
        });
    }
    Ok(())
}

/// The dashboard over `backends`, as a router to serve or to mount (`nest`) in a service's
/// own. Call it inside a tokio runtime: it starts a task that listens to the bus's task
/// events and worker announcements for the live view (it ends when the router and its clones
/// are dropped). A token that [`DashboardOptions::validate`] refuses makes every request
/// answer 500 with the reason: check it first, or use [`check_listen`].
pub fn router(backends: Backends, options: DashboardOptions) -> axum::Router {
    let valid = options.validate().map_err(|e| e.to_string());
    let shared = Arc::new(live::Shared::new(backends, options));
    shared.start();
    api::routes(shared, valid)
}
