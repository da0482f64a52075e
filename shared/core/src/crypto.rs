//! Encryption of stored secrets (Twilio Auth Tokens, agent API keys, webhook secrets).
//!
//! AES-SIV (RFC 5297) under a 64-byte master key. Each sealed value binds, as associated data,
//! the agent id and the purpose of the secret, so a ciphertext copied onto another agent or
//! field does not open. A random 16-byte nonce is a further header, so two agents with the same
//! token do not store equal ciphertexts. The sealed text names the key it was made with
//! (`v1.<key id>.<nonce>.<ciphertext>`), so keys can rotate: the keyring opens values of every
//! key it holds and seals with the newest. A key check, a known text sealed the same way under
//! a label of its own, lets a process tell at start whether its keyring is the one the stored
//! data was sealed with (`shared::key_check`).

use aes_siv::{KeyInit, siv::Aes256Siv};
use base64::{Engine, engine::general_purpose::STANDARD, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngExt;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::AgentId;

/// Why a key or a sealed value was refused. Never carries secret material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The master key text is not base64 of 64 bytes.
    #[error("the master key must be base64 of 64 random bytes (e.g. `openssl rand -base64 64`)")]
    BadKey,
    /// The sealed value was made with a key this process does not hold.
    #[error(
        "a stored secret was sealed with key {0}, which this process does not have (set WAGATE_MASTER_KEY_PREVIOUS)"
    )]
    UnknownKey(String),
    /// The sealed value is damaged, or belongs to another agent or field.
    #[error("a stored secret could not be decrypted (damaged, or moved between agents)")]
    Corrupt,
}

/// What a secret is for; part of the associated data so secrets cannot be swapped between fields.
#[derive(Debug, Clone, Copy)]
pub enum SecretPurpose {
    /// The Twilio Auth Token of an agent's WhatsApp channel.
    TwilioAuthToken,
    /// The API key of an OpenAI-compatible backend.
    AgentApiKey,
    /// The signing secret of a webhook backend.
    WebhookSecret,
    /// The `user:password` of an agent backend's URL.
    UrlCredentials,
    /// The Standard Webhooks secret of an agent's event webhook.
    EventsSecret,
}

impl SecretPurpose {
    fn label(self) -> &'static [u8] {
        match self {
            Self::TwilioAuthToken => b"twilio-auth-token",
            Self::AgentApiKey => b"agent-api-key",
            Self::WebhookSecret => b"webhook-secret",
            Self::UrlCredentials => b"url-credentials",
            Self::EventsSecret => b"events-secret",
        }
    }
}

/// A secret as it is stored: ciphertext only, safe to persist and to log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SealedSecret(String);

impl SealedSecret {
    /// The stored text (`v1.<kid>.<nonce>.<ciphertext>`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A sealed value as read back from a store that keeps it as plain text; whether it opens
    /// is for the keyring to say.
    pub fn from_stored(text: String) -> Self {
        Self(text)
    }
}

/// The key check's associated data: an empty scope, which no agent id is (they are 1 to 64
/// characters), and a label of its own, so no stored secret can pass for a check or the reverse.
const KEY_CHECK_SCOPE: &[u8] = b"";
const KEY_CHECK_LABEL: &[u8] = b"master-key-check";
/// What a key check seals; not secret, only proof that the key that opens it sealed it.
const KEY_CHECK_TEXT: &[u8] = b"wagate master key check v1";

/// Which key of the keyring opened a stored key check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// The primary key: the data is sealed with the key that seals new values.
    Primary,
    /// A key being rotated out (`WAGATE_MASTER_KEY_PREVIOUS`): the check should be sealed again
    /// with the primary once every stored secret is.
    Previous,
}

struct MasterKey {
    id: String,
    bytes: SecretBox<[u8; 64]>,
}

impl MasterKey {
    fn from_base64(text: &SecretString) -> Result<Self, CryptoError> {
        let decoded = STANDARD
            .decode(text.expose_secret().trim())
            .map_err(|_| CryptoError::BadKey)?;
        let bytes: [u8; 64] = decoded.try_into().map_err(|_| CryptoError::BadKey)?;
        let mut hasher = Sha256::new();
        hasher.update(b"wagate-key-id\0");
        hasher.update(bytes);
        let id = hex::encode(&hasher.finalize()[..4]);
        Ok(Self {
            id,
            bytes: SecretBox::new(Box::new(bytes)),
        })
    }

    fn cipher(&self) -> Aes256Siv {
        // 64 bytes is exactly Aes256Siv's key size, checked when the key was parsed.
        Aes256Siv::new(self.bytes.expose_secret().into())
    }
}

