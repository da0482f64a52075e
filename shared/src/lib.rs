#![warn(missing_docs)]
//! What every wagate role runs on, wired together: settings, the channel directory, the
//! consumer loop, embedded mode, events, the master key check. The pieces are crates of their
//! own beside this one: [`wagate_core`] (the domain), `twilio` (Twilio's wire formats),
//! [`bus`], [`store`], [`wagate_embedded`] (embedded mode's data file) and `transport` (the
//! agent client).
//!
//! # Layout
//! - [`config`]: every setting, from the environment, checked at start.
//! - [`directory`]: the agents' channel settings, decrypted and cached for the hot path.
//! - [`dispatch`]: consuming a topic, conversations in parallel, each one in order.
//! - [`embedded`]: embedded mode's bus and store, opened together on their one file.
//! - [`events`]: raising the events of the agents' event webhooks.
//! - [`key_check`]: the start-up proof that the master key is the one the data was sealed
//!   with, and the end of a key rotation.
//! - [`shutdown`]: the signal every long-running loop watches.

pub mod config;
pub mod directory;
pub mod dispatch;
pub mod embedded;
pub mod events;
pub mod key_check;
pub mod shutdown;
