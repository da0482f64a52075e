//! The integration tests, as one test binary (one link of the workspace instead of one per
//! suite). Each suite is a module; its tests are named `suite::test`, e.g. `webhooks::...`.

mod support;

mod admin_api;
mod chaos;
mod chat;
mod coalescing;
mod console;
mod contract_bus;
mod contract_store;
mod conversation;
mod credentials;
mod embedded;
mod embedded_files;
mod events;
mod fakes_selftest;
mod faults;
mod handoff;
mod lifecycle;
mod master_key;
mod media;
mod nats_cluster;
mod openapi;
mod ordering;
mod outage;
mod pacing;
mod parts;
mod quick_replies;
mod redis_cluster;
mod secrets;
mod sending;
mod signature_differential;
mod slow_clients;
mod startup;
mod traces;
mod webhooks;
