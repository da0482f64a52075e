//! The process's listeners, each serving what its role owns plus the process's probes: ingress's
//! webhook listener (webhooks, `/healthz`, `/readyz`) and admin listener (admin API, probes,
//! `/metrics`), or, in a process without ingress, the worker's or sender's
//! `WAGATE_METRICS_LISTEN` (probes and `/metrics`).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use shared::{config::Settings, shutdown::Shutdown};
use tokio::task::JoinSet;

use crate::{health, http};

/// Connections the kernel queues for a listener before the accept loop takes them (capped by
/// `net.core.somaxconn`). tokio's 1024 overflows under a burst of connections while the accept
/// loop catches up, and then a client (a health check among them) is not answered until its
/// SYN is sent again a second later.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    };
    socket
        .and_then(|s| {
            // As std and tokio do on Unix: a restart can bind while old connections linger.
            #[cfg(unix)]
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(LISTEN_BACKLOG)
        })
        .with_context(|| format!("cannot listen on {addr} ({what}); is the port taken?"))
}

/// What the listeners say once bound.
pub struct Bound {
    /// What each listens on, for the ready line.
    pub listening: Vec<String>,
    /// In embedded mode, the console's one-time sign-in link, to print at start.
    pub sign_in_link: Option<String>,
}

/// Binds the listeners and serves them on `tasks` until `shutdown`; ingress's when `ingress`
/// is given, else the metrics listener if one is configured.
pub async fn start(
    settings: &Settings,
    ingress: Option<ingress::AppState>,
    health: health::Health,
    shutdown: &Shutdown,
    tasks: &mut JoinSet<Result<()>>,
) -> Result<Bound> {
    let limits = http::Limits::of(settings);
    let serve = |listener, what, router| {
        http::serve(
            listener,
            what,
            router,
            limits,
            shutdown.clone(),
            settings.shutdown_grace(),
        )
    };
    let mut listening = Vec::new();
    let mut sign_in_link = None;
    if let Some(state) = ingress {
        let webhooks = bind(settings.listen, "WAGATE_LISTEN").await?;
        let admin = bind(settings.admin_listen, "WAGATE_ADMIN_LISTEN").await?;
        listening.push(format!("webhooks on {}", webhooks.local_addr()?));
        let admin_addr = admin.local_addr()?;
        listening.push(format!("admin API on {admin_addr}"));
        if matches!(settings.backends(), Ok(shared::config::Backends::Embedded)) {
            sign_in_link = ingress::console::sign_in_link(&state, &browsable(admin_addr));
        }
        let public = ingress::webhook_router(state.clone()).merge(health::probes(health.clone()));
        tasks.spawn(serve(webhooks, "WAGATE_LISTEN", public));
        let admin_routes = ingress::admin_router(state).merge(health::routes(health));
        tasks.spawn(serve(admin, "WAGATE_ADMIN_LISTEN", admin_routes));
    } else if let Some(addr) = settings.metrics_listen {
        let listener = bind(addr, "WAGATE_METRICS_LISTEN").await?;
        listening.push(format!("health and metrics on {}", listener.local_addr()?));
        tasks.spawn(serve(
            listener,
            "WAGATE_METRICS_LISTEN",
            health::routes(health),
        ));
    }
    Ok(Bound {
        listening,
        sign_in_link,
    })
}

/// The admin listener's address as a browser on this machine reaches it.
fn browsable(addr: SocketAddr) -> String {
    let host = match addr.ip() {
        ip if ip.is_unspecified() && addr.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("http://{host}:{}", addr.port())
}
