//! The in-memory claim table shared by the memory and embedded ledgers.
//! One DashMap entry per key digest; every transition is a single entry operation, never get-then-insert.

use std::convert::Infallible;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use sha2::{Digest, Sha256};

use super::{retention_over, ClaimOutcome, LedgerError, ResetOutcome, ServedRecord, Ticket};

/// The first 128 bits of a key's SHA-256: what the table (and the embedded file) is keyed by.
/// 16 bytes per record whatever the key's length, and a collision cannot be crafted, so no
/// archive id can make another archive look served. Two `u64`s rather than a `u128`: aligned
/// to 8, a table entry is 40 bytes instead of 48, and every future holding a ticket is smaller.
/// (Field order keeps the derived order that of the `u128`, which the embedded file is keyed by.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyDigest {
    high: u64,
    low: u64,
}

impl KeyDigest {
    pub fn of(key: &str) -> KeyDigest {
        let sha = Sha256::digest(key.as_bytes());
        let half = |range: std::ops::Range<usize>| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&sha[range]);
            u64::from_be_bytes(bytes)
        };
        KeyDigest {
            high: half(0..8),
            low: half(8..16),
        }
    }

    pub fn from_u128(value: u128) -> KeyDigest {
        KeyDigest {
            high: (value >> 64) as u64,
            low: value as u64,
        }
    }

    pub fn as_u128(self) -> u128 {
        (u128::from(self.high) << 64) | u128::from(self.low)
    }
}

/// The low 64 bits are already uniform: they are the hash (see `DigestHasher`).
impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.low);
    }
}

/// Digests are already uniform: their low 64 bits are the hash, no SipHash round per lookup.
/// (Flooding a bucket would need SHA-256 preimages.)
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for other key types; digests go through `write_u64`.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

pub type DigestMap<V> = DashMap<KeyDigest, V, BuildHasherDefault<DigestHasher>>;

/// What the table keeps of a served key: at least when it was served (for retention).
pub trait ServedEntry: Clone + Send + Sync + 'static {
    fn served_at_ms(&self) -> u64;
}

/// The whole record, for a store that has nowhere else to keep it (`memory`).
impl ServedEntry for Arc<ServedRecord> {
    fn served_at_ms(&self) -> u64 {
        self.served_at_ms
    }
}

/// Only the time: the record itself is in the durable store (`embedded`), 8 bytes in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedAt(pub u64);

impl ServedEntry for ServedAt {
    fn served_at_ms(&self) -> u64 {
        self.0
    }
}

/// A key's state as the table sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableState<S> {
    Unseen,
    InFlight,
    Served(S),
}

/// 24 bytes with a `ServedAt` (checked by a test): with the 16-byte digest, 40 bytes a slot.
#[derive(Debug)]
enum Slot<S> {
    InFlight {
        ticket: u64,
        /// Nanoseconds since the table's `epoch`.
        expires: u64,
        /// Set while the durable write of a commit runs: such a claim never expires under it.
        committing: bool,
    },
    Served(S),
}

/// A commit under way (`ClaimMap::begin_commit`).
pub struct Committing<'a, S: ServedEntry> {
    map: &'a ClaimMap<S>,
    ticket: &'a Ticket,
    finished: bool,
}

impl<S: ServedEntry> Committing<'_, S> {
    /// The record is durable: the key is served.
    pub fn finish(mut self, entry: S) {
        self.finished = true;
        if let Some(mut slot) = self.map.slots.get_mut(&self.ticket.digest) {
            if matches!(*slot, Slot::InFlight { ticket: held, .. } if held == self.ticket.id) {
                *slot = Slot::Served(entry);
            }
        }
    }
}

impl<S: ServedEntry> Drop for Committing<'_, S> {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self
                .map
                .with_held(self.ticket, |_, committing| *committing = false);
        }
    }
}

/// A reset in progress (see `ClaimMap::begin_reset`).
pub struct ResetGuard<'a, S: ServedEntry> {
    map: &'a ClaimMap<S>,
    digest: KeyDigest,
    ticket: u64,
    /// Put back unless the reset finishes.
    entry: Option<S>,
}

