//! The proxy's per-request work outside the network: classifying the path, the claim table,
//! and making a synthesized error. Run with `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use oncegate::config::DEFAULT_ROUTE;
use oncegate::error::ProxyError;
use oncegate::ledger::{ClaimMap, ClaimOutcome, ServedRecord};
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

fn claims(c: &mut Criterion) {
    let mut group = c.benchmark_group("claim_map");
    let map = ClaimMap::new(None);
    let lease = Duration::from_secs(600);
    let mut n = 0u64;
    group.bench_function("claim_commit_unique", |b| {
        b.iter(|| {
            n += 1;
            let key = format!("p/i/{n}");
            if let ClaimOutcome::Claimed(ticket) = map.claim(&key, lease) {
                let record = ServedRecord {
                    key,
                    served_at_ms: 0,
                    request_id: String::new(),
                    bytes: 42,
                    client: String::new(),
                    token_sha256_prefix: String::new(),
                    user_id: None,
                };
                map.commit(&ticket, record).unwrap();
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

criterion_group!(benches, route, claims, errors);
criterion_main!(benches);
