//! Counters exported at `/metrics` (Prometheus text format).

use skiff_core::{ErrorKind, Outcome};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Process-wide invocation counters. Lock-free; cheap on the hot path.
#[derive(Default, Debug)]
pub struct Metrics {
    pub invocations_ok: AtomicU64,
    pub invocations_function_error: AtomicU64,
    pub invocations_timeout: AtomicU64,
    pub invocations_oom: AtomicU64,
    pub invocations_crashed: AtomicU64,
    pub invocations_throttled: AtomicU64,
    pub invocations_start_failed: AtomicU64,
    pub cold_starts: AtomicU64,
    pub instances_started: AtomicU64,
    pub duration_us_total: AtomicU64,
}

impl Metrics {
    pub(crate) fn count_ok(&self, function_error: bool, d: Duration) {
        let c = if function_error {
            &self.invocations_function_error
        } else {
            &self.invocations_ok
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.duration_us_total
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub(crate) fn count_outcome(&self, o: &Outcome) {
        let c = match o.kind {
            ErrorKind::Timeout => &self.invocations_timeout,
            ErrorKind::OutOfMemory => &self.invocations_oom,
            ErrorKind::Crashed => &self.invocations_crashed,
            ErrorKind::Throttled => &self.invocations_throttled,
            ErrorKind::StartFailed => &self.invocations_start_failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Renders the counters in Prometheus text format; `instances` is the current gauge.
    pub fn render(&self, instances: usize) -> String {
        let mut out = String::with_capacity(1024);
        out.push_str("# HELP skiff_invocations_total Invocations by outcome.\n# TYPE skiff_invocations_total counter\n");
        for (status, c) in [
            ("ok", &self.invocations_ok),
            ("function_error", &self.invocations_function_error),
            ("timeout", &self.invocations_timeout),
            ("out_of_memory", &self.invocations_oom),
            ("crashed", &self.invocations_crashed),
            ("throttled", &self.invocations_throttled),
            ("start_failed", &self.invocations_start_failed),
        ] {
            let _ = writeln!(
                out,
                "skiff_invocations_total{{status=\"{status}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE skiff_cold_starts_total counter\nskiff_cold_starts_total {}",
            self.cold_starts.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE skiff_instances_started_total counter\nskiff_instances_started_total {}",
            self.instances_started.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE skiff_instances gauge\nskiff_instances {instances}"
        );
        let _ = writeln!(
            out,
            "# TYPE skiff_invocation_duration_seconds_sum counter\nskiff_invocation_duration_seconds_sum {:.6}",
            self.duration_us_total.load(Ordering::Relaxed) as f64 / 1e6
        );
        out
    }
}
