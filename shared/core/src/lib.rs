#![warn(missing_docs)]
//! wagate's domain: what the pipeline is about, with no I/O. Every other crate of wagate
//! depends on this one; it depends on none of them.
//!
//! # Layout
//! - [`domain`]: identifiers parsed once at the edge (agent id, E.164 phone, WhatsApp address,
//!   Twilio sids, session id `twilio_{agent_id}_{phone}`).
//! - [`agent`]: agents, their backends and WhatsApp channels as stored.
//! - [`envelope`]: what travels on the bus (inbound messages, replies, dead letters);
//!   [`events`]: the events of the agents' event webhooks, and their signatures.
//! - [`failure`]: the one failure model: whether trying again can help, and when;
//!   [`retry`]: retry schedules as data.
//! - [`window`]: WhatsApp's 24-hour window and opt-outs, the rule for free-form text.
//! - [`text`]: splitting replies into WhatsApp-sized parts.
//! - [`crypto`]: AES-SIV sealing of stored secrets, bound to their agent, with key rotation;
//!   [`redact`]: credentials inside URLs, masked wherever a URL is shown.
//! - [`trace`]: one W3C trace per inbound message, carried in envelopes and continued by
//!   every role.

pub mod agent;
pub mod crypto;
pub mod domain;
pub mod envelope;
pub mod events;
pub mod failure;
pub mod redact;
pub mod retry;
pub mod text;
pub mod trace;
pub mod window;
