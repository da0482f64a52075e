//! The start-up proof that the master key is the one the stored data was sealed with.
//!
//! A well-formed but wrong master key used to start a process that looked healthy (`/readyz`
//! 200) while every webhook failed, because no stored Auth Token opened. So the data carries a
//! key check: a known text sealed with the primary key under a label of its own, written by
//! the first process that starts on the data. Every later start opens it with its keyring and
//! refuses to run when no key of the keyring does, naming the key ids involved but never a key.
//!
//! The check also ends a rotation. A process that holds keys being rotated out
//! (`WAGATE_MASTER_KEY_PREVIOUS`) seals every stored secret made with one of them again with
//! the primary key, and only once none is left seals the check again with the primary: from
//! then on the new key alone starts, and every stored secret opens with it.

use store::{Store, StoreError};
use wagate_core::{
    agent::{Agent, Backend},
    crypto::{CryptoError, KeyCheck, Keyring, SealedSecret, SecretPurpose},
    domain::AgentId,
};

/// Why the keyring and the stored data do not go together.
#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    /// No key of the keyring opens the stored check.
    #[error(
        "the master key does not match the one this data was written with (WAGATE_MASTER_KEY, or \
         master.key in the data folder in embedded mode): the data was sealed with key id \
         {written_with}, and this process holds key id(s) {held}. Start it with the key the data \
         was written with; to change keys, set the new one as WAGATE_MASTER_KEY and the old one \
         in WAGATE_MASTER_KEY_PREVIOUS until a start has sealed everything again"
    )]
    Mismatch {
        /// The id of the key that sealed the check.
        written_with: String,
        /// The ids of the keys this process holds, comma-separated.
        held: String,
    },
    /// The stored check names one of our keys but does not open with it: it was changed
    /// outside wagate (or, against all odds, two keys share an id).
    #[error(
        "the stored master key check does not open with the key it names ({key_id}): it was \
         changed outside wagate, or the master key does not match the one this data was written \
         with (WAGATE_MASTER_KEY)"
    )]
    Damaged {
        /// The id of the key the check names.
        key_id: String,
    },
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the check found and did, for the start-up log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// Stored secrets sealed again with the primary key.
    pub resealed: usize,
    /// Stored secrets that no key of the keyring opens: they stay as they are, and the check
    /// stays on the old key, so that the rotation is not taken as finished.
    pub unreadable: usize,
    /// Whether the check itself was sealed again with the primary key (a rotation finished).
    pub rotated: bool,
}

/// Checks that `keyring` opens the data of `store`, writing the check on first use, and
/// finishes a rotation when the keyring holds keys being rotated out.
pub async fn verify(store: &dyn Store, keyring: &Keyring) -> Result<Verified, KeyCheckError> {
    let stored = store.key_check(&keyring.seal_key_check()).await?;
    let opened = keyring
        .open_key_check(&stored)
        .map_err(|e| mismatch(e, &stored, keyring))?;
    let mut verified = Verified::default();
    if keyring.is_rotating() {
        reseal_secrets(store, keyring, &mut verified).await?;
    }
    if opened == KeyCheck::Previous && verified.unreadable == 0 {
        verified.rotated = store
            .replace_key_check(&stored, &keyring.seal_key_check())
            .await?;
    }
    Ok(verified)
}

/// The operator's view of a check that did not open: a key it names that this process lacks
/// is a key mismatch; one of ours that fails to open it means the check was changed.
fn mismatch(e: CryptoError, stored: &SealedSecret, keyring: &Keyring) -> KeyCheckError {
    let named = stored.as_str().split('.').nth(1).unwrap_or("").to_owned();
    match e {
        CryptoError::UnknownKey(written_with) => KeyCheckError::Mismatch {
            written_with,
            held: keyring.key_ids().join(", "),
        },
        CryptoError::BadKey | CryptoError::Corrupt => KeyCheckError::Damaged { key_id: named },
    }
}

/// Seals every stored secret that was sealed with a key other than the primary again with the
/// primary. An agent is written back only when one of its secrets changed, so a start after the
/// rotation writes nothing.
async fn reseal_secrets(
    store: &dyn Store,
    keyring: &Keyring,
    verified: &mut Verified,
) -> Result<(), StoreError> {
    for mut agent in store.agents().await? {
        let id = agent.id.clone();
        if reseal_backend(&mut agent, keyring, verified) {
            store.put_agent(&agent).await?;
        }
        if let Some(mut channel) = store.channel(&id).await?
            && reseal_one(
                &id,
                SecretPurpose::TwilioAuthToken,
                &mut channel.auth_token,
                keyring,
                verified,
            )
        {
            store.put_channel(&id, &channel).await?;
        }
    }
    Ok(())
}

/// Reseals the secrets of an agent (its backend's, its event webhook's); true when one
/// changed.
fn reseal_backend(agent: &mut Agent, keyring: &Keyring, verified: &mut Verified) -> bool {
    let id = agent.id.clone();
    let mut reseal = |purpose, sealed: Option<&mut SealedSecret>| {
        sealed.is_some_and(|s| reseal_one(&id, purpose, s, keyring, verified))
    };
    let events = reseal(
        SecretPurpose::EventsSecret,
        agent.events.as_mut().map(|e| &mut e.secret),
    );
    events
        | match &mut agent.backend {
            Backend::Echo => false,
            Backend::Openai {
                api_key,
                credentials,
                ..
            } => {
                let key = reseal(SecretPurpose::AgentApiKey, api_key.as_mut());
                reseal(SecretPurpose::UrlCredentials, credentials.as_mut()) | key
            }
            Backend::Webhook {
                secret,
                credentials,
                transcription,
                ..
            } => {
                let secret = reseal(SecretPurpose::WebhookSecret, Some(secret));
                let key = reseal(
                    SecretPurpose::AgentApiKey,
                    transcription.as_mut().and_then(|t| t.api_key.as_mut()),
                );
                reseal(SecretPurpose::UrlCredentials, credentials.as_mut()) | secret | key
            }
        }
}

/// Reseals one secret if it needs it; true when it changed. One that does not open is counted
/// and logged (by agent and purpose, never its value) and left as it is.
fn reseal_one(
    id: &AgentId,
    purpose: SecretPurpose,
    sealed: &mut SealedSecret,
    keyring: &Keyring,
    verified: &mut Verified,
) -> bool {
    if !keyring.needs_reseal(sealed) {
        return false;
    }
    match keyring.reseal(id, purpose, sealed) {
        Ok(fresh) => {
            *sealed = fresh;
            verified.resealed += 1;
            true
        }
        Err(e) => {
            tracing::warn!(agent = %id, secret = ?purpose, error = %e, "a stored secret could not be sealed with the new master key; set it again through the admin API");
            verified.unreadable += 1;
            false
        }
    }
}
