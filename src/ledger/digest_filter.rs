//! The digests the embedded ledger's file may hold, as a Bloom filter: a digest it never took is
//! certainly not in the file, so a new key's first claim needs no read of the file.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::KeyDigest;

/// Filter bits per digest it is sized for: with `PROBES` bits set in one 512-bit block, about
/// 0.5 % of absent digests look present (and are then read from the file, as before).
const BITS_PER_DIGEST: usize = 12;

/// Bits set per digest, all in one block (one cache line), 9 bits of the digest choosing each.
const PROBES: u32 = 6;

/// u64 words per block: 512 bits, a cache line.
const BLOCK_WORDS: usize = 8;

/// One cache line of the filter: all the bits of a digest lie in one.
#[derive(Default)]
#[repr(align(64))]
struct Block([AtomicU64; BLOCK_WORDS]);

/// A blocked Bloom filter of key digests. Digests are SHA-256 bits, already uniform: the high
/// half picks the block and the low half the bits, with no hashing of its own. Inserts and
/// lookups are lock-free, from any thread.
pub struct DigestFilter {
    blocks: Box<[Block]>,
    block_mask: u64,
    capacity: usize,
    taken: AtomicUsize,
}

impl DigestFilter {
    /// A filter sized for `capacity` digests (rounded up to a power of two of blocks).
    pub fn with_capacity(capacity: usize) -> DigestFilter {
        let blocks = capacity
            .clamp(1, usize::MAX / BITS_PER_DIGEST)
            .saturating_mul(BITS_PER_DIGEST)
            .div_ceil(BLOCK_WORDS * 64)
            .next_power_of_two();
        DigestFilter {
            blocks: (0..blocks).map(|_| Default::default()).collect(),
            block_mask: blocks as u64 - 1,
            capacity,
            taken: AtomicUsize::new(0),
        }
    }

    /// The block and, per probe, the word in it and the bit in that word.
    fn probes(&self, digest: KeyDigest) -> (&Block, impl Iterator<Item = (usize, u64)>) {
        let value = digest.as_u128();
        let block = &self.blocks[((value >> 64) as u64 & self.block_mask) as usize];
        let bits = value as u64;
        let probes = (0..PROBES).map(move |probe| {
            let bit = (bits >> (9 * probe)) & 511;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        });
        (block, probes)
    }

    pub fn insert(&self, digest: KeyDigest) {
        let (block, probes) = self.probes(digest);
        for (word, bit) in probes {
            block.0[word].fetch_or(bit, Ordering::Release);
        }
        self.taken.fetch_add(1, Ordering::Relaxed);
    }

    /// False only for a digest never inserted.
    pub fn may_hold(&self, digest: KeyDigest) -> bool {
        let (block, mut probes) = self.probes(digest);
        probes.all(|(word, bit)| block.0[word].load(Ordering::Acquire) & bit != 0)
    }

    /// More digests were inserted than it was sized for: false positives grow from here on.
    pub fn is_full(&self) -> bool {
        self.taken.load(Ordering::Relaxed) > self.capacity
    }

    #[cfg(test)]
    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// The filter lookups consult (none until the first one is built: until then every first use
/// of a key reads the file) and the one being built, which takes every new digest too.
#[derive(Default)]
pub struct FileDigests {
    ready: RwLock<Option<Arc<DigestFilter>>>,
    building: Mutex<Option<Arc<DigestFilter>>>,
}

impl FileDigests {
    // The filters' state is atomic bits and `Option<Arc<_>>` swaps: consistent even after a panic
    // elsewhere, so a poisoned lock is used as it is.
    fn ready(&self) -> std::sync::RwLockReadGuard<'_, Option<Arc<DigestFilter>>> {
        self.ready.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn building(&self) -> std::sync::MutexGuard<'_, Option<Arc<DigestFilter>>> {
        self.building.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the file may hold `digest`: true until a filter is ready.
    pub fn may_hold(&self, digest: KeyDigest) -> bool {
        self.ready()
            .as_ref()
            .is_none_or(|filter| filter.may_hold(digest))
    }

    /// Adds a digest the file is about to take (to the filter being built and the one in use).
    /// Callers hold the lock `begin_build` is called under. The one being built comes first:
    /// `finish_build` puts it in use before it stops being built, so a digest that finds no
    /// filter being built finds the finished one in use.
    pub fn insert(&self, digest: KeyDigest) {
        if let Some(filter) = self.building().clone() {
            filter.insert(digest);
        }
        if let Some(filter) = self.ready().clone() {
            filter.insert(digest);
        }
    }

    /// Whether a (new) filter should be built: none is ready, or the one in use is full.
    pub fn wants_build(&self) -> bool {
        self.building().is_none() && self.ready().as_ref().is_none_or(|filter| filter.is_full())
    }

