//! A ledger wrapper that times every operation into `oncegate_ledger_operation_seconds{op}` and
//! counts failures in `oncegate_ledger_errors_total{op}`, whatever the store.

use std::future::Future;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{ClaimOutcome, KeyState, Ledger, LedgerError, ResetOutcome, ServedRecord, Ticket};

pub struct Timed<L> {
    inner: L,
}

impl<L: Ledger> Timed<L> {
    pub fn new(inner: L) -> Timed<L> {
        Timed { inner }
    }
}

async fn timed<T>(
    op: &'static str,
    call: impl Future<Output = Result<T, LedgerError>>,
) -> Result<T, LedgerError> {
    let started = Instant::now();
    let result = call.await;
    metrics::histogram!("oncegate_ledger_operation_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    if result.is_err() {
        metrics::counter!("oncegate_ledger_errors_total", "op" => op).increment(1);
    }
    result
}

#[async_trait]
impl<L: Ledger> Ledger for Timed<L> {
    async fn claim(&self, key: &str, lease: Duration) -> Result<ClaimOutcome, LedgerError> {
        timed("claim", self.inner.claim(key, lease)).await
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<(), LedgerError> {
        timed("renew", self.inner.renew(ticket, lease)).await
    }

    async fn commit(&self, ticket: &Ticket, record: ServedRecord) -> Result<(), LedgerError> {
        timed("commit", self.inner.commit(ticket, record)).await
    }

    async fn release(&self, ticket: &Ticket) -> Result<(), LedgerError> {
        timed("release", self.inner.release(ticket)).await
    }

    async fn lookup(&self, key: &str) -> Result<KeyState, LedgerError> {
        timed("lookup", self.inner.lookup(key)).await
    }

    async fn reset(&self, key: &str) -> Result<ResetOutcome, LedgerError> {
        timed("reset", self.inner.reset(key)).await
    }

    async fn ready(&self) -> bool {
        self.inner.ready().await
    }

    async fn sweep(&self) {
        self.inner.sweep().await;
    }

    async fn flush(&self) -> Result<(), LedgerError> {
        timed("flush", self.inner.flush()).await
    }
}
