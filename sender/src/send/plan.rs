//! What a reply goes out as: its messages (media with a caption, text parts, the last one with
//! its choices as a content) and each as a reply of its own for its record.

use backon::Retryable;
use shared::directory::ResolvedChannel;
use twilio::rest::FailureClass;
use wagate_core::{
    envelope::{OutboundReply, ReplyContent},
    failure::Failure,
};

use super::{SendContext, post::inline_retries};
use crate::{content::Choices, twilio_client::SendError};

/// One message of a reply, as planned before its guard is taken.
pub(super) enum Post<'a> {
    /// Sent with these form fields (`Body`, `MediaUrl`, a template's).
    Fields(Vec<(&'static str, &'a str)>),
    /// The reply's last text with its choices, sent as a content ([`resolve_choices`]).
    Choices(Choices<'a>),
}

/// What the last message of a reply with choices goes out as.
pub(super) enum Resolved {
    /// The content of its text and choices (`ContentSid`).
    Content(String),
    /// Text with the choices listed, when no content can be had.
    Text(String),
}

/// The content of `choices` in the channel's account: the cached one, else one made now and
/// cached. A refusal of the Content API (a 4xx: Twilio will not make this content) falls back
/// to text, logged; anything else fails the part for another attempt, as a failed post does.
/// In simulation mode there is no account, and the choices are recorded as text.
pub(super) async fn resolve_choices(
    ctx: &SendContext,
    reply: &OutboundReply,
    channel: &ResolvedChannel,
    choices: &Choices<'_>,
) -> Result<Resolved, Failure> {
    if channel.channel.simulation {
        return Ok(Resolved::Text(choices.as_text()));
    }
    let account = &channel.channel.account_sid;
    let cache_key = choices.cache_key(account);
    if let Some(sid) = ctx
        .store
        .content_sid(&cache_key)
        .await
        .map_err(Failure::transient)?
    {
        return Ok(Resolved::Content(sid));
    }
    let attempt = || async {
        ctx.content
            .create(account, &channel.auth_token, choices, &cache_key)
            .await
    };
    let created = attempt
        .retry(inline_retries(ctx))
        .when(|e: &SendError| {
            e.class == FailureClass::RetryLater
                && e.retry_after.is_none_or(|d| d <= ctx.inline_wait_cap())
        })
        .adjust(|e: &SendError, planned| e.retry_after.or(planned))
        .await;
    match created {
        Ok(sid) => {
            tracing::info!(id = %reply.id, kind = choices.kind().as_str(), sid = %sid.as_str(), "made a content for the reply's choices");
            match ctx.store.cache_content_sid(&cache_key, sid.as_str()).await {
                Ok(stands) => Ok(Resolved::Content(stands)),
                Err(e) => {
                    // The content exists; the next reply with these choices makes another.
                    tracing::warn!(id = %reply.id, error = %e, "could not cache the content sid");
                    Ok(Resolved::Content(sid.as_str().to_owned()))
                }
            }
        }
        Err(e) if e.class == FailureClass::Permanent => {
            tracing::warn!(id = %reply.id, error = %e, "the Content API refused the reply's choices; sending them as text");
            Ok(Resolved::Text(choices.as_text()))
        }
        // A content made twice is only a duplicate, so an ambiguous answer is tried again too.
        Err(e) => {
            Err(Failure::transient(format!("Content API: {e}")).with_retry_after(e.retry_after))
        }
    }
}

/// The value of form field `name`.
pub(super) fn field<'a>(fields: &[(&str, &'a str)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
}

/// The messages of a text reply: one per medium (WhatsApp takes one medium a message), the first
/// with the reply's first part as its caption, then the remaining parts as text. With choices,
/// the last part goes last of all, as the content that carries them (a content has no medium,
/// so the choices are on the last message whatever came before).
pub(super) fn text_posts<'a>(
    parts: &'a [String],
    media: &'a [String],
    choices: &'a [String],
) -> Vec<Post<'a>> {
    let (text, last) = match parts.split_last() {
        Some((last, before)) if !choices.is_empty() => (before, Some(last)),
        _ => (parts, None),
    };
    let mut posts: Vec<Vec<(&'static str, &'a str)>> = media
        .iter()
        .map(|url| vec![("MediaUrl", url.as_str())])
        .collect();
    let mut text = text.iter();
    if let Some(first) = posts.first_mut()
        && let Some(caption) = text.next()
    {
        first.insert(0, ("Body", caption.as_str()));
    }
    posts.extend(text.map(|p| vec![("Body", p.as_str())]));
    let mut posts: Vec<Post<'a>> = posts.into_iter().map(Post::Fields).collect();
    if let Some(body) = last {
        posts.push(Post::Choices(Choices { body, choices }));
    }
    posts
}

/// Part `index` of `reply` as a reply of its own, with an id of its own so that replaying it
/// (after Twilio reported it failed) is not stopped by the original part's send guard.
pub(super) fn single_part(reply: &OutboundReply, index: usize) -> OutboundReply {
    let (content, media, quick_replies) = match &reply.content {
        ReplyContent::Text { parts } => {
            match text_posts(parts, &reply.media, &reply.quick_replies)
                .into_iter()
                .nth(index)
            {
                Some(Post::Choices(choices)) => (
                    ReplyContent::Text {
                        parts: vec![choices.body.to_owned()],
                    },
                    Vec::new(),
                    choices.choices.to_vec(),
                ),
                post => {
                    let post = match post {
                        Some(Post::Fields(fields)) => fields,
                        _ => Vec::new(),
                    };
                    let field = |name: &str| {
                        post.iter()
                            .filter(|(k, _)| *k == name)
                            .map(|(_, v)| (*v).to_owned())
                            .collect::<Vec<String>>()
                    };
                    (
                        ReplyContent::Text {
                            parts: field("Body"),
                        },
                        field("MediaUrl"),
                        Vec::new(),
                    )
                }
            }
        }
        template @ ReplyContent::Template { .. } => (template.clone(), Vec::new(), Vec::new()),
    };
    OutboundReply {
        id: format!("{}-p{index}", reply.id),
        content,
        media,
        quick_replies,
        ..reply.clone()
    }
}
