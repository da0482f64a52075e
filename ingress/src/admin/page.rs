//! Pages of the lists (`/v1/agents`, leads, `/v1/dead-letters`, and the console's Dead
//! letters): `?limit=n` answers `{"items": [...], "next_cursor": "…" or null}`, and the cursor
//! asks for the page after. Without `limit` a list is the plain array it always was.
//!
//! The cursor names the last item given by its sort key (an agent's id; a lead's first contact
//! and number; a dead letter's id, which the bus hands out in order), not by a position: an
//! item added or removed meanwhile does not shift the next page, which goes on after the item
//! where the last one ended. It is opaque to callers (base64url of JSON naming the list too, so
//! that a cursor of one list is refused by another).

use axum::{Json, http::StatusCode};
use base64::Engine;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use utoipa::{IntoParams, ToSchema};

use super::ApiError;

/// The largest page.
pub const MAX_LIMIT: usize = 1000;

const CURSOR: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// `limit` and `cursor` of a list's query string. `limit` is read as text, so that a bad one
/// gets this module's 400 naming the range rather than the query parser's.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// With it, the answer is a page of at most this many items (1-1000); without it, the whole
    /// list as an array.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// The `next_cursor` of the page before (needs `limit`).
    cursor: Option<String>,
}

impl PageQuery {
    /// The page asked for from `list` ([`PageRequest::parse`]).
    pub(crate) fn request<K: DeserializeOwned>(
        &self,
        list: &str,
    ) -> Result<Option<PageRequest<K>>, ApiError> {
        PageRequest::parse(list, self.limit.as_deref(), self.cursor.as_deref())
    }
}

/// What a page request asks for: how many items, after which key.
#[derive(Debug)]
pub(crate) struct PageRequest<K> {
    limit: usize,
    after: Option<K>,
}

#[derive(Serialize, Deserialize)]
struct Cursor<K> {
    /// The list the cursor is of.
    list: String,
    /// The sort key of the last item given.
    after: K,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

impl<K: DeserializeOwned> PageRequest<K> {
    /// The page `limit` and `cursor` ask for from `list`; `None` for the whole list (no
    /// `limit`). 400 for a limit that is not 1 to [`MAX_LIMIT`], a cursor without a limit, or
    /// a cursor that this list did not give.
    pub(crate) fn parse(
        list: &str,
        limit: Option<&str>,
        cursor: Option<&str>,
    ) -> Result<Option<Self>, ApiError> {
        let Some(limit) = limit else {
            return match cursor {
                Some(_) => Err(bad("a cursor is taken with a limit: add ?limit=")),
                None => Ok(None),
            };
        };
        let limit = limit
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}"
                ))
            })?;
        let after = match cursor {
            None | Some("") => None,
            Some(raw) => {
                let not_ours = || {
                    bad(format!(
                        "cursor is not one that {list} gave; start again without it"
                    ))
                };
                let bytes = CURSOR.decode(raw.trim()).map_err(|_| not_ours())?;
                let cursor: Cursor<K> = serde_json::from_slice(&bytes).map_err(|_| not_ours())?;
                if cursor.list != list {
                    return Err(not_ours());
                }
                Some(cursor.after)
            }
        };
        Ok(Some(Self { limit, after }))
    }
}

/// One page of a list, and the cursor of the next (null on the last page).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    /// The `cursor` of the next page; null on the last.
    pub(crate) next_cursor: Option<String>,
}

/// A list's answer: the whole list without `limit`, a page with it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum List<T> {
    All(Vec<T>),
    Page(Page<T>),
}

impl<K: Ord + Serialize> PageRequest<K> {
    /// The page of `items` (any order) by `key`, ascending.
    pub(crate) fn take<T>(&self, list: &str, items: Vec<T>, key: impl Fn(&T) -> K) -> Page<T> {
        let mut keyed: Vec<(K, T)> = items
            .into_iter()
            .map(|item| (key(&item), item))
            .filter(|(k, _)| self.after.as_ref().is_none_or(|after| k > after))
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        let more = keyed.len() > self.limit;
        keyed.truncate(self.limit);
        let next_cursor = more
            .then(|| keyed.last())
            .flatten()
            .and_then(|(last, _)| {
                serde_json::to_vec(&Cursor {
                    list: list.to_owned(),
                    after: last,
                })
                .ok()
            })
            .map(|json| CURSOR.encode(json));
        Page {
            items: keyed.into_iter().map(|(_, item)| item).collect(),
            next_cursor,
        }
    }
}

/// A list's answer: the page `request` asks for, or the whole list as an array.
pub(crate) fn answer<T, K: Ord + Serialize>(
    list: &str,
    request: Option<PageRequest<K>>,
    items: Vec<T>,
    key: impl Fn(&T) -> K,
) -> Json<List<T>> {
    Json(match request {
        Some(request) => List::Page(request.take(list, items, key)),
        None => List::All(items),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(list: &str, limit: &str, cursor: Option<&str>) -> PageRequest<u32> {
        match PageRequest::parse(list, Some(limit), cursor) {
            Ok(Some(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pages_go_on_after_the_last_key_whatever_was_added() {
        let first = request("things", "2", None).take("things", vec![5, 1, 3], |n| *n);
        assert_eq!(first.items, [1, 3]);
        let cursor = first.next_cursor.expect("a next page");
        // 2 and 4 arrive: 4 sorts after the cursor and is in the next page, 2 before it.
        let next =
            request("things", "2", Some(&cursor)).take("things", vec![4, 2, 5, 1, 3], |n| *n);
        assert_eq!(next.items, [4, 5]);
        assert_eq!(next.next_cursor, None);
    }

    #[test]
    fn bad_limits_and_cursors_are_400() {
        for (limit, cursor) in [
            (Some("0"), None),
            (Some("1001"), None),
            (Some("-1"), None),
            (Some("x"), None),
            (Some(""), None),
            (None, Some("abc")),
            (Some("5"), Some("!!")),
            (Some("5"), Some("bm90IGpzb24")),
        ] {
            let r = PageRequest::<u32>::parse("things", limit, cursor);
            assert!(
                matches!(&r, Err(e) if e.status() == StatusCode::BAD_REQUEST),
                "{limit:?} {cursor:?}: {r:?}"
            );
        }
        let other = request("others", "1", None).take("others", vec![1, 2], |n| *n);
        let r = PageRequest::<u32>::parse("things", Some("1"), other.next_cursor.as_deref());
        assert!(r.is_err(), "another list's cursor");
    }
}
