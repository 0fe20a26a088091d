//! The `embedded` ledger (the default): the claim table in front of a journal and a redb file.
//! Records are journaled durably before a commit returns, moved into redb in large
//! transactions, and read back on a key's first use.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::claims::DigestHasher;
use super::digest_filter::{DigestFilter, FileDigests};
use super::journal::{self, ClosedSegments, Journal};
use super::{
    retention_over, ClaimMap, ClaimOutcome, KeyDigest, KeyState, Ledger, LedgerError, ResetOutcome,
    ServedAt, ServedRecord, TableState, Ticket,
};

/// key: the archive key's digest; value: the time it was served (milliseconds since the epoch,
/// 8 bytes little-endian), then the record as JSON (it names its key; easy to extend). One row
/// per record, so a commit touches one leaf; the time comes first so claims and sweeps read it
/// without parsing the record.
const SERVED: TableDefinition<u128, &[u8]> = TableDefinition::new("served_records");

/// The second layout: the same keys in two tables, the JSON in `records` and the time in
/// `served_at` (twice the pages written per commit). Moved into `SERVED` on open.
const RECORDS_V2: TableDefinition<u128, &[u8]> = TableDefinition::new("records");
const SERVED_AT_V2: TableDefinition<u128, u64> = TableDefinition::new("served_at");

/// The first layout (archive key → JSON); moved into `SERVED` on open.
const LEGACY_SERVED: TableDefinition<&str, &[u8]> = TableDefinition::new("served");

/// Rows moved per transaction when an earlier layout is converted, so a file of millions of
/// records is converted without holding them all in one transaction (a few in unit tests, so
/// they take several steps).
const MIGRATE_ROWS: usize = if cfg!(test) { 2 } else { 100_000 };

/// One small row rewritten to find out whether the disk takes writes again after a failure.
const PROBE: TableDefinition<&str, u64> = TableDefinition::new("probe");

/// The sequence number of the last journal entry the file holds (`APPLIED_THROUGH`), written in
/// the transaction that applies it: entries up to it are skipped when the journal is replayed,
/// so a replay never brings back a record that a later reset removed.
const JOURNAL_STATE: TableDefinition<&str, u64> = TableDefinition::new("journal");
const APPLIED_THROUGH: &str = "applied_through";

/// How many queued writes one journal write (one fdatasync) takes at most.
const MAX_BATCH: usize = 4096;

/// How long journaled records gather before they are moved into the file together. A redb
/// transaction rewrites about one leaf page per record until it holds about as many records as the
/// file has leaves (~75k at 1M records): 20k-record transactions cost 21–26 µs a record at 1M
/// records, 100k-record ones 14–17 (docs/BENCHMARKS.md, "the file thread's batches").
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Records moved into the file per transaction at most.
const APPLY_ROWS: usize = 131_072;

/// Journaled records not yet in the file at most (~300 bytes of memory each); past this, commits
/// wait for the file to catch up, so memory stays bounded when the disk is slower than the
/// journal. Twice a transaction, so records keep coming while one is written.
const MAX_PENDING: usize = 2 * APPLY_ROWS;

/// Rows of the file one sweep looks at for records past retention that were never read since
/// the start (those read are swept from memory); the next sweep goes on from there.
const FILE_SWEEP_ROWS: usize = 50_000;

/// redb's page cache (its default is 1 GiB). What must stay hot is the B-tree's inner pages, a
/// few MiB; the OS caches the rest of the file anyway.
const PAGE_CACHE_BYTES: usize = 64 << 20;

/// The fewest digests a filter of the file's digests is sized for (512 KiB of filter).
const MIN_FILTER_DIGESTS: usize = if cfg!(test) { 16 } else { 1 << 18 };

/// How often the filter thread checks whether the filter in use is full.
const FILTER_CHECK: Duration = Duration::from_millis(if cfg!(test) { 20 } else { 1000 });

/// Rows read per read transaction while a filter is built: a long-lived read would keep redb
/// from reusing the pages the file thread frees meanwhile, and would hold up closing the file
/// after a failed write (`LedgerFile::close` waits a second for reads).
const FILTER_SCAN_ROWS: usize = if cfg!(test) { 4 } else { 10_000 };

enum StoreOp {
    /// A record, by its key's digest: journaled, then moved into the file.
    Put(KeyDigest, ServedRecord),
    Delete(Vec<KeyDigest>),
    /// Deletes records past this retention, `FILE_SWEEP_ROWS` rows at a time.
    Expire(Duration),
    /// Closes the file cleanly once the batch is written (shutdown); a later write reopens it.
    Flush,
    /// A real write that needs free space, tried while the ledger is failing.
    Probe,
}

type Reply = oneshot::Sender<Result<(), String>>;

type StoreRequest = (StoreOp, Reply);

/// What the journal thread hands the file thread, in journal order.
enum FileOp {
    /// The records of one journal write (already acknowledged), by sequence number: one
    /// message, so the file thread wakes once per group, not once per record.
    Puts(Vec<Journaled>),
    /// Any other operation, answered once the file holds it and everything before it.
    Other(StoreOp, Reply),
}

/// A journaled record: its sequence number, its key's digest and its row.
type Journaled = (u64, KeyDigest, Arc<[u8]>);

/// Journaled records the file does not hold yet: a lookup finds their details here, and a claim
/// finds those a start took from the journal (the claim table knows every other one).
#[derive(Default)]
struct Pending {
    rows: Mutex<HashMap<KeyDigest, Arc<[u8]>, BuildHasherDefault<DigestHasher>>>,
    /// Set while rows a start took from the journal are not in the file yet: only then must a
    /// claim look here before the file.
    replayed: AtomicBool,
    /// Signalled when rows leave, for a journal thread waiting at `MAX_PENDING`.
    shrunk: Condvar,
    /// Every digest the file holds or is about to take; rows enter it under `rows`' lock, so a
    /// filter being built sees each of them either here or in the file.
    digests: FileDigests,
}

impl Pending {
    fn row(&self, digest: KeyDigest) -> Option<Arc<[u8]>> {
        // Poisoned or not, the rows are all there: a row missed here could be served twice.
        let pending = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        pending.get(&digest).cloned()
    }

    /// A row a start took from the journal, while the file may not hold it yet.
    fn replayed_row(&self, digest: KeyDigest) -> Option<Arc<[u8]>> {
        if self.replayed.load(Ordering::Acquire) {
            self.row(digest)
        } else {
            None
        }
    }

    /// Waits until there is room for `more` rows, unless the file cannot be written (then no
    /// new claims are taken, which bounds the rows).
    fn insert(
        &self,
        rows: impl Iterator<Item = (KeyDigest, Arc<[u8]>)>,
        more: usize,
        health: &Health,
    ) {
        let mut pending = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        while pending.len() + more > MAX_PENDING
            && !pending.is_empty()
            && !health.file_fails.load(Ordering::Relaxed)
        {
            match self
                .shrunk
                .wait_timeout(pending, Duration::from_millis(100))
            {
                Ok((guard, _)) => pending = guard,
                // Still taken: the journal has the rows, and the filter must have them too.
                Err(poisoned) => pending = poisoned.into_inner().0,
            }
        }
        for (digest, row) in rows {
            self.digests.insert(digest);
            pending.insert(digest, row);
        }
    }

