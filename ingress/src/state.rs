//! What every handler shares.

use std::sync::Arc;

use bus::Bus;
use secrecy::SecretString;
use shared::directory::ChannelDirectory;
use store::Store;
use wagate_core::crypto::Keyring;

/// Shared, cheaply cloned state of the ingress role.
#[derive(Clone)]
pub struct AppState {
    /// Where inbound messages and admin sends are published.
    pub bus: Arc<dyn Bus>,
    /// Agents, leads, sessions, statuses.
    pub store: Arc<dyn Store>,
    /// Channel settings with decrypted tokens, cached.
    pub directory: Arc<ChannelDirectory>,
    /// Seals secrets that the admin API receives.
    pub keyring: Arc<Keyring>,
    /// Bearer token of the admin API; `None` disables it.
    pub admin_token: Option<Arc<SecretString>>,
    /// `WAGATE_PUBLIC_URL` without a trailing slash.
    pub public_url: Option<Arc<str>>,
    /// Port of the webhook listener, for webhook URLs when no public URL is configured.
    pub webhook_port: u16,
    /// `WAGATE_SANDBOX_MPS`: the rate a Sandbox channel without `mps` is shown with.
    pub sandbox_mps: f64,
    /// What the console keeps in this process (used sign-in tickets).
    pub console: crate::console::ConsoleState,
}
