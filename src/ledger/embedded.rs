//! The `embedded` ledger (the default): the claim table in front of a redb file.
//! Served records are written durably before a commit returns; memory keeps claims and times only.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

use super::{
    retention_over, ClaimMap, ClaimOutcome, KeyDigest, KeyState, Ledger, LedgerError, ResetOutcome,
    ServedAt, ServedRecord, TableState, Ticket,
};

/// key: the archive key's digest; value: the record as JSON (it names its key; easy to extend).
const RECORDS: TableDefinition<u128, &[u8]> = TableDefinition::new("records");

/// The same keys with only the time each was served: all a restart has to read (24 bytes a row).
const SERVED_AT: TableDefinition<u128, u64> = TableDefinition::new("served_at");

/// The layout before digests (archive key → JSON); moved into the two tables above on open.
const LEGACY_SERVED: TableDefinition<&str, &[u8]> = TableDefinition::new("served");

/// One small row rewritten to find out whether the disk takes writes again after a failure.
const PROBE: TableDefinition<&str, u64> = TableDefinition::new("probe");

/// How many queued writes one transaction (one fsync) takes at most.
const MAX_BATCH: usize = 4096;

/// redb's page cache (its default is 1 GiB). The records are read back only by admin lookups and
/// the OS caches the file anyway; what must stay hot is the B-tree's inner pages, a few MiB.
const PAGE_CACHE_BYTES: usize = 64 << 20;

fn open_file(path: &Path) -> Result<Database, redb::DatabaseError> {
    redb::Builder::new()
        .set_cache_size(PAGE_CACHE_BYTES)
        .create(path)
}

enum StoreOp {
    Put(ServedRecord),
    Delete(Vec<KeyDigest>),
    Flush,
    /// A real write that needs free space, tried while the ledger is failing.
    Probe,
    /// The stored JSON of one record (for the admin lookup; the table keeps only times).
    Read(KeyDigest),
}

impl StoreOp {
    fn writes(&self) -> bool {
        !matches!(self, StoreOp::Read(_))
    }
}

/// `Read` answers with the record's JSON if there is one; writes answer `None`.
type Reply = Result<Option<Vec<u8>>, String>;
type StoreRequest = (StoreOp, oneshot::Sender<Reply>);

pub struct EmbeddedLedger {
    /// Served keys keep only their time here; the records are in the file.
    claims: ClaimMap<ServedAt>,
    store: mpsc::Sender<StoreRequest>,
    healthy: Arc<AtomicBool>,
}

impl EmbeddedLedger {
    /// Opens (or creates) the file and loads every live served key. Fails when another
    /// process has the file open.
    pub fn open(path: &Path, retention: Option<Duration>) -> Result<EmbeddedLedger, LedgerError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            LedgerError::Unavailable(format!("{}: {e}", path.display()))
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| unavailable(&e))?;
        }
        let db = open_file(path).map_err(|e| unavailable(&e))?;
        migrate_legacy(&db).map_err(|e| unavailable(&e))?;
        let (claims, expired) = load_served(&db, retention).map_err(|e| unavailable(&e))?;
        let healthy = Arc::new(AtomicBool::new(true));
        let (store, queue) = mpsc::channel();
        let thread_health = healthy.clone();
        std::thread::Builder::new()
            .name("oncegate-ledger".into())
            .spawn({
                let path = path.to_path_buf();
                move || store_loop(db, &path, queue, thread_health)
            })
            .map_err(|e| unavailable(&e))?;
        let ledger = EmbeddedLedger {
            claims,
            store,
            healthy,
        };
        if !expired.is_empty() {
            // Best effort at startup: the sweep retries later.
            let (done, _) = oneshot::channel();
            let _ = ledger.store.send((StoreOp::Delete(expired), done));
        }
        Ok(ledger)
    }

    async fn request(&self, op: StoreOp) -> Result<Option<Vec<u8>>, LedgerError> {
        let (done, result) = oneshot::channel();
        self.store
            .send((op, done))
            .map_err(|_| LedgerError::Unavailable("ledger writer stopped".into()))?;
        match result.await {
            Ok(reply) => reply.map_err(LedgerError::Unavailable),
            Err(_) => Err(LedgerError::Unavailable("ledger writer stopped".into())),
        }
    }

    async fn write(&self, op: StoreOp) -> Result<(), LedgerError> {
        self.request(op).await.map(|_| ())
    }
}