    /// The journal's records a start found the file lacking: taken whatever the bound, as the
    /// journal already holds them.
    fn insert_replayed(&self, rows: &[Journaled]) {
        let mut pending = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        for (_, digest, row) in rows {
            self.digests.insert(*digest);
            pending.insert(*digest, row.clone());
        }
        self.replayed.store(!rows.is_empty(), Ordering::Release);
    }

    /// Starts building a filter for twice the rows of the file (`file_rows`) and those pending:
    /// from now on it takes every new row's digest, and here those of the rows the file may not
    /// hold yet. Sized by rows, not by what the last filter took, so resets and expiry that keep
    /// the file small keep the filter small too.
    fn begin_filter(&self, file_rows: u64) -> Arc<DigestFilter> {
        let pending = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        let rows = (file_rows as usize).saturating_add(pending.len());
        let filter = Arc::new(DigestFilter::with_capacity(
            rows.saturating_mul(2).max(MIN_FILTER_DIGESTS),
        ));
        self.digests.begin_build(filter.clone());
        for digest in pending.keys() {
            filter.insert(*digest);
        }
        filter
    }

    /// Forgets rows the file now holds (unless a newer row for the key took their place). The
    /// replayed rows are in the file after the first transaction that succeeds: they are its
    /// first records.
    fn applied(&self, rows: &[Journaled]) {
        let mut pending = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        for (_, digest, row) in rows {
            if pending
                .get(digest)
                .is_some_and(|held| Arc::ptr_eq(held, row))
            {
                pending.remove(digest);
            }
        }
        self.replayed.store(false, Ordering::Release);
        drop(pending);
        self.shrunk.notify_all();
    }
}

/// Whether the ledger can record downloads: the journal and the file each keep their own flag
/// (each thread sets only its own), and claims are taken only while both are true.
#[derive(Default)]
struct Health {
    journal_fails: AtomicBool,
    file_fails: AtomicBool,
}

impl Health {
    fn ok(&self) -> bool {
        !self.journal_fails.load(Ordering::Relaxed) && !self.file_fails.load(Ordering::Relaxed)
    }
}

/// The open file, shared by the writer thread (writes) and requests (reads). After a failed
/// write redb refuses all further I/O on that handle, so the writer closes it and opens the
/// file again for the next write (redb repairs it if needed).
struct LedgerFile {
    path: PathBuf,
    db: RwLock<Option<Arc<Database>>>,
    /// Rows looked up in the file (a key's first use, unless the digest filter rules it out).
    reads: AtomicU64,
}

impl LedgerFile {
    fn open(path: &Path) -> Result<Database, redb::DatabaseError> {
        redb::Builder::new()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create(path)
    }

    fn current(&self) -> Option<Arc<Database>> {
        self.db.read().ok()?.clone()
    }

    /// The open handle, or a new one if the last write closed it.
    fn current_or_reopen(&self) -> Option<Arc<Database>> {
        if let Some(db) = self.current() {
            return Some(db);
        }
        let db = Arc::new(
            Self::open(&self.path)
                .inspect_err(|e| tracing::warn!(error = %e, "cannot reopen the ledger file"))
                .ok()?,
        );
        *self.db.write().ok()? = Some(db.clone());
        Some(db)
    }

