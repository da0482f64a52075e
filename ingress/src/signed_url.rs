//! The URL that Twilio signed: the configured public base URL followed by the request's path
//! and query exactly as they arrived (no decoding, no normalisation: Twilio signs the bytes it
//! requested). Without a public URL, the base comes from `X-Forwarded-Proto` and `Host`, which
//! is right behind a proxy that forwards both.

use axum::http::{HeaderMap, Uri};

/// The full URL as Twilio requested it.
pub fn signed_url(public_base: Option<&str>, headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    match public_base {
        Some(base) => Some(format!("{base}{path_and_query}")),
        None => {
            let host = headers.get(axum::http::header::HOST)?.to_str().ok()?;
            let proto = headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .map(str::trim)
                .filter(|p| *p == "https" || *p == "http")
                .unwrap_or("http");
            Some(format!("{proto}://{host}{path_and_query}"))
        }
    }
}

/// The scheme and authority of `url` (`https://bot.example.com:8443`), without path or query.
pub fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find(['/', '?', '#']) {
        Some(end) => &url[..after_scheme + end],
        None => url,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_query_verbatim() {
        let uri: Uri = "/webhooks/twilio/whatsapp/a?x=It's&y=%27".parse().unwrap();
        let h = HeaderMap::new();
        assert_eq!(
            signed_url(Some("https://bot.example.com"), &h, &uri).unwrap(),
            "https://bot.example.com/webhooks/twilio/whatsapp/a?x=It's&y=%27"
        );
    }

    #[test]
    fn falls_back_to_forwarded_headers() {
        let uri: Uri = "/w".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("host", "bot.example.com:8443".parse().unwrap());
        h.insert("x-forwarded-proto", "https, http".parse().unwrap());
        assert_eq!(
            signed_url(None, &h, &uri).unwrap(),
            "https://bot.example.com:8443/w"
        );
        assert!(signed_url(None, &HeaderMap::new(), &uri).is_none());
    }

    #[test]
    fn the_origin_is_scheme_and_authority() {
        assert_eq!(
            origin("https://bot.example.com:8443/webhooks/x?y=1"),
            "https://bot.example.com:8443"
        );
        assert_eq!(origin("http://h?q"), "http://h");
        assert_eq!(origin("http://h"), "http://h");
    }
}
