//! A ledger wrapper that times every operation into `oncegate_ledger_operation_seconds{op}` and
//! counts failures in `oncegate_ledger_errors_total{op}`, whatever the store.

use std::future::Future;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{ClaimOutcome, KeyState, Ledger, LedgerError, ResetOutcome, ServedRecord, Ticket};

pub struct Timed<L> {
    inner: L,
    claim: OpMetrics,
    renew: OpMetrics,
    commit: OpMetrics,
    release: OpMetrics,
    lookup: OpMetrics,
    reset: OpMetrics,
    flush: OpMetrics,
}

/// The metric handles of one operation, looked up once instead of on every call.
struct OpMetrics {
    seconds: metrics::Histogram,
    errors: metrics::Counter,
}

impl OpMetrics {
    fn new(op: &'static str) -> OpMetrics {
        OpMetrics {
            seconds: metrics::histogram!("oncegate_ledger_operation_seconds", "op" => op),
            errors: metrics::counter!("oncegate_ledger_errors_total", "op" => op),
        }
    }

    async fn time<T>(
        &self,
        call: impl Future<Output = Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        let started = Instant::now();
        let result = call.await;
        self.record(started, &result);
        result
    }

    fn record<T>(&self, started: Instant, result: &Result<T, LedgerError>) {
        self.seconds.record(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.errors.increment(1);
        }
    }
}

impl<L: Ledger> Timed<L> {
    /// Call after the metrics recorder is installed: the handles are bound to it here.
    pub fn new(inner: L) -> Timed<L> {
        Timed {
            inner,
            claim: OpMetrics::new("claim"),
            renew: OpMetrics::new("renew"),
            commit: OpMetrics::new("commit"),
            release: OpMetrics::new("release"),
            lookup: OpMetrics::new("lookup"),
            reset: OpMetrics::new("reset"),
            flush: OpMetrics::new("flush"),
        }
    }
}

#[async_trait]
impl<L: Ledger> Ledger for Timed<L> {
    async fn claim(&self, key: &str, lease: Duration) -> Result<ClaimOutcome, LedgerError> {
        self.claim.time(self.inner.claim(key, lease)).await
    }

    fn claim_now(&self, key: &str, lease: Duration) -> Option<Result<ClaimOutcome, LedgerError>> {
        let started = Instant::now();
        let result = self.inner.claim_now(key, lease)?;
        self.claim.record(started, &result);
        Some(result)
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<(), LedgerError> {
        self.renew.time(self.inner.renew(ticket, lease)).await
    }

    async fn commit(&self, ticket: &Ticket, record: ServedRecord) -> Result<(), LedgerError> {
        self.commit.time(self.inner.commit(ticket, record)).await
    }

    async fn release(&self, ticket: &Ticket) -> Result<(), LedgerError> {
        self.release.time(self.inner.release(ticket)).await
    }

    async fn lookup(&self, key: &str) -> Result<KeyState, LedgerError> {
        self.lookup.time(self.inner.lookup(key)).await
    }

    async fn reset(&self, key: &str) -> Result<ResetOutcome, LedgerError> {
        self.reset.time(self.inner.reset(key)).await
    }

    async fn ready(&self) -> bool {
        self.inner.ready().await
    }

    async fn sweep(&self) {
        self.inner.sweep().await;
    }

    async fn flush(&self) -> Result<(), LedgerError> {
        self.flush.time(self.inner.flush()).await
    }
}