    /// Drops the handle. redb cannot open a file this process still has open, so this waits
    /// (a second at most) for reads in progress to let go of it.
    fn close(&self) {
        let Some(mut db) = self.db.write().ok().and_then(|mut slot| slot.take()) else {
            return;
        };
        for _ in 0..1000 {
            match Arc::try_unwrap(db) {
                Ok(last) => return drop(last),
                Err(shared) => db = shared,
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Reads one row of `table` (nothing when the table was never created) and maps its value.
    fn get<V: redb::Value + 'static, T>(
        &self,
        table: TableDefinition<u128, V>,
        digest: KeyDigest,
        map: impl FnOnce(V::SelfType<'_>) -> T,
    ) -> Result<Option<T>, LedgerError> {
        let unavailable = |e: redb::Error| LedgerError::Unavailable(e.to_string());
        let db = self
            .current()
            .ok_or_else(|| LedgerError::Unavailable("the ledger file cannot be read".into()))?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        let read = db.begin_read().map_err(|e| unavailable(e.into()))?;
        let table = match read.open_table(table) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(unavailable(e.into())),
        };
        let row = table
            .get(digest.as_u128())
            .map_err(|e| unavailable(e.into()))?;
        Ok(row.map(|row| map(row.value())))
    }

    /// When the key was served, if the file has a record of it.
    fn served_at(&self, digest: KeyDigest) -> Result<Option<ServedAt>, LedgerError> {
        self.get(SERVED, digest, |row| ServedAt(row_time(row)))
    }

    /// The stored JSON of a record.
    fn record(&self, digest: KeyDigest) -> Result<Option<Vec<u8>>, LedgerError> {
        self.get(SERVED, digest, |row| {
            row.get(8..).unwrap_or_default().to_vec()
        })
    }
}

/// A `SERVED` row for `record`: the time, then the JSON written straight after it.
fn record_row(record: &ServedRecord) -> Vec<u8> {
    // Sized once for the usual record (~200 bytes of JSON): no reallocation per download.
    let mut row = Vec::with_capacity(8 + 256);
    row.extend_from_slice(&record.served_at_ms.to_le_bytes());
    record.write_json(&mut row);
    row
}

/// A `SERVED` row: the time, then the JSON.
fn served_row(served_at_ms: u64, json: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(8 + json.len());
    row.extend_from_slice(&served_at_ms.to_le_bytes());
    row.extend_from_slice(json);
    row
}

/// The time of a `SERVED` row. A row too short to hold one (never written so) still means
/// served: it counts as served now, so the archive is refused rather than served again.
fn row_time(row: &[u8]) -> u64 {
    row.get(..8)
        .and_then(|time| <[u8; 8]>::try_from(time).ok())
        .map_or_else(super::now_ms, u64::from_le_bytes)
}

pub struct EmbeddedLedger {
    /// Keys used since the start (served ones with their time only); the file has the rest.
    claims: ClaimMap<ServedAt>,
    file: Arc<LedgerFile>,
    pending: Arc<Pending>,
    writer: mpsc::Sender<StoreRequest>,
    health: Arc<Health>,
}

impl EmbeddedLedger {
    /// Opens (or creates) the file; ready at once, whatever its size: a key's record is read on
    /// its first use. Fails when another process has the file open.
    pub fn open(path: &Path, retention: Option<Duration>) -> Result<EmbeddedLedger, LedgerError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            LedgerError::Unavailable(format!("{}: {e}", path.display()))
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| unavailable(&e))?;
        }
        let db = LedgerFile::open(path).map_err(|e| unavailable(&e))?;
        migrate(&db).map_err(|e| unavailable(&e))?;
        // Only now, with the file locked to this process, is the journal safe to touch.
        let replay = replay_journal(&db, path).map_err(|e| unavailable(&e))?;
        let (next_seq, next_segment, applied) =
            (replay.next_seq, replay.next_segment, replay.applied);
        let file = Arc::new(LedgerFile {
            path: path.to_path_buf(),
            db: RwLock::new(Some(Arc::new(db))),
            reads: Default::default(),
        });
        let (health, pending) = (Arc::new(Health::default()), Arc::new(Pending::default()));
        let closed = Arc::new(ClosedSegments::default());
        let (to_file, file_ops) = mpsc::channel();
        // The records a crash left in the journal only: served from now on, in the file soon.
        let replayed = replay.missing;
        if let Some(last) = replayed.iter().map(|(seq, _, _)| *seq).max() {
            pending.insert_replayed(&replayed);
            for segment in replay.segments {
                closed.keep_until_applied(segment, last);
            }
        }
        let (writer, queue) = mpsc::channel();
        let spawn = |name: &str, work: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(work)
                .map_err(|e| unavailable(&e))
        };
        spawn(
            "ledger-file",
            Box::new({
                let (file, pending, health, closed) = (
                    file.clone(),
                    pending.clone(),
                    health.clone(),
                    closed.clone(),
                );
                move || {
                    let start = FileStart {
                        replayed,
                        applied_seq: applied,
                    };
                    apply_loop(&file, file_ops, start, &pending, &closed, &health)
                }
            }),
        )?;
        spawn(
            "ledger-digests",
            Box::new({
                let (file, pending) = (Arc::downgrade(&file), Arc::downgrade(&pending));
                move || filter_loop(&file, &pending)
            }),
        )?;
        spawn(
            "ledger-journal",
            Box::new({
                let (pending, health) = (pending.clone(), health.clone());
                let journal = Journal::new(path, next_segment, closed);
                move || journal_loop(journal, next_seq, queue, &to_file, &pending, &health)
            }),
        )?;
        Ok(EmbeddedLedger {
            claims: ClaimMap::new(retention),
            file,
            pending,
            writer,
            health,
        })
    }

    async fn write(&self, op: StoreOp) -> Result<(), LedgerError> {
        let (done, result) = oneshot::channel();
        self.writer
            .send((op, done))
            .map_err(|_| LedgerError::Unavailable("ledger writer stopped".into()))?;
        match result.await {
            Ok(reply) => reply.map_err(LedgerError::Unavailable),
            Err(_) => Err(LedgerError::Unavailable("ledger writer stopped".into())),
        }
    }

    /// Whether the filter of the file's digests is built (in the background after `open`):
    /// from then on a new key's first claim reads nothing from the file.
    pub fn digest_filter_ready(&self) -> bool {
        self.pending.digests.is_ready()
    }

    /// When a key the table does not know was served: from the rows a start found only in the
    /// journal (while the file may lack them), else from the file. A digest the filter has never
    /// seen is in neither, so a new key costs no read. The rows come first: one leaves them only
    /// once the file holds it, so it cannot slip between the two reads.
    fn stored(&self, digest: KeyDigest) -> Result<Option<ServedAt>, LedgerError> {
        if !self.pending.digests.may_hold(digest) {
            return Ok(None);
        }
        if let Some(row) = self.pending.replayed_row(digest) {
            return Ok(Some(ServedAt(row_time(&row))));
        }
        self.file.served_at(digest)
    }

    /// Claims need no write: the key's row is read from the file on first use, and the claim
    /// itself lives in memory until its commit.
    fn claim_here(&self, key: &str, lease: Duration) -> Result<ClaimOutcome, LedgerError> {
        let stored = |digest| self.stored(digest);
        // Fail closed while the file cannot be written (disk full, read-only, I/O error): a
        // download now could not be recorded. The sweep's probe notices when writes work again.
        // What is known is still answered: a served key stays refused.
        if !self.health.ok() {
            return match self.claims.lookup_or_load(key, stored)? {
                TableState::Served(_) => Ok(ClaimOutcome::Served),
                TableState::InFlight => Ok(ClaimOutcome::InFlight),
                TableState::Unseen => Err(LedgerError::Unavailable(
                    "the ledger file cannot be written".into(),
                )),
            };
        }
        self.claims.claim_or_load(key, lease, stored)
    }
}

fn table_exists<K: redb::Key + 'static, V: redb::Value + 'static>(
    db: &Database,
    table: TableDefinition<K, V>,
) -> Result<bool, redb::Error> {
    match db.begin_read()?.open_table(table) {
        Ok(_) => Ok(true),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Moves the records of earlier layouts into `SERVED`, `MIGRATE_ROWS` per transaction: a crash
/// half-way leaves every record in one of the tables, and the next open goes on from there.
fn migrate(db: &Database) -> Result<(), redb::Error> {
    let legacy = table_exists(db, LEGACY_SERVED)?;
    let two_tables = table_exists(db, RECORDS_V2)? || table_exists(db, SERVED_AT_V2)?;
    if legacy || two_tables {
        tracing::info!("moving the ledger's records to the current layout");
    }
    if legacy {
        while migrate_legacy(db)? > 0 {}
    }
    if two_tables {
        while migrate_two_tables(db)? > 0 {}
    }
    Ok(())
}

/// The time a record's JSON names, or `now` for one that does not parse (still served).
fn time_in_json(json: &[u8], now: u64) -> u64 {
    serde_json::from_slice::<ServedRecord>(json).map_or(now, |record| record.served_at_ms)
}

/// One step of the first layout's move: up to `MIGRATE_ROWS` records, or, when none are left,
/// the table. The rows moved.
fn migrate_legacy(db: &Database) -> Result<usize, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_quick_repair(true);
    let moved = {
        let mut legacy = txn.open_table(LEGACY_SERVED)?;
        let mut served = txn.open_table(SERVED)?;
        let now = super::now_ms();
        let mut keys = Vec::new();
        for entry in legacy.iter()?.take(MIGRATE_ROWS) {
            let (key, json) = entry?;
            let row = served_row(time_in_json(json.value(), now), json.value());
            served.insert(KeyDigest::of(key.value()).as_u128(), row.as_slice())?;
            keys.push(key.value().to_string());
        }
        for key in &keys {
            legacy.remove(key.as_str())?;
        }
        keys.len()
    };
    if moved == 0 {
        txn.delete_table(LEGACY_SERVED)?;
    }
    txn.commit()?;
    Ok(moved)
}

/// One step of the second layout's move: up to `MIGRATE_ROWS` records, or, when none are
/// left, the times without a record (kept as served) and the two tables. The rows moved.
fn migrate_two_tables(db: &Database) -> Result<usize, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_quick_repair(true);
    let moved = {
        let mut records = txn.open_table(RECORDS_V2)?;
        let mut times = txn.open_table(SERVED_AT_V2)?;
        let mut served = txn.open_table(SERVED)?;
        let now = super::now_ms();
        let mut digests = Vec::new();
        for entry in records.iter()?.take(MIGRATE_ROWS) {
            let (digest, json) = entry?;
            let digest = digest.value();
            let time = match times.get(digest)? {
                Some(time) => time.value(),
                None => time_in_json(json.value(), now),
            };
            served.insert(digest, served_row(time, json.value()).as_slice())?;
            digests.push(digest);
        }
        if digests.is_empty() {
            // Times whose record is missing: still served, with an unreadable record.
            for entry in times.iter()?.take(MIGRATE_ROWS) {
                let (digest, time) = entry?;
                digests.push(digest.value());
                served.insert(digest.value(), served_row(time.value(), b"").as_slice())?;
            }
        }
        for digest in &digests {
            records.remove(digest)?;
            times.remove(digest)?;
        }
        digests.len()
    };
    if moved == 0 {
        txn.delete_table(RECORDS_V2)?;
        txn.delete_table(SERVED_AT_V2)?;
    }
    txn.commit()?;
    Ok(moved)
}

