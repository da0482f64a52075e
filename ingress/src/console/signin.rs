//! Signing in and out. The token is compared in constant time, as the API compares it; a
//! wrong one gets the form again with a 401 and no cookie, and a client that tries too often
//! gets 429 ([`super::throttle`]). Signing in with `serve`'s link
//! works once per ticket, in the process that printed it.

use askama::Template;
use axum::{
    Extension, Form, Router,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use secrecy::SecretString;
use serde::Deserialize;
use time::OffsetDateTime;

use super::{
    Layout, SignedIn, cookie_value, session,
    session::SessionKey,
    session_key, set_cookie,
    throttle::{self, ClientIp},
};
use crate::AppState;

/// The sign-in routes, open to everyone.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/signin", get(page).post(sign_in))
        .route("/signin/link", get(with_ticket))
}

/// Sign out, behind the session and CSRF checks like every form.
pub(super) fn sign_out_route() -> Router<AppState> {
    Router::new().route("/signout", post(sign_out))
}

#[derive(Template)]
#[template(path = "signin.html")]
struct SignInPage {
    layout: Layout,
    failed: bool,
    disabled: bool,
    throttled: bool,
    wait_seconds: u64,
}

fn sign_in_form(state: &AppState, failed: bool) -> Response {
    form_page(state, failed, false)
}

fn form_page(state: &AppState, failed: bool, throttled: bool) -> Response {
    super::page(&SignInPage {
        layout: Layout {
            title: "Sign in".into(),
            csrf: None,
        },
        failed,
        disabled: state.admin_token.is_none(),
        throttled,
        wait_seconds: throttle::PERIOD.as_secs(),
    })
}

/// 429 with the form and why, and when to try again.
fn too_many_attempts(state: &AppState) -> Response {
    let mut r = form_page(state, false, true);
    *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    r.headers_mut()
        .insert(header::RETRY_AFTER, throttle::PERIOD.as_secs().into());
    r
}

async fn page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let now = OffsetDateTime::now_utc();
    let signed_in = session_key(&state)
        .zip(cookie_value(&headers))
        .is_some_and(|(key, cookie)| key.session(cookie, now).is_some());
    if signed_in {
        return Redirect::to("/agents").into_response();
    }
    sign_in_form(&state, false)
}

#[derive(Deserialize)]
struct SignInForm {
    token: SecretString,
}

fn start_session(key: &SessionKey, headers: &HeaderMap) -> Response {
    let cookie = key.new_session(OffsetDateTime::now_utc());
    let mut r = Redirect::to("/agents").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(headers, &cookie, session::SESSION_TTL.whole_seconds()),
    );
    r
}

/// Signs in with the admin token, compared in constant time as the API compares it, unless
/// the client has tried too often ([`throttle`]): then 429, the token unread.
async fn sign_in(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    use secrecy::ExposeSecret;
    if !state.console.sign_in_limit.attempt(ip) {
        tracing::warn!("console: sign-in attempts over the limit were refused");
        return too_many_attempts(&state);
    }
    let given = form.token.expose_secret().trim();
    match session_key(&state) {
        Some(key) if crate::admin::is_admin_token(&state, given) => {
            tracing::info!("console: signed in");
            start_session(&key, &headers)
        }
        _ => {
            tracing::warn!("console: a sign-in with a wrong admin token was refused");
            let mut r = sign_in_form(&state, true);
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r
        }
    }
}

#[derive(Deserialize)]
struct TicketQuery {
    ticket: String,
}

/// Signs in with the ticket of `serve`'s start link, once.
async fn with_ticket(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<TicketQuery>,
) -> Response {
    let Some(key) = session_key(&state) else {
        return sign_in_form(&state, true);
    };
    let fresh = key
        .ticket(&q.ticket, OffsetDateTime::now_utc())
        .is_some_and(|nonce| {
            state
                .console
                .used_tickets
                .lock()
                .is_ok_and(|mut used| used.insert(nonce))
        });
    if fresh {
        start_session(&key, &headers)
    } else {
        let mut r = sign_in_form(&state, true);
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        r
    }
}

/// Signs out: the browser drops the cookie. The session is stateless (see [`session`]), so a
/// copy of the cookie taken earlier stays valid until it expires; rotating the admin token ends
/// every session.
async fn sign_out(headers: HeaderMap, Extension(_): Extension<SignedIn>) -> Response {
    let mut r = Redirect::to("/signin").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&headers, "", 0));
    r
}
