//! Rate limits (SPEC §7): every configured limit must pass, before authentication.
//! Keyed limiters on governor, by client address, token digest, or one global bucket.

use std::future::Ready;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::Either;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use http::{Request, Response};
use ipnet::IpNet;
use tower::{Layer, Service};

use crate::body::ProxyBody;
use crate::config::{RateKey, RateLimitConfig};
use crate::error::ProxyError;
use crate::layers::auth::token_digest;
use crate::net::{client_ip, ConnInfo};

enum Limiter {
    Ip(DefaultKeyedRateLimiter<IpAddr>),
    /// Keyed by a digest prefix: raw tokens (up to 100 kB each) are never kept.
    Token(DefaultKeyedRateLimiter<[u8; 16]>),
    Global(DefaultDirectRateLimiter),
}

impl Limiter {
    fn label(&self) -> &'static str {
        match self {
            Limiter::Ip(_) => "ip",
            Limiter::Token(_) => "token",
            Limiter::Global(_) => "global",
        }
    }
}

/// The limits the rate-limit layer reads; swapped whole (state and all) on a config reload.
pub type SharedRateLimits = Arc<ArcSwap<RateLimits>>;

pub struct RateLimits {
    limiters: Vec<Limiter>,
    trusted_proxies: Vec<IpNet>,
    clock: DefaultClock,
}

impl RateLimits {
    pub fn new(configs: &[RateLimitConfig], trusted_proxies: Vec<IpNet>) -> RateLimits {
        let limiters = configs
            .iter()
            .map(|config| {
                let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
                let quota = Quota::with_period(config.period)
                    .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
                    .allow_burst(burst);
                match config.key {
                    RateKey::Ip => Limiter::Ip(DefaultKeyedRateLimiter::keyed(quota)),
                    RateKey::Token => Limiter::Token(DefaultKeyedRateLimiter::keyed(quota)),
                    RateKey::Global => Limiter::Global(DefaultDirectRateLimiter::direct(quota)),
                }
            })
            .collect();
        RateLimits {
            limiters,
            trusted_proxies,
            clock: DefaultClock::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
    }

    /// `Err(wait)` when a limit is hit.
    pub fn check<B>(&self, request: &Request<B>) -> Result<(), Duration> {
        for limiter in &self.limiters {
            let verdict = match limiter {
                Limiter::Ip(limiter) => {
                    let peer = request.extensions().get::<ConnInfo>().map(|c| c.peer.ip());
                    let ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |peer| {
                        client_ip(peer, request.headers(), &self.trusted_proxies)
                    });
                    limiter.check_key(&ip)
                }
                Limiter::Token(limiter) => {
                    let digest = token_digest(request.headers()).unwrap_or_default();
                    let mut key = [0u8; 16];
                    key.copy_from_slice(&digest[..16]);
                    limiter.check_key(&key)
                }
                Limiter::Global(limiter) => limiter.check(),
            };
            if let Err(not_until) = verdict {
                metrics::counter!("oncegate_rate_limited_total", "key" => limiter.label())
                    .increment(1);
                return Err(not_until.wait_time_from(self.clock.now()));
            }
        }
        Ok(())
    }

    /// Forgets keys whose buckets are full again, so memory follows the active clients only.
    pub fn prune(&self) {
        for limiter in &self.limiters {
            match limiter {
                Limiter::Ip(limiter) => {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
                Limiter::Token(limiter) => {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
                Limiter::Global(_) => {}
            }
        }
    }
}

#[derive(Clone)]
pub struct RateLimitLayer {
    limits: SharedRateLimits,
}

impl RateLimitLayer {
    pub fn new(limits: SharedRateLimits) -> RateLimitLayer {
        RateLimitLayer { limits }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limits: self.limits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limits: SharedRateLimits,
}

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    /// The inner future as it is, or the refusal: no box of its own per request.
    type Future = Either<Ready<Result<Response<ProxyBody>, ProxyError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if let Err(retry_after) = self.limits.load().check(&request) {
            return Either::Left(std::future::ready(Err(ProxyError::RateLimited {
                retry_after,
            })));
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_from(ip: &str, token: &str) -> Request<()> {
        let mut request = Request::builder()
            .header("x-auth-token", token)
            .body(())
            .unwrap();
        request.extensions_mut().insert(ConnInfo {
            peer: format!("{ip}:1000").parse().unwrap(),
            tls: false,
        });
        request
    }

    fn limit(key: RateKey, per_second: f64, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            key,
            period: Duration::from_secs_f64(1.0 / per_second),
            burst,
        }
    }

    #[test]
    fn ip_limits_are_per_client_and_report_the_wait() {
        let limits = RateLimits::new(&[limit(RateKey::Ip, 0.5, 2)], Vec::new());
        assert!(limits.check(&request_from("10.0.0.1", "t")).is_ok());
        assert!(limits.check(&request_from("10.0.0.1", "t")).is_ok());
        let wait = limits.check(&request_from("10.0.0.1", "t")).unwrap_err();
        assert!(
            wait > Duration::from_secs(1) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
        assert!(limits.check(&request_from("10.0.0.2", "t")).is_ok());
    }

    #[test]
    fn token_and_global_limits() {
        let limits = RateLimits::new(&[limit(RateKey::Token, 1.0, 1)], Vec::new());
        assert!(limits.check(&request_from("10.0.0.1", "a")).is_ok());
        assert!(limits.check(&request_from("10.0.0.2", "a")).is_err());
        assert!(limits.check(&request_from("10.0.0.2", "b")).is_ok());
        let limits = RateLimits::new(&[limit(RateKey::Global, 1.0, 1)], Vec::new());
        assert!(limits.check(&request_from("10.0.0.1", "a")).is_ok());
        assert!(limits.check(&request_from("10.0.0.2", "b")).is_err());
    }

    #[test]
    fn prune_keeps_limiting_active_clients() {
        let limits = RateLimits::new(&[limit(RateKey::Ip, 1.0, 1)], Vec::new());
        assert!(limits.check(&request_from("10.0.0.1", "t")).is_ok());
        limits.prune();
        assert!(limits.check(&request_from("10.0.0.1", "t")).is_err());
    }
}
