//! How loudly to report a failure that is retried: while the kubelet restarts, registration
//! fails several times a second, and one warning per retry flooded the log (issue 8, finding 9:
//! 15 lines in 7 s). The first failure of a run is a warning; later consecutive ones are debug,
//! with a warning that summarizes them at most once per interval; the first success after
//! failures is worth an info line. Pure: the caller passes the time.

use std::time::Duration;

use tokio::time::Instant;

/// How to log one failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The first failure after success (or at start): warn with the error.
    First,
    /// A repeat inside the interval: debug only.
    Quiet,
    /// A repeat after the interval: warn with the error and how many failures were not warned
    /// about since the last warning.
    Summary {
        /// Failures logged at debug since the last warning.
        suppressed: u64,
        /// Consecutive failures so far, this one included.
        consecutive: u64,
        /// Time since the first failure of this run.
        failing_for: Duration,
    },
}

/// The end of a run of failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Consecutive failures before the success.
    pub failures: u64,
    /// Time from the first of them to the success.
    pub after: Duration,
}

/// The limiter (see the module docs).
#[derive(Debug, Clone)]
pub struct RetryLog {
    every: Duration,
    since: Option<Instant>,
    last_warn: Option<Instant>,
    consecutive: u64,
    suppressed: u64,
}

impl RetryLog {
    /// A limiter that warns at most once per `every` during a run of failures.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            since: None,
            last_warn: None,
            consecutive: 0,
            suppressed: 0,
        }
    }

    /// A failure at `now`.
    pub fn failure(&mut self, now: Instant) -> Verdict {
        self.consecutive += 1;
        let since = *self.since.get_or_insert(now);
        match self.last_warn {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.suppressed += 1;
                Verdict::Quiet
            }
            Some(_) => {
                let v = Verdict::Summary {
                    suppressed: self.suppressed,
                    consecutive: self.consecutive,
                    failing_for: now.saturating_duration_since(since),
                };
                self.suppressed = 0;
                self.last_warn = Some(now);
                v
            }
            None => {
                self.last_warn = Some(now);
                Verdict::First
            }
        }
    }

    /// A success at `now`: `Some` when it ends a run of failures.
    pub fn success(&mut self, now: Instant) -> Option<Recovered> {
        let since = self.since.take()?;
        let r = Recovered {
            failures: self.consecutive,
            after: now.saturating_duration_since(since),
        };
        *self = Self::new(self.every);
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_burst_of_failures_warns_once_then_summarizes_per_interval() {
        let t0 = Instant::now();
        let mut l = RetryLog::new(30 * S);
        assert_eq!(l.failure(t0), Verdict::First);
        // The kubelet restart of the issue: 15 failures in 7 s give one warning.
        let mut warned = 0;
        for i in 1..15u32 {
            if l.failure(t0 + i * S / 2) != Verdict::Quiet {
                warned += 1;
            }
        }
        assert_eq!(warned, 0);
        assert_eq!(
            l.failure(t0 + 30 * S),
            Verdict::Summary {
                suppressed: 14,
                consecutive: 16,
                failing_for: 30 * S
            }
        );
        assert_eq!(l.failure(t0 + 31 * S), Verdict::Quiet);
        assert_eq!(
            l.failure(t0 + 60 * S),
            Verdict::Summary {
                suppressed: 1,
                consecutive: 18,
                failing_for: 60 * S
            }
        );
        assert_eq!(
            l.success(t0 + 61 * S),
            Some(Recovered {
                failures: 18,
                after: 61 * S
            })
        );
    }

    #[test]
    fn success_without_failures_is_silent_and_a_new_run_warns_again() {
        let t0 = Instant::now();
        let mut l = RetryLog::new(30 * S);
        assert_eq!(l.success(t0), None);
        assert_eq!(l.failure(t0), Verdict::First);
        assert_eq!(l.failure(t0 + S), Verdict::Quiet);
        assert!(l.success(t0 + 2 * S).is_some());
        assert_eq!(l.success(t0 + 3 * S), None);
        // A new run right after recovery warns at once, whatever the interval.
        assert_eq!(l.failure(t0 + 4 * S), Verdict::First);
    }
}