/// Where the file thread starts: the records a start found only in the journal, and the highest
/// sequence number the file holds.
struct FileStart {
    replayed: Vec<Journaled>,
    applied_seq: u64,
}

/// What a start finds in the journal.
struct Replay {
    /// The journal's records the file does not hold yet (a crash before the file took them).
    missing: Vec<Journaled>,
    /// Every segment when any record is missing (kept until the file has them all), else none.
    segments: Vec<PathBuf>,
    /// The highest sequence number the file holds.
    applied: u64,
    next_seq: u64,
    next_segment: u64,
}

/// Reads the journal for the records the file lacks. They are not moved into the file here: the
/// file thread writes them first thing, while requests already see them (`Pending`). A start
/// after a crash is then as quick as any other (moving 65k records into a file of 10M took
/// ~2 s). When nothing is missing, the segments are deleted at once.
fn replay_journal(db: &Database, path: &Path) -> Result<Replay, String> {
    let segments = journal::segments(path).map_err(|e| e.to_string())?;
    let next_segment = segments.last().map_or(1, |(number, _)| number + 1);
    let entries = journal::replay(&segments).map_err(|e| e.to_string())?;
    let applied = applied_through(db).map_err(|e| e.to_string())?;
    let newest = entries.iter().map(|e| e.seq).max().unwrap_or(0);
    let missing: Vec<Journaled> = entries
        .into_iter()
        .filter(|e| e.seq > applied)
        .map(|e| (e.seq, e.digest, e.row.into()))
        .collect();
    let mut segments: Vec<PathBuf> = segments.into_iter().map(|(_, path)| path).collect();
    if missing.is_empty() {
        for segment in segments.drain(..) {
            // One left behind is harmless: its entries are in the file, so skipped next time.
            if let Err(e) = std::fs::remove_file(&segment) {
                tracing::warn!(path = %segment.display(), error = %e, "cannot delete a journal segment");
            }
        }
    } else {
        tracing::info!(
            records = missing.len(),
            "journaled records the ledger file lacks are moved into it in the background"
        );
    }
    Ok(Replay {
        missing,
        segments,
        applied,
        next_seq: newest.max(applied) + 1,
        next_segment,
    })
}

fn applied_through(db: &Database) -> Result<u64, redb::Error> {
    let read = db.begin_read()?;
    match read.open_table(JOURNAL_STATE) {
        Ok(table) => Ok(table.get(APPLIED_THROUGH)?.map_or(0, |v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// The journal thread: whatever is queued goes into one journal write and one fdatasync (group
/// commit); a record is acknowledged then, and handed to the file thread.
fn journal_loop(
    mut journal: Journal,
    mut next_seq: u64,
    queue: mpsc::Receiver<StoreRequest>,
    to_file: &mpsc::Sender<FileOp>,
    pending: &Pending,
    health: &Health,
) {
    wake_without_preempting();
    let mut journaled: Vec<(u64, KeyDigest, Arc<[u8]>, Reply)> = Vec::new();
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        for (op, done) in batch {
            match op {
                StoreOp::Put(digest, record) => {
                    let row: Arc<[u8]> = record_row(&record).into();
                    journal.push(next_seq, digest, &row);
                    journaled.push((next_seq, digest, row, done));
                    next_seq += 1;
                }
                other => {
                    // The records before it go first, so the file thread sees the same order.
                    if matches!(other, StoreOp::Probe) {
                        journal.push_probe();
                    }
                    let synced =
                        sync_journal(&mut journal, &mut journaled, to_file, pending, health);
                    if let (StoreOp::Probe, Err(e)) = (&other, synced) {
                        let _ = done.send(Err(e));
                        continue;
                    }
                    if matches!(other, StoreOp::Flush) {
                        journal.close_current();
                    }
                    let _ = to_file.send(FileOp::Other(other, done));
                }
            }
        }
        let _ = sync_journal(&mut journal, &mut journaled, to_file, pending, health);
    }
}

/// The filter thread: builds the filter of the file's digests at start, and a larger one
/// whenever the one in use has taken more digests than it was sized for. It holds the ledger
/// only while it works, so it ends soon after the ledger is dropped.
fn filter_loop(file: &Weak<LedgerFile>, pending: &Weak<Pending>) {
    loop {
        let wanted = match pending.upgrade() {
            Some(pending) => pending.digests.wants_build(),
            None => return,
        };
        if wanted {
            let started = Instant::now();
            match build_filter(file, pending) {
                Ok(Some(rows)) => tracing::info!(
                    rows,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "ledger digest filter built"
                ),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot build the ledger's digest filter; first uses read the file");
                    std::thread::sleep(FILTER_CHECK * 30);
                }
            }
        }
        std::thread::sleep(FILTER_CHECK);
    }
}

/// The open handle of a ledger still in use: `Ok(None)` when the ledger was dropped, an error
/// while its file is closed after a failed write (the build is tried again later).
fn open_handle(file: &Weak<LedgerFile>) -> Result<Option<Arc<Database>>, String> {
    match file.upgrade() {
        None => Ok(None),
        Some(file) => file
            .current()
            .map(Some)
            .ok_or_else(|| "the ledger file is closed".to_string()),
    }
}

/// Builds a filter of every digest the file holds or is about to take, and puts it in use: the
/// rows scanned; `None` when the ledger was dropped meanwhile.
fn build_filter(file: &Weak<LedgerFile>, pending: &Weak<Pending>) -> Result<Option<u64>, String> {
    let Some(first) = pending.upgrade().map(|held| !held.digests.is_ready()) else {
        return Ok(None);
    };
    // Holding no part of the ledger meanwhile: it may take seconds.
    if let Some(path) = file
        .upgrade()
        .filter(|_| first)
        .map(|file| file.path.clone())
    {
        read_ahead(&path);
    }
    let Some(db) = open_handle(file)? else {
        return Ok(None);
    };
    let Some(held) = pending.upgrade() else {
        return Ok(None);
    };
    let rows = served_rows(&db).map_err(|e| e.to_string())?;
    drop(db);
    // First the filter takes new digests, then those pending, then the file's: a row is always
    // in one of them (it leaves `pending` only once the file holds it).
    let filter = held.begin_filter(rows);
    drop(held);
    let scanned = scan_digests(file, &filter);
    let Some(pending) = pending.upgrade() else {
        return Ok(None);
    };
    match scanned {
        Ok(Some(scanned)) => {
            pending.digests.finish_build();
            Ok(Some(scanned))
        }
        other => {
            pending.digests.abandon_build();
            other
        }
    }
}

/// Reads the file once in order, so the OS caches it before the first scan: the scan reads the
/// leaves in key order, scattered over the file, which from a cold disk took 216 s for 10M
/// records (5 GiB) against 10.5 s to read the file in order (`posix_fadvise`'s `WILLNEED` reads
/// only the first few pages). A failure only leaves the scan slower.
fn read_ahead(path: &Path) {
    use std::io::Read;
    let Ok(mut file) = std::fs::File::open(path) else {
        return;
    };
    let mut buffer = vec![0u8; 1 << 20];
    while matches!(file.read(&mut buffer), Ok(read) if read > 0) {}
}

/// Rows in the file's `SERVED` table.
fn served_rows(db: &Database) -> Result<u64, redb::Error> {
    use redb::ReadableTableMetadata;
    match db.begin_read()?.open_table(SERVED) {
        Ok(table) => Ok(table.len()?),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Adds every digest of the `SERVED` table to `filter`, `FILTER_SCAN_ROWS` per read
/// transaction; `None` when the ledger was dropped meanwhile.
fn scan_digests(file: &Weak<LedgerFile>, filter: &DigestFilter) -> Result<Option<u64>, String> {
    let mut from = 0u128;
    let mut scanned = 0;
    loop {
        let Some(db) = open_handle(file)? else {
            return Ok(None);
        };
        let read = db.begin_read().map_err(|e| e.to_string())?;
        let table = match read.open_table(SERVED) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Some(scanned)),
            Err(e) => return Err(e.to_string()),
        };
        let mut seen = 0;
        for row in table
            .range(from..)
            .map_err(|e| e.to_string())?
            .take(FILTER_SCAN_ROWS)
        {
            let digest = row.map_err(|e| e.to_string())?.0.value();
            filter.insert(KeyDigest::from_u128(digest));
            seen += 1;
            scanned += 1;
            match digest.checked_add(1) {
                Some(next) => from = next,
                None => return Ok(Some(scanned)),
            }
        }
        if seen < FILTER_SCAN_ROWS {
            return Ok(Some(scanned));
        }
    }
}

/// Puts the calling thread (the journal's) under `SCHED_BATCH`: a commit queued for it no longer
/// preempts the thread serving requests, so it runs when that thread waits and takes every commit
/// queued meanwhile in one fdatasync. With the default policy each wake-up cut in at once and
/// groups stayed small; paired runs took ~25 % less CPU per download with it (docs/BENCHMARKS.md).
fn wake_without_preempting() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid `sched_param` for the call; pid 0 is the calling thread, and
        // SCHED_BATCH with priority 0 needs no privilege.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
            let error = std::io::Error::last_os_error();
            tracing::warn!(%error, "the ledger journal thread keeps the default scheduling policy");
        }
    }
}