impl<S: ServedEntry> ResetGuard<'_, S> {
    pub fn digest(&self) -> KeyDigest {
        self.digest
    }

    /// The record is gone (durably, where it matters): the key is unseen.
    pub fn finish(mut self) {
        self.entry = None;
        let ticket = self.ticket;
        self.map.slots.remove_if(
            &self.digest,
            |_, slot| matches!(slot, Slot::InFlight { ticket: held, .. } if *held == ticket),
        );
        self.map.resets.fetch_add(1, Ordering::SeqCst);
    }
}

impl<S: ServedEntry> Drop for ResetGuard<'_, S> {
    fn drop(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        if let Some(mut slot) = self.map.slots.get_mut(&self.digest) {
            if matches!(*slot, Slot::InFlight { ticket: held, .. } if held == self.ticket) {
                *slot = Slot::Served(entry);
            }
        }
    }
}

#[derive(Debug)]
pub struct ClaimMap<S: ServedEntry> {
    slots: DigestMap<Slot<S>>,
    next_ticket: AtomicU64,
    retention: Option<Duration>,
    /// Lease deadlines are kept as nanoseconds since this instant (8 bytes, not an `Instant`'s 16).
    epoch: Instant,
    /// Finished resets so far: a record read from the store before a reset must not be put
    /// into the table after it.
    resets: AtomicU64,
}

impl<S: ServedEntry> ClaimMap<S> {
    pub fn new(retention: Option<Duration>) -> ClaimMap<S> {
        ClaimMap {
            slots: DashMap::default(),
            next_ticket: AtomicU64::new(1),
            retention,
            epoch: Instant::now(),
            resets: AtomicU64::new(0),
        }
    }

