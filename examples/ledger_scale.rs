//! Measures what served records cost the embedded ledger at scale: resident memory per record
//! and the time a restart takes to be ready (SPEC §2 durability, up to 10 million records).
//!
//! ```sh
//! cargo run --release --example ledger_scale -- fill /var/tmp/scale 10000000
//! cargo run --release --example ledger_scale -- open /var/tmp/scale
//! ```
//! `fill` commits that many records through the ledger (concurrently, so they share fsyncs);
//! `open` is a restart in a fresh process: how long until the ledger takes claims (and until
//! new keys skip the file), what a refusal costs read from the file and from memory, and how
//! much resident memory the records hold once every one of them has been asked for.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use oncegate::ledger::embedded::EmbeddedLedger;
use oncegate::ledger::{now_ms, ClaimOutcome, Ledger, ServedRecord};

/// The proxy's allocator (src/main.rs), so the memory measured here is what it would hold.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const LEASE: Duration = Duration::from_secs(600);
/// Commits waiting at once (`ONCEGATE_SCALE_CONCURRENCY`): enough to fill the writer's batches.
fn concurrency() -> usize {
    std::env::var("ONCEGATE_SCALE_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096)
}

fn key(i: u64) -> String {
    format!("0f6c5e9a1b2d4c3e8f7a6b5c4d3e2f1a/b3c8f1e2-77aa-4d2e-9c1f-3a5b6c7d8e9f/archive-{i:010}")
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn ledger_path(dir: &Path) -> PathBuf {
    dir.join("ledger.redb")
}

async fn fill(dir: &Path, records: u64) {
    std::fs::create_dir_all(dir).expect("create the directory");
    let ledger = Arc::new(EmbeddedLedger::open(&ledger_path(dir), None).expect("open the ledger"));
    let started = Instant::now();
    let progress = records.div_ceil(10).max(1);
    futures_util::stream::iter(0..records)
        .map(|i| {
            let ledger = ledger.clone();
            async move {
                let key = key(i);
                let ClaimOutcome::Claimed(ticket) = ledger.claim(&key, LEASE).await.unwrap() else {
                    return;
                };
                let record = ServedRecord {
                    key,
                    served_at_ms: now_ms(),
                    request_id: format!("{:032x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15),
                    bytes: 4_194_304,
                    client: "192.0.2.17".into(),
                    token_sha256_prefix: "3f9a1c0d5e7b2a44".into(),
                    user_id: None,
                };
                ledger.commit(&ticket, record).await.expect("commit");
                if (i + 1) % progress == 0 {
                    eprintln!(
                        "{} records, {:.0} commits/s",
                        i + 1,
                        (i + 1) as f64 / started.elapsed().as_secs_f64()
                    );
                }
            }
        })
        .buffer_unordered(concurrency())
        .collect::<()>()
        .await;
    ledger.flush().await.expect("flush");
    println!(
        "filled {records} records in {:.1} s; file {} MiB",
        started.elapsed().as_secs_f64(),
        std::fs::metadata(ledger_path(dir)).map_or(0, |m| m.len() >> 20)
    );
}

async fn open(dir: &Path) {
    let before = resident_bytes();
    let started = Instant::now();
    let ledger = EmbeddedLedger::open(&ledger_path(dir), None).expect("open the ledger");
    let ready = started.elapsed();
    // The ledger answers at once: a recorded archive is refused, a new key is claimed.
    assert_eq!(
        ledger.claim(&key(0), LEASE).await.unwrap(),
        ClaimOutcome::Served
    );
    let fresh = format!("{}-new", key(0));
    assert!(matches!(
        ledger.claim(&fresh, LEASE).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    println!("restart: ready in {:.3} s", ready.as_secs_f64());
    // New keys skip the file once the filter of its digests is built (in the background).
    while !ledger.digest_filter_ready() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "digest filter built {:.1} s after the start",
        started.elapsed().as_secs_f64()
    );
    let mut upper = 1u64;
    while ledger.claim(&key(upper), LEASE).await.unwrap() == ClaimOutcome::Served {
        upper *= 2;
    }
    let records = count_records(&ledger, upper).await;
    // Every record asked for once (read from the file into memory), then once more.
    for pass in ["first (from the file)", "second (from memory)"] {
        let started = Instant::now();
        for i in 0..records {
            assert_eq!(
                ledger.claim(&key(i), LEASE).await.unwrap(),
                ClaimOutcome::Served
            );
        }
        println!(
            "{pass} refusal of all {records}: {:.2} µs each",
            started.elapsed().as_secs_f64() * 1e6 / records as f64
        );
    }
    let after = resident_bytes();
    println!(
        "resident {} MiB -> {} MiB with all {records} records in memory: {:.0} bytes per record",
        before >> 20,
        after >> 20,
        after.saturating_sub(before) as f64 / records.max(1) as f64
    );
}

/// The number of filled records: keys are dense from 0, so the first unseen one is the count.
async fn count_records(ledger: &EmbeddedLedger, upper: u64) -> u64 {
    let (mut served, mut unseen) = (0u64, upper.max(1));
    while served + 1 < unseen {
        let middle = served + (unseen - served) / 2;
        match ledger.claim(&key(middle), LEASE).await.unwrap() {
            ClaimOutcome::Served => served = middle,
            _ => unseen = middle,
        }
    }
    served + 1
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["fill", dir, records] => fill(Path::new(dir), records.parse().expect("a count")).await,
        ["open", dir] => open(Path::new(dir)).await,
        _ => {
            eprintln!("usage: ledger_scale fill DIR RECORDS | ledger_scale open DIR");
            std::process::exit(2);
        }
    }
}