    /// How many digests the filter in use took and was sized for (none when there is none).
    #[cfg(test)]
    pub fn taken_and_capacity(&self) -> Option<(usize, usize)> {
        self.ready()
            .as_ref()
            .map(|filter| (filter.taken(), filter.capacity()))
    }

    /// Starts taking new digests into `filter`; the caller then adds every digest the file
    /// holds or is about to take. Called under the lock `insert`'s callers hold.
    pub fn begin_build(&self, filter: Arc<DigestFilter>) {
        *self.building() = Some(filter);
    }

    /// Puts the filter being built in use. It is in use before it stops being built, so no
    /// digest inserted meanwhile misses it (see `insert`).
    pub fn finish_build(&self) {
        let Some(filter) = self.building().clone() else {
            return;
        };
        *self.ready.write().unwrap_or_else(PoisonError::into_inner) = Some(filter);
        *self.building() = None;
    }

    /// Drops a build that could not finish; the filter in use (if any) stays.
    pub fn abandon_build(&self) {
        *self.building() = None;
    }

    pub fn is_ready(&self) -> bool {
        self.ready().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u64) -> KeyDigest {
        KeyDigest::of(&format!("key-{i}"))
    }

    #[test]
    fn every_inserted_digest_is_found_and_few_others_are() {
        let filter = DigestFilter::with_capacity(100_000);
        for i in 0..100_000 {
            filter.insert(digest(i));
        }
        assert!((0..100_000).all(|i| filter.may_hold(digest(i))));
        assert!(!filter.is_full());
        let false_positives = (100_000..200_000)
            .filter(|&i| filter.may_hold(digest(i)))
            .count();
        // ~0.5 % expected at this load; 2 % would mean the probes are not independent.
        assert!(false_positives < 2_000, "{false_positives} false positives");
        filter.insert(digest(100_000));
        assert!(filter.is_full());
    }

    /// The embedded ledger's protocol, raced: inserts under one lock (the pending map's) while
    /// filters are begun under it, then finished outside it. Every digest inserted after a
    /// filter was begun must be in that filter once it is in use.
    #[test]
    fn no_digest_inserted_during_a_build_is_missing_from_the_filter_put_in_use() {
        let digests = Arc::new(FileDigests::default());
        // The digests inserted so far, under the lock inserts and begins take.
        let inserted = Arc::new(Mutex::new(Vec::<KeyDigest>::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = std::thread::spawn({
            let (digests, inserted, stop) = (digests.clone(), inserted.clone(), stop.clone());
            move || {
                // Cheap distinct digests (no SHA-256 in the loop), so inserts come thick and fast.
                for i in 1..=20_000_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let spread = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    let next = KeyDigest::from_u128(
                        u128::from(spread) << 64 | u128::from(spread.rotate_left(29)),
                    );
                    let mut held = inserted.lock().unwrap();
                    digests.insert(next);
                    held.push(next);
                }
            }
        });
        let started = std::time::Instant::now();
        let mut builds = 0;
        let mut missing = 0;
        while started.elapsed() < std::time::Duration::from_secs(3) && builds < 1_000_000 {
            // (The ledger also copies the digests inserted before; only those after count here.)
            let since = {
                let held = inserted.lock().unwrap();
                digests.begin_build(Arc::new(DigestFilter::with_capacity(4096)));
                held.len()
            };
            digests.finish_build();
            builds += 1;
            let held = inserted.lock().unwrap();
            missing += held[since..]
                .iter()
                .filter(|digest| !digests.may_hold(**digest))
                .count();
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert_eq!(
            missing, 0,
            "digests missing from the filter in use over {builds} builds"
        );
    }

    #[test]
    fn a_digest_inserted_while_a_filter_is_built_is_in_the_one_put_in_use() {
        let digests = FileDigests::default();
        assert!(
            digests.may_hold(digest(1)),
            "no filter yet: everything may be in the file"
        );
        assert!(digests.wants_build());
        digests.begin_build(Arc::new(DigestFilter::with_capacity(4)));
        assert!(!digests.wants_build());
        digests.insert(digest(1));
        assert!(digests.may_hold(digest(2)), "still building");
        digests.finish_build();
        assert!(digests.is_ready());
        assert!(digests.may_hold(digest(1)));
        assert!(!digests.may_hold(digest(2)));
        for i in 3..8 {
            digests.insert(digest(i));
        }
        assert!(digests.wants_build(), "full: a larger one is wanted");
        digests.begin_build(Arc::new(DigestFilter::with_capacity(64)));
        digests.insert(digest(9));
        digests.abandon_build();
        assert!(digests.may_hold(digest(9)), "the filter in use took it too");
    }
}
