//! The web console on the admin listener's `/`: server-rendered pages over the same functions
//! as the JSON admin API (`crate::admin`), so the two cannot disagree.
//!
//! # Layout
//! - [`session`]: the signed session cookie, CSRF tokens and `serve`'s one-time sign-in link.
//! - `signin`: signing in (token or link) and out; `throttle`: sign-in attempts per client.
//! - this file: routes, the session and CSRF checks, security headers, the embedded assets.
//! - `agents`: the agent list and the agent form.
//! - `deploy`: an agent's WhatsApp channel on Twilio, its URLs, steps and health.
//! - `chat`: Test chat, through the real pipeline with the channel in simulation mode.
//! - `people`: Leads and Conversations (with live transcripts over server-sent events).
//! - `dead_letters`: Dead letters and their replay.
//! - `lifecycle`: Forget conversation, Erase (a lead) and Delete agent.
//!
//! Every page is an askama template under `templates/` (escaped by default); the only script is
//! `assets/console.js`, served from this origin, so the Content-Security-Policy allows no inline
//! script at all. Every POST carries the session's CSRF token, checked before any handler runs.

mod agents;
mod chat;
mod dead_letters;
mod deploy;
mod handoff;
mod lifecycle;
mod people;
pub mod session;
mod signin;
mod throttle;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use askama::Template;
use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{Html, IntoResponse, Redirect, Response},
    routing::get,
};
use secrecy::SecretString;
use store::{SignatureFailure, Store};
use time::OffsetDateTime;

use crate::{AppState, admin::ApiError};
use session::{Session, SessionKey};

const COOKIE: &str = "wagate_console";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
/// Largest form the console takes (an agent's system prompt is the longest field).
const MAX_FORM: usize = 64 * 1024;

/// State of the console that lives in one process: the sign-in tickets already used, so that
/// the link `serve` prints works once; sign-in attempts per client; and when this process last
/// stored each agent's signature failure (the failures themselves are in the store, for
/// every process's console).
#[derive(Clone, Default)]
pub struct ConsoleState {
    used_tickets: Arc<Mutex<HashSet<String>>>,
    /// Sign-in attempts per client, in this process.
    sign_in_limit: Arc<throttle::SignInLimit>,
    /// When this process last wrote each agent's signature failure to the store.
    signature_failures_noted: Arc<Mutex<HashMap<String, Instant>>>,
}

/// How often one process writes an agent's signature failure to the store, at most: a flood
/// of forged webhooks stays a trickle of writes, and Deploy's "last signature failure" is at
/// most this much older than the last one.
const SIGNATURE_FAILURE_WRITES: Duration = Duration::from_secs(10);

impl ConsoleState {
    /// Notes that a webhook of `agent` was refused for its signature, checked against
    /// `signed_url`: stored for Deploy's channel health, unless this process stored one for the
    /// agent in the last [`SIGNATURE_FAILURE_WRITES`]. The write runs in the background, so the
    /// refusal does not wait on the store.
    pub fn note_signature_failure(
        &self,
        store: &Arc<dyn Store>,
        agent: &wagate_core::domain::AgentId,
        signed_url: &str,
    ) {
        let now = Instant::now();
        let due = self.signature_failures_noted.lock().is_ok_and(|mut noted| {
            match noted.get(agent.as_str()) {
                Some(last) if now.duration_since(*last) < SIGNATURE_FAILURE_WRITES => false,
                _ => {
                    noted.insert(agent.to_string(), now);
                    true
                }
            }
        });
        if !due {
            return;
        }
        let failure = SignatureFailure {
            at: OffsetDateTime::now_utc(),
            signed_url: wagate_core::redact::text(signed_url),
        };
        let (store, agent) = (store.clone(), agent.clone());
        tokio::spawn(async move {
            if let Err(e) = store.note_signature_failure(&agent, &failure).await {
                tracing::warn!(agent = %agent, error = %e, "could not store a signature failure");
            }
        });
    }
}

/// The console's routes, to merge into the admin router.
pub fn routes(state: AppState) -> Router<AppState> {
    let signed_in = Router::new()
        .route("/", get(|| async { Redirect::to("/agents") }))
        .merge(signin::sign_out_route())
        .merge(agents::routes())
        .merge(deploy::routes())
        .merge(chat::routes())
        .merge(people::routes())
        .merge(dead_letters::routes())
        .merge(lifecycle::routes())
        .merge(handoff::routes())
        .route_layer(middleware::from_fn_with_state(state, require_session));
    Router::new()
        .merge(signin::routes())
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .merge(signed_in)
        .layer(middleware::map_response(security_headers))
}

/// The link `serve` prints at start to sign in without typing the token, as Jupyter does: it
/// carries a ticket that works once, for [`session::TICKET_TTL`], in this process. `None` when
/// the admin API is disabled.
pub fn sign_in_link(state: &AppState, admin_base: &str) -> Option<String> {
    let key = session_key(state)?;
    let ticket = key.new_ticket(OffsetDateTime::now_utc());
    Some(format!("{admin_base}/signin/link?ticket={ticket}"))
}

