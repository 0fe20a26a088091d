//! The crash loop: the real binary is SIGKILLed at random moments while 16 clients download
//! unique archives, then restarted. A fully received archive is never served again, and no
//! claim outlives its lease. Runs: `ONCEGATE_CRASH_LOOP_RUNS` (default 3) per test.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use support::*;

const CLIENTS: usize = 16;
/// `trickle-<ms>-*` sends 8 chunks of 64 KiB.
const TRICKLE_BYTES: usize = 8 * 64 * 1024;

/// What the clients download.
#[derive(Clone, Copy)]
enum Archives {
    /// Slow, streamed ones (`trickle-15-*`, ~120 ms each): kills land mid-body.
    Streamed,
    /// Small ones the upstream answers at once: thousands of commits a second, so kills land
    /// between a record's journal write and its move into the ledger file.
    Small,
}

impl Archives {
    fn path(self, name: &str) -> String {
        match self {
            Archives::Streamed => format!("{ARCHIVES}/trickle-15-{name}"),
            Archives::Small => format!("{ARCHIVES}/{name}"),
        }
    }

    fn full_size(self, path: &str) -> usize {
        match self {
            Archives::Streamed => TRICKLE_BYTES,
            Archives::Small => body_for(path).len(),
        }
    }

    /// Downloads per client at most: far more than fit before the kill (within a second).
    fn per_client(self) -> usize {
        match self {
            Archives::Streamed => 200,
            Archives::Small => 5_000,
        }
    }
}

#[derive(Default)]
struct Books {
    /// Archives a client received in full.
    complete: Vec<String>,
    /// Archives whose transfer was cut by the crash.
    broken: Vec<String>,
}

/// A GET that reports instead of panicking when the proxy dies under it: `Some(bytes)` after a
/// 200 whose body ended cleanly, `None` otherwise.
async fn download(addr: std::net::SocketAddr, path: &str) -> Option<(StatusCode, usize)> {
    let request = Request::get(format!("http://{addr}{path}"))
        .header("x-auth-token", TOKEN)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = client().request(request).await.ok()?;
    let status = response.status();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, body.len()))
}

async fn crash_loop(
    config: &str,
    dir: &std::path::Path,
    store: &str,
    lease: Duration,
    archives: Archives,
) {
    let runs: usize = std::env::var("ONCEGATE_CRASH_LOOP_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut all_complete: Vec<String> = Vec::new();
    for run in 0..runs {
        let proxy = Process::spawn(dir, config);
        let addr = proxy.addr;
        let books = Arc::new(Mutex::new(Books::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let (books, stop) = (books.clone(), stop.clone());
                let store = store.to_string();
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) && n < archives.per_client() {
                        let path = archives.path(&format!("{store}{run}c{client}n{n}"));
                        n += 1;
                        let result = download(addr, &path).await;
                        let mut books = books.lock().unwrap();
                        match result {
                            Some((StatusCode::OK, size)) if size == archives.full_size(&path) => {
                                books.complete.push(path)
                            }
                            Some((status, _)) if status != StatusCode::OK => {
                                panic!("{path}: unexpected {status} before the crash")
                            }
                            _ => {
                                books.broken.push(path);
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        let wait = Duration::from_millis(rand::random_range(150..900));
        tokio::time::sleep(wait).await;
        proxy.signal("KILL");
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.unwrap();
        }
        drop(proxy);

        let restarted = Process::spawn(dir, config);
        let books = std::mem::take(&mut *books.lock().unwrap());
        all_complete.extend(books.complete.iter().cloned());
        for path in &all_complete {
            let reply = get(restarted.addr, path, &[]).await;
            assert_eq!(
                reply.status,
                StatusCode::FORBIDDEN,
                "{path} was received in full and is served again after crash {run}"
            );
        }
        // A broken transfer is either recorded (it reached its commit) or free again once its
        // lease has run out: never stuck in flight.
        let deadline = Instant::now() + lease + Duration::from_secs(5);
        let (mut recorded, mut freed) = (0, 0);
        for path in &books.broken {
            loop {
                let reply = get(restarted.addr, path, &[]).await;
                match reply.status {
                    StatusCode::FORBIDDEN => recorded += 1,
                    StatusCode::OK => freed += 1,
                    StatusCode::CONFLICT if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    other => panic!("{path}: {other} after crash {run} (stuck past its lease?)"),
                }
                break;
            }
        }
        eprintln!(
            "crash loop {store} run {run}: killed after {wait:?}; {} complete, {} broken \
             ({recorded} recorded, {freed} free again)",
            books.complete.len(),
            books.broken.len()
        );
        drop(restarted);
    }
}

async fn embedded_crash_loop(name: &str, archives: Archives) {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[upstream]\nurl = \"{}\"\n\
         [store]\nkind = \"embedded\"\npath = \"ledger.redb\"\n[once]\ninflight_lease = \"2s\"\n\
         [admin]\nlisten = \"{{admin}}\"\n[log]\nlevel = \"warn\"\n",
        upstream.url()
    );
    let lease = Duration::from_secs(2);
    crash_loop(&config, dir.path(), name, lease, archives).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_never_lets_a_received_archive_be_served_again_embedded() {
    embedded_crash_loop("emb", Archives::Streamed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_never_lets_a_received_small_archive_be_served_again_embedded() {
    embedded_crash_loop("small", Archives::Small).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_never_lets_a_received_archive_be_served_again_redis() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[upstream]\nurl = \"{}\"\n\
         [store]\nkind = \"redis\"\nurl = \"{}\"\n[once]\ninflight_lease = \"2s\"\n\
         [admin]\nlisten = \"{{admin}}\"\n[log]\nlevel = \"warn\"\n",
        upstream.url(),
        redis.url()
    );
    crash_loop(
        &config,
        dir.path(),
        "red",
        Duration::from_secs(2),
        Archives::Streamed,
    )
    .await;
}
