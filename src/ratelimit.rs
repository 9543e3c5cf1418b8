//! Token buckets for rate limits (connections per source address, SENDs per connection).
//!
//! Pure: time is passed in (ms). Small on purpose (16 bytes), since every connection holds one.

/// A token bucket that refills at `rate_per_s` up to `burst` tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenBucket {
    tokens: f32,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: u32, now_ms: u64) -> TokenBucket {
        TokenBucket {
            tokens: burst as f32,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64, rate_per_s: u32, burst: u32) {
        let elapsed_ms = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let added = elapsed_ms as f64 * f64::from(rate_per_s) / 1000.0;
        self.tokens = (f64::from(self.tokens) + added).min(f64::from(burst)) as f32;
    }

    /// Takes one token if there is one (after refilling); false when over the limit.
    pub fn take(&mut self, now_ms: u64, rate_per_s: u32, burst: u32) -> bool {
        self.refill(now_ms, rate_per_s, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full again (its owner has been quiet): safe to forget.
    pub fn is_full(&mut self, now_ms: u64, rate_per_s: u32, burst: u32) -> bool {
        self.refill(now_ms, rate_per_s, burst);
        self.tokens >= burst as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_the_rate() {
        let mut b = TokenBucket::full(10, 0);
        assert_eq!((0..20).filter(|_| b.take(0, 100, 10)).count(), 10);
        assert!(!b.take(0, 100, 10));
        // 100/s: one token per 10 ms.
        assert!(b.take(10, 100, 10));
        assert!(!b.take(10, 100, 10));
        assert_eq!(
            (0..100).filter(|_| b.take(110, 100, 10)).count(),
            10,
            "capped at burst"
        );
        assert!(!b.is_full(110, 100, 10));
        assert!(b.is_full(10_000, 100, 10));
        // Time going backwards (clock step) neither panics nor mints tokens.
        assert!(!b.take(5_000, 100, 0));
    }

    #[test]
    fn sustained_rate_is_kept_over_a_long_run() {
        let mut b = TokenBucket::full(5, 0);
        let taken = (0..100_000u64).filter(|ms| b.take(*ms, 250, 5)).count();
        // 100 s at 250/s, plus the initial burst.
        assert!((24_990..=25_010).contains(&taken), "{taken}");
    }
}
