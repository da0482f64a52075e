//! Test support shared by the end-to-end suites: a harness that starts real `nats-server` and
//! `redis-server` processes and the real `wagate` binary per test, and local HTTP servers that
//! speak Twilio's, OpenAI's and an agent webhook's wire formats.

pub mod browser;
pub mod fake_agent_webhook;
pub mod fake_openai;
pub mod fake_twilio;
pub mod harness;
pub mod nats_cluster;
pub mod redis_cluster;
