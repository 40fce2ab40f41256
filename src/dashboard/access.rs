//! Who may read and who may act (see the module doc of [`dashboard`](super)).

use std::net::IpAddr;

use axum::http::{header, HeaderMap, Method, StatusCode};

/// The header a state-changing request carries the token in.
pub(crate) const TOKEN_HEADER: &str = "x-orchestra-token";

/// Why a request is refused: its status and a message for the page.
pub(crate) type Refusal = (StatusCode, String);

/// Checks a request against the dashboard's token (if any).
pub(crate) fn check(
    method: &Method,
    headers: &HeaderMap,
    token: Option<&str>,
) -> Result<(), Refusal> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let reads = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    match token {
        None => {
            if !is_loopback_host(host) {
                return Err((
                    StatusCode::FORBIDDEN,
                    format!(
                        "this dashboard has no token, so it answers only on a loopback host (localhost, 127.0.0.1, [::1]), not {host:?}: give it a token to serve it elsewhere"
                    ),
                ));
            }
            if reads || same_origin(headers, host) {
                Ok(())
            } else {
                Err((
                    StatusCode::FORBIDDEN,
                    "refused: a state-changing request must come from the dashboard's own page (same-origin Origin or Sec-Fetch-Site) or carry the token".into(),
                ))
            }
        }
        Some(expected) => {
            if reads {
                return Ok(());
            }
            let given = headers
                .get(TOKEN_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or(b"");
            if constant_time_eq(given, expected.as_bytes()) {
                Ok(())
            } else {
                Err((
                    StatusCode::UNAUTHORIZED,
                    format!("this action needs the dashboard's token in the {TOKEN_HEADER} header"),
                ))
            }
        }
    }
}

/// True for `localhost`, `127.x.y.z`, `[::1]`, with or without a port.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, tail)) if tail.is_empty() || tail.starts_with(':') => ip,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn same_origin(headers: &HeaderMap, host: &str) -> bool {
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        return origin == format!("http://{host}") || origin == format!("https://{host}");
    }
    headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"same-origin")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn loopback_hosts_are_recognised() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "127.9.9.9",
            "[::1]:80",
            "[::1]",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "",
            "evil.example:8080",
            "10.0.0.1:80",
            "[::2]:1",
            "localhost:80x",
            "127.0.0.1.evil.example",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn without_a_token_only_loopback_hosts_and_same_origin_actions_pass() {
        let get = Method::GET;
        let post = Method::POST;
        assert!(check(&get, &headers(&[("host", "127.0.0.1:8080")]), None).is_ok());
        // DNS rebinding: a page of evil.example resolved to 127.0.0.1.
        let e = check(&get, &headers(&[("host", "evil.example:8080")]), None).unwrap_err();
        assert_eq!(e.0, StatusCode::FORBIDDEN);
        assert!(check(&post, &headers(&[("host", "127.0.0.1:8080")]), None).is_err());
        let cross = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://evil.example"),
        ]);
        assert!(check(&post, &cross, None).is_err());
        let own = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ]);
        assert!(check(&post, &own, None).is_ok());
        let fetch = headers(&[
            ("host", "localhost:8080"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert!(check(&post, &fetch, None).is_ok());
    }

    #[test]
    fn with_a_token_actions_need_it_and_any_host_may_read() {
        let t = Some("0123456789abcdef");
        assert!(check(&Method::GET, &headers(&[("host", "ops.example")]), t).is_ok());
        let own = headers(&[("host", "ops.example"), ("origin", "http://ops.example")]);
        assert_eq!(
            check(&Method::POST, &own, t).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        let wrong = headers(&[("host", "ops.example"), (TOKEN_HEADER, "0123456789abcdeX")]);
        assert!(check(&Method::POST, &wrong, t).is_err());
        let right = headers(&[("host", "ops.example"), (TOKEN_HEADER, "0123456789abcdef")]);
        assert!(check(&Method::POST, &right, t).is_ok());
    }
}
