//! Sign-in attempts per client: a burst of [`BURST`], then one every [`PERIOD`], so that the
//! admin token cannot be guessed at the speed of the network. An attempt over the limit is
//! refused before the token is looked at.
//!
//! A client is its IPv4 address, or the /64 network of its IPv6 address (one host commonly
//! holds a whole /64, and would otherwise get a fresh allowance per address). Behind a reverse
//! proxy every client is the proxy, so the limit is shared: slower sign-ins for everyone rather
//! than a header a client could forge to get its own allowance.
//!
//! Memory is bounded: clients whose allowance is full again are forgotten every [`SWEEP`] (the
//! keyed limiter never forgets on its own), and past [`MAX_CLIENTS`] remembered clients every
//! newcomer shares one allowance until the sweep makes room.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::request::Parts,
};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Attempts a client may make at once.
pub(crate) const BURST: u32 = 5;
/// Time after which a client may try once more.
pub(crate) const PERIOD: Duration = Duration::from_secs(10);
/// How often clients with a full allowance are forgotten.
const SWEEP: Duration = Duration::from_secs(60);
/// Clients remembered at most (about a hundred bytes each).
const MAX_CLIENTS: usize = 100_000;

/// Who is trying to sign in, as far as the limit is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Client {
    V4([u8; 4]),
    V6Net([u8; 8]),
    /// The connection's address is not known (not served over TCP).
    Unknown,
    /// Anyone new while [`MAX_CLIENTS`] are remembered.
    Overflow,
}

impl Client {
    fn of(ip: Option<IpAddr>) -> Self {
        match ip.map(|ip| ip.to_canonical()) {
            Some(IpAddr::V4(v4)) => Self::V4(v4.octets()),
            Some(IpAddr::V6(v6)) => {
                let mut net = [0; 8];
                net.copy_from_slice(&v6.octets()[..8]);
                Self::V6Net(net)
            }
            None => Self::Unknown,
        }
    }
}

/// The sign-in limit of one process.
pub(crate) struct SignInLimit {
    limiter: DefaultKeyedRateLimiter<Client>,
    last_sweep: Mutex<Instant>,
}

impl Default for SignInLimit {
    fn default() -> Self {
        let burst = NonZeroU32::new(BURST).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(PERIOD)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            last_sweep: Mutex::new(Instant::now()),
        }
    }
}

impl SignInLimit {
    /// Counts an attempt from `ip`; false when it is over the limit.
    pub(crate) fn attempt(&self, ip: Option<IpAddr>) -> bool {
        self.sweep();
        let client = if self.limiter.len() >= MAX_CLIENTS {
            Client::Overflow
        } else {
            Client::of(ip)
        };
        self.limiter.check_key(&client).is_ok()
    }

    /// Forgets the clients with a full allowance, once a [`SWEEP`].
    fn sweep(&self) {
        let Ok(mut last) = self.last_sweep.lock() else {
            return;
        };
        if last.elapsed() < SWEEP {
            return;
        }
        *last = Instant::now();
        drop(last);
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// The client's address, from the connection (`src/http.rs` puts it in each request); `None`
/// when the request did not come over TCP.
pub(crate) struct ClientIp(pub(crate) Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_nothing_per_client_and_ipv6_by_network() {
        let limit = SignInLimit::default();
        let a = IpAddr::from([192, 0, 2, 1]);
        let b = IpAddr::from([192, 0, 2, 2]);
        for n in 0..BURST {
            assert!(limit.attempt(Some(a)), "attempt {n}");
        }
        assert!(!limit.attempt(Some(a)));
        assert!(
            limit.attempt(Some(b)),
            "another client has its own allowance"
        );
        let v6 = |s: &str| s.parse::<IpAddr>().ok();
        for _ in 0..BURST {
            assert!(limit.attempt(v6("2001:db8:1:2::1")));
        }
        assert!(
            !limit.attempt(v6("2001:db8:1:2::ffff")),
            "the same /64 is the same client"
        );
        assert!(limit.attempt(v6("2001:db8:1:3::1")));
    }
}