/// The master keys of this process: the newest seals, all of them open.
pub struct Keyring {
    primary: MasterKey,
    previous: Vec<MasterKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keyring {
    /// A keyring from the base64 texts of the current key and any keys being rotated out.
    pub fn from_base64(
        primary: &SecretString,
        previous: &[SecretString],
    ) -> Result<Self, CryptoError> {
        Ok(Self {
            primary: MasterKey::from_base64(primary)?,
            previous: previous
                .iter()
                .map(MasterKey::from_base64)
                .collect::<Result<_, _>>()?,
        })
    }

    /// A fresh random master key, as base64 text (for first starts and `wagate keygen`).
    pub fn generate_key() -> SecretString {
        let mut bytes = [0u8; 64];
        rand::rng().fill(&mut bytes);
        SecretString::from(STANDARD.encode(bytes))
    }

    /// The id of the key that seals new values.
    pub fn primary_id(&self) -> &str {
        &self.primary.id
    }

    /// Encrypts `plaintext` for `agent` and `purpose`.
    pub fn seal(
        &self,
        agent: &AgentId,
        purpose: SecretPurpose,
        plaintext: &SecretString,
    ) -> SealedSecret {
        self.seal_bound(
            agent.as_str().as_bytes(),
            purpose.label(),
            plaintext.expose_secret().as_bytes(),
        )
    }

    /// Decrypts a stored value; fails if it was sealed for another agent or purpose.
    pub fn open(
        &self,
        agent: &AgentId,
        purpose: SecretPurpose,
        sealed: &SealedSecret,
    ) -> Result<SecretString, CryptoError> {
        let (plain, _) = self.open_bound(agent.as_str().as_bytes(), purpose.label(), sealed)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| CryptoError::Corrupt)
    }

    /// Whether `sealed` was made with a key other than the primary (or cannot be read at all):
    /// what rotation has yet to seal again.
    pub fn needs_reseal(&self, sealed: &SealedSecret) -> bool {
        sealed.0.split('.').nth(1) != Some(self.primary.id.as_str())
    }

    /// A fresh key check: a known text sealed with the primary key, stored beside the data so
    /// that a later start can tell whether its keyring is the one the data was sealed with.
    pub fn seal_key_check(&self) -> SealedSecret {
        self.seal_bound(KEY_CHECK_SCOPE, KEY_CHECK_LABEL, KEY_CHECK_TEXT)
    }

    /// Opens a stored key check with any key of the keyring, and says which one opened it.
    pub fn open_key_check(&self, sealed: &SealedSecret) -> Result<KeyCheck, CryptoError> {
        let (plain, key) = self.open_bound(KEY_CHECK_SCOPE, KEY_CHECK_LABEL, sealed)?;
        if plain != KEY_CHECK_TEXT {
            return Err(CryptoError::Corrupt);
        }
        Ok(if key.id == self.primary.id {
            KeyCheck::Primary
        } else {
            KeyCheck::Previous
        })
    }

    /// A 32-byte key for `label`: HMAC-SHA256 keyed by the primary master key over the label
    /// (HMAC as a pseudorandom function, as HKDF-Expand of RFC 5869 uses it). Every process
    /// given the same master key derives the same key, so what one process signs (a console
    /// session cookie) another behind the same load balancer accepts, while the master key
    /// itself never signs anything.
    pub fn derive_key(&self, label: &str) -> SecretBox<[u8; 32]> {
        use hmac::{KeyInit as _, Mac};
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(self.primary.bytes.expose_secret())
            .expect("HMAC takes a key of any length");
        mac.update(b"wagate-derive\0");
        mac.update(label.as_bytes());
        SecretBox::new(Box::new(mac.finalize().into_bytes().into()))
    }

    /// Whether keys being rotated out are held besides the primary.
    pub fn is_rotating(&self) -> bool {
        !self.previous.is_empty()
    }

    /// The ids of every key held, the primary first: safe to print (a key id is 4 bytes of a
    /// hash of the key), and what an operator compares with the id a check names.
    pub fn key_ids(&self) -> Vec<&str> {
        std::iter::once(&self.primary)
            .chain(&self.previous)
            .map(|k| k.id.as_str())
            .collect()
    }

