//! The `memory` ledger: the claim table alone, lost on restart.
//! For tests and development; the default `embedded` store adds durability.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    ClaimMap, ClaimOutcome, KeyState, Ledger, LedgerError, ResetOutcome, ServedRecord, TableState,
    Ticket,
};

#[derive(Debug)]
pub struct MemoryLedger {
    /// Nowhere else to keep them: whole records live in the table.
    claims: ClaimMap<Arc<ServedRecord>>,
}

impl MemoryLedger {
    pub fn new(retention: Option<Duration>) -> MemoryLedger {
        MemoryLedger {
            claims: ClaimMap::new(retention),
        }
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn claim(&self, key: &str, lease: Duration) -> Result<ClaimOutcome, LedgerError> {
        Ok(self.claims.claim(key, lease))
    }

    fn claim_now(&self, key: &str, lease: Duration) -> Option<Result<ClaimOutcome, LedgerError>> {
        Some(Ok(self.claims.claim(key, lease)))
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<(), LedgerError> {
        self.claims.renew(ticket, lease)
    }

    async fn commit(&self, ticket: &Ticket, record: ServedRecord) -> Result<(), LedgerError> {
        self.claims.commit(ticket, Arc::new(record))
    }

    async fn release(&self, ticket: &Ticket) -> Result<(), LedgerError> {
        self.claims.release(ticket);
        Ok(())
    }

    async fn lookup(&self, key: &str) -> Result<KeyState, LedgerError> {
        Ok(match self.claims.lookup(key) {
            TableState::Unseen => KeyState::Unseen,
            TableState::InFlight => KeyState::InFlight,
            TableState::Served(record) => KeyState::Served(record),
        })
    }

    async fn reset(&self, key: &str) -> Result<ResetOutcome, LedgerError> {
        self.claims.reset_with(key, || Ok(()))
    }

    async fn ready(&self) -> bool {
        true
    }

    async fn sweep(&self) {
        self.claims.sweep();
    }

    async fn flush(&self) -> Result<(), LedgerError> {
        Ok(())
    }
}