/// Makes the pushed entries durable, then acknowledges their records and hands them on.
fn sync_journal(
    journal: &mut Journal,
    journaled: &mut Vec<(u64, KeyDigest, Arc<[u8]>, Reply)>,
    to_file: &mpsc::Sender<FileOp>,
    pending: &Pending,
    health: &Health,
) -> Result<(), String> {
    let result = journal.sync().map_err(|e| e.to_string());
    if !matches!(result, Ok(false)) {
        health
            .journal_fails
            .store(result.is_err(), Ordering::Relaxed);
    }
    match &result {
        Ok(_) => {
            let rows = journaled
                .iter()
                .map(|(_, digest, row, _)| (*digest, row.clone()));
            pending.insert(rows, journaled.len(), health);
            let mut puts = Vec::with_capacity(journaled.len());
            for (seq, digest, row, done) in journaled.drain(..) {
                puts.push((seq, digest, row));
                let _ = done.send(Ok(()));
            }
            if !puts.is_empty() {
                let _ = to_file.send(FileOp::Puts(puts));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "ledger journal write failed");
            for (_, _, _, done) in journaled.drain(..) {
                let _ = done.send(Err(e.clone()));
            }
        }
    }
    result.map(|_| ())
}

/// The file thread: gathers journaled records for `APPLY_WAIT` and writes them (with any other
/// operation, in order) in one transaction, then deletes the journal segments the file now holds.
fn apply_loop(
    file: &LedgerFile,
    ops: mpsc::Receiver<FileOp>,
    start: FileStart,
    pending: &Pending,
    closed: &ClosedSegments,
    health: &Health,
) {
    let mut sweep_from = 0u128;
    let mut applied_seq = start.applied_seq;
    // Records not in the file yet: gathered, or kept after a failed transaction to try again.
    // Those a start found only in the journal go first, at once.
    let mut puts: Vec<Journaled> = start.replayed;
    let mut write_now = !puts.is_empty();
    let mut stopping = false;
    while !stopping {
        // At most one other operation, and it comes last: the transaction keeps the journal's
        // order (a sweep's delete must not overtake a record journaled after it).
        let mut other: Option<(StoreOp, Reply)> = None;
        let take = |op: FileOp, puts: &mut Vec<_>| match op {
            FileOp::Puts(mut more) => {
                puts.append(&mut more);
                None
            }
            FileOp::Other(op, done) => Some((op, done)),
        };
        if !std::mem::take(&mut write_now) {
            match ops.recv() {
                Ok(op) => other = take(op, &mut puts),
                Err(_) if puts.is_empty() => break,
                Err(_) => stopping = true,
            }
            // Records wait to be written in numbers; any other operation is answered at once.
            let deadline = Instant::now() + APPLY_WAIT;
            while puts.len() < APPLY_ROWS && !stopping && other.is_none() {
                match ops.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(op) => other = take(op, &mut puts),
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => stopping = true,
                }
            }
        }
        while other.is_none() {
            match ops.try_recv() {
                Ok(op) => other = take(op, &mut puts),
                Err(_) => break,
            }
        }
        let result = match file.current_or_reopen() {
            Some(db) => apply(
                &db,
                &puts,
                other.as_ref().map(|(op, _)| op),
                &mut sweep_from,
            )
            .map_err(|e| e.to_string()),
            None => Err("the ledger file cannot be opened".to_string()),
        };
        // After a failure, and on a flush: a file closed cleanly opens without a repair pass
        // over every record (which takes seconds per million).
        if result.is_err() || matches!(other, Some((StoreOp::Flush, _))) {
            file.close();
        }
        // Reads go on while writes fail (a full disk still lets served keys be found).
        if let Err(e) = &result {
            file.current_or_reopen();
            tracing::error!(error = %e, "ledger write failed");
        } else {
            pending.applied(&puts);
            applied_seq = puts
                .iter()
                .map(|(seq, _, _)| *seq)
                .fold(applied_seq, u64::max);
            closed.delete_applied(applied_seq);
            puts.clear();
        }
        health.file_fails.store(result.is_err(), Ordering::Relaxed);
        if let Some((_, done)) = other {
            let _ = done.send(result);
        }
    }
}

