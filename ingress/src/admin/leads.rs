//! `GET /v1/agents/{agent_id}/leads` (JSON, or CSV with `?format=csv`).

use axum::{
    Json,
    extract::{Path, Query, State},
    http::header,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use store::Lead;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use utoipa::{IntoParams, ToSchema};

use super::{
    AgentPath, ApiError, ErrorBody, load_agent,
    page::{self, List, PageRequest},
};
use crate::AppState;

/// The leads list's query.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LeadsQuery {
    /// `json` (the default) or `csv`: the whole list as a CSV attachment.
    #[param(inline)]
    format: Option<Format>,
    /// With it, a page of at most this many leads (1-1000), by first contact; not with `csv`.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// The `next_cursor` of the page before (needs `limit`).
    cursor: Option<String>,
}

/// What the leads come as.
#[derive(Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Json,
    Csv,
}

/// A WhatsApp user who wrote to the agent, as the API shows them.
#[derive(Serialize, ToSchema)]
pub struct LeadView {
    /// The user's number (`+…`), or their WhatsApp id when it is not a phone number.
    phone: String,
    /// `whatsapp`.
    platform: String,
    /// The latest WhatsApp profile name seen.
    profile_name: Option<String>,
    /// First message.
    #[serde(with = "time::serde::rfc3339")]
    first_seen: OffsetDateTime,
    /// Latest message.
    #[serde(with = "time::serde::rfc3339")]
    last_seen: OffsetDateTime,
    /// Messages received from this user.
    message_count: u64,
    /// Whether the user opted out (STOP) and has not opted back in.
    opted_out: bool,
    /// When, while they are opted out.
    #[serde(with = "time::serde::rfc3339::option")]
    opted_out_at: Option<OffsetDateTime>,
}

impl From<Lead> for LeadView {
    /// Every field of the stored lead, named: a field added to [`Lead`] does not compile here
    /// until the API (and so its description) says whether it shows it.
    fn from(lead: Lead) -> Self {
        let Lead {
            phone,
            platform,
            profile_name,
            first_seen,
            last_seen,
            message_count,
            opted_out,
            opted_out_at,
        } = lead;
        Self {
            phone,
            platform,
            profile_name,
            first_seen,
            last_seen,
            message_count,
            opted_out,
            opted_out_at,
        }
    }
}

/// The agent's leads: all, or a page of them by first contact; the CSV is always whole
#[utoipa::path(
    get,
    path = "/v1/agents/{agent_id}/leads",
    tag = "people",
    operation_id = "list_leads",
    params(AgentPath, LeadsQuery),
    responses(
        (status = 200, description = "Every lead (an array), a page of them with `limit`, or with `format=csv` the CSV attachment (phone, platform, profile_name, first_seen, last_seen, message_count, opted_out, opted_out_at)",
            content((List<LeadView> = "application/json"), (String = "text/csv"))),
        (status = 400, description = "A bad limit or cursor, or a page of the CSV", body = ErrorBody),
        (status = 404, description = "Unknown agent", body = ErrorBody),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    Path(AgentPath { agent_id: raw }): Path<AgentPath>,
    Query(q): Query<LeadsQuery>,
) -> Result<Response, ApiError> {
    let request =
        PageRequest::<(i64, String)>::parse("leads", q.limit.as_deref(), q.cursor.as_deref())?;
    let (agent, leads) = of_agent(&state, &raw).await?;
    match (q.format.unwrap_or(Format::Json), request) {
        (Format::Json, request) => {
            let leads = leads.into_iter().map(LeadView::from).collect();
            let page: Json<List<LeadView>> = page::answer("leads", request, leads, |l| {
                let ms = l.first_seen.unix_timestamp_nanos() / 1_000_000;
                (i64::try_from(ms).unwrap_or(i64::MAX), l.phone.clone())
            });
            Ok(page.into_response())
        }
        (Format::Csv, None) => Ok(csv_download(&agent, &leads)),
        (Format::Csv, Some(_)) => Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "the CSV is always whole: leave out limit and cursor",
        )),
    }
}

/// The agent's leads (404 for an unknown agent): the API's list and the console's Leads.
pub(crate) async fn of_agent(
    state: &AppState,
    raw: &str,
) -> Result<(wagate_core::agent::Agent, Vec<Lead>), ApiError> {
    let agent = load_agent(state, raw).await?;
    let leads = state
        .store
        .leads(&agent.id)
        .await
        .map_err(ApiError::unavailable)?;
    Ok((agent, leads))
}

/// The leads as a CSV attachment: `?format=csv` and the console's Download CSV.
pub(crate) fn csv_download(agent: &wagate_core::agent::Agent, leads: &[Lead]) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"leads-{}.csv\"", agent.id),
            ),
        ],
        to_csv(leads),
    )
        .into_response()
}

fn to_csv(leads: &[Lead]) -> String {
    let mut out = String::from(
        "phone,platform,profile_name,first_seen,last_seen,message_count,opted_out,opted_out_at\r\n",
    );
    for l in leads {
        let fields = [
            cell(&l.phone),
            cell(&l.platform),
            cell(l.profile_name.as_deref().unwrap_or("")),
            l.first_seen.format(&Rfc3339).unwrap_or_default(),
            l.last_seen.format(&Rfc3339).unwrap_or_default(),
            l.message_count.to_string(),
            l.opted_out.to_string(),
            l.opted_out_at
                .and_then(|at| at.format(&Rfc3339).ok())
                .unwrap_or_default(),
        ];
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
}

/// Quotes a CSV cell, and neutralises one that a spreadsheet would run as a formula (OWASP's
/// CSV injection rule: a leading `=`, `+`, `-`, `@`, tab or carriage return gets an apostrophe
/// in front). A plain E.164 number (`+` and 8 to 15 digits) is left as it is, so that phone
/// numbers stay readable; anything else from a user, such as a profile name or a WhatsApp id
/// that is not a phone number, is guarded.
fn cell(value: &str) -> String {
    let guarded = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) && !is_e164(value) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if guarded.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", guarded.replace('"', "\"\""))
    } else {
        guarded
    }
}

fn is_e164(value: &str) -> bool {
    value.strip_prefix('+').is_some_and(|digits| {
        (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells() {
        assert_eq!(cell("+14155550100"), "+14155550100");
        assert_eq!(cell("=SUM(A1)"), "'=SUM(A1)");
        assert_eq!(cell("a,\"b\""), "\"a,\"\"b\"\"\"");
        for formula in [
            "+1+cmd|' /C calc'!A0",
            "-2+3",
            "@SUM(1)",
            "\tx",
            "=HYPERLINK(\"http://x\")",
            "+14155550100=1",
            "+1",
        ] {
            assert!(
                cell(formula).trim_start_matches('"').starts_with('\''),
                "{formula:?}"
            );
        }
        assert_eq!(cell("\r=1"), "\"'\r=1\"");
        assert_eq!(cell("whatsapp"), "whatsapp");
    }
}