/// Moves records of the earlier layout into the digest-keyed tables, in one transaction.
fn migrate_legacy(db: &Database) -> Result<(), redb::Error> {
    match db.begin_read()?.open_table(LEGACY_SERVED) {
        Ok(_) => {}
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let txn = db.begin_write()?;
    {
        let legacy = txn.open_table(LEGACY_SERVED)?;
        let mut records = txn.open_table(RECORDS)?;
        let mut served_at = txn.open_table(SERVED_AT)?;
        let now = super::now_ms();
        for entry in legacy.iter()? {
            let (key, value) = entry?;
            let digest = KeyDigest::of(key.value()).as_u128();
            let time = serde_json::from_slice::<ServedRecord>(value.value())
                .map_or(now, |record| record.served_at_ms);
            records.insert(digest, value.value())?;
            served_at.insert(digest, time)?;
        }
    }
    txn.delete_table(LEGACY_SERVED)?;
    txn.commit()?;
    Ok(())
}

/// Reads the served keys (digest and time only) into a table sized for them; returns the
/// digests already past retention as well.
fn load_served(
    db: &Database,
    retention: Option<Duration>,
) -> Result<(ClaimMap<ServedAt>, Vec<KeyDigest>), redb::Error> {
    let read = db.begin_read()?;
    let table = match read.open_table(SERVED_AT) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Ok((ClaimMap::new(retention), Vec::new()))
        }
        Err(e) => return Err(e.into()),
    };
    let claims = ClaimMap::with_capacity(retention, table.len()? as usize);
    let now = SystemTime::now();
    let mut expired = Vec::new();
    for entry in table.iter()? {
        let (digest, served_at_ms) = entry?;
        let digest = KeyDigest::from_u128(digest.value());
        let served_at_ms = served_at_ms.value();
        if retention_over(served_at_ms, retention, now) {
            expired.push(digest);
        } else {
            claims.insert_served(digest, ServedAt(served_at_ms));
        }
    }
    Ok((claims, expired))
}

/// The single writer: drains whatever is queued into one transaction, so concurrent commits
/// share one fsync (group commit); reads queued with them run after it. After a failed write
/// redb refuses all further I/O on that handle, so the file is closed and opened again for the
/// next request (redb repairs it if needed).
fn store_loop(
    db: Database,
    path: &Path,
    queue: mpsc::Receiver<StoreRequest>,
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
            db = open_file(path)
                .inspect_err(|e| tracing::warn!(error = %e, "cannot reopen the ledger file"))
                .ok();
        }
        let (writes, reads): (Vec<_>, Vec<_>) = batch.into_iter().partition(|(op, _)| op.writes());
        if !writes.is_empty() {
            let result = match &db {
                Some(open) => {
                    write_batch(open, writes.iter().map(|(op, _)| op)).map_err(|e| e.to_string())
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
            for (_, done) in writes {
                let _ = done.send(result.clone().map(|()| None));
            }
        }
        for (op, done) in reads {
            if let StoreOp::Read(digest) = op {
                let reply = match &db {
                    Some(open) => read_record(open, digest).map_err(|e| e.to_string()),
                    None => Err("the ledger file cannot be opened".to_string()),
                };
                let _ = done.send(reply);
            }
        }
    }
}