/// One transaction: the records, the journal position they reach, then the other operation.
fn apply(
    db: &Database,
    puts: &[Journaled],
    other: Option<&StoreOp>,
    sweep_from: &mut u128,
) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    // Saves redb's allocator state with each commit (and commits in two phases): a restart after
    // a crash is ready at once instead of walking the whole file (tens of seconds at 10 million
    // records).
    txn.set_quick_repair(true);
    {
        let mut served = txn.open_table(SERVED)?;
        for (_, digest, row) in puts {
            served.insert(digest.as_u128(), &**row)?;
        }
        if let Some(last) = puts.iter().map(|(seq, _, _)| *seq).max() {
            txn.open_table(JOURNAL_STATE)?
                .insert(APPLIED_THROUGH, last)?;
        }
        if let Some(op) = other {
            match op {
                StoreOp::Delete(digests) => {
                    for digest in digests {
                        served.remove(digest.as_u128())?;
                    }
                }
                StoreOp::Expire(retention) => {
                    let now = SystemTime::now();
                    let mut expired = Vec::new();
                    let mut seen = 0;
                    for row in served.range(*sweep_from..)?.take(FILE_SWEEP_ROWS) {
                        let (digest, row) = row?;
                        seen += 1;
                        *sweep_from = digest.value().saturating_add(1);
                        if retention_over(row_time(row.value()), Some(*retention), now) {
                            expired.push(digest.value());
                        }
                    }
                    if seen < FILE_SWEEP_ROWS {
                        *sweep_from = 0;
                    }
                    for digest in expired {
                        served.remove(digest)?;
                    }
                }
                StoreOp::Probe => {
                    txn.open_table(PROBE)?
                        .insert("last_probe_ms", super::now_ms())?;
                }
                StoreOp::Put(..) | StoreOp::Flush => {}
            }
        }
    }
    txn.commit()?;
    Ok(())
}

#[async_trait]
impl Ledger for EmbeddedLedger {
    async fn claim(&self, key: &str, lease: Duration) -> Result<ClaimOutcome, LedgerError> {
        self.claim_here(key, lease)
    }

