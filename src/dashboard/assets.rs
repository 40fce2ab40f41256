//! The page, its script and styles, compiled into the binary.

use axum::extract::OriginalUri;
use axum::http::Uri;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");
const ICON: &str = include_str!("assets/icon.svg");

/// Only the dashboard's own files run: no inline script, nothing from elsewhere, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    asset_owned(body.to_string(), content_type)
}

fn asset_owned(body: String, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// The page, with the path it is served under (`/`, or `/ops/` when a service nests it at
/// `/ops`) written into its links, so that its files and API are found wherever it is mounted.
pub(crate) async fn index(OriginalUri(original): OriginalUri, uri: Uri) -> Response {
    let inner = uri.path();
    let outer = original.path();
    let prefix = if matches!(inner, "" | "/") {
        outer.trim_end_matches('/')
    } else {
        outer.strip_suffix(inner).unwrap_or("")
    };
    // A path holds no quote or angle bracket once percent-encoded, but escape anyway.
    let base: String = format!("{prefix}/")
        .chars()
        .map(|c| match c {
            '"' | '<' | '>' | '&' | '\'' => '_',
            c => c,
        })
        .collect();
    let mut r = asset_owned(INDEX.replace("{{BASE}}", &base), "text/html; charset=utf-8");
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

pub(crate) async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

pub(crate) async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

pub(crate) async fn icon() -> Response {
    asset(ICON, "image/svg+xml")
}

/// Anything else: not found (but the page, should a nested root be routed here).
pub(crate) async fn fallback(original: OriginalUri, uri: Uri) -> Response {
    if matches!(uri.path(), "" | "/") {
        return index(original, uri).await;
    }
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}
