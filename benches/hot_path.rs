//! The proxy's per-request work outside the network: classifying the path, the claim table,
//! claim + commit through each ledger, the embedded ledger's first use of a key, and making a
//! synthesized error.
//! Run with `cargo bench --bench hot_path`; the Redis bench needs `redis-server` on the PATH,
//! and `ONCEGATE_BENCH_RECORDS` (default 1000000) sets the largest table of the flatness bench.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use oncegate::config::DEFAULT_ROUTE;
use oncegate::error::ProxyError;
use oncegate::ledger::embedded::EmbeddedLedger;
use oncegate::ledger::memory::MemoryLedger;
use oncegate::ledger::redis::RedisLedger;
use oncegate::ledger::{now_ms, ClaimMap, ClaimOutcome, Ledger, ServedAt, ServedRecord};
use oncegate::route::RouteTemplate;

fn route(c: &mut Criterion) {
    let template = RouteTemplate::parse(DEFAULT_ROUTE).unwrap();
    let mut group = c.benchmark_group("route_classify");
    for (name, path) in [
        (
            "canonical",
            "/v2/0a1b2c3d4e5f/instances/9f8e7d6c5b4a/assets/archives/1764310000123400070100000042",
        ),
        (
            "other_path",
            "/v2/0a1b2c3d4e5f/instances/9f8e7d6c5b4a/assets/jobs/42",
        ),
        ("static_file", "/static/js/app.min.js"),
        (
            "encoded_attack",
            "/v2/p/instances/i/assets/archives%252f..%252f..%252fa",
        ),
        ("case_variant", "/V2/p/INSTANCES/i/assets/archives/a"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| template.classify(black_box(path), true))
        });
    }
    group.finish();
}

fn record(key: String) -> ServedRecord {
    ServedRecord {
        key,
        served_at_ms: 0,
        request_id: "0123456789abcdef0123456789abcdef".into(),
        bytes: 42,
        client: "127.0.0.1".into(),
        token_sha256_prefix: "0123456789abcdef".into(),
        user_id: None,
    }
}

/// Claim + commit of a fresh key through the `Ledger` trait, as the once layer does it. The
/// embedded store's commit includes its fsync; concurrent commits would share it.
fn ledgers(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut stores: Vec<(&str, Box<dyn Ledger>)> = vec![
        ("memory", Box::new(MemoryLedger::new(None))),
        (
            "embedded",
            Box::new(EmbeddedLedger::open(&dir.path().join("bench.redb"), None).unwrap()),
        ),
    ];
    let redis = start_redis(dir.path());
    if let Some((_, url)) = &redis {
        let _context = runtime.enter();
        stores.push((
            "redis",
            Box::new(RedisLedger::new(url, "bench:", None).unwrap()),
        ));
    }
    let mut group = c.benchmark_group("ledger_claim_commit");
    let lease = Duration::from_secs(600);
    for (name, ledger) in &stores {
        let mut n = 0u64;
        group.bench_function(*name, |b| {
            b.iter(|| {
                n += 1;
                let key = format!("p/i/{n}");
                runtime.block_on(async {
                    if let Ok(ClaimOutcome::Claimed(ticket)) = ledger.claim(&key, lease).await {
                        ledger.commit(&ticket, record(key)).await.unwrap();
                    }
                })
            })
        });
    }
    group.finish();
    if let Some((mut server, _)) = redis {
        let _ = server.kill();
        let _ = server.wait();
    }
}

/// The embedded ledger's claim of a key it has not seen since the start, with 50k records in the
/// file, then its release: with the filter of the file's digests built, the claim reads nothing
/// from the file (before `6faeb8d` it read the file for the key's row).
fn embedded_first_use(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.redb");
    let ledger = std::sync::Arc::new(EmbeddedLedger::open(&path, None).unwrap());
    let lease = Duration::from_secs(600);
    runtime.block_on(async {
        let commits: Vec<_> = (0..50_000)
            .map(|n| {
                let ledger = ledger.clone();
                tokio::spawn(async move {
                    let key = format!("p/i/filled-{n}");
                    if let Ok(ClaimOutcome::Claimed(ticket)) = ledger.claim(&key, lease).await {
                        ledger.commit(&ticket, record(key)).await.unwrap();
                    }
                })
            })
            .collect();
        for commit in commits {
            commit.await.unwrap();
        }
        // Written to the file (a reset is answered once the file holds all before it).
        ledger.reset("p/i/none").await.unwrap();
        while !ledger.digest_filter_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut n = 0u64;
    c.bench_function("ledger_first_use/embedded", |b| {
        b.iter(|| {
            n += 1;
            let key = format!("p/i/new-{n}");
            match ledger.claim_now(&key, lease) {
                Some(Ok(ClaimOutcome::Claimed(ticket))) => {
                    runtime.block_on(ledger.release(&ticket)).unwrap()
                }
                other => panic!("{other:?}"),
            }
        })
    });
}

fn start_redis(dir: &std::path::Path) -> Option<(std::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((child, format!("redis://127.0.0.1:{port}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Claim + commit of a fresh key and the refusal of a served one, with 1k to N records already
/// in the table: the cost must not grow with the table.
fn flat_with_size(c: &mut Criterion) {
    let largest: usize = std::env::var("ONCEGATE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let lease = Duration::from_secs(600);
    let mut group = c.benchmark_group("claim_map_by_size");
    let map: ClaimMap<ServedAt> = ClaimMap::new(None);
    let mut filled = 0usize;
    let mut size = 1_000;
    while size <= largest {
        while filled < size {
            let key = format!("p/i/fill{filled}");
            if let ClaimOutcome::Claimed(ticket) = map.claim(&key, lease) {
                map.commit(&ticket, ServedAt(now_ms())).unwrap();
            }
            filled += 1;
        }
        let mut n = 0u64;
        group.bench_function(format!("claim_commit/{size}"), |b| {
            b.iter(|| {
                n += 1;
                let key = format!("p/i/new{size}-{n}");
                if let ClaimOutcome::Claimed(ticket) = map.claim(&key, lease) {
                    map.commit(&ticket, ServedAt(now_ms())).unwrap();
                }
            })
        });
        group.bench_function(format!("refuse_served/{size}"), |b| {
            b.iter(|| map.claim(black_box("p/i/fill7"), lease))
        });
        size *= 10;
    }
    group.finish();
}

fn claims(c: &mut Criterion) {
    let mut group = c.benchmark_group("claim_map");
    let map: ClaimMap<ServedAt> = ClaimMap::new(None);
    let lease = Duration::from_secs(600);
    let mut n = 0u64;
    group.bench_function("claim_commit_unique", |b| {
        b.iter(|| {
            n += 1;
            let key = format!("p/i/{n}");
            if let ClaimOutcome::Claimed(ticket) = map.claim(&key, lease) {
                map.commit(&ticket, ServedAt(now_ms())).unwrap();
            }
        })
    });
    group.bench_function("refuse_served", |b| {
        b.iter(|| map.claim(black_box("p/i/1"), lease))
    });
    group.finish();
}

fn errors(c: &mut Criterion) {
    c.bench_function("error_response", |b| {
        b.iter(|| {
            ProxyError::AlreadyDownloaded
                .into_response(black_box("0123456789abcdef0123456789abcdef"), false)
        })
    });
}

criterion_group!(
    benches,
    route,
    claims,
    ledgers,
    embedded_first_use,
    flat_with_size,
    errors
);
criterion_main!(benches);