    /// Seals `plaintext` under the primary key, bound to `scope` and `label` as associated data.
    fn seal_bound(&self, scope: &[u8], label: &[u8], plaintext: &[u8]) -> SealedSecret {
        let mut nonce = [0u8; 16];
        rand::rng().fill(&mut nonce);
        let headers: [&[u8]; 3] = [scope, label, &nonce];
        let sealed = self
            .primary
            .cipher()
            .encrypt(headers, plaintext)
            // SIV encryption only fails for more headers than the algorithm allows; we pass 3.
            .unwrap_or_default();
        SealedSecret(format!(
            "v1.{}.{}.{}",
            self.primary.id,
            URL_SAFE_NO_PAD.encode(nonce),
            URL_SAFE_NO_PAD.encode(sealed)
        ))
    }

    /// Opens a value sealed by [`Self::seal_bound`] with the same `scope` and `label`, with the
    /// key its text names; returns the plaintext and that key.
    fn open_bound(
        &self,
        scope: &[u8],
        label: &[u8],
        sealed: &SealedSecret,
    ) -> Result<(Vec<u8>, &MasterKey), CryptoError> {
        let mut parts = sealed.0.split('.');
        let (Some("v1"), Some(kid), Some(nonce), Some(ct), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(CryptoError::Corrupt);
        };
        let key = std::iter::once(&self.primary)
            .chain(&self.previous)
            .find(|k| k.id == kid)
            .ok_or_else(|| CryptoError::UnknownKey(kid.to_owned()))?;
        let nonce = URL_SAFE_NO_PAD
            .decode(nonce)
            .map_err(|_| CryptoError::Corrupt)?;
        let ct = URL_SAFE_NO_PAD
            .decode(ct)
            .map_err(|_| CryptoError::Corrupt)?;
        let headers: [&[u8]; 3] = [scope, label, &nonce];
        let plain = key
            .cipher()
            .decrypt(headers, &ct)
            .map_err(|_| CryptoError::Corrupt)?;
        Ok((plain, key))
    }

