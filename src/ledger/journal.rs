//! The embedded ledger's journal: commits are appended to segment files, one write and one
//! fdatasync per group, and the redb file takes them later in large transactions.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::KeyDigest;

/// A segment is closed and a new one begun past this size, so applied entries go with their file.
const SEGMENT_BYTES: u64 = 8 << 20;

/// Before each entry: the payload's length and its CRC-32 (both u32, little-endian).
const ENTRY_HEADER: usize = 8;

/// The payload's fixed part: the sequence number (u64 LE) and the key's digest (u128 LE); the
/// row (time, then JSON) follows.
const PAYLOAD_FIXED: usize = 8 + 16;

/// The sequence number of an entry that stands for nothing (a probe of the disk); real ones
/// start at 1.
const NO_OP: u64 = 0;

/// One journaled record, as read back at start.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub digest: KeyDigest,
    /// The `served_records` row: the time, then the JSON.
    pub row: Vec<u8>,
}

/// Closed segments and the last sequence number each holds; one is deleted once the redb file
/// holds everything up to that number durably.
#[derive(Default)]
pub struct ClosedSegments(Mutex<Vec<(PathBuf, u64)>>);

impl ClosedSegments {
    fn push(&self, path: PathBuf, last_seq: u64) {
        if let Ok(mut closed) = self.0.lock() {
            closed.push((path, last_seq));
        }
    }

    /// A segment from before the start, deleted once the file holds its entries (`last_seq`).
    pub fn keep_until_applied(&self, path: PathBuf, last_seq: u64) {
        self.push(path, last_seq);
    }

    /// Deletes the segments whose entries are all in the redb file (`applied` and below).
    pub fn delete_applied(&self, applied: u64) {
        let Ok(mut closed) = self.0.lock() else {
            return;
        };
        closed.retain(|(path, last_seq)| {
            if *last_seq > applied {
                return true;
            }
            // A file left behind is harmless: its entries are skipped at the next start.
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete a journal segment");
            }
            false
        });
    }
}

struct Segment {
    path: PathBuf,
    file: File,
    len: u64,
    last_seq: u64,
}

/// The writer's end: entries are gathered with `push` and made durable together by `sync`.
pub struct Journal {
    /// The ledger file's path; segments are `<path>.journal.<n>`, `n` one higher for each.
    base: PathBuf,
    current: Option<Segment>,
    closed: std::sync::Arc<ClosedSegments>,
    /// The number the next segment is named with; they only grow, so names sort in the order
    /// the segments were written.
    next_segment: u64,
    /// Entries pushed since the last `sync`, and the highest sequence number among them.
    unsynced: Vec<u8>,
    unsynced_last: Option<u64>,
}

impl Journal {
    /// `first_segment` must be above the number of every segment already on disk.
    pub fn new(base: &Path, first_segment: u64, closed: std::sync::Arc<ClosedSegments>) -> Journal {
        Journal {
            base: base.to_path_buf(),
            current: None,
            closed,
            next_segment: first_segment,
            unsynced: Vec::with_capacity(64 << 10),
            unsynced_last: None,
        }
    }

    /// Adds a record to the next `sync`.
    pub fn push(&mut self, seq: u64, digest: KeyDigest, row: &[u8]) {
        let payload_len = PAYLOAD_FIXED + row.len();
        let start = self.unsynced.len();
        self.unsynced
            .extend_from_slice(&(payload_len as u32).to_le_bytes());
        self.unsynced.extend_from_slice(&[0; 4]);
        self.unsynced.extend_from_slice(&seq.to_le_bytes());
        self.unsynced
            .extend_from_slice(&digest.as_u128().to_le_bytes());
        self.unsynced.extend_from_slice(row);
        let crc = crc32fast::hash(&self.unsynced[start + ENTRY_HEADER..]);
        self.unsynced[start + 4..start + ENTRY_HEADER].copy_from_slice(&crc.to_le_bytes());
        if seq != NO_OP {
            self.unsynced_last = Some(seq);
        }
    }

    /// Adds an entry that stands for nothing: a real write, to learn whether the disk takes them.
    pub fn push_probe(&mut self) {
        self.push(NO_OP, KeyDigest::from_u128(0), &[]);
    }

    /// Writes what was pushed and waits until it is on disk; `false` when there was nothing to
    /// write. After a failure the segment is closed (it may end in a torn entry), so later
    /// entries start a new one.
    pub fn sync(&mut self) -> io::Result<bool> {
        if self.unsynced.is_empty() {
            return Ok(false);
        }
        let result = self.write_unsynced();
        let last = self.unsynced_last.take();
        self.unsynced.clear();
        if let Some(segment) = &mut self.current {
            segment.last_seq = segment.last_seq.max(last.unwrap_or(0));
        }
        if result.is_err()
            || self
                .current
                .as_ref()
                .is_some_and(|s| s.len >= SEGMENT_BYTES)
        {
            self.close_current();
        }
        result.map(|()| true)
    }

    fn write_unsynced(&mut self) -> io::Result<()> {
        if self.current.is_none() {
            self.current = Some(self.create_segment()?);
        }
        let Some(segment) = &mut self.current else {
            unreachable!("a segment was just created");
        };
        segment.file.write_all(&self.unsynced)?;
        segment.len += self.unsynced.len() as u64;
        segment.file.sync_data()
    }