fn session_key(state: &AppState) -> Option<SessionKey> {
    let token: &SecretString = state.admin_token.as_deref()?;
    Some(SessionKey::new(&state.keyring, token))
}

/// What a signed-in page knows: the CSRF token its forms carry.
#[derive(Clone)]
pub(crate) struct SignedIn {
    pub(crate) csrf: String,
}

/// What the page layout (`base.html`) shows.
pub(crate) struct Layout {
    /// The page's title.
    pub(crate) title: String,
    /// Signed in: the CSRF token of the Sign out form, and the navigation is shown.
    pub(crate) csrf: Option<String>,
}

impl Layout {
    pub(crate) fn new(title: impl Into<String>, who: &SignedIn) -> Self {
        Self {
            title: title.into(),
            csrf: Some(who.csrf.clone()),
        }
    }
}

/// Renders a page.
pub(crate) fn page(template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a console page did not render");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page did not render").into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    layout: Layout,
    message: &'a str,
}

/// An error of the admin logic as a page: its status and its message, which never holds a
/// secret.
pub(crate) fn error_page(who: &SignedIn, e: &ApiError) -> Response {
    let mut r = page(&ErrorPage {
        layout: Layout::new("Error", who),
        message: e.message(),
    });
    *r.status_mut() = e.status();
    r
}

/// A time as the pages show it: UTC, to the second.
pub(crate) fn shown_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// Whether the browser reached the console over HTTPS (directly or through a proxy that says
/// so), for the cookie's `Secure` attribute.
fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .next()
                .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
        })
}

fn set_cookie(headers: &HeaderMap, value: &str, max_age: i64) -> HeaderValue {
    let secure = if over_https(headers) { "; Secure" } else { "" };
    let text =
        format!("{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Lets a request through only with a current session; a POST also needs the session's CSRF
/// token, as the form field `csrf` (the body is read here, up to [`MAX_FORM`], and handed on).
async fn require_session(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let now = OffsetDateTime::now_utc();
    let key = session_key(&state);
    let session = key
        .as_ref()
        .zip(cookie_value(request.headers()))
        .and_then(|(key, cookie)| key.session(cookie, now));
    let (Some(key), Some(session)) = (key, session) else {
        return if request.method() == Method::GET {
            Redirect::to("/signin").into_response()
        } else {
            (StatusCode::UNAUTHORIZED, "Sign in first").into_response()
        };
    };
    let request = if request.method() == Method::GET || request.method() == Method::HEAD {
        request
    } else {
        let (parts, body) = request.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
            return (StatusCode::PAYLOAD_TOO_LARGE, "The form is too large").into_response();
        };
        let token = form_urlencoded_field(&bytes, "csrf").unwrap_or_default();
        if !key.check_csrf(&session, &token) {
            tracing::warn!("console form refused: missing or wrong CSRF token");
            return (
                StatusCode::FORBIDDEN,
                "The form has expired or did not come from this console: reload the page",
            )
                .into_response();
        }
        Request::from_parts(parts, axum::body::Body::from(bytes))
    };
    let mut request = request;
    request.extensions_mut().insert(SignedIn {
        csrf: key.csrf_token(&session),
    });
    request.extensions_mut().insert::<Session>(session);
    next.run(request).await
}

fn form_urlencoded_field(body: &[u8], name: &str) -> Option<String> {
    twilio::form::parse(body)
        .ok()?
        .into_iter()
        .find_map(|(k, v)| (k == name).then_some(v))
}

/// Headers of every console answer: the CSP, no framing, no sniffing, no referrer (URLs carry
/// agent ids and phone numbers), and no caching of pages that show customer data.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    )
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let h = headers(&[
            ("cookie", "a=1; wagate_console_x=no"),
            ("cookie", "b=2;wagate_console=yes; c=3"),
        ]);
        assert_eq!(cookie_value(&h), Some("yes"));
        assert_eq!(
            cookie_value(&headers(&[("cookie", "wagate_consolex=1")])),
            None
        );
        assert_eq!(cookie_value(&HeaderMap::new()), None);
    }

    #[test]
    fn the_cookie_is_secure_only_over_https() {
        let plain = set_cookie(&HeaderMap::new(), "v", 60);
        let plain = plain.to_str().unwrap();
        assert_eq!(
            plain,
            "wagate_console=v; Path=/; Max-Age=60; HttpOnly; SameSite=Strict"
        );
        for proto in ["https", "HTTPS", "https, http"] {
            let h = headers(&[("x-forwarded-proto", proto)]);
            assert!(
                set_cookie(&h, "v", 60)
                    .to_str()
                    .unwrap()
                    .ends_with("; Secure")
            );
        }
        let h = headers(&[("x-forwarded-proto", "http, https")]);
        assert!(!set_cookie(&h, "v", 60).to_str().unwrap().contains("Secure"));
    }

    #[test]
    fn the_csrf_field_is_read_from_a_form() {
        assert_eq!(
            form_urlencoded_field(b"a=1&csrf=abc%20d&csrf=second", "csrf").as_deref(),
            Some("abc d")
        );
        assert_eq!(form_urlencoded_field(b"a=1", "csrf"), None);
        assert_eq!(form_urlencoded_field(&[0xff, 0xfe], "csrf"), None);
    }
}