fn read_record(db: &Database, digest: KeyDigest) -> Result<Option<Vec<u8>>, redb::Error> {
    let read = db.begin_read()?;
    let table = match read.open_table(RECORDS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(table
        .get(digest.as_u128())?
        .map(|json| json.value().to_vec()))
}

fn write_batch<'a>(
    db: &Database,
    ops: impl Iterator<Item = &'a StoreOp>,
) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut records = txn.open_table(RECORDS)?;
        let mut served_at = txn.open_table(SERVED_AT)?;
        for op in ops {
            match op {
                StoreOp::Put(record) => {
                    let digest = KeyDigest::of(&record.key).as_u128();
                    let json = serde_json::to_vec(record).unwrap_or_default();
                    records.insert(digest, json.as_slice())?;
                    served_at.insert(digest, record.served_at_ms)?;
                }
                StoreOp::Delete(digests) => {
                    for digest in digests {
                        records.remove(digest.as_u128())?;
                        served_at.remove(digest.as_u128())?;
                    }
                }
                StoreOp::Probe => {
                    txn.open_table(PROBE)?
                        .insert("last_probe_ms", super::now_ms())?;
                }
                StoreOp::Flush | StoreOp::Read(_) => {}
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
                TableState::Served(_) => Ok(ClaimOutcome::Served),
                TableState::InFlight => Ok(ClaimOutcome::InFlight),
                TableState::Unseen => Err(LedgerError::Unavailable(
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
        let served_at = ServedAt(record.served_at_ms);
        match self.write(StoreOp::Put(record)).await {
            Ok(()) => {
                self.claims.finish_commit(ticket, served_at);
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
        let served_at = match self.claims.lookup(key) {
            TableState::Unseen => return Ok(KeyState::Unseen),
            TableState::InFlight => return Ok(KeyState::InFlight),
            TableState::Served(ServedAt(ms)) => ms,
        };
        // The table is the authority on the state; the file only adds the details. A record
        // missing there (a reset that ran since) or unreadable is still reported as served.
        let json = self.request(StoreOp::Read(KeyDigest::of(key))).await?;
        let record = json
            .and_then(|json| serde_json::from_slice(&json).ok())
            .unwrap_or_else(|| ServedRecord::unreadable(key, served_at));
        Ok(KeyState::Served(Arc::new(record)))
    }

    async fn reset(&self, key: &str) -> Result<ResetOutcome, LedgerError> {
        let reset = match self.claims.begin_reset(key) {
            Ok(reset) => reset,
            Err(nothing_to_do) => return Ok(nothing_to_do),
        };
        // The durable delete comes first: a crash in between leaves the key served, never a
        // memory that disagrees with the file. A failed delete drops `reset`: still served.
        self.write(StoreOp::Delete(vec![reset.digest()])).await?;
        reset.finish();
        Ok(ResetOutcome::Reset)
    }

    async fn ready(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    async fn sweep(&self) {
        if !self.healthy.load(Ordering::Relaxed) {
            match self.write(StoreOp::Probe).await {
                Ok(()) => tracing::info!("ledger file writable again; taking claims"),
                Err(e) => tracing::warn!(error = %e, "ledger file still not writable"),
            }
        }
        let expired = self.claims.sweep();
        if !expired.is_empty() {
            if let Err(e) = self.write(StoreOp::Delete(expired)).await {
                tracing::warn!(error = %e, "could not delete expired records");
            }
        }
    }

    async fn flush(&self) -> Result<(), LedgerError> {
        self.write(StoreOp::Flush).await
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
    async fn records_of_the_earlier_layout_are_moved_and_stay_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let old = record("p/i/old");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(LEGACY_SERVED).unwrap();
                let json = serde_json::to_vec(&old).unwrap();
                table.insert("p/i/old", json.as_slice()).unwrap();
                table
                    .insert("p/i/garbled", b"{not json".as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let ledger = EmbeddedLedger::open(&path, None).unwrap();
        assert_eq!(
            ledger.lookup("p/i/old").await.unwrap(),
            KeyState::Served(Arc::new(old))
        );
        for key in ["p/i/old", "p/i/garbled"] {
            assert_eq!(
                ledger.claim(key, Duration::from_secs(60)).await.unwrap(),
                ClaimOutcome::Served,
                "{key}"
            );
        }
        assert!(matches!(
            ledger
                .claim("p/i/new", Duration::from_secs(60))
                .await
                .unwrap(),
            ClaimOutcome::Claimed(_)
        ));
        drop(ledger);
        let db = loop {
            match Database::create(&path) {
                Ok(db) => break db,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let read = db.begin_read().unwrap();
        assert!(matches!(
            read.open_table(LEGACY_SERVED),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
        assert_eq!(read.open_table(SERVED_AT).unwrap().len().unwrap(), 2);
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