    fn claim_now(&self, key: &str, lease: Duration) -> Option<Result<ClaimOutcome, LedgerError>> {
        Some(self.claim_here(key, lease))
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<(), LedgerError> {
        self.claims.renew(ticket, lease)
    }

    async fn commit(&self, ticket: &Ticket, record: ServedRecord) -> Result<(), LedgerError> {
        let committing = self.claims.begin_commit(ticket)?;
        let served_at = ServedAt(record.served_at_ms);
        self.write(StoreOp::Put(ticket.digest, record)).await?;
        committing.finish(served_at);
        Ok(())
    }

    async fn release(&self, ticket: &Ticket) -> Result<(), LedgerError> {
        self.claims.release(ticket);
        Ok(())
    }

    async fn lookup(&self, key: &str) -> Result<KeyState, LedgerError> {
        let served_at = match self
            .claims
            .lookup_or_load(key, |digest| self.stored(digest))?
        {
            TableState::Unseen => return Ok(KeyState::Unseen),
            TableState::InFlight => return Ok(KeyState::InFlight),
            TableState::Served(ServedAt(ms)) => ms,
        };
        // The table is the authority on the state; the file adds the details. A record gone
        // there (a reset that ran since) or unreadable is still reported as served.
        let digest = KeyDigest::of(key);
        let json = match self.pending.row(digest) {
            Some(row) => Some(row.get(8..).unwrap_or_default().to_vec()),
            None => self.file.record(digest)?,
        };
        let record = json
            .and_then(|json| serde_json::from_slice(&json).ok())
            .unwrap_or_else(|| ServedRecord::unreadable(key, served_at));
        Ok(KeyState::Served(Arc::new(record)))
    }

    async fn reset(&self, key: &str) -> Result<ResetOutcome, LedgerError> {
        let reset = match self
            .claims
            .begin_reset_or_load(key, |digest| self.stored(digest))?
        {
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
        self.health.ok()
    }

    async fn sweep(&self) {
        if !self.health.ok() {
            match self.write(StoreOp::Probe).await {
                Ok(()) => tracing::info!("ledger file writable again; taking claims"),
                Err(e) => tracing::warn!(error = %e, "ledger file still not writable"),
            }
        }
        let Some(retention) = self.claims.retention() else {
            return;
        };
        // Those read since the start, then a slice of the file for the ones never read.
        let expired = self.claims.sweep();
        let known = (!expired.is_empty()).then_some(StoreOp::Delete(expired));
        for op in known.into_iter().chain([StoreOp::Expire(retention)]) {
            if let Err(e) = self.write(op).await {
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
    use redb::ReadableTableMetadata;

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

    /// Claims and commits each key.
    async fn serve(ledger: &EmbeddedLedger, keys: &[&str]) {
        for key in keys {
            let ticket = claim(ledger, key).await;
            ledger.commit(&ticket, record(key)).await.unwrap();
        }
    }

    async fn claim(ledger: &EmbeddedLedger, key: &str) -> Ticket {
        match ledger.claim(key, Duration::from_secs(60)).await.unwrap() {
            ClaimOutcome::Claimed(ticket) => ticket,
            other => panic!("{other:?}"),
        }
    }

    /// Waits (ten seconds at most) until a digest filter is in use and no larger one is wanted.
    async fn filter_settled(ledger: &EmbeddedLedger) {
        for _ in 0..1000 {
            let digests = &ledger.pending.digests;
            if digests.is_ready() && !digests.wants_build() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no digest filter was built");
    }

    #[tokio::test]
    async fn once_the_digest_filter_is_built_served_keys_are_read_and_new_keys_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        // Far more records than the smallest filter takes in tests, so larger ones are built
        // while they are served.
        let keys: Vec<String> = (0..100).map(|i| format!("served-{i}")).collect();
        {
            let ledger = EmbeddedLedger::open(&path, None).unwrap();
            for key in &keys {
                serve(&ledger, &[key]).await;
            }
            filter_settled(&ledger).await;
            let (taken, _) = ledger.pending.digests.taken_and_capacity().unwrap();
            assert!(taken >= keys.len());
        }
        let ledger = reopen(&path, None).await;
        filter_settled(&ledger).await;
        let reads = || ledger.file.reads.load(Ordering::Relaxed);
        let before = reads();
        for i in 0..200 {
            let ticket = claim(&ledger, &format!("new-{i}")).await;
            ledger.release(&ticket).await.unwrap();
        }
        // Only the filter's false positives (~0.5 %) read the file.
        let new_key_reads = reads() - before;
        assert!(
            new_key_reads <= 10,
            "{new_key_reads} reads for 200 new keys"
        );
        let before = reads();
        for key in &keys {
            let outcome = ledger.claim(key, Duration::from_secs(60)).await.unwrap();
            assert_eq!(outcome, ClaimOutcome::Served, "{key}");
        }
        assert_eq!(
            reads() - before,
            keys.len() as u64,
            "each served key read once"
        );
    }

    #[tokio::test]
    async fn the_digest_filter_stays_sized_by_the_file_when_resets_keep_it_small() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = EmbeddedLedger::open(&dir.path().join("ledger.redb"), None).unwrap();
        // 500 records served, never more than 50 at a time in the file; each round's filter
        // is built for twice the rows then, not for what the last one took.
        for round in 0..10 {
            let keys: Vec<String> = (0..50).map(|i| format!("r{round}-{i}")).collect();
            for key in &keys {
                serve(&ledger, &[key]).await;
            }
            filter_settled(&ledger).await;
            for key in &keys {
                assert_eq!(ledger.reset(key).await.unwrap(), ResetOutcome::Reset);
            }
        }
        let (taken, capacity) = ledger.pending.digests.taken_and_capacity().unwrap();
        assert!(
            capacity <= 2 * 100,
            "sized for {capacity} digests after {taken}"
        );
    }

    #[tokio::test]
    async fn a_commit_nobody_waits_for_leaves_the_key_free_once_its_lease_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = EmbeddedLedger::open(&dir.path().join("ledger.redb"), None).unwrap();
        let ticket = match ledger.claim("k", Duration::from_millis(100)).await.unwrap() {
            ClaimOutcome::Claimed(ticket) => ticket,
            other => panic!("{other:?}"),
        };
        {
            // Polled once (the claim is pinned, the record queued), then dropped, as when the
            // client goes away while its record is written.
            let mut commit = Box::pin(ledger.commit(&ticket, record("k")));
            let _ = futures_util::poll!(commit.as_mut());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let outcome = ledger.claim("k", Duration::from_secs(60)).await.unwrap();
        assert!(
            !matches!(outcome, ClaimOutcome::InFlight),
            "the key stayed in flight after its lease"
        );
    }

    #[tokio::test]
    async fn served_records_survive_reopen_and_resets_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ledger.redb");
        {
            let ledger = EmbeddedLedger::open(&path, None).unwrap();
            serve(&ledger, &["a", "b"]).await;
            let _held = claim(&ledger, "c").await;
            assert_eq!(ledger.reset("b").await.unwrap(), ResetOutcome::Reset);
        }
        let ledger = reopen(&path, None).await;
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
            let db = LedgerFile::open(&path).unwrap();
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
        assert_eq!(read.open_table(SERVED).unwrap().len().unwrap(), 2);
    }

    #[tokio::test]
    async fn records_of_the_two_table_layout_are_moved_with_their_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let mut old = record("p/i/old");
        old.served_at_ms -= 7_200_000;
        let others: Vec<ServedRecord> = (0..4).map(|i| record(&format!("p/i/{i}"))).collect();
        let digest = |key: &str| KeyDigest::of(key).as_u128();
        {
            let db = LedgerFile::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut records = txn.open_table(RECORDS_V2).unwrap();
                let mut times = txn.open_table(SERVED_AT_V2).unwrap();
                for record in others.iter().chain([&old]) {
                    let json = serde_json::to_vec(record).unwrap();
                    records
                        .insert(digest(&record.key), json.as_slice())
                        .unwrap();
                    times
                        .insert(digest(&record.key), record.served_at_ms)
                        .unwrap();
                }
                // A time whose record is missing, and a record that does not parse.
                times.insert(digest("p/i/time-only"), 1_000).unwrap();
                records
                    .insert(digest("p/i/garbled"), b"{not json".as_slice())
                    .unwrap();
                times.insert(digest("p/i/garbled"), 2_000).unwrap();
            }
            txn.commit().unwrap();
        }
        let ledger = EmbeddedLedger::open(&path, None).unwrap();
        assert_eq!(
            ledger.lookup("p/i/old").await.unwrap(),
            KeyState::Served(Arc::new(old.clone()))
        );
        for record in &others {
            assert_eq!(
                ledger.lookup(&record.key).await.unwrap(),
                KeyState::Served(Arc::new(record.clone()))
            );
        }
        for (key, time) in [("p/i/time-only", 1_000), ("p/i/garbled", 2_000)] {
            assert_eq!(
                ledger.lookup(key).await.unwrap(),
                KeyState::Served(Arc::new(ServedRecord::unreadable(key, time))),
                "{key} stays served, at its time"
            );
            assert_eq!(
                ledger.claim(key, Duration::from_secs(60)).await.unwrap(),
                ClaimOutcome::Served
            );
        }
        let db = ledger.file.current().unwrap();
        let read = db.begin_read().unwrap();
        assert_eq!(read.open_table(SERVED).unwrap().len().unwrap(), 7);
        for gone in [
            read.open_table(RECORDS_V2).err(),
            read.open_table(SERVED_AT_V2).err(),
        ] {
            assert!(matches!(gone, Some(redb::TableError::TableDoesNotExist(_))));
        }
    }

    async fn reopen(path: &Path, retention: Option<Duration>) -> EmbeddedLedger {
        // The writer thread holds the file until its queue closes.
        loop {
            match EmbeddedLedger::open(path, retention) {
                Ok(ledger) => break ledger,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    #[tokio::test]
    async fn records_of_an_earlier_run_are_refused_reset_and_expired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        {
            let ledger = EmbeddedLedger::open(&path, None).unwrap();
            serve(&ledger, &["p/i/kept", "p/i/reset"]).await;
            let ticket = claim(&ledger, "p/i/old").await;
            let mut old = record("p/i/old");
            old.served_at_ms -= 3_600_000;
            ledger.commit(&ticket, old).await.unwrap();
        }
        let ledger = reopen(&path, Some(Duration::from_secs(60))).await;
        assert_eq!(
            ledger
                .claim("p/i/kept", Duration::from_secs(60))
                .await
                .unwrap(),
            ClaimOutcome::Served
        );
        assert_eq!(
            ledger.reset("p/i/reset").await.unwrap(),
            ResetOutcome::Reset
        );
        claim(&ledger, "p/i/reset").await;
        // Never read since the start: the sweep finds it in the file.
        ledger.sweep().await;
        let rows = |ledger: &EmbeddedLedger| {
            let db = ledger.file.current().unwrap();
            let read = db.begin_read().unwrap();
            read.open_table(SERVED).unwrap().len().unwrap()
        };
        assert_eq!(rows(&ledger), 1, "only p/i/kept is left");
        claim(&ledger, "p/i/old").await;
    }

    #[tokio::test]
    async fn a_flush_closes_the_file_cleanly_so_it_opens_without_repair() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let ledger = EmbeddedLedger::open(&path, None).unwrap();
        let ticket = claim(&ledger, "p/i/a").await;
        ledger.commit(&ticket, record("p/i/a")).await.unwrap();
        ledger.flush().await.unwrap();
        // The file is free (the process still runs) and needs no repair pass.
        let repaired = std::rc::Rc::new(std::cell::Cell::new(false));
        let seen = repaired.clone();
        let db = redb::Builder::new()
            .set_repair_callback(move |_| seen.set(true))
            .create(&path)
            .unwrap();
        assert!(!repaired.get(), "the file needed a repair");
        let read = db.begin_read().unwrap();
        assert_eq!(read.open_table(SERVED).unwrap().len().unwrap(), 1);
    }

    #[test]
    fn journaled_records_wait_for_room_unless_the_file_fails() {
        let (pending, health) = (Arc::new(Pending::default()), Arc::new(Health::default()));
        let row: Arc<[u8]> = Arc::from(&b"row"[..]);
        let entry = |i: u64, digest: u128| (i + 1, KeyDigest::from_u128(digest), row.clone());
        let held: Vec<Journaled> = (0..MAX_PENDING as u64)
            .map(|i| entry(i, i.into()))
            .collect();
        let rows = |journaled: &[Journaled]| {
            let rows: Vec<_> = journaled.iter().map(|(_, d, r)| (*d, r.clone())).collect();
            rows.into_iter()
        };
        pending.insert(rows(&held), held.len(), &health);
        // One more waits while the file takes none of them...
        let (inserted, waiting) = mpsc::channel();
        let one_more = std::thread::spawn({
            let (pending, health, row) = (pending.clone(), health.clone(), row.clone());
            move || {
                let digest = KeyDigest::from_u128(u128::MAX);
                pending.insert(std::iter::once((digest, row)), 1, &health);
                inserted.send(()).unwrap();
            }
        });
        assert!(
            waiting.recv_timeout(Duration::from_millis(300)).is_err(),
            "a record went past MAX_PENDING while the file took none"
        );
        // ...and goes in once the file holds them.
        pending.applied(&held);
        waiting
            .recv_timeout(Duration::from_secs(10))
            .expect("still waiting after the file took the rows");
        one_more.join().unwrap();
        assert_eq!(pending.rows.lock().unwrap().len(), 1);

        // While the file fails nothing leaves, so waiting would hold commits for good: the
        // records go in (no new claims are taken meanwhile, which bounds them).
        health.file_fails.store(true, Ordering::Relaxed);
        let more: Vec<Journaled> = (0..MAX_PENDING as u64)
            .map(|i| entry(i, (1 << 64) | u128::from(i)))
            .collect();
        let (inserted, waiting) = mpsc::channel();
        std::thread::spawn({
            let (pending, health) = (pending.clone(), health.clone());
            move || {
                pending.insert(rows(&more), more.len(), &health);
                inserted.send(()).unwrap();
            }
        });
        waiting
            .recv_timeout(Duration::from_secs(10))
            .expect("records waited for a file that fails");
        assert_eq!(pending.rows.lock().unwrap().len(), MAX_PENDING + 1);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_journal_thread_runs_under_sched_batch() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = EmbeddedLedger::open(&dir.path().join("ledger.redb"), None).unwrap();
        let ticket = claim(&ledger, "p/i/a").await;
        // Answered by the journal thread, so it has set its policy by now.
        ledger.commit(&ticket, record("p/i/a")).await.unwrap();
        // The policy is field 41 of a thread's `stat` (the 39th after the name's parenthesis).
        let policies: Vec<u32> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| {
                let task = task.ok()?.path();
                let name = std::fs::read_to_string(task.join("comm")).ok()?;
                let stat = std::fs::read_to_string(task.join("stat")).ok()?;
                let after_name = &stat[stat.rfind(')')? + 1..];
                (name.trim() == "ledger-journal")
                    .then(|| after_name.split_whitespace().nth(38)?.parse().ok())?
            })
            .collect();
        assert!(
            policies.contains(&(libc::SCHED_BATCH as u32)),
            "journal threads' policies: {policies:?}"
        );
    }

    #[tokio::test]
    async fn second_process_cannot_open_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let _first = EmbeddedLedger::open(&path, None).unwrap();
        assert!(EmbeddedLedger::open(&path, None).is_err());
    }