    /// Seals again under the primary key, for rotation.
    pub fn reseal(
        &self,
        agent: &AgentId,
        purpose: SecretPurpose,
        sealed: &SealedSecret,
    ) -> Result<SealedSecret, CryptoError> {
        Ok(self.seal(agent, purpose, &self.open(agent, purpose, sealed)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::from_base64(&Keyring::generate_key(), &[]).unwrap()
    }

    #[test]
    fn derived_keys_depend_on_the_master_key_and_the_label() {
        let key = Keyring::generate_key();
        let one = Keyring::from_base64(&key, &[]).unwrap();
        let same = Keyring::from_base64(&key, &[]).unwrap();
        let derive = |k: &Keyring, label| *k.derive_key(label).expose_secret();
        assert_eq!(derive(&one, "console"), derive(&same, "console"));
        assert_ne!(derive(&one, "console"), derive(&one, "other"));
        assert_ne!(derive(&one, "console"), derive(&ring(), "console"));
    }

    #[test]
    fn round_trip_and_binding() {
        let k = ring();
        let a = AgentId::parse("a").unwrap();
        let b = AgentId::parse("b").unwrap();
        let token = SecretString::from("secret-token-123");
        let sealed = k.seal(&a, SecretPurpose::TwilioAuthToken, &token);
        assert!(!sealed.as_str().contains("secret-token-123"));
        let opened = k.open(&a, SecretPurpose::TwilioAuthToken, &sealed).unwrap();
        assert_eq!(opened.expose_secret(), "secret-token-123");
        assert!(k.open(&b, SecretPurpose::TwilioAuthToken, &sealed).is_err());
        assert!(k.open(&a, SecretPurpose::AgentApiKey, &sealed).is_err());
        // The nonce makes equal plaintexts seal differently.
        assert_ne!(sealed, k.seal(&a, SecretPurpose::TwilioAuthToken, &token));
    }

    #[test]
    fn rotation() {
        let old_text = Keyring::generate_key();
        let old = Keyring::from_base64(&old_text, &[]).unwrap();
        let a = AgentId::parse("a").unwrap();
        let sealed = old.seal(&a, SecretPurpose::WebhookSecret, &SecretString::from("s"));
        let new = Keyring::from_base64(&Keyring::generate_key(), &[old_text]).unwrap();
        let resealed = new
            .reseal(&a, SecretPurpose::WebhookSecret, &sealed)
            .unwrap();
        assert!(resealed.as_str().contains(new.primary_id()));
        let only_new = Keyring::from_base64(&Keyring::generate_key(), &[]).unwrap();
        assert!(matches!(
            only_new.open(&a, SecretPurpose::WebhookSecret, &sealed),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    /// The key id in a sealed value is only a label: someone holding the stored data can
    /// rewrite it. A value sealed under one master key, relabelled with the id of another,
    /// must still not open under that other key; it would if sealing did not use the key.
    #[test]
    fn a_value_sealed_under_one_key_does_not_open_under_another_even_relabelled() {
        let k1 = ring();
        let k2 = ring();
        let a = AgentId::parse("a").unwrap();
        let sealed = k1.seal(
            &a,
            SecretPurpose::TwilioAuthToken,
            &SecretString::from("secret-token-123"),
        );
        assert!(matches!(
            k2.open(&a, SecretPurpose::TwilioAuthToken, &sealed),
            Err(CryptoError::UnknownKey(_))
        ));
        let relabelled = SealedSecret(sealed.as_str().replacen(
            &format!("v1.{}.", k1.primary_id()),
            &format!("v1.{}.", k2.primary_id()),
            1,
        ));
        assert_ne!(relabelled, sealed);
        assert!(matches!(
            k2.open(&a, SecretPurpose::TwilioAuthToken, &relabelled),
            Err(CryptoError::Corrupt)
        ));
        // Put back under its own key's id, the same ciphertext opens: the refusal above was
        // the key's doing.
        let opened = k1
            .open(&a, SecretPurpose::TwilioAuthToken, &sealed)
            .unwrap();
        assert_eq!(opened.expose_secret(), "secret-token-123");
    }

    /// The sealed value is AES-SIV under the 64 master-key bytes themselves, with the agent,
    /// the purpose and the nonce as headers: any AES-SIV implementation given the key opens it.
    #[test]
    fn the_ciphertext_is_aes_siv_under_the_master_key_bytes() {
        let text = Keyring::generate_key();
        let key: [u8; 64] = STANDARD
            .decode(text.expose_secret())
            .unwrap()
            .try_into()
            .unwrap();
        let k = Keyring::from_base64(&text, &[]).unwrap();
        let a = AgentId::parse("a").unwrap();
        let sealed = k.seal(
            &a,
            SecretPurpose::AgentApiKey,
            &SecretString::from("sk-123"),
        );
        let parts: Vec<&str> = sealed.as_str().split('.').collect();
        let nonce = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let ct = URL_SAFE_NO_PAD.decode(parts[3]).unwrap();
        let headers: [&[u8]; 3] = [b"a", b"agent-api-key", &nonce];
        let plain = Aes256Siv::new(&key.into()).decrypt(headers, &ct).unwrap();
        assert_eq!(plain, b"sk-123");
        let mut other = key;
        other[63] ^= 1;
        assert!(Aes256Siv::new(&other.into()).decrypt(headers, &ct).is_err());
    }

    #[test]
    fn a_key_check_opens_with_the_key_that_sealed_it_and_no_other() {
        let k1 = Keyring::generate_key();
        let k2 = Keyring::generate_key();
        let first = Keyring::from_base64(&k1, &[]).unwrap();
        let check = first.seal_key_check();
        assert_eq!(first.open_key_check(&check).unwrap(), KeyCheck::Primary);
        let rotating = Keyring::from_base64(&k2, std::slice::from_ref(&k1)).unwrap();
        assert!(rotating.is_rotating());
        assert_eq!(rotating.open_key_check(&check).unwrap(), KeyCheck::Previous);
        assert!(rotating.needs_reseal(&check));
        let wrong = Keyring::from_base64(&k2, &[]).unwrap();
        assert!(matches!(
            wrong.open_key_check(&check),
            Err(CryptoError::UnknownKey(id)) if id == first.primary_id()
        ));
        // A stored secret cannot pass for a check, nor a check for a secret.
        let a = AgentId::parse("a").unwrap();
        let secret = first.seal(&a, SecretPurpose::WebhookSecret, &SecretString::from("s"));
        assert!(first.open_key_check(&secret).is_err());
        assert!(
            first
                .open(&a, SecretPurpose::WebhookSecret, &check)
                .is_err()
        );
    }

    #[test]
    fn garbage_never_panics() {
        let k = ring();
        let a = AgentId::parse("a").unwrap();
        for s in [
            "",
            "v1",
            "v1.x.y.z",
            "v1...",
            "v2.a.b.c",
            "v1.a.b.c.d",
            "v1.\u{1F600}.!.!",
        ] {
            assert!(
                k.open(&a, SecretPurpose::AgentApiKey, &SealedSecret(s.into()))
                    .is_err()
            );
        }
        assert!(Keyring::from_base64(&SecretString::from("abc"), &[]).is_err());
    }
}
