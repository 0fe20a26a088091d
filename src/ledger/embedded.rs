//! The `embedded` ledger (the default): the claim table in front of a redb file.
//! Served records are written durably before a commit returns; claims live in memory only.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{
    ClaimMap, ClaimOutcome, KeyState, Ledger, LedgerError, ResetOutcome, ServedRecord, Ticket,
};

/// key: the archive key; value: the record as JSON (readable with any redb tool, easy to extend).
const SERVED: TableDefinition<&str, &[u8]> = TableDefinition::new("served");

/// One small row rewritten to find out whether the disk takes writes again after a failure.
const PROBE: TableDefinition<&str, u64> = TableDefinition::new("probe");

/// How many queued writes one transaction (one fsync) takes at most.
const MAX_BATCH: usize = 4096;

enum WriteOp {
    Put(ServedRecord),
    Delete(Vec<String>),
    Flush,
    /// A real write that needs free space, tried while the ledger is failing.
    Probe,
}

type WriteRequest = (WriteOp, oneshot::Sender<Result<(), String>>);

pub struct EmbeddedLedger {
    claims: ClaimMap,
    writer: mpsc::Sender<WriteRequest>,
    healthy: Arc<AtomicBool>,
}

impl EmbeddedLedger {
    /// Opens (or creates) the file and loads every live served record. Fails when another
    /// process has the file open.
    pub fn open(path: &Path, retention: Option<Duration>) -> Result<EmbeddedLedger, LedgerError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            LedgerError::Unavailable(format!("{}: {e}", path.display()))
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| unavailable(&e))?;
        }
        let db = Database::create(path).map_err(|e| unavailable(&e))?;
        let claims = ClaimMap::new(retention);
        let expired = load_records(&db, &claims).map_err(|e| unavailable(&e))?;
        let healthy = Arc::new(AtomicBool::new(true));
        let (writer, queue) = mpsc::channel();
        let thread_health = healthy.clone();
        std::thread::Builder::new()
            .name("oncegate-ledger".into())
            .spawn({
                let path = path.to_path_buf();
                move || write_loop(db, &path, queue, thread_health)
            })
            .map_err(|e| unavailable(&e))?;
        let ledger = EmbeddedLedger {
            claims,
            writer,
            healthy,
        };
        if !expired.is_empty() {
            // Best effort at startup: the sweep retries later.
            let (done, _) = oneshot::channel();
            let _ = ledger.writer.send((WriteOp::Delete(expired), done));
        }
        Ok(ledger)
    }

    async fn write(&self, op: WriteOp) -> Result<(), LedgerError> {
        let (done, result) = oneshot::channel();
        self.writer
            .send((op, done))
            .map_err(|_| LedgerError::Unavailable("ledger writer stopped".into()))?;
        match result.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(LedgerError::Unavailable(e)),
            Err(_) => Err(LedgerError::Unavailable("ledger writer stopped".into())),
        }
    }
}

fn load_records(db: &Database, claims: &ClaimMap) -> Result<Vec<String>, redb::Error> {
    let read = db.begin_read()?;
    let table = match read.open_table(SERVED) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let now = SystemTime::now();
    let mut expired = Vec::new();
    for entry in table.iter()? {
        let (key, value) = entry?;
        match serde_json::from_slice::<ServedRecord>(value.value()) {
            Ok(record) if record.expired(claims.retention(), now) => expired.push(record.key),
            Ok(record) => claims.insert_served(record),
            Err(_) => claims.insert_served(ServedRecord::unreadable(key.value())),
        }
    }
    Ok(expired)
}

/// The single writer: drains whatever is queued into one transaction, so concurrent commits
/// share one fsync (group commit). After a failed write redb refuses all further I/O on that
/// handle, so the file is closed and opened again for the next write (redb repairs it if needed).
fn write_loop(
    db: Database,
    path: &Path,
    queue: mpsc::Receiver<WriteRequest>,
    healthy: Arc<AtomicBool>,
) {
    let mut db = Some(db);
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        if db.is_none() {
            db = Database::create(path)
                .inspect_err(|e| tracing::warn!(error = %e, "cannot reopen the ledger file"))
                .ok();
        }
        let result = match &db {
            Some(open) => {
                write_batch(open, batch.iter().map(|(op, _)| op)).map_err(|e| e.to_string())
            }
            None => Err("the ledger file cannot be opened".to_string()),
        };
        if result.is_err() {
            db = None;
        }
        healthy.store(result.is_ok(), Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::error!(error = %e, "ledger write failed");
        }
        for (_, done) in batch {
            let _ = done.send(result.clone());
        }
    }
}

fn write_batch<'a>(
    db: &Database,
    ops: impl Iterator<Item = &'a WriteOp>,
) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(SERVED)?;
        for op in ops {
            match op {
                WriteOp::Put(record) => {
                    let json = serde_json::to_vec(record).unwrap_or_default();
                    table.insert(record.key.as_str(), json.as_slice())?;
                }
                WriteOp::Delete(keys) => {
                    for key in keys {
                        table.remove(key.as_str())?;
                    }
                }
                WriteOp::Probe => {
                    txn.open_table(PROBE)?
                        .insert("last_probe_ms", super::now_ms())?;
                }
                WriteOp::Flush => {}
            }
        }
    }
    txn.commit()?;
    Ok(())
}

