//! [`Conversations`] on Redis: a conversation's keys share its `{<session>}` hash tag, an
//! agent's leads its `{<agent>}` one, so each script below runs in one slot.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use time::OffsetDateTime;

use wagate_core::domain::{AgentId, MessageSid, SessionId};

use super::{RedisStore, err, evalsha, from_json, from_ms, ms, to_json};
use crate::{
    CompletedTurn, Conversations, GUARD_TTL, Lead, LeadSighting, Pause, SimulatedMessage,
    StoreError, Turn, TurnStart,
};

mod scripts;

use scripts::SCRIPTS;

/// The keys of the lead of `session`'s user and of the "seen" marks of `sids`, in the order
/// [`scripts::RECORD_LEAD`] takes them.
fn lead_keys<'a>(
    store: &RedisStore,
    session: &SessionId,
    sids: impl Iterator<Item = &'a MessageSid>,
) -> Vec<String> {
    let agent = session.agent();
    let user = session.user();
    let mut keys = vec![
        key!(store, "lead:{{{agent}}}:{user}"),
        key!(store, "leads:{{{agent}}}"),
    ];
    keys.extend(sids.map(|sid| key!(store, "leadseen:{{{agent}}}:{sid}")));
    keys
}

/// The arguments of [`scripts::RECORD_LEAD`] after the keys.
fn lead_args(cmd: &mut redis::Cmd, session: &SessionId, sightings: &[LeadSighting<'_>]) {
    cmd.arg(session.user()).arg(GUARD_TTL.as_secs());
    for s in sightings {
        cmd.arg(s.profile_name.unwrap_or("")).arg(ms(s.at));
    }
}

impl RedisStore {
    /// Copies an opt-out or opt-in time (`field`) onto the user's lead, if they are one, so
    /// that the leads list shows it without reading every conversation's clocks (another slot
    /// on a cluster). The conversation's clock, written first, is what sends obey.
    async fn stamp_lead(
        &self,
        session: &SessionId,
        field: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let agent = session.agent();
        let user = session.user();
        let _: i64 = SCRIPTS
            .stamp_lead
            .key(key!(self, "lead:{{{agent}}}:{user}"))
            .arg(field)
            .arg(ms(at))
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("stamp lead"))?;
        Ok(())
    }
}

#[async_trait]
impl Conversations for RedisStore {
    async fn forget_session(&self, session: &SessionId) -> Result<(), StoreError> {
        // The keys carry the session's hash tag: one DEL, one slot.
        let _: i64 = self
            .conn()
            .del(&[
                key!(self, "session:{{{session}}}"),
                key!(self, "pause:{{{session}}}"),
                key!(self, "outbox:{{{session}}}"),
            ])
            .await
            .map_err(err("forget session"))?;
        Ok(())
    }