    pub fn retention(&self) -> Option<Duration> {
        self.retention
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn deadline(&self, lease: Duration) -> u64 {
        self.now().saturating_add(lease.as_nanos() as u64)
    }

    fn live(&self, entry: &S, wall: SystemTime) -> bool {
        !retention_over(entry.served_at_ms(), self.retention, wall)
    }

    pub fn claim(&self, key: &str, lease: Duration) -> ClaimOutcome {
        match self.claim_or_load(key, lease, |_| Ok::<_, Infallible>(None)) {
            Ok(outcome) => outcome,
            Err(never) => match never {},
        }
    }

    /// Claims `key`; for a key the table does not hold, `load` first asks the durable store
    /// whether it was served (records are read on first use, not at startup).
    pub fn claim_or_load<E>(
        &self,
        key: &str,
        lease: Duration,
        load: impl Fn(KeyDigest) -> Result<Option<S>, E>,
    ) -> Result<ClaimOutcome, E> {
        let digest = KeyDigest::of(key);
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let stored = self.load_unknown(digest, &load)?;
        let now = self.now();
        let fresh = Slot::InFlight {
            ticket,
            expires: now.saturating_add(lease.as_nanos() as u64),
            committing: false,
        };
        match self.slots.entry(digest) {
            Entry::Vacant(vacant) => match stored {
                Some(entry) if self.live(&entry, SystemTime::now()) => {
                    vacant.insert(Slot::Served(entry));
                    return Ok(ClaimOutcome::Served);
                }
                _ => {
                    vacant.insert(fresh);
                }
            },
            Entry::Occupied(mut occupied) => match occupied.get() {
                Slot::Served(entry) if self.live(entry, SystemTime::now()) => {
                    return Ok(ClaimOutcome::Served);
                }
                Slot::InFlight {
                    expires,
                    committing,
                    ..
                } if *committing || *expires > now => {
                    return Ok(ClaimOutcome::InFlight);
                }
                // A dead claim or a record past retention: the key is unseen again.
                _ => {
                    occupied.insert(fresh);
                }
            },
        }
        Ok(ClaimOutcome::Claimed(Ticket {
            key: key.to_string(),
            id: ticket,
            digest,
        }))
    }

    /// What the store holds for a key the table does not know (`None` when the table knows
    /// it). A reset that finishes while the store is read makes the answer stale: read again.
    /// The store is never read under a table lock.
    fn load_unknown<E>(
        &self,
        digest: KeyDigest,
        load: &impl Fn(KeyDigest) -> Result<Option<S>, E>,
    ) -> Result<Option<S>, E> {
        loop {
            if self.slots.contains_key(&digest) {
                return Ok(None);
            }
            let resets = self.resets.load(Ordering::SeqCst);
            let stored = load(digest)?;
            if stored.is_none() || self.resets.load(Ordering::SeqCst) == resets {
                return Ok(stored);
            }
        }
    }

    /// Runs `change` on the slot if `ticket` still holds it; `LostClaim` otherwise.
    fn with_held(
        &self,
        ticket: &Ticket,
        change: impl FnOnce(&mut u64, &mut bool),
    ) -> Result<(), LedgerError> {
        match self.slots.get_mut(&ticket.digest).as_deref_mut() {
            Some(Slot::InFlight {
                ticket: held,
                expires,
                committing,
            }) if *held == ticket.id => {
                change(expires, committing);
                Ok(())
            }
            _ => Err(LedgerError::LostClaim(ticket.key.clone())),
        }
    }

    pub fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<(), LedgerError> {
        let deadline = self.deadline(lease);
        self.with_held(ticket, |expires, _| *expires = deadline)
    }

    /// First half of a commit: pins the claim so it cannot expire while the record is written.
    /// A claim past its lease may still commit as long as nobody took it over: nobody else was
    /// told the key is free. The pin lasts as long as the returned guard: `finish` makes the key
    /// served; dropped unfinished (a failed write, or a caller that stopped waiting, e.g. a
    /// client gone mid-commit) it leaves an ordinary claim, which its release or lease ends.
    /// Without that, a cancelled commit left the key in flight for good.
    pub fn begin_commit<'a>(
        &'a self,
        ticket: &'a Ticket,
    ) -> Result<Committing<'a, S>, LedgerError> {
        self.with_held(ticket, |_, committing| *committing = true)?;
        Ok(Committing {
            map: self,
            ticket,
            finished: false,
        })
    }

    pub fn commit(&self, ticket: &Ticket, entry: S) -> Result<(), LedgerError> {
        self.begin_commit(ticket)?.finish(entry);
        Ok(())
    }

    pub fn release(&self, ticket: &Ticket) {
        self.slots.remove_if(
            &ticket.digest,
            |_, slot| matches!(slot, Slot::InFlight { ticket: held, .. } if *held == ticket.id),
        );
    }

    pub fn lookup(&self, key: &str) -> TableState<S> {
        match self.lookup_or_load(key, |_| Ok::<_, Infallible>(None)) {
            Ok(state) => state,
            Err(never) => match never {},
        }
    }

    /// The key's state; for a key the table does not hold, what `load` finds in the store.
    pub fn lookup_or_load<E>(
        &self,
        key: &str,
        load: impl Fn(KeyDigest) -> Result<Option<S>, E>,
    ) -> Result<TableState<S>, E> {
        let digest = KeyDigest::of(key);
        let stored = self.load_unknown(digest, &load)?;
        let now = self.now();
        let wall = SystemTime::now();
        Ok(match self.slots.get(&digest).as_deref() {
            Some(Slot::Served(entry)) if self.live(entry, wall) => {
                TableState::Served(entry.clone())
            }
            Some(Slot::InFlight {
                expires,
                committing,
                ..
            }) if *committing || *expires > now => TableState::InFlight,
            Some(_) => TableState::Unseen,
            None => match stored {
                Some(entry) if self.live(&entry, wall) => TableState::Served(entry),
                _ => TableState::Unseen,
            },
        })
    }

    /// Removes a served record; `persist` runs (e.g. a durable delete) before the slot goes, and
    /// the record stays when it fails.
    pub fn reset_with<E>(
        &self,
        key: &str,
        persist: impl FnOnce() -> Result<(), E>,
    ) -> Result<ResetOutcome, E> {
        let reset = match self.begin_reset(key) {
            Ok(reset) => reset,
            Err(outcome) => return Ok(outcome),
        };
        persist()?;
        reset.finish();
        Ok(ResetOutcome::Reset)
    }

    /// First half of a reset: atomically turns a served record into a pinned claim held by the
    /// reset, so no claim, commit or second reset can touch the key while a durable delete runs.
    /// `Err` tells why there is nothing to reset. Dropping the guard without `finish` puts the
    /// record back.
    pub fn begin_reset(&self, key: &str) -> Result<ResetGuard<'_, S>, ResetOutcome> {
        match self.begin_reset_or_load(key, |_| Ok::<_, Infallible>(None)) {
            Ok(outcome) => outcome,
            Err(never) => match never {},
        }
    }

    /// `begin_reset` for a key the table may not hold yet: `load` reads the store.
    #[allow(clippy::type_complexity)]
    pub fn begin_reset_or_load<E>(
        &self,
        key: &str,
        load: impl Fn(KeyDigest) -> Result<Option<S>, E>,
    ) -> Result<Result<ResetGuard<'_, S>, ResetOutcome>, E> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let digest = KeyDigest::of(key);
        let stored = self.load_unknown(digest, &load)?;
        let now = self.now();
        let wall = SystemTime::now();
        let pinned = Slot::InFlight {
            ticket,
            expires: now,
            committing: true,
        };
        let guard = |entry| ResetGuard {
            map: self,
            digest,
            ticket,
            entry: Some(entry),
        };
        Ok(match self.slots.entry(digest) {
            Entry::Vacant(vacant) => match stored {
                Some(entry) if self.live(&entry, wall) => {
                    vacant.insert(pinned);
                    Ok(guard(entry))
                }
                _ => Err(ResetOutcome::Unseen),
            },
            Entry::Occupied(mut occupied) => match occupied.get() {
                Slot::Served(entry) if self.live(entry, wall) => {
                    let entry = entry.clone();
                    occupied.insert(pinned);
                    Ok(guard(entry))
                }
                Slot::InFlight {
                    expires,
                    committing,
                    ..
                } if *committing || *expires > now => Err(ResetOutcome::InFlight),
                _ => Err(ResetOutcome::Unseen),
            },
        })
    }

    /// Drops records past retention; returns their digests. Claims are left alone: their holders
    /// always end them (commit, or release on drop), and an expired one is replaced by the next
    /// claim of its key.
    pub fn sweep(&self) -> Vec<KeyDigest> {
        if self.retention.is_none() {
            return Vec::new();
        }
        let wall = SystemTime::now();
        let mut expired_records = Vec::new();
        self.slots.retain(|digest, slot| match slot {
            Slot::InFlight { .. } => true,
            Slot::Served(entry) => {
                let keep = self.live(entry, wall);
                if !keep {
                    expired_records.push(*digest);
                }
                keep
            }
        });
        expired_records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Map = ClaimMap<Arc<ServedRecord>>;

    fn record(key: &str) -> Arc<ServedRecord> {
        Arc::new(ServedRecord {
            key: key.into(),
            served_at_ms: super::super::now_ms(),
            request_id: "r".into(),
            bytes: 1,
            client: "127.0.0.1".into(),
            token_sha256_prefix: "abcd".into(),
            user_id: None,
        })
    }

    fn ticket(outcome: ClaimOutcome) -> Ticket {
        match outcome {
            ClaimOutcome::Claimed(ticket) => ticket,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    #[test]
    fn a_served_slot_stays_small() {
        assert!(std::mem::size_of::<Slot<ServedAt>>() <= 24);
        assert!(std::mem::size_of::<Slot<Arc<ServedRecord>>>() <= 24);
        assert_eq!(std::mem::size_of::<KeyDigest>(), 16);
    }

    #[test]
    fn digests_keep_the_value_and_order_files_are_keyed_by() {
        // Files written by any version key their rows by the first 16 bytes of the SHA-256,
        // big-endian.
        let sha = Sha256::digest(b"p/i/a");
        let first = u128::from_be_bytes(sha[..16].try_into().unwrap());
        assert_eq!(KeyDigest::of("p/i/a").as_u128(), first);
        let values = [0, 1, u128::from(u64::MAX), 1 << 64, first, u128::MAX];
        for a in values {
            assert_eq!(KeyDigest::from_u128(a).as_u128(), a);
            for b in values {
                assert_eq!(
                    KeyDigest::from_u128(a).cmp(&KeyDigest::from_u128(b)),
                    a.cmp(&b)
                );
            }
        }
    }

    #[test]
    fn digests_tell_keys_apart() {
        assert_eq!(KeyDigest::of("p/i/a"), KeyDigest::of("p/i/a"));
        assert_ne!(KeyDigest::of("p/i/a"), KeyDigest::of("p/i/b"));
        assert_ne!(KeyDigest::of("p/i/a"), KeyDigest::of("p/i/A"));
    }

    #[test]
    fn claim_commit_then_refuse() {
        let map = Map::new(None);
        let t = ticket(map.claim("k", Duration::from_secs(60)));
        assert_eq!(
            map.claim("k", Duration::from_secs(60)),
            ClaimOutcome::InFlight
        );
        map.commit(&t, record("k")).unwrap();
        assert!(matches!(
            map.claim("k", Duration::from_secs(60)),
            ClaimOutcome::Served
        ));
        assert!(matches!(map.lookup("k"), TableState::Served(_)));
    }

    #[test]
    fn release_frees_and_stale_ticket_cannot_touch_new_claim() {
        let map = Map::new(None);
        let old = ticket(map.claim("k", Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        let new = ticket(map.claim("k", Duration::from_secs(60)));
        map.release(&old);
        assert_eq!(map.lookup("k"), TableState::InFlight);
        assert!(matches!(
            map.commit(&old, record("k")),
            Err(LedgerError::LostClaim(_))
        ));
        assert!(map.renew(&old, Duration::from_secs(1)).is_err());
        map.release(&new);
        assert_eq!(map.lookup("k"), TableState::Unseen);
    }

    #[test]
    fn expired_lease_commits_only_if_not_taken_over() {
        let map = Map::new(None);
        let late = ticket(map.claim("k", Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        map.commit(&late, record("k")).unwrap();
        let lost = ticket(map.claim("j", Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        let _winner = ticket(map.claim("j", Duration::from_secs(60)));
        assert!(map.commit(&lost, record("j")).is_err());
    }

    #[test]
    fn retention_expires_records() {
        let map = Map::new(Some(Duration::from_millis(1)));
        let t = ticket(map.claim("k", Duration::from_secs(60)));
        map.commit(&t, record("k")).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(map.lookup("k"), TableState::Unseen);
        assert_eq!(map.sweep(), vec![KeyDigest::of("k")]);
        assert!(map.is_empty());
    }

    #[test]
    fn reset_only_touches_served() {
        let map = Map::new(None);
        let t = ticket(map.claim("k", Duration::from_secs(60)));
        assert_eq!(
            map.reset_with("k", || Ok::<_, ()>(())),
            Ok(ResetOutcome::InFlight)
        );
        map.commit(&t, record("k")).unwrap();
        assert_eq!(map.reset_with("k", || Err("disk")), Err("disk"));
        assert!(matches!(map.lookup("k"), TableState::Served(_)));
        assert_eq!(
            map.reset_with("k", || Ok::<_, ()>(())),
            Ok(ResetOutcome::Reset)
        );
        assert_eq!(
            map.reset_with("k", || Ok::<_, ()>(())),
            Ok(ResetOutcome::Unseen)
        );
    }

    #[test]
    fn of_many_concurrent_resets_exactly_one_resets() {
        let map = Arc::new(Map::new(None));
        for round in 0..50 {
            let key = format!("p/i/reset{round}");
            let ticket = ticket(map.claim(&key, Duration::from_secs(60)));
            map.commit(&ticket, record(&key)).unwrap();
            let resets: Vec<_> = (0..8)
                .map(|_| {
                    let (map, key) = (map.clone(), key.clone());
                    std::thread::spawn(move || map.reset_with(&key, || Ok::<(), ()>(())).unwrap())
                })
                .collect();
            let done = resets
                .into_iter()
                .map(|reset| reset.join().unwrap())
                .filter(|outcome| *outcome == ResetOutcome::Reset)
                .count();
            assert_eq!(done, 1, "round {round}");
            assert_eq!(map.lookup(&key), TableState::Unseen);
        }
    }

    #[test]
    fn a_failed_or_abandoned_reset_keeps_the_record() {
        let map = Map::new(None);
        let key = "p/i/kept";
        let ticket = ticket(map.claim(key, Duration::from_secs(60)));
        map.commit(&ticket, record(key)).unwrap();
        assert_eq!(map.reset_with(key, || Err::<(), _>("disk")), Err("disk"));
        assert!(matches!(map.lookup(key), TableState::Served(_)));
        let pending = map.begin_reset(key).unwrap();
        assert_eq!(
            map.lookup(key),
            TableState::InFlight,
            "claims wait while it runs"
        );
        assert_eq!(
            map.claim(key, Duration::from_secs(1)),
            ClaimOutcome::InFlight
        );
        drop(pending);
        assert!(matches!(map.lookup(key), TableState::Served(_)));
    }

    #[test]
    fn keys_unknown_to_the_table_are_read_from_the_store_once() {
        let map: ClaimMap<ServedAt> = ClaimMap::new(None);
        let reads = std::cell::Cell::new(0);
        let store = |digest: KeyDigest| {
            reads.set(reads.get() + 1);
            Ok::<_, ()>((digest == KeyDigest::of("p/i/old")).then_some(ServedAt(1)))
        };
        let lease = Duration::from_secs(60);
        assert_eq!(
            map.claim_or_load("p/i/old", lease, store),
            Ok(ClaimOutcome::Served)
        );
        assert_eq!(
            map.claim_or_load("p/i/old", lease, store),
            Ok(ClaimOutcome::Served)
        );
        assert_eq!(reads.get(), 1, "the answer stays in the table");
        assert!(matches!(
            map.claim_or_load("p/i/new", lease, store),
            Ok(ClaimOutcome::Claimed(_))
        ));
        assert_eq!(
            map.claim_or_load("p/i/x", lease, |_| Err("disk")),
            Err("disk")
        );
        assert_eq!(
            map.lookup_or_load("p/i/other", |_| Ok::<_, ()>(Some(ServedAt(1)))),
            Ok(TableState::Served(ServedAt(1)))
        );
    }

    #[test]
    fn a_reset_during_a_store_read_is_not_undone_by_it() {
        let map: ClaimMap<ServedAt> = ClaimMap::new(None);
        let stored = std::cell::Cell::new(true);
        let read = |_: KeyDigest| {
            let was = stored.get();
            if was {
                // Another request resets the key (and deletes it from the store) meanwhile.
                let reset = map
                    .begin_reset_or_load("p/i/k", |_| Ok::<_, ()>(Some(ServedAt(1))))
                    .unwrap()
                    .unwrap();
                stored.set(false);
                reset.finish();
            }
            Ok::<_, ()>(was.then_some(ServedAt(1)))
        };
        assert!(matches!(
            map.claim_or_load("p/i/k", Duration::from_secs(60), read),
            Ok(ClaimOutcome::Claimed(_))
        ));
    }

    #[test]
    fn exactly_one_of_many_threads_wins() {
        let map = Arc::new(Map::new(None));
        let winners: usize = (0..16)
            .map(|_| {
                let map = map.clone();
                std::thread::spawn(move || {
                    matches!(
                        map.claim("k", Duration::from_secs(60)),
                        ClaimOutcome::Claimed(_)
                    )
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum();
        assert_eq!(winners, 1);
    }
}
