//! A general rate limit on every route, per client address (GCRA through `governor`): 429 with `Retry-After`.
//! Login throttling (per account and address, shared through the database) is separate, in `auth::service`.

use crate::app::AppState;
use crate::error::AppError;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::net::IpAddr;
use std::num::NonZeroU32;

pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit").finish_non_exhaustive()
    }
}

impl RateLimit {
    pub fn new(per_second: u64, burst: u32) -> RateLimit {
        let rate = NonZeroU32::new(u32::try_from(per_second).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        RateLimit {
            limiter: DefaultKeyedRateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
        }
    }

    /// `None` when the address may proceed, else the seconds to wait (rounded up).
    pub fn check(&self, ip: IpAddr) -> Option<u64> {
        match self.limiter.check_key(&ip) {
            Ok(()) => None,
            Err(not_until) => Some(not_until.wait_time_from(self.clock.now()).as_secs() + 1),
        }
    }

    /// Forgets addresses whose state has fully recovered (bounded memory).
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

pub async fn rate_limit(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody + 'static>, actix_web::Error> {
    let wait = match (req.app_data::<web::Data<AppState>>(), req.peer_addr()) {
        (Some(state), Some(peer)) => {
            let forwarded = req.headers().get_all("x-forwarded-for").filter_map(|v| v.to_str().ok());
            let ip = crate::api::client_addr::resolve(peer.ip(), forwarded, &state.config.network.trusted_proxies);
            state.limits.check(ip)
        }
        _ => None,
    };
    if let Some(retry_after_secs) = wait {
        let resp = actix_web::ResponseError::error_response(&AppError::TooManyRequests { retry_after_secs });
        return Ok(req.into_response(resp).map_into_right_body());
    }
    next.call(req).await.map(ServiceResponse::map_into_left_body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_429_per_address() {
        let limit = RateLimit::new(1, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!((0..3).all(|_| limit.check(a).is_none()));
        assert!(limit.check(a).is_some_and(|s| s >= 1));
        assert!(limit.check(b).is_none(), "other addresses are unaffected");
    }
}
