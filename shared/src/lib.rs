#![warn(missing_docs)]
//! What every wagate role needs.
//!
//! # Layout
//! - [`domain`]: identifiers parsed once at the edge (agent id, E.164 phone, WhatsApp address,
//!   Twilio sids, session id `twilio_{agent_id}_{phone}`).
//! - [`twilio`]: Twilio's wire formats: the signature algorithm, strict form parsing, the
//!   inbound-message and status-callback forms, REST error classification.
//! - [`crypto`]: AES-SIV sealing of stored secrets, bound to their agent, with key rotation;
//!   [`redact`]: credentials inside URLs, masked wherever a URL is shown.
//! - [`key_check`]: the start-up proof that the master key is the one the data was sealed
//!   with, and the end of a key rotation.
//! - [`config`]: every setting, from the environment, checked at start; [`retry`]: retry
//!   schedules as data.
//! - [`agent`]: agents, their backends and WhatsApp channels as stored.
//! - [`envelope`]: what travels on the bus (inbound messages, replies, dead letters);
//!   [`events`]: the events of the agents' event webhooks.
//! - [`failure`]: the one failure model: whether trying again can help, and when.
//! - [`text`]: splitting replies into WhatsApp-sized parts.
//! - [`bus`] and [`store`]: the two interfaces the pipeline runs on, with their NATS JetStream
//!   and Redis implementations, and their embedded ones.
//! - [`embedded`]: embedded mode's one data file (redb), opened by one process at a time, and
//!   the writer that group-commits every change of the embedded bus and store.
//! - [`data_dir`]: the data folder and its files, private to their owner, and redb databases
//!   opened only once they pass an integrity check.
//! - [`dispatch`]: consuming a topic, conversations in parallel, each one in order.
//! - [`directory`]: the agents' channel settings, decrypted and cached for the hot path.
//! - [`shutdown`]: the signal every long-running loop watches.
//! - [`trace`]: one W3C trace per inbound message, continued by every role.
//! - [`window`]: WhatsApp's 24-hour window and opt-outs, the rule for free-form text.

pub mod agent;
pub mod bus;
pub mod config;
pub mod crypto;
pub mod data_dir;
pub mod directory;
pub mod dispatch;
pub mod domain;
pub mod embedded;
pub mod envelope;
pub mod events;
pub mod failure;
pub mod key_check;
pub mod redact;
pub mod retry;
pub mod shutdown;
pub mod store;
pub mod text;
pub mod trace;
pub mod twilio;
pub mod window;