#[async_trait]
impl Ledger for EmbeddedLedger {
    async fn claim(&self, key: &str, lease: Duration) -> Result<ClaimOutcome, LedgerError> {
        // Fail closed while the file cannot be written (disk full, read-only, I/O error): a
        // download now could not be recorded. The sweep's probe notices when writes work again.
        // What is already known is still answered: a served key stays refused.
        if !self.healthy.load(Ordering::Relaxed) {
            return match self.claims.lookup(key) {
                KeyState::Served(record) => Ok(ClaimOutcome::Served(record)),
                KeyState::InFlight => Ok(ClaimOutcome::InFlight),
                KeyState::Unseen => Err(LedgerError::Unavailable(
                    "the ledger file cannot be written".into(),
                )),
            };
        }
        Ok(self.claims.claim(key, lease))
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<(), LedgerError> {
        self.claims.renew(ticket, lease)
    }

    async fn commit(&self, ticket: &Ticket, record: ServedRecord) -> Result<(), LedgerError> {
        self.claims.begin_commit(ticket)?;
        let record = Arc::new(record);
        match self.write(WriteOp::Put((*record).clone())).await {
            Ok(()) => {
                self.claims.finish_commit(ticket, record);
                Ok(())
            }
            Err(e) => {
                self.claims.abort_commit(ticket);
                Err(e)
            }
        }
    }

    async fn release(&self, ticket: &Ticket) -> Result<(), LedgerError> {
        self.claims.release(ticket);
        Ok(())
    }

    async fn lookup(&self, key: &str) -> Result<KeyState, LedgerError> {
        Ok(self.claims.lookup(key))
    }

    async fn reset(&self, key: &str) -> Result<ResetOutcome, LedgerError> {
        let reset = match self.claims.begin_reset(key) {
            Ok(reset) => reset,
            Err(nothing_to_do) => return Ok(nothing_to_do),
        };
        // The durable delete comes first: a crash in between leaves the key served, never a
        // memory that disagrees with the file. A failed delete drops `reset`: still served.
        self.write(WriteOp::Delete(vec![key.to_string()])).await?;
        reset.finish();
        Ok(ResetOutcome::Reset)
    }

    async fn ready(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    async fn sweep(&self) {
        if !self.healthy.load(Ordering::Relaxed) {
            match self.write(WriteOp::Probe).await {
                Ok(()) => tracing::info!("ledger file writable again; taking claims"),
                Err(e) => tracing::warn!(error = %e, "ledger file still not writable"),
            }
        }
        let expired = self.claims.sweep();
        if !expired.is_empty() {
            if let Err(e) = self.write(WriteOp::Delete(expired)).await {
                tracing::warn!(error = %e, "could not delete expired records");
            }
        }
    }

    async fn flush(&self) -> Result<(), LedgerError> {
        self.write(WriteOp::Flush).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str) -> ServedRecord {
        ServedRecord {
            key: key.into(),
            served_at_ms: super::super::now_ms(),
            request_id: "req-1".into(),
            bytes: 42,
            client: "127.0.0.1".into(),
            user_id: None,
            token_sha256_prefix: "0123456789abcdef".into(),
        }
    }

    async fn claim(ledger: &EmbeddedLedger, key: &str) -> Ticket {
        match ledger.claim(key, Duration::from_secs(60)).await.unwrap() {
            ClaimOutcome::Claimed(ticket) => ticket,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn served_records_survive_reopen_and_resets_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ledger.redb");
        {
            let ledger = EmbeddedLedger::open(&path, None).unwrap();
            for key in ["a", "b"] {
                let ticket = claim(&ledger, key).await;
                ledger.commit(&ticket, record(key)).await.unwrap();
            }
            let _held = claim(&ledger, "c").await;
            assert_eq!(ledger.reset("b").await.unwrap(), ResetOutcome::Reset);
        }
        // The writer thread holds the file until its queue closes.
        let ledger = loop {
            match EmbeddedLedger::open(&path, None) {
                Ok(ledger) => break ledger,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        assert_eq!(
            ledger.lookup("a").await.unwrap(),
            KeyState::Served(Arc::new(record_with_time(&ledger, "a").await))
        );
        assert_eq!(ledger.lookup("b").await.unwrap(), KeyState::Unseen);
        assert_eq!(
            ledger.lookup("c").await.unwrap(),
            KeyState::Unseen,
            "claims are not durable"
        );
    }

    async fn record_with_time(ledger: &EmbeddedLedger, key: &str) -> ServedRecord {
        match ledger.lookup(key).await.unwrap() {
            KeyState::Served(record) => {
                assert_eq!(record.bytes, 42);
                assert_eq!(record.request_id, "req-1");
                (*record).clone()
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn second_process_cannot_open_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let _first = EmbeddedLedger::open(&path, None).unwrap();
        assert!(EmbeddedLedger::open(&path, None).is_err());
    }

    #[tokio::test]
    async fn concurrent_commits_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let ledger = Arc::new(EmbeddedLedger::open(&path, None).unwrap());
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let ledger = ledger.clone();
                tokio::spawn(async move {
                    let key = format!("k{i}");
                    let ticket = claim(&ledger, &key).await;
                    ledger.commit(&ticket, record(&key)).await.unwrap();
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        drop(ledger);
        let reopened = loop {
            match EmbeddedLedger::open(&path, None) {
                Ok(ledger) => break ledger,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        for i in 0..64 {
            assert!(matches!(
                reopened.lookup(&format!("k{i}")).await.unwrap(),
                KeyState::Served(_)
            ));
        }
    }
}
