//! What embedded mode creates on its first start, so that `wagate serve` works with nothing
//! configured: the master key that encrypts stored secrets and the admin API's token, each in
//! a file of the data folder readable by its owner only (0600). Later starts read them back,
//! making them private first if they were not ([`wagate_embedded::data_dir`] says why).
//! Their paths are printed, never their contents.

use std::{io::Write, path::Path};

use anyhow::{Context, Result};
use base64::Engine;
use rand::RngExt;
use secrecy::{ExposeSecret, SecretString};
use wagate_embedded::data_dir;

/// Reads the secret in `data_dir/name`, creating it with `generate` on the first start.
pub fn secret_file(
    data_dir: &Path,
    name: &str,
    what: &str,
    generate: fn() -> SecretString,
) -> Result<SecretString> {
    let path = data_dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => {
            data_dir::private_file(&path)?;
            return Ok(SecretString::from(text.trim().to_owned()));
        }
        Ok(_) => anyhow::bail!(
            "{} is empty: delete it to have a new {what} made",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let secret = generate();
    let mut file = data_dir::create_private(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{}", secret.expose_secret())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tracing::info!(path = %path.display(), "created the {what} (first start)");
    eprintln!(
        "wagate: first start: created the {what} in {}",
        path.display()
    );
    Ok(secret)
}

/// A random admin token: 32 bytes, URL-safe base64.
pub fn generate_token() -> SecretString {
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes);
    SecretString::from(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}
