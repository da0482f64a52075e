//! Opening what the roles run on: NATS and Redis, or the embedded store (its master key and
//! admin token made on first start); the master key checked against the data; and, for a role
//! on a runtime of its own, connections of its own.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use bus::{
    Bus,
    jetstream::{JetStreamBus, JetStreamOptions},
};
use secrecy::SecretString;
use shared::embedded::EmbeddedOptions;
use shared::{
    config::{Backends, ServerUrl, Settings},
    directory::ChannelDirectory,
    embedded::Embedded,
    key_check,
};
use store::{Store, redis::RedisStore};
use wagate_core::crypto::Keyring;

use crate::{Roles, first_start};

/// What the process's roles share.
pub(super) struct Deps {
    pub bus: Arc<dyn Bus>,
    pub store: Arc<dyn Store>,
    pub keyring: Arc<Keyring>,
    pub directory: Arc<ChannelDirectory>,
    pub admin_token: Option<SecretString>,
}

/// Opens the bus and the store of `roles` and checks the master key against the data.
pub(super) async fn connect(settings: &Settings, roles: Roles) -> Result<Deps> {
    let mut master = settings.master_key.clone();
    let mut admin_token = settings.admin_token.clone();
    let (bus, store): (Arc<dyn Bus>, Arc<dyn Store>) = match settings.backends()? {
        Backends::Distributed {
            nats_url,
            redis_url,
        } => {
            let max_in_flight = settings.worker_concurrency.max(settings.sender_concurrency);
            connect_remote(settings, &nats_url, &redis_url, max_in_flight).await?
        }
        Backends::Embedded => {
            if roles != Roles::ALL {
                return Err(anyhow!(
                    "embedded mode runs every role in one process: use `wagate serve`, or set WAGATE_NATS_URL and WAGATE_REDIS_URL to run roles apart"
                ));
            }
            let dir = settings.data_dir.clone();
            let options = EmbeddedOptions {
                duplicate_window: std::time::Duration::from_millis(
                    settings.dedupe_window_ms.max(1000),
                ),
            };
            let embedded =
                tokio::task::spawn_blocking(move || Embedded::open(&dir, options)).await??;
            if master.is_none() {
                master = Some(first_start::secret_file(
                    &settings.data_dir,
                    "master.key",
                    "master key",
                    Keyring::generate_key,
                )?);
            }
            if admin_token.is_none() {
                admin_token = Some(first_start::secret_file(
                    &settings.data_dir,
                    "admin.token",
                    "admin token",
                    first_start::generate_token,
                )?);
                if let Some(token) = &admin_token {
                    let file = settings.data_dir.join("admin.token");
                    shared::config::check_admin_token(token, &file.display().to_string())?;
                }
            }
            (Arc::new(embedded.bus), Arc::new(embedded.store))
        }
    };
    if roles.ingress && admin_token.is_none() {
        tracing::warn!(
            "WAGATE_ADMIN_TOKEN is not set: the admin API answers 401 to every call until it is"
        );
    }
    // Embedded mode is for trying wagate, often behind a tunnel whose URL changes; a deployment
    // behind a load balancer should say where Twilio reaches it.
    if roles.ingress && settings.nats_url.is_some() && settings.public_url.is_none() {
        tracing::warn!(
            "WAGATE_PUBLIC_URL is not set: signatures are checked against the URL rebuilt from each request's Host and X-Forwarded-Proto, which fails behind a proxy that rewrites them; set it to the base URL configured in Twilio"
        );
    }
    let master = master.as_ref().ok_or_else(|| {
        anyhow!(
            "WAGATE_MASTER_KEY is required with NATS and Redis: create one with `wagate keygen`"
        )
    })?;
    let keyring = Arc::new(
        Keyring::from_base64(master, &settings.master_key_previous).context("WAGATE_MASTER_KEY")?,
    );
    check_master_key(&*store, &keyring).await?;
    let directory = ChannelDirectory::new(store.clone(), keyring.clone());
    Ok(Deps {
        bus,
        store,
        keyring,
        directory,
        admin_token,
    })
}

/// Refuses to start with a master key that the stored data was not sealed with (every webhook
/// would fail while `/readyz` said ready), and finishes a key rotation; see
/// [`shared::key_check`].
async fn check_master_key(store: &dyn Store, keyring: &Keyring) -> Result<()> {
    let verified = key_check::verify(store, keyring).await?;
    if verified.resealed > 0 {
        tracing::info!(
            secrets = verified.resealed,
            "sealed stored secrets again with the new master key"
        );
    }
    if verified.rotated {
        tracing::info!(
            key_id = keyring.primary_id(),
            "master key rotation finished: the old keys (WAGATE_MASTER_KEY_PREVIOUS) are no longer needed"
        );
    } else if verified.unreadable > 0 {
        tracing::warn!(
            secrets = verified.unreadable,
            "stored secrets that open with none of the master keys held stay as they are, and so does the key check: set them again through the admin API"
        );
    }
    Ok(())
}

/// Connects to NATS and Redis; `max_in_flight` bounds the deliveries the bus holds at once.
async fn connect_remote(
    settings: &Settings,
    nats_url: &ServerUrl,
    redis_url: &ServerUrl,
    max_in_flight: usize,
) -> Result<(Arc<dyn Bus>, Arc<dyn Store>)> {
    let options = JetStreamOptions {
        replicas: settings.nats_replicas,
        credentials_file: settings.nats_creds.clone(),
        tls_ca: settings.nats_tls_ca.clone(),
        ..JetStreamOptions::new(
            settings.prefix.clone(),
            max_in_flight,
            std::time::Duration::from_millis(settings.dedupe_window_ms.max(1000)),
        )
    };
    let bus = JetStreamBus::connect(nats_url.expose(), options).await?;
    let topology = settings.redis_topology()?;
    let store = RedisStore::connect_to(redis_url.expose(), &topology, &settings.prefix).await?;
    Ok((Arc::new(bus), Arc::new(store)))
}

/// Where a role's bus and store come from.
#[derive(Clone)]
pub(super) enum Backing {
    /// The process's own: embedded mode, or a process that runs one role.
    Shared {
        bus: Arc<dyn Bus>,
        store: Arc<dyn Store>,
    },
    /// A role on a runtime of its own connects its own: a NATS or Redis connection is driven by
    /// a task on the runtime that opened it, so sharing one would hand every call to the other
    /// runtime's thread and back.
    Own {
        nats_url: ServerUrl,
        redis_url: ServerUrl,
    },
}

impl Backing {
    pub(super) async fn open(
        self,
        settings: &Settings,
        max_in_flight: usize,
    ) -> Result<(Arc<dyn Bus>, Arc<dyn Store>)> {
        match self {
            Backing::Shared { bus, store } => Ok((bus, store)),
            Backing::Own {
                nats_url,
                redis_url,
            } => connect_remote(settings, &nats_url, &redis_url, max_in_flight).await,
        }
    }
}