    async fn purge_erased(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn erase_user(&self, session: &SessionId) -> Result<(), StoreError> {
        // The sent parts and statuses first (each its own slot), while the index that names
        // them is still there: a crash part way leaves the index, and erasing again finishes.
        let sent_index = key!(self, "sentto:{{{session}}}");
        let sids: Vec<String> = self
            .conn()
            .smembers(&sent_index)
            .await
            .map_err(err("erase user"))?;
        for sid in &sids {
            let _: i64 = self
                .conn()
                .del(key!(self, "sent:{sid}"))
                .await
                .map_err(err("erase user"))?;
            let _: i64 = self
                .conn()
                .del(key!(self, "status:{sid}"))
                .await
                .map_err(err("erase user"))?;
        }
        // The conversation's keys, all in its slot: the turn records named by their index
        // (only keys of this session, whatever the index holds), then everything else.
        let turn_index = key!(self, "turns:{{{session}}}");
        let own_turns = key!(self, "turn:{{{session}}}:");
        let turn_keys: Vec<String> = self
            .conn()
            .smembers(&turn_index)
            .await
            .map_err(err("erase user"))?;
        let mut keys: Vec<String> = turn_keys
            .into_iter()
            .filter(|k| k.starts_with(&own_turns))
            .collect();
        let history = key!(self, "session:{{{session}}}");
        keys.extend([
            turn_index,
            sent_index,
            history.clone(),
            key!(self, "pause:{{{session}}}"),
            key!(self, "outbox:{{{session}}}"),
            key!(self, "window:{{{session}}}"),
            key!(self, "optout:{{{session}}}"),
            key!(self, "optin:{{{session}}}"),
        ]);
        let _: i64 = self.conn().del(&keys).await.map_err(err("erase user"))?;
        // An erasure undone by a failover would bring back what the person asked to erase.
        self.replicated(&history, "erase user").await;
        // The lead, in the agent's slot.
        let agent = session.agent();
        let user = session.user();
        let lead = key!(self, "lead:{{{agent}}}:{user}");
        let _: () = redis::pipe()
            .atomic()
            .del(&lead)
            .ignore()
            .zrem(key!(self, "leads:{{{agent}}}"), user)
            .ignore()
            .query_async(&mut self.conn())
            .await
            .map_err(err("erase user"))?;
        self.replicated(&lead, "erase user").await;
        Ok(())
    }

    async fn begin_turn(
        &self,
        session: &SessionId,
        sightings: &[LeadSighting<'_>],
        history: usize,
    ) -> Result<TurnStart, StoreError> {
        let Some(latest) = crate::conversations::latest_sighting(session, sightings)? else {
            return Ok(TurnStart::default());
        };
        let mut keys = vec![
            key!(self, "window:{{{session}}}"),
            key!(self, "session:{{{session}}}"),
            key!(self, "pause:{{{session}}}"),
        ];
        keys.extend(
            sightings
                .iter()
                .map(|s| key!(self, "turn:{{{session}}}:{}", s.message_sid)),
        );
        let lead_keys = lead_keys(self, session, sightings.iter().map(|s| s.message_sid));
        let history = history.min(i64::MAX as usize);
        type Begun = (Vec<Option<Vec<u8>>>, Vec<u8>, Option<Vec<u8>>, i64);
        let (completed, turns, pause, counted) = if self.redis.one_server() {
            // One script for both steps: the keys of two slots may go together here.
            let begin_keys = keys.len();
            let mut both = evalsha(&SCRIPTS.begin_turn_and_lead, &[keys, lead_keys].concat());
            both.arg(begin_keys).arg(ms(latest)).arg(history);
            lead_args(&mut both, session, sightings);
            let (begun,): (Begun,) = self
                .scripted(
                    redis::pipe().add_command(both),
                    &SCRIPTS.begin_turn_and_lead,
                )
                .await
                .map_err(err("begin turn"))?;
            begun
        } else {
            let mut begin = evalsha(&SCRIPTS.begin_turn, &keys);
            begin.arg(ms(latest)).arg(history);
            let mut lead = evalsha(&SCRIPTS.record_lead, &lead_keys);
            lead_args(&mut lead, session, sightings);
            // The conversation's keys and the agent's leads are two slots on a cluster: two
            // scripts, sent together. Both are idempotent (the lead counts each message once
            // by its "seen" mark), so when either fails the whole begin is simply done again.
            let begin = redis::pipe().add_command(begin).clone();
            let lead = redis::pipe().add_command(lead).clone();
            type Started = ((Vec<Option<Vec<u8>>>, Vec<u8>, Option<Vec<u8>>),);
            let (begun, counted) = tokio::join!(
                self.scripted::<Started>(&begin, &SCRIPTS.begin_turn),
                self.scripted::<(i64,)>(&lead, &SCRIPTS.record_lead)
            );
            let ((completed, turns, pause),) = begun.map_err(err("begin turn"))?;
            let (counted,) = counted.map_err(err("begin turn"))?;
            (completed, turns, pause, counted)
        };
        Ok(TurnStart {
            completed: completed
                .iter()
                .map(|r| {
                    r.as_deref()
                        .map(|r| from_json(r, "decode turn record"))
                        .transpose()
                })
                .collect::<Result<_, _>>()?,
            history: from_json(&turns, "decode turns")?,
            pause: pause.map(|p| from_json(&p, "decode pause")).transpose()?,
            new_lead: counted >= 1_000_000,
        })
    }

    async fn history(&self, session: &SessionId, last: usize) -> Result<Vec<Turn>, StoreError> {
        // LRANGE from -0 would be the whole list.
        if last == 0 {
            return Ok(Vec::new());
        }
        let start = -(isize::try_from(last).unwrap_or(isize::MAX));
        let raw: Vec<Vec<u8>> = self
            .conn()
            .lrange(key!(self, "session:{{{session}}}"), start, -1)
            .await
            .map_err(err("history"))?;
        raw.iter().map(|r| from_json(r, "decode turn")).collect()
    }

    async fn complete_turn(
        &self,
        session: &SessionId,
        turn_keys: &[String],
        turns: &[Turn],
        completed: &CompletedTurn,
        keep: Duration,
    ) -> Result<CompletedTurn, StoreError> {
        if turn_keys.is_empty() {
            return Err(StoreError::Invalid(
                "complete_turn needs at least one turn key".into(),
            ));
        }
        let mut inv = SCRIPTS
            .complete_turn
            .key(key!(self, "session:{{{session}}}"));
        inv.key(key!(self, "turns:{{{session}}}"));
        for k in turn_keys {
            inv.key(key!(self, "turn:{{{session}}}:{k}"));
        }
        inv.arg(to_json(completed)?)
            .arg(GUARD_TTL.as_secs())
            .arg(turns.len());
        for t in turns {
            inv.arg(to_json(t)?);
        }
        // A century at most: Redis refuses an expiry past its clock's range.
        inv.arg(keep.as_secs().clamp(1, 100 * 366 * 86_400))
            .arg(crate::conversations::retention_cutoff(keep))
            .arg(crate::conversations::TRIM_PER_COMPLETION);
        let earlier: Option<Vec<u8>> = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("complete turn"))?;
        if earlier.is_none() {
            // The turn record is what keeps a redelivered message from running the agent
            // again, and the turns are the conversation's history.
            self.replicated(&key!(self, "session:{{{session}}}"), "complete turn")
                .await;
        }
        match earlier {
            Some(earlier) => from_json(&earlier, "decode turn record"),
            None => Ok(completed.clone()),
        }
    }

    async fn set_pause(
        &self,
        session: &SessionId,
        pause: Option<&Pause>,
    ) -> Result<(), StoreError> {
        let key = key!(self, "pause:{{{session}}}");
        match pause {
            Some(p) => {
                let raw = serde_json::to_vec(p).map_err(StoreError::json("encode pause"))?;
                let _: () = self.conn().set(&key, raw).await.map_err(err("pause"))?;
            }
            None => {
                let _: i64 = self.conn().del(&key).await.map_err(err("resume"))?;
            }
        }
        // Lost in a failover, the agent would answer over the person, or stay silent.
        self.replicated(&key, "pause").await;
        Ok(())
    }

    async fn pause(&self, session: &SessionId) -> Result<Option<Pause>, StoreError> {
        self.get_json(key!(self, "pause:{{{session}}}")).await
    }

    async fn leads(&self, agent: &AgentId) -> Result<Vec<Lead>, StoreError> {
        let users: Vec<String> = self
            .conn()
            .zrange(key!(self, "leads:{{{agent}}}"), 0, -1)
            .await
            .map_err(err("leads"))?;
        let mut out = Vec::with_capacity(users.len());
        // The agent's leads share its slot: a pipeline of reads per chunk, not a round trip
        // per lead.
        for chunk in users.chunks(500) {
            let mut pipe = redis::pipe();
            for user in chunk {
                pipe.hgetall(key!(self, "lead:{{{agent}}}:{user}"));
            }
            let hashes: Vec<std::collections::HashMap<String, String>> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(err("leads"))?;
            for (user, h) in chunk.iter().zip(hashes) {
                let num = |f: &str| h.get(f).and_then(|v| v.parse::<i64>().ok());
                let mut lead = Lead {
                    phone: user.clone(),
                    platform: "whatsapp".into(),
                    profile_name: h.get("profile_name").cloned(),
                    first_seen: from_ms(num("first_seen").unwrap_or(0)),
                    last_seen: from_ms(num("last_seen").unwrap_or(0)),
                    message_count: u64::try_from(num("message_count").unwrap_or(0)).unwrap_or(0),
                    opted_out: false,
                    opted_out_at: None,
                };
                lead.consent(num("optout"), num("optin"));
                out.push(lead);
            }
        }
        Ok(out)
    }

    async fn last_inbound(
        &self,
        session: &SessionId,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        let v: Option<i64> = self
            .conn()
            .get(key!(self, "window:{{{session}}}"))
            .await
            .map_err(err("window"))?;
        Ok(v.map(from_ms))
    }

    async fn opt_out(&self, session: &SessionId, at: OffsetDateTime) -> Result<(), StoreError> {
        let _: i64 = SCRIPTS
            .stamp_max
            .key(key!(self, "optout:{{{session}}}"))
            .arg(ms(at))
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("opt out"))?;
        // Losing it would send to a user who said STOP (or refuse one who said START).
        self.replicated(&key!(self, "optout:{{{session}}}"), "opt out")
            .await;
        self.stamp_lead(session, "optout", at).await
    }

