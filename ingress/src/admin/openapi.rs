//! `GET /v1/openapi.json`: the admin API's OpenAPI 3.1 description, generated from the code.
//!
//! Each handler carries its `#[utoipa::path]` (method, path, parameters, body, answers) and the
//! request and answer types derive their schemas, so the description follows the code; the
//! router and the description are built in one go ([`super::api`]). What every call shares is
//! added here once, so that no operation can leave it out: the bearer token, the 401 without
//! it, the 400 of a path, query or body that does not parse, the 413 of a body over the limit,
//! and the 503 of a store or bus that is away.

use std::sync::LazyLock;

use axum::{http::header, response::IntoResponse};
use utoipa::{
    Modify, OpenApi,
    openapi::{
        ContentBuilder, OpenApi as Document, RefOr, ResponseBuilder,
        path::Operation,
        schema::Ref,
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

use super::ErrorBody;

/// The name of the bearer scheme in the description (also spelled out in `Base`'s `security`).
const BEARER: &str = "bearer";

/// What the description says before the routes are added: title, version, the bearer scheme
/// required by every operation, and the error schema.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "wagate admin API",
        description = "Agents, their WhatsApp channels (Twilio), leads, conversations, operator \
messages and dead letters of a wagate, on its admin listener (`WAGATE_ADMIN_LISTEN`).\n\n\
Every call, this description included, needs `Authorization: Bearer <WAGATE_ADMIN_TOKEN>` \
(401 without it, also for a path that does not exist). JSON in and out; an error is \
`{\"error\": \"…\"}` with its status. No answer ever carries an Auth Token, API key or secret: \
secrets are write-only and shown as `…_set: true`.\n\n\
The lists (`GET /v1/agents`, leads, `GET /v1/dead-letters`) are the whole list as an array \
without `limit`; with `limit` (1-1000) they are a page, `{\"items\": [...], \"next_cursor\": …}`, \
and `?limit=…&cursor=<next_cursor>` gives the next one until `next_cursor` is null."
    ),
    modifiers(&Bearer),
    security(("bearer" = [])),
    components(schemas(ErrorBody)),
    tags(
        (name = "agents", description = "Agents and their backends"),
        (name = "whatsapp", description = "An agent's Twilio WhatsApp channel"),
        (name = "people", description = "Leads, conversations and handoff to a person"),
        (name = "messages", description = "Messages the business sends, and their delivery"),
        (name = "dead-letters", description = "What failed for good, and replaying it"),
        (name = "meta", description = "This description"),
    )
)]
struct Base;

/// Adds the bearer scheme that [`Base`]'s `security` names.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The admin token: WAGATE_ADMIN_TOKEN, or ./data/admin.token in embedded mode",
                    ))
                    .build(),
            ),
        );
    }
}

/// The description the routes are added to ([`super::api`]).
pub(crate) fn base() -> Document {
    Base::openapi()
}

/// The whole description: the routes', with what every operation shares.
pub fn spec() -> Document {
    let (_, mut doc) = super::api().split_for_parts();
    for (path, item) in doc.paths.paths.iter_mut() {
        let describes_itself = path == "/v1/openapi.json";
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            shared_answers(op, describes_itself);
        }
    }
    doc
}

/// Adds the answers every operation can give, unless it says more of one itself.
fn shared_answers(op: &mut Operation, describes_itself: bool) {
    add(
        op,
        "401",
        "No `Authorization: Bearer` with the admin token (or the admin API is disabled)",
    );
    if describes_itself {
        return;
    }
    add(
        op,
        "503",
        "The store or the bus is away: temporarily unavailable, try again",
    );
    let has_body = op.request_body.is_some();
    if has_body || op.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
        add(
            op,
            "400",
            "A path, query or body that does not parse (malformed JSON, a wrong type, an unknown \
             field or parameter)",
        );
    }
    if has_body {
        let limit = format!("A body over {} KiB", super::MAX_BODY / 1024);
        add(op, "413", &limit);
    }
}

/// Adds the error answer `status` to `op`, unless it has one.
fn add(op: &mut Operation, status: &str, description: &str) {
    op.responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| RefOr::T(error(description)));
}

/// An error answer of `description`: `{"error": "…"}`.
fn error(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// The description as served, made once. Writing it cannot fail (every map key is a string);
/// should it ever, the answer says why rather than the process panicking.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    spec()
        .to_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"the description could not be written: {e}\"}}"))
});

/// The admin API's OpenAPI 3.1 description
///
/// Generated from the code that serves the routes, so it lists every route of the admin API
/// with its parameters, bodies and answers.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)),
)]
pub async fn document() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}

#[cfg(test)]
mod tests {
    use utoipa::openapi::path::ParameterIn;

    use super::*;

    /// utoipa takes a path's template and its declared parameters separately: each operation
    /// must declare exactly the `{names}` its template has, and a 2xx answer.
    #[test]
    fn every_operation_declares_its_path_parameters_and_a_success() {
        let doc = spec();
        assert!(doc.paths.paths.len() > 1);
        for (path, item) in &doc.paths.paths {
            let mut in_template: Vec<&str> = path
                .split('{')
                .skip(1)
                .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
                .collect();
            in_template.sort_unstable();
            for op in [&item.get, &item.put, &item.post, &item.delete, &item.patch]
                .into_iter()
                .flatten()
            {
                let mut declared: Vec<&str> = op
                    .parameters
                    .iter()
                    .flatten()
                    .filter_map(|p| match p {
                        RefOr::T(p) if p.parameter_in == ParameterIn::Path => Some(p.name.as_str()),
                        _ => None,
                    })
                    .collect();
                declared.sort_unstable();
                assert_eq!(declared, in_template, "{path}");
                assert!(
                    op.responses.responses.keys().any(|s| s.starts_with('2')),
                    "{path}: no success answer"
                );
                assert!(op.responses.responses.contains_key("401"), "{path}");
            }
        }
    }
}
