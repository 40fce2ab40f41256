//! Secrets in URLs: hidden in every log line and error message that shows a URL.

use url::Url;

/// The URL with its password (or, without one, its user part: a NATS token), and any
/// `token`/`password`/`pass`/`secret`/`nkey`/`jwt` query value, replaced by
/// `***`. Used in every log line and error message that shows a URL.
///
/// ```
/// use agent_orchestra::redact_url;
/// assert_eq!(redact_url("redis://user:hunter2@host:6379/0"), "redis://user:***@host:6379/0");
/// assert_eq!(redact_url("nats://host:4222?token=abc"), "nats://host:4222?token=***");
/// assert_eq!(redact_url("tls://s3cr3t@host:4222"), "tls://***@host:4222");
/// assert_eq!(redact_url("nats://s3cr3t@host:4222"), "nats://***@host:4222");
/// assert_eq!(
///     redact_url("redis+cluster://u:pw@h1:7000,h2:7001"),
///     "redis+cluster://u:***@h1:7000,h2:7001"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        // Not parseable (such as a Redis Cluster URL with its seed list, `host:port,host:port`):
        // hide the password between "://" and the last '@' (or all of it, when there is no
        // `user:` before it), and any secret in the query.
        let hidden = match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
                Some((user, _)) if !user.is_empty() => {
                    format!("{}{user}:***{}", &url[..s + 3], &url[at..])
                }
                _ => format!("{}***{}", &url[..s + 3], &url[at..]),
            },
            _ => url.to_string(),
        };
        return match hidden.split_once('?') {
            Some((base, query)) if !query.is_empty() => {
                let fake = format!("x://h?{query}");
                match Url::parse(&fake) {
                    Ok(_) => {
                        let q = redact_url(&fake);
                        format!("{base}?{}", q.split_once('?').map_or("", |(_, q)| q))
                    }
                    Err(_) => hidden,
                }
            }
            _ => hidden,
        };
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    } else if !parsed.username().is_empty() {
        // A user part without a password may be a secret itself: a NATS token
        // (nats://TOKEN@host, tls://TOKEN@host), or a password written where the user goes.
        let _ = parsed.set_username("***");
    }
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| {
            let secret = matches!(
                k.to_ascii_lowercase().as_str(),
                "token" | "password" | "pass" | "secret" | "nkey" | "jwt"
            );
            (
                k.into_owned(),
                if secret { "***".into() } else { v.into_owned() },
            )
        })
        .collect();
    if !pairs.is_empty() {
        let q: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parsed.set_query(Some(&q.join("&")));
    }
    parsed.to_string()
}