    #[tokio::test]
    async fn a_record_is_looked_up_in_full_before_the_file_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = EmbeddedLedger::open(&dir.path().join("ledger.redb"), None).unwrap();
        let ticket = claim(&ledger, "p/i/a").await;
        let committed = record("p/i/a");
        ledger.commit(&ticket, committed.clone()).await.unwrap();
        // Journaled now; the file takes it up to `APPLY_WAIT` later.
        assert_eq!(
            ledger.lookup("p/i/a").await.unwrap(),
            KeyState::Served(Arc::new(committed))
        );
    }

    #[tokio::test]
    async fn journaled_records_the_file_lacks_are_served_at_open_and_moved_in_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        {
            let ledger = EmbeddedLedger::open(&path, None).unwrap();
            serve(&ledger, &["p/i/kept", "p/i/reset"]).await;
            let reset = ledger.reset("p/i/reset").await.unwrap();
            assert_eq!(reset, ResetOutcome::Reset);
            ledger.flush().await.unwrap();
            assert!(journal::segments(&path).unwrap().is_empty());
        }
        // What a crash leaves: an entry the file already holds, older than a reset of its key
        // (sequence 2), and one it never took (3).
        let mut journal = Journal::new(&path, 7, Arc::default());
        for (seq, key) in [(2, "p/i/reset"), (3, "p/i/crashed")] {
            journal.push(seq, KeyDigest::of(key), &record_row(&record(key)));
        }
        journal.sync().unwrap();
        drop(journal);

        let ledger = reopen(&path, None).await;
        // Refused at once, from memory or (once the file thread wrote it) from the file.
        let crashed_digest = KeyDigest::of("p/i/crashed");
        let crashed = ledger.claim("p/i/crashed", Duration::from_secs(60)).await;
        assert_eq!(crashed.unwrap(), ClaimOutcome::Served);
        let kept = ledger.claim("p/i/kept", Duration::from_secs(60)).await;
        assert_eq!(kept.unwrap(), ClaimOutcome::Served);
        claim(&ledger, "p/i/reset").await;
        // Then the file takes it at once (well inside `APPLY_WAIT`), and only then is the
        // journal segment deleted.
        for _ in 0..200 {
            if journal::segments(&path).unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(journal::segments(&path).unwrap().is_empty());
        assert!(ledger.file.served_at(crashed_digest).unwrap().is_some());
        drop(ledger);
        let ledger = reopen(&path, None).await;
        let KeyState::Served(crashed) = ledger.lookup("p/i/crashed").await.unwrap() else {
            panic!("p/i/crashed was journaled, so it is served");
        };
        assert_eq!((crashed.key.as_str(), crashed.bytes), ("p/i/crashed", 42));
    }

    #[tokio::test]
    async fn records_a_start_found_only_in_the_journal_are_refused_before_the_file_has_them() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = EmbeddedLedger::open(&dir.path().join("ledger.redb"), None).unwrap();
        // As a start leaves them, but never handed to the file thread: only memory has them.
        let digest = KeyDigest::of("p/i/journaled");
        let row: Arc<[u8]> = record_row(&record("p/i/journaled")).into();
        ledger.pending.insert_replayed(&[(1, digest, row)]);
        assert!(ledger.file.served_at(digest).unwrap().is_none());
        let refused = ledger.claim("p/i/journaled", Duration::from_secs(60)).await;
        assert_eq!(refused.unwrap(), ClaimOutcome::Served);
        let KeyState::Served(found) = ledger.lookup("p/i/journaled").await.unwrap() else {
            panic!("a journaled record is served");
        };
        assert_eq!(found.key, "p/i/journaled");
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
        let reopened = reopen(&path, None).await;
        for i in 0..64 {
            assert!(matches!(
                reopened.lookup(&format!("k{i}")).await.unwrap(),
                KeyState::Served(_)
            ));
        }
    }
}