    fn create_segment(&mut self) -> io::Result<Segment> {
        let path = segment_path(&self.base, self.next_segment);
        self.next_segment += 1;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        // The new name must be durable before any entry in it is acknowledged.
        sync_dir(&self.base)?;
        Ok(Segment {
            path,
            file,
            len: 0,
            last_seq: 0,
        })
    }

    /// Closes the segment being written; the next entry starts a new one.
    pub fn close_current(&mut self) {
        if let Some(segment) = self.current.take() {
            self.closed.push(segment.path, segment.last_seq);
        }
    }
}

fn segment_prefix(base: &Path) -> String {
    let name = base.file_name().map(|n| n.to_string_lossy().into_owned());
    format!("{}.journal.", name.unwrap_or_default())
}

fn segment_path(base: &Path, number: u64) -> PathBuf {
    base.with_file_name(format!("{}{number:020}", segment_prefix(base)))
}

fn sync_dir(base: &Path) -> io::Result<()> {
    let dir = base.parent().filter(|p| !p.as_os_str().is_empty());
    File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

/// The journal's segment files with their numbers, oldest first.
pub fn segments(base: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let dir = base.parent().filter(|p| !p.as_os_str().is_empty());
    let prefix = segment_prefix(base);
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir.unwrap_or(Path::new(".")))? {
        let name = entry?.file_name();
        let Some(number) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if let Ok(number) = number.parse::<u64>() {
            found.push((number, base.with_file_name(&name)));
        }
    }
    found.sort();
    Ok(found)
}

/// Every record in the segments, in the order written. A segment is read up to its first entry
/// that is cut short or fails its checksum: a write the crash interrupted, never acknowledged.
pub fn replay(segments: &[(u64, PathBuf)]) -> io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for (_, path) in segments {
        let bytes = std::fs::read(path)?;
        let read = parse(&bytes, &mut entries);
        if read < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                ignored_bytes = bytes.len() - read,
                "journal segment ends in an incomplete entry (a write cut off by a crash)"
            );
        }
    }
    Ok(entries)
}

/// Appends the whole entries at the start of `bytes` to `entries`; the bytes they take.
fn parse(bytes: &[u8], entries: &mut Vec<Entry>) -> usize {
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + ENTRY_HEADER) {
        let len = u32::from_le_bytes(header[..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().unwrap_or_default());
        let Some(payload) = bytes.get(at + ENTRY_HEADER..at + ENTRY_HEADER + len) else {
            break;
        };
        if len < PAYLOAD_FIXED || crc32fast::hash(payload) != crc {
            break;
        }
        let seq = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
        let digest = u128::from_le_bytes(payload[8..PAYLOAD_FIXED].try_into().unwrap_or_default());
        if seq != NO_OP {
            entries.push(Entry {
                seq,
                digest: KeyDigest::from_u128(digest),
                row: payload[PAYLOAD_FIXED..].to_vec(),
            });
        }
        at += ENTRY_HEADER + len;
    }
    at
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            digest: KeyDigest::of(&format!("p/i/{seq}")),
            row: format!("{seq:08}{{\"json\":{seq}}}").into_bytes(),
        }
    }

    fn write(journal: &mut Journal, entries: &[Entry]) {
        for e in entries {
            journal.push(e.seq, e.digest, &e.row);
        }
        journal.push_probe();
        journal.sync().unwrap();
    }

    /// A journal with entries 1 and 2 in a closed segment and 3 in the open one.
    fn two_segments(dir: &Path) -> (PathBuf, Arc<ClosedSegments>, Journal) {
        let base = dir.join("ledger.redb");
        let closed = Arc::new(ClosedSegments::default());
        let mut journal = Journal::new(&base, 1, closed.clone());
        write(&mut journal, &[entry(1), entry(2)]);
        journal.close_current();
        write(&mut journal, &[entry(3)]);
        (base, closed, journal)
    }

    #[test]
    fn entries_come_back_in_order_across_segments_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (base, _, _journal) = two_segments(dir.path());
        let files = segments(&base).unwrap();
        assert_eq!(files.len(), 2);
        // A crash in the middle of the next write: half an entry at the end.
        let mut torn = Vec::new();
        let mut scratch = Journal::new(&base, 9, Arc::default());
        scratch.push(4, entry(4).digest, &entry(4).row);
        torn.extend_from_slice(&scratch.unsynced[..scratch.unsynced.len() - 3]);
        OpenOptions::new()
            .append(true)
            .open(&files[1].1)
            .unwrap()
            .write_all(&torn)
            .unwrap();
        let back = replay(&files).unwrap();
        assert_eq!(back, vec![entry(1), entry(2), entry(3)]);
        // A flipped bit ends the segment at that entry too (the last byte of entry 2, before the
        // probe entry of 32 bytes).
        let mut bytes = std::fs::read(&files[0].1).unwrap();
        let last_of_second = bytes.len() - (ENTRY_HEADER + PAYLOAD_FIXED) - 1;
        bytes[last_of_second] ^= 1;
        std::fs::write(&files[0].1, bytes).unwrap();
        assert_eq!(replay(&files).unwrap(), vec![entry(1), entry(3)]);
    }

    #[test]
    fn a_closed_segment_is_deleted_once_all_its_entries_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (base, closed, mut journal) = two_segments(dir.path());
        journal.close_current();
        closed.delete_applied(1);
        assert_eq!(segments(&base).unwrap().len(), 2);
        closed.delete_applied(2);
        let left = segments(&base).unwrap();
        assert_eq!(replay(&left).unwrap(), vec![entry(3)]);
        closed.delete_applied(3);
        assert!(segments(&base).unwrap().is_empty());
    }
}
