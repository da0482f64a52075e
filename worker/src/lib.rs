#![warn(missing_docs)]
//! The worker role: inbound messages in, agent replies out.
//!
//! # Layout
//! - [`consumer`]: pulls inbound messages and runs many conversations at once (bounded), each
//!   conversation's messages one at a time in arrival order.
//! - [`turn`]: one inbound message: lead, 24-hour window clock, history, agent, stored turns,
//!   split reply published, then ack. Safe to repeat: a redelivered message republishes the
//!   stored reply instead of running the agent again.
//! - [`agent`]: the backends (`echo`, `openai`, `webhook`) behind one call.

pub mod agent;
pub mod consumer;
pub mod turn;

pub use consumer::{WorkerConfig, run};
pub use turn::TurnContext;
