//! The download ledger: who holds a claim on an archive key and which keys were served.
//! One trait; stores: `memory` (tests), `embedded` (redb file, default), `redis` (shared by replicas).

mod claims;
mod digest_filter;
pub mod embedded;
mod journal;
pub mod memory;
pub mod redis;
pub mod timed;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use claims::{ClaimMap, DigestMap, KeyDigest, ServedAt, ServedEntry, TableState};

/// What is kept of a served download (SPEC §2.6); never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedRecord {
    pub key: String,
    /// Milliseconds since the Unix epoch.
    pub served_at_ms: u64,
    pub request_id: String,
    pub bytes: u64,
    pub client: String,
    pub token_sha256_prefix: String,
    /// The IAM user id of the token (`auth.mode = "iam"` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

impl ServedRecord {
    /// Stands for a stored record this version cannot read: it still means "served", so the
    /// archive is refused rather than served again.
    pub fn unreadable(key: &str, served_at_ms: u64) -> ServedRecord {
        ServedRecord {
            key: key.to_string(),
            served_at_ms,
            request_id: String::new(),
            bytes: 0,
            client: String::new(),
            token_sha256_prefix: String::new(),
            user_id: None,
        }
    }

    /// The record as JSON, byte for byte as serde_json writes it (a test compares the two),
    /// without its per-byte escaping of field names and of values that need none: the Redis
    /// and embedded ledgers write one per download.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use crate::json::{write_str, write_u64};
        out.extend_from_slice(b"{\"key\":");
        write_str(out, &self.key);
        out.extend_from_slice(b",\"served_at_ms\":");
        write_u64(out, self.served_at_ms);
        out.extend_from_slice(b",\"request_id\":");
        write_str(out, &self.request_id);
        out.extend_from_slice(b",\"bytes\":");
        write_u64(out, self.bytes);
        out.extend_from_slice(b",\"client\":");
        write_str(out, &self.client);
        out.extend_from_slice(b",\"token_sha256_prefix\":");
        write_str(out, &self.token_sha256_prefix);
        if let Some(user_id) = &self.user_id {
            out.extend_from_slice(b",\"user_id\":");
            write_str(out, user_id);
        }
        out.push(b'}');
    }

    pub fn served_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.served_at_ms)
    }

    /// Whether `retention` has run out for this record at `now`.
    pub fn expired(&self, retention: Option<Duration>, now: SystemTime) -> bool {
        retention_over(self.served_at_ms, retention, now)
    }
}

/// Whether `retention` has run out at `now` for a record served at `served_at_ms`.
pub fn retention_over(served_at_ms: u64, retention: Option<Duration>, now: SystemTime) -> bool {
    retention.is_some_and(|keep| UNIX_EPOCH + Duration::from_millis(served_at_ms) + keep <= now)
}

/// Proof of holding the claim on one key; only its holder may commit or release it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub key: String,
    pub id: u64,
    /// The key's digest, so a held key is never hashed again (commit, renew, release).
    pub digest: KeyDigest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This request won the key and must commit or release it.
    Claimed(Ticket),
    /// Already downloaded.
    Served,
    /// Another request holds a live claim.
    InFlight,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    Unseen,
    InFlight,
    Served(Arc<ServedRecord>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetOutcome {
    /// The served record was removed: the archive can be downloaded once more.
    Reset,
    /// Nothing to reset.
    Unseen,
    /// A download is running; it is not interrupted.
    InFlight,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The ticket no longer holds the claim (its lease ran out and someone else took it).
    #[error("claim on {0} was lost")]
    LostClaim(String),
    /// The store could not be reached or written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// The state machine's storage (SPEC §2). Every method is atomic per key.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Atomically claims `key` for `lease` unless it is served or held by a live claim.
    async fn claim(&self, key: &str, lease: Duration) -> Result<ClaimOutcome, LedgerError>;
    /// The same answer as `claim`, given on the spot when the store needs no round trip for it
    /// (memory, embedded, a Redis replica's served cache); `None` means "call `claim`". Spares a
    /// refusal the boxed futures of an async call.
    fn claim_now(&self, _key: &str, _lease: Duration) -> Option<Result<ClaimOutcome, LedgerError>> {
        None
    }
    /// Extends a held claim; `LostClaim` when the ticket no longer holds it.
    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<(), LedgerError>;
    /// Makes the key served, durably, before returning; `LostClaim` when the ticket no longer holds it.
    async fn commit(&self, ticket: &Ticket, record: ServedRecord) -> Result<(), LedgerError>;
    /// Gives the key back (unseen) if the ticket still holds it.
    async fn release(&self, ticket: &Ticket) -> Result<(), LedgerError>;
    async fn lookup(&self, key: &str) -> Result<KeyState, LedgerError>;
    async fn reset(&self, key: &str) -> Result<ResetOutcome, LedgerError>;
    /// Whether the store can take claims right now (`/readyz`).
    async fn ready(&self) -> bool;
    /// Drops records past retention; called on a timer.
    async fn sweep(&self);
    /// Makes everything committed so far durable and closes the store cleanly (at shutdown),
    /// so the next start needs no recovery.
    async fn flush(&self) -> Result<(), LedgerError>;
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_written_as_serde_json_writes_it_and_reads_back() {
        let plain = ServedRecord {
            key: "proj/inst/archive-1.zip".into(),
            served_at_ms: 1_764_720_000_123,
            request_id: "0b7c6f0e-1a2b-4c3d-8e9f-001122334455".into(),
            bytes: 42,
            client: "127.0.0.1:50123".into(),
            token_sha256_prefix: "9f86d081".into(),
            user_id: None,
        };
        let odd = ServedRecord {
            key: "p/i/a\"b\\c".into(),
            served_at_ms: u64::MAX,
            request_id: "tab\tbell\u{7}".into(),
            bytes: 0,
            client: "[::1]:1".into(),
            token_sha256_prefix: String::new(),
            user_id: Some("用户 \u{1f980}".into()),
        };
        for record in [plain, odd, ServedRecord::unreadable("k", 0)] {
            let mut written = Vec::new();
            record.write_json(&mut written);
            assert_eq!(written, serde_json::to_vec(&record).unwrap(), "{record:?}");
            let read: ServedRecord = serde_json::from_slice(&written).unwrap();
            assert_eq!(read, record);
        }
    }
}