    async fn opted_out_at(
        &self,
        session: &SessionId,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        let v: Option<i64> = self
            .conn()
            .get(key!(self, "optout:{{{session}}}"))
            .await
            .map_err(err("opt-out"))?;
        Ok(v.map(from_ms))
    }

    async fn opt_in(&self, session: &SessionId, at: OffsetDateTime) -> Result<(), StoreError> {
        let _: i64 = SCRIPTS
            .stamp_max
            .key(key!(self, "optin:{{{session}}}"))
            .arg(ms(at))
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("opt in"))?;
        // Losing it would send to a user who said STOP (or refuse one who said START).
        self.replicated(&key!(self, "optin:{{{session}}}"), "opt in")
            .await;
        self.stamp_lead(session, "optin", at).await
    }

    async fn opted_in_at(&self, session: &SessionId) -> Result<Option<OffsetDateTime>, StoreError> {
        let v: Option<i64> = self
            .conn()
            .get(key!(self, "optin:{{{session}}}"))
            .await
            .map_err(err("opt-in"))?;
        Ok(v.map(from_ms))
    }

    async fn record_simulated(
        &self,
        session: &SessionId,
        body: &str,
        at: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        let entry = serde_json::json!({"body": body, "at": ms(at)});
        self.conn()
            .rpush(key!(self, "outbox:{{{session}}}"), entry.to_string())
            .await
            .map_err(err("record simulated"))
    }

    async fn simulated(
        &self,
        session: &SessionId,
        after: u64,
    ) -> Result<Vec<SimulatedMessage>, StoreError> {
        let start = isize::try_from(after).unwrap_or(isize::MAX);
        let raw: Vec<String> = self
            .conn()
            .lrange(key!(self, "outbox:{{{session}}}"), start, -1)
            .await
            .map_err(err("simulated"))?;
        raw.iter()
            .zip(after.saturating_add(1)..)
            .map(|(r, index)| {
                let v: serde_json::Value =
                    serde_json::from_str(r).map_err(StoreError::json("decode outbox"))?;
                Ok(SimulatedMessage {
                    index,
                    body: v["body"].as_str().unwrap_or_default().to_owned(),
                    at: from_ms(v["at"].as_i64().unwrap_or(0)),
                })
            })
            .collect()
    }
}
