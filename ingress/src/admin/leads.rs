//! `GET /v1/agents/{agent_id}/leads` (JSON, or CSV with `?format=csv`).

use axum::{
    Json,
    extract::{Path, Query, State},
    http::header,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use shared::store::Lead;
use time::format_description::well_known::Rfc3339;

use super::{ApiError, load_agent};
use crate::AppState;

#[derive(Deserialize)]
pub struct LeadsQuery {
    format: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    Query(q): Query<LeadsQuery>,
) -> Result<Response, ApiError> {
    let agent = load_agent(&state, &raw).await?;
    let leads = state
        .store
        .leads(&agent.id)
        .await
        .map_err(ApiError::unavailable)?;
    match q.format.as_deref() {
        None | Some("json") => Ok(Json(leads).into_response()),
        Some("csv") => Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"leads-{}.csv\"", agent.id),
                ),
            ],
            to_csv(&leads),
        )
            .into_response()),
        Some(_) => Err(ApiError::invalid("format must be json or csv")),
    }
}

fn to_csv(leads: &[Lead]) -> String {
    let mut out =
        String::from("phone,platform,profile_name,first_seen,last_seen,message_count\r\n");
    for l in leads {
        let fields = [
            cell(&l.phone, false),
            cell(&l.platform, false),
            cell(l.profile_name.as_deref().unwrap_or(""), true),
            l.first_seen.format(&Rfc3339).unwrap_or_default(),
            l.last_seen.format(&Rfc3339).unwrap_or_default(),
            l.message_count.to_string(),
        ];
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
}

/// Quotes a CSV cell; user-chosen text (profile names) that a spreadsheet would run as a
/// formula gets a leading apostrophe.
fn cell(value: &str, user_text: bool) -> String {
    let guarded = if user_text && value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells() {
        assert_eq!(cell("+14155550100", false), "+14155550100");
        assert_eq!(cell("=SUM(A1)", true), "'=SUM(A1)");
        assert_eq!(cell("a,\"b\"", true), "\"a,\"\"b\"\"\"");
    }
}
