//! Property tests of the ledger state machine, on every store: random interleavings of claim,
//! renew, commit, release, lease expiry and reset across concurrent tasks never let a key be
//! committed twice without a reset in between.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use oncegate::ledger::embedded::EmbeddedLedger;
use oncegate::ledger::memory::MemoryLedger;
use oncegate::ledger::redis::RedisLedger;
use oncegate::ledger::{ClaimOutcome, KeyState, Ledger, ResetOutcome, ServedRecord, Ticket};
use proptest::prelude::*;

const KEYS: [&str; 2] = ["p/i/a", "p/i/b"];

#[derive(Debug, Clone)]
enum Op {
    Claim(usize),
    Renew(usize),
    Commit(usize),
    Release(usize),
    Reset(usize),
    /// Long enough, at times, for a lease to run out.
    Sleep(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS.len();
    prop_oneof![
        3 => key.clone().prop_map(Op::Claim),
        1 => key.clone().prop_map(Op::Renew),
        3 => key.clone().prop_map(Op::Commit),
        1 => key.clone().prop_map(Op::Release),
        1 => key.prop_map(Op::Reset),
        2 => (0u64..12).prop_map(Op::Sleep),
    ]
}

/// Up to 4 tasks, each with up to 12 operations.
fn schedule() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(prop::collection::vec(op(), 1..12), 2..5)
}

#[derive(Default)]
struct Tally {
    commits: [AtomicUsize; 2],
    resets: [AtomicUsize; 2],
}

fn record(key: &str) -> ServedRecord {
    ServedRecord {
        key: key.to_string(),
        served_at_ms: oncegate::ledger::now_ms(),
        request_id: "model".into(),
        bytes: 1,
        client: "127.0.0.1".into(),
        token_sha256_prefix: "0000000000000000".into(),
        user_id: None,
    }
}

async fn run_task(ledger: Arc<dyn Ledger>, ops: Vec<Op>, lease: Duration, tally: Arc<Tally>) {
    let mut held: HashMap<usize, Ticket> = HashMap::new();
    for op in ops {
        match op {
            Op::Claim(k) => {
                if let Ok(ClaimOutcome::Claimed(ticket)) = ledger.claim(KEYS[k], lease).await {
                    held.insert(k, ticket);
                }
            }
            Op::Renew(k) => {
                if let Some(ticket) = held.get(&k) {
                    let _ = ledger.renew(ticket, lease).await;
                }
            }
            Op::Commit(k) => {
                if let Some(ticket) = held.remove(&k) {
                    if ledger.commit(&ticket, record(KEYS[k])).await.is_ok() {
                        tally.commits[k].fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            Op::Release(k) => {
                if let Some(ticket) = held.remove(&k) {
                    let _ = ledger.release(&ticket).await;
                }
            }
            Op::Reset(k) => {
                if let Ok(ResetOutcome::Reset) = ledger.reset(KEYS[k]).await {
                    tally.resets[k].fetch_add(1, Ordering::SeqCst);
                }
            }
            Op::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }
    // Tickets still held are abandoned, like a crashed holder: their leases run out.
}

/// Runs the tasks concurrently and checks the books: every successful commit but the current
/// served record was undone by exactly one reset.
async fn check(ledger: Arc<dyn Ledger>, schedule: Vec<Vec<Op>>, lease: Duration) {
    let tally = Arc::new(Tally::default());
    let tasks: Vec<_> = schedule
        .into_iter()
        .map(|ops| tokio::spawn(run_task(ledger.clone(), ops, lease, tally.clone())))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    for (k, key) in KEYS.iter().enumerate() {
        let commits = tally.commits[k].load(Ordering::SeqCst);
        let resets = tally.resets[k].load(Ordering::SeqCst);
        let served = matches!(ledger.lookup(key).await.unwrap(), KeyState::Served(_));
        assert_eq!(
            commits,
            resets + usize::from(served),
            "{key}: {commits} commits, {resets} resets, served now: {served}"
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn memory_ledger_never_serves_twice(schedule in schedule(), lease_ms in 1u64..8) {
        let ledger: Arc<dyn Ledger> = Arc::new(MemoryLedger::new(None));
        runtime().block_on(check(ledger, schedule, Duration::from_millis(lease_ms)));
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn embedded_ledger_never_serves_twice(schedule in schedule(), lease_ms in 1u64..8) {
        let dir = tempfile::tempdir().unwrap();
        let runtime = runtime();
        let ledger: Arc<dyn Ledger> = Arc::new(
            EmbeddedLedger::open(&dir.path().join("model.redb"), None).unwrap(),
        );
        runtime.block_on(check(ledger, schedule, Duration::from_millis(lease_ms)));
    }
}

#[test]
fn redis_ledger_never_serves_twice() {
    let server = support::RedisServer::start();
    let runtime = runtime();
    let mut runner = proptest::test_runner::TestRunner::new(config(64));
    let case = AtomicUsize::new(0);
    runner
        .run(&(schedule(), 1u64..8), |(schedule, lease_ms)| {
            // A fresh key space per case, on one server.
            let prefix = format!("model{}:", case.fetch_add(1, Ordering::SeqCst));
            let _context = runtime.enter();
            let ledger: Arc<dyn Ledger> =
                Arc::new(RedisLedger::new(&server.url(), &prefix, None).unwrap());
            runtime.block_on(check(ledger, schedule, Duration::from_millis(lease_ms)));
            Ok(())
        })
        .unwrap();
}
