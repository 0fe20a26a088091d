//! The in-memory claim table shared by the memory and embedded ledgers.
//! One DashMap entry per key; every transition is a single entry operation, never get-then-insert.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::{ClaimOutcome, KeyState, LedgerError, ResetOutcome, ServedRecord, Ticket};

#[derive(Debug)]
enum Slot {
    InFlight {
        ticket: u64,
        expires: Instant,
        /// Set while the durable write of a commit runs: such a claim never expires under it.
        committing: bool,
    },
    Served(Arc<ServedRecord>),
}

/// A reset in progress (see `ClaimMap::begin_reset`).
pub struct ResetGuard<'a> {
    map: &'a ClaimMap,
    key: String,
    ticket: u64,
    /// Put back unless the reset finishes.
    record: Option<Arc<ServedRecord>>,
}

impl ResetGuard<'_> {
    /// The record is gone (durably, where it matters): the key is unseen.
    pub fn finish(mut self) {
        self.record = None;
        let ticket = self.ticket;
        self.map.slots.remove_if(
            self.key.as_str(),
            |_, slot| matches!(slot, Slot::InFlight { ticket: held, .. } if *held == ticket),
        );
    }
}

impl Drop for ResetGuard<'_> {
    fn drop(&mut self) {
        let Some(record) = self.record.take() else {
            return;
        };
        if let Some(mut slot) = self.map.slots.get_mut(self.key.as_str()) {
            if matches!(*slot, Slot::InFlight { ticket: held, .. } if held == self.ticket) {
                *slot = Slot::Served(record);
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct ClaimMap {
    slots: DashMap<Box<str>, Slot>,
    next_ticket: AtomicU64,
    retention: Option<Duration>,
}

impl ClaimMap {
    pub fn new(retention: Option<Duration>) -> ClaimMap {
        ClaimMap {
            slots: DashMap::new(),
            next_ticket: AtomicU64::new(1),
            retention,
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

    pub fn claim(&self, key: &str, lease: Duration) -> ClaimOutcome {
        let now = Instant::now();
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let fresh = Slot::InFlight {
            ticket,
            expires: now + lease,
            committing: false,
        };
        match self.slots.entry(key.into()) {
            Entry::Vacant(vacant) => {
                vacant.insert(fresh);
            }
            Entry::Occupied(mut occupied) => match occupied.get() {
                Slot::Served(record) if !record.expired(self.retention, SystemTime::now()) => {
                    return ClaimOutcome::Served(record.clone());
                }
                Slot::InFlight {
                    expires,
                    committing,
                    ..
                } if *committing || *expires > now => {
                    return ClaimOutcome::InFlight;
                }
                // A dead claim or a record past retention: the key is unseen again.
                _ => {
                    occupied.insert(fresh);
                }
            },
        }
        ClaimOutcome::Claimed(Ticket {
            key: key.to_string(),
            id: ticket,
        })
    }

    pub fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<(), LedgerError> {
        match self.slots.get_mut(ticket.key.as_str()).as_deref_mut() {
            Some(Slot::InFlight {
                ticket: held,
                expires,
                ..
            }) if *held == ticket.id => {
                *expires = Instant::now() + lease;
                Ok(())
            }
            _ => Err(LedgerError::LostClaim(ticket.key.clone())),
        }
    }

    /// First half of a commit: pins the claim so it cannot expire while the record is written.
    /// A claim past its lease may still commit as long as nobody took it over: nobody else was
    /// told the key is free.
    pub fn begin_commit(&self, ticket: &Ticket) -> Result<(), LedgerError> {
        match self.slots.get_mut(ticket.key.as_str()).as_deref_mut() {
            Some(Slot::InFlight {
                ticket: held,
                committing,
                ..
            }) if *held == ticket.id => {
                *committing = true;
                Ok(())
            }
            _ => Err(LedgerError::LostClaim(ticket.key.clone())),
        }
    }

    /// Second half of a commit, once the record is durable.
    pub fn finish_commit(&self, ticket: &Ticket, record: Arc<ServedRecord>) {
        if let Some(mut slot) = self.slots.get_mut(ticket.key.as_str()) {
            if matches!(*slot, Slot::InFlight { ticket: held, .. } if held == ticket.id) {
                *slot = Slot::Served(record);
            }
        }
    }

    /// Undoes `begin_commit` after a failed write, leaving an ordinary claim to release.
    pub fn abort_commit(&self, ticket: &Ticket) {
        if let Some(Slot::InFlight {
            ticket: held,
            committing,
            ..
        }) = self.slots.get_mut(ticket.key.as_str()).as_deref_mut()
        {
            if *held == ticket.id {
                *committing = false;
            }
        }
    }

    pub fn commit(&self, ticket: &Ticket, record: ServedRecord) -> Result<(), LedgerError> {
        self.begin_commit(ticket)?;
        self.finish_commit(ticket, Arc::new(record));
        Ok(())
    }

    pub fn release(&self, ticket: &Ticket) {
        self.slots.remove_if(
            ticket.key.as_str(),
            |_, slot| matches!(slot, Slot::InFlight { ticket: held, .. } if *held == ticket.id),
        );
    }

    pub fn lookup(&self, key: &str) -> KeyState {
        let now = Instant::now();
        match self.slots.get(key).as_deref() {
            Some(Slot::Served(record)) if !record.expired(self.retention, SystemTime::now()) => {
                KeyState::Served(record.clone())
            }
            Some(Slot::InFlight {
                expires,
                committing,
                ..
            }) if *committing || *expires > now => KeyState::InFlight,
            _ => KeyState::Unseen,
        }
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
    pub fn begin_reset(&self, key: &str) -> Result<ResetGuard<'_>, ResetOutcome> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let Some(mut slot) = self.slots.get_mut(key) else {
            return Err(ResetOutcome::Unseen);
        };
        let record = match &*slot {
            Slot::Served(record) if !record.expired(self.retention, SystemTime::now()) => {
                record.clone()
            }
            Slot::InFlight {
                expires,
                committing,
                ..
            } if *committing || *expires > Instant::now() => return Err(ResetOutcome::InFlight),
            _ => return Err(ResetOutcome::Unseen),
        };
        *slot = Slot::InFlight {
            ticket,
            expires: Instant::now(),
            committing: true,
        };
        Ok(ResetGuard {
            map: self,
            key: key.to_string(),
            ticket,
            record: Some(record),
        })
    }

    /// Loads a durable record at startup.
    pub fn insert_served(&self, record: ServedRecord) {
        self.slots
            .insert(record.key.as_str().into(), Slot::Served(Arc::new(record)));
    }

    /// Drops records past retention; returns their keys. Claims are left alone: their holders
    /// always end them (commit, or release on drop), and an expired one is replaced by the next
    /// claim of its key.
    pub fn sweep(&self) -> Vec<String> {
        if self.retention.is_none() {
            return Vec::new();
        }
        let wall = SystemTime::now();
        let mut expired_records = Vec::new();
        self.slots.retain(|key, slot| match slot {
            Slot::InFlight { .. } => true,
            Slot::Served(record) => {
                let keep = !record.expired(self.retention, wall);
                if !keep {
                    expired_records.push(key.to_string());
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

    fn record(key: &str) -> ServedRecord {
        ServedRecord {
            key: key.into(),
            served_at_ms: super::super::now_ms(),
            request_id: "r".into(),
            bytes: 1,
            client: "127.0.0.1".into(),
            token_sha256_prefix: "abcd".into(),
            user_id: None,
        }
    }

    fn ticket(outcome: ClaimOutcome) -> Ticket {
        match outcome {
            ClaimOutcome::Claimed(ticket) => ticket,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    #[test]
    fn claim_commit_then_refuse() {
        let map = ClaimMap::new(None);
        let t = ticket(map.claim("k", Duration::from_secs(60)));
        assert_eq!(
            map.claim("k", Duration::from_secs(60)),
            ClaimOutcome::InFlight
        );
        map.commit(&t, record("k")).unwrap();
        assert!(matches!(
            map.claim("k", Duration::from_secs(60)),
            ClaimOutcome::Served(_)
        ));
        assert!(matches!(map.lookup("k"), KeyState::Served(_)));
    }

    #[test]
    fn release_frees_and_stale_ticket_cannot_touch_new_claim() {
        let map = ClaimMap::new(None);
        let old = ticket(map.claim("k", Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        let new = ticket(map.claim("k", Duration::from_secs(60)));
        map.release(&old);
        assert_eq!(map.lookup("k"), KeyState::InFlight);
        assert!(matches!(
            map.commit(&old, record("k")),
            Err(LedgerError::LostClaim(_))
        ));
        assert!(map.renew(&old, Duration::from_secs(1)).is_err());
        map.release(&new);
        assert_eq!(map.lookup("k"), KeyState::Unseen);
    }

    #[test]
    fn expired_lease_commits_only_if_not_taken_over() {
        let map = ClaimMap::new(None);
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
        let map = ClaimMap::new(Some(Duration::from_millis(1)));
        let t = ticket(map.claim("k", Duration::from_secs(60)));
        map.commit(&t, record("k")).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(map.lookup("k"), KeyState::Unseen);
        assert_eq!(map.sweep(), vec!["k".to_string()]);
        assert!(map.is_empty());
    }

    #[test]
    fn reset_only_touches_served() {
        let map = ClaimMap::new(None);
        let t = ticket(map.claim("k", Duration::from_secs(60)));
        assert_eq!(
            map.reset_with("k", || Ok::<_, ()>(())),
            Ok(ResetOutcome::InFlight)
        );
        map.commit(&t, record("k")).unwrap();
        assert_eq!(map.reset_with("k", || Err("disk")), Err("disk"));
        assert!(matches!(map.lookup("k"), KeyState::Served(_)));
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
        let map = Arc::new(ClaimMap::new(None));
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
            assert_eq!(map.lookup(&key), KeyState::Unseen);
        }
    }

    #[test]
    fn a_failed_or_abandoned_reset_keeps_the_record() {
        let map = ClaimMap::new(None);
        let key = "p/i/kept";
        let ticket = ticket(map.claim(key, Duration::from_secs(60)));
        map.commit(&ticket, record(key)).unwrap();
        assert_eq!(map.reset_with(key, || Err::<(), _>("disk")), Err("disk"));
        assert!(matches!(map.lookup(key), KeyState::Served(_)));
        let pending = map.begin_reset(key).unwrap();
        assert_eq!(
            map.lookup(key),
            KeyState::InFlight,
            "claims wait while it runs"
        );
        assert_eq!(
            map.claim(key, Duration::from_secs(1)),
            ClaimOutcome::InFlight
        );
        drop(pending);
        assert!(matches!(map.lookup(key), KeyState::Served(_)));
    }

    #[test]
    fn exactly_one_of_many_threads_wins() {
        let map = Arc::new(ClaimMap::new(None));
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
