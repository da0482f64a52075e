//! Twilio's wire formats: webhook signatures, the inbound-message and status-callback forms,
//! and the REST API's error answers.

pub mod form;
pub mod inbound;
pub mod rest;
pub mod signature;
pub mod status;

#[cfg(test)]
mod envelope_tests;
