//! Per-route rate limit: a token bucket (`rps` tokens a second, `burst` at most) kept as one
//! atomic "theoretical arrival time" (GCRA), so taking a token is a load and a CAS, no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A token bucket shared by all requests of one route of one revision.
pub struct TokenBucket {
    /// Nanoseconds per token.
    interval: u64,
    /// How far ahead of now the arrival time may run: `burst` tokens' worth.
    tolerance: u64,
    /// Theoretical arrival time of the next token, nanoseconds since `epoch`.
    tat: AtomicU64,
    epoch: Instant,
}

impl TokenBucket {
    pub fn new(rps: u32, burst: u32) -> TokenBucket {
        let interval = 1_000_000_000 / u64::from(rps.max(1));
        TokenBucket {
            interval,
            tolerance: interval * u64::from(burst.max(1)),
            tat: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Takes a token now; `Err` says how long until one is available.
    pub fn try_take(&self) -> Result<(), Duration> {
        self.try_take_at(self.epoch.elapsed().as_nanos() as u64)
    }

    /// [`TokenBucket::try_take`] at `now` (nanoseconds since the bucket was made).
    pub fn try_take_at(&self, now: u64) -> Result<(), Duration> {
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + self.interval;
            let ahead = next - now;
            if ahead > self.tolerance {
                return Err(Duration::from_nanos(ahead - self.tolerance));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_refill_at_rps() {
        let b = TokenBucket::new(10, 3); // one token per 100 ms, 3 at once
        let t0 = 5_000 * MS;
        for _ in 0..3 {
            assert!(b.try_take_at(t0).is_ok());
        }
        let wait = b.try_take_at(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // 50 ms later still empty, with 50 ms to go.
        assert_eq!(
            b.try_take_at(t0 + 50 * MS).unwrap_err(),
            Duration::from_millis(50)
        );
        // One token back after 100 ms, and only one.
        assert!(b.try_take_at(t0 + 100 * MS).is_ok());
        assert!(b.try_take_at(t0 + 100 * MS).is_err());
        // A long pause refills to the burst, not beyond.
        let later = t0 + 10_000 * MS;
        for _ in 0..3 {
            assert!(b.try_take_at(later).is_ok());
        }
        assert!(b.try_take_at(later).is_err());
    }

    #[test]
    fn concurrent_takers_get_exactly_the_burst() {
        let b = std::sync::Arc::new(TokenBucket::new(1, 100));
        let ok = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        if b.try_take_at(1_000 * MS).is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(ok.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}
