//! Faults and hostile clients: upstream failures at every stage, slow and oversized clients,
//! connection floods, a client that stops reading, and a full disk under the embedded ledger.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use oncegate::ledger::KeyState;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn archive(id: &str) -> String {
    format!("{ARCHIVES}/{id}")
}

/// Waits (bounded) until the key is back to unseen: a broken transfer releases its claim.
async fn assert_released(ledger: &dyn oncegate::ledger::Ledger, key: &str) {
    for _ in 0..200 {
        if ledger.lookup(key).await.unwrap() == KeyState::Unseen {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{key} was not released: {:?}", ledger.lookup(key).await);
}

#[tokio::test]
async fn upstream_failures_at_any_stage_release_the_claim() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;

    // Connection dropped before the response headers.
    let reply = get(proxy.addr, &archive("hangup-1"), &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error_code(), "APIC.0202");
    assert_released(proxy.ledger.as_ref(), "proj/inst/hangup-1").await;

    // Reset mid-body, and a body shorter than its Content-Length: the client never holds a
    // whole archive, and the key comes free.
    for id in ["reset-1", "short-1"] {
        let reply = get(proxy.addr, &archive(id), &[]).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{id}: the headers went out: {:?}",
            reply.body
        );
        assert!(
            reply.body.len() < 16 * 64 * 1024,
            "{id}: a broken body must not look complete"
        );
        assert_released(proxy.ledger.as_ref(), &format!("proj/inst/{id}")).await;
    }
    assert_eq!(upstream.hits("short-1").len(), 1);
    let again = get(proxy.addr, &archive("short-1"), &[]).await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "a released key can be retried"
    );
    assert_eq!(upstream.hits("short-1").len(), 2);
}

/// A proxy that cuts an upstream body pausing for more than 250 ms.
async fn start_with_short_body_idle_timeout(upstream: &Upstream) -> oncegate::Running {
    let mut config = config_for(&upstream.url(), "");
    config.upstream.body_idle_timeout = Duration::from_millis(250);
    oncegate::start(config).await.unwrap()
}

#[tokio::test]
async fn a_small_archive_is_read_whole_and_a_broken_one_gets_a_clean_error() {
    let upstream = Upstream::start().await;
    let proxy = start_with_short_body_idle_timeout(&upstream).await;

    // Three chunks joined in order, then recorded with their length.
    let whole = get(proxy.addr, &archive("tiny-whole-1"), &[]).await;
    assert_eq!(whole.status, StatusCode::OK);
    let expected: Vec<u8> = (0..3).flat_map(|i| tiny_chunk(i).to_vec()).collect();
    assert_eq!(whole.body.as_ref(), expected.as_slice());
    match proxy.ledger.lookup("proj/inst/tiny-whole-1").await.unwrap() {
        KeyState::Served(record) => assert_eq!(record.bytes, 3 * TINY_CHUNK as u64),
        other => panic!("not served: {other:?}"),
    }

    // An empty archive is an archive too: served once, recorded with 0 bytes.
    let empty = get(proxy.addr, &archive("tiny-empty-1"), &[]).await;
    assert_eq!(empty.status, StatusCode::OK);
    assert!(empty.body.is_empty());
    match proxy.ledger.lookup("proj/inst/tiny-empty-1").await.unwrap() {
        KeyState::Served(record) => assert_eq!(record.bytes, 0),
        other => panic!("not served: {other:?}"),
    }
    assert_eq!(
        get(proxy.addr, &archive("tiny-empty-1"), &[]).await.status,
        StatusCode::FORBIDDEN
    );

    // Nothing went out before the body was whole, so a broken one is a ROMA error, not a
    // truncated 200, and the key comes free for the next try.
    for (id, status, code) in [
        ("tiny-reset-1", StatusCode::BAD_GATEWAY, "APIC.0202"),
        ("tiny-short-1", StatusCode::BAD_GATEWAY, "APIC.0202"),
        ("tiny-stall-1", StatusCode::GATEWAY_TIMEOUT, "APIC.0203"),
    ] {
        let reply = get(proxy.addr, &archive(id), &[]).await;
        assert_eq!(reply.status, status, "{id}: {:?}", reply.body);
        assert_eq!(reply.error_code(), code, "{id}");
        assert_released(proxy.ledger.as_ref(), &format!("proj/inst/{id}")).await;
    }
    assert_eq!(
        get(proxy.addr, &archive("tiny-stall-1"), &[]).await.status,
        StatusCode::GATEWAY_TIMEOUT,
        "a released key is tried again"
    );
    assert_eq!(upstream.hits("tiny-stall-1").len(), 2);
}

#[tokio::test]
async fn a_body_that_pauses_longer_than_body_idle_timeout_is_cut_and_released() {
    let upstream = Upstream::start().await;
    let proxy = start_with_short_body_idle_timeout(&upstream).await;

    let cut = get(proxy.addr, &archive("trickle-700-idle"), &[]).await;
    assert_eq!(cut.status, StatusCode::OK);
    assert!(cut.body.len() < 8 * 64 * 1024, "the stalled body was cut");
    assert_released(proxy.ledger.as_ref(), "proj/inst/trickle-700-idle").await;

    // Pauses below the limit are fine, however long the whole transfer takes.
    let slow = get(proxy.addr, &archive("trickle-60-idle"), &[]).await;
    assert_eq!(slow.status, StatusCode::OK);
    assert_eq!(slow.body.len(), 8 * 64 * 1024);
}

#[tokio::test]
async fn slow_headers_are_cut_after_header_read_timeout() {
    let upstream = Upstream::start().await;
    let mut config = config_for(&upstream.url(), "");
    config.server.header_read_timeout = Duration::from_millis(300);
    let proxy = oncegate::start(config).await.unwrap();

    // Slowloris: a request line and one header, then nothing.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET /v2/p/instances/i/assets/archives/a HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buffer)).await;
    assert!(read.is_ok(), "the connection was not closed");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed only after {:?}",
        started.elapsed()
    );
    assert!(upstream.hits("/archives/a").is_empty());

    // An idle keep-alive connection is closed the same way.
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(
        format!("GET /ping HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut buffer)).await;
    assert!(read.is_ok(), "an idle connection stays open forever");
    assert!(String::from_utf8_lossy(&buffer).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn oversize_headers_get_431_and_oversize_bodies_413() {
    let upstream = Upstream::start().await;
    let mut config = config_for(&upstream.url(), "");
    config.server.max_request_body = 1024;
    let proxy = oncegate::start(config).await.unwrap();

    let huge = "h".repeat(600 * 1024);
    let (status, _) = raw(proxy.addr, &format!("GET /x HTTP/1.1\r\nX-Huge: {huge}")).await;
    assert_eq!(status, 431);

    let post = |length: usize, chunked: bool| {
        let addr = proxy.addr;
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let body = "b".repeat(length);
            let framing = if chunked {
                "Transfer-Encoding: chunked".to_string()
            } else {
                format!("Content-Length: {length}")
            };
            let payload = if chunked {
                format!("{length:x}\r\n{body}\r\n0\r\n\r\n")
            } else {
                body
            };
            let request = format!(
                "POST /v2/proj/upload HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n{framing}\r\nConnection: close\r\n\r\n{payload}"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut reply = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
            String::from_utf8_lossy(&reply).to_string()
        }
    };
    let declared = post(2000, false).await;
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    assert!(declared.contains("APIG.0201"), "{declared}");
    assert!(
        upstream.hits("/upload").is_empty(),
        "a declared oversize body is refused before forwarding"
    );
    let streamed = post(2000, true).await;
    assert!(streamed.starts_with("HTTP/1.1 413"), "{streamed}");
    let small = post(1000, false).await;
    assert!(small.starts_with("HTTP/1.1 200"), "{small}");
}

/// Open file descriptors of a process, from /proc.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connection_floods_are_bounded_by_max_connections() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\nmax_connections = 64\nheader_read_timeout = \"60s\"\n\
         [upstream]\nurl = \"{}\"\n[store]\nkind = \"memory\"\n[admin]\nlisten = \"{{admin}}\"\n",
        upstream.url()
    );
    let proxy = Process::spawn(dir.path(), &config);
    let baseline = open_fds(proxy.pid());

    // Up to 10,000 clients connect and say nothing; connects past the listen backlog may time
    // out, which is the kernel's business, not the proxy's memory.
    let addr = proxy.addr;
    let attempts: Vec<_> = (0..10_000)
        .map(|_| {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
                    .await
                    .ok()
                    .and_then(Result::ok)
            })
        })
        .collect();
    let mut idle = Vec::new();
    for attempt in attempts {
        if let Some(stream) = attempt.await.unwrap() {
            idle.push(stream);
        }
    }
    assert!(idle.len() >= 64, "only {} connected", idle.len());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = open_fds(proxy.pid());
    assert!(
        held <= baseline + 64 + 8,
        "{held} descriptors open (baseline {baseline}) with max_connections = 64"
    );
    assert!(proxy.rss_kib() < 64 * 1024, "RSS {} KiB", proxy.rss_kib());
    // The admin listener has its own budget and still answers.
    assert_eq!(
        request(proxy.admin, "GET", "/healthz", &[]).await.status,
        StatusCode::OK
    );
    // A new client is served once the idle ones go away.
    drop(idle);
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        get(proxy.addr, &archive("after-flood"), &[]),
    )
    .await
    .expect("served after the flood");
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_holds_no_buffers_and_releases_on_disconnect() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[upstream]\nurl = \"{}\"\n[store]\nkind = \"memory\"\n\
         [admin]\nlisten = \"{{admin}}\"\ntoken_env = \"ONCEGATE_TEST_STALL_ADMIN\"\n",
        upstream.url()
    );
    std::env::set_var("ONCEGATE_TEST_STALL_ADMIN", "t");
    let proxy = Process::spawn(dir.path(), &config);
    let before = proxy.rss_kib();

    // Read the headers and 64 KiB of a 200 MiB archive, then stop reading.
    let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
    let path = archive("big-200-stall");
    stalled
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut first = vec![0u8; 64 * 1024];
    stalled.read_exact(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..12]).starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = proxy.rss_kib();
    assert!(
        during < before + 16 * 1024,
        "RSS grew from {before} to {during} KiB while the client was not reading"
    );
    let admin = proxy.admin;
    let state = || async move {
        let bearer = [("authorization", "Bearer t")];
        let reply = request(admin, "GET", "/archives/proj/inst/big-200-stall", &bearer).await;
        reply.json()["state"].clone()
    };
    assert_eq!(state().await, "in_flight");

    drop(stalled);
    let mut released = false;
    for _ in 0..200 {
        if state().await == "unseen" {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(released, "the claim of a vanished client was not released");
}

/// A tmpfs of `size` mounted for the test, unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    /// `None` where this process may not mount (not root, or no CAP_SYS_ADMIN).
    fn mount(path: std::path::PathBuf, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(&path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        mounted.then_some(SmallDisk { path })
    }

    /// Writes a file until the disk says it is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file
            .write_all(&block)
            .and_then(|()| file.sync_all())
            .is_ok()
        {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

async fn wait_for_status(addr: std::net::SocketAddr, path: &str, status: StatusCode) {
    for _ in 0..300 {
        if request(addr, "GET", path, &[]).await.status == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{path} never answered {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_fails_the_archive_route_closed_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(dir.path().join("disk"), "4m") else {
        eprintln!("SKIPPED a_full_disk_fails_the_archive_route_closed_and_recovers: cannot mount a tmpfs here (needs root)");
        return;
    };
    let upstream = Upstream::start().await;
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[upstream]\nurl = \"{}\"\n\
         [store]\nkind = \"embedded\"\npath = \"{}\"\n[once]\ninflight_lease = \"1s\"\n\
         [admin]\nlisten = \"{{admin}}\"\n",
        upstream.url(),
        disk.path.join("ledger.redb").display()
    );
    let first = Process::spawn(dir.path(), &config);
    assert_eq!(
        get(first.addr, &archive("disk-1"), &[]).await.status,
        StatusCode::OK
    );
    // A new process: disk-1 is known only to the file, read on first use.
    drop(first.terminate_and_read_logs().await);
    let proxy = Process::spawn(dir.path(), &config);

    let filler = disk.fill();
    // Downloads may go on while space already taken can hold their records (a journal block
    // not yet full); the first one that cannot be recorded is not completed: a small archive is
    // recorded before anything goes out, so its client gets a clean 503. Every one answered 200
    // must be refused after the restart below. Bounded: the disk has 4 MiB in all.
    let mut recorded = Vec::new();
    let (lost_id, lost) = loop {
        let id = format!("disk-2-{}", recorded.len());
        let reply = try_request(proxy.addr, "GET", &archive(&id), &[("x-auth-token", TOKEN)])
            .await
            .expect("an answer");
        if reply.status != StatusCode::OK {
            break (id, reply);
        }
        assert_eq!(reply.body.len(), body_for(&archive(&id)).len());
        recorded.push(id);
        assert!(
            recorded.len() < 20_000,
            "a full disk never stopped downloads"
        );
    };
    eprintln!(
        "{} downloads recorded after the disk filled up",
        recorded.len()
    );
    assert_eq!(lost.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(lost.error_code(), "APIC.9000");
    wait_for_status(proxy.admin, "/readyz", StatusCode::SERVICE_UNAVAILABLE).await;
    let refused = get(proxy.addr, &archive("disk-3"), &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.error_code(), "APIC.9000");
    assert!(
        upstream.hits("disk-3").is_empty(),
        "fails closed: nothing forwarded"
    );
    assert_eq!(
        get(proxy.addr, "/v2/proj/jobs", &[]).await.status,
        StatusCode::OK,
        "other routes keep working"
    );
    assert_eq!(
        get(proxy.addr, &archive("disk-1"), &[]).await.error_code(),
        "ROMA.00000101",
        "served records are still refused"
    );

    // Space again: the ledger notices by itself and the lost download can be done once.
    std::fs::remove_file(filler).unwrap();
    wait_for_status(proxy.admin, "/readyz", StatusCode::OK).await;
    let retried = get(proxy.addr, &archive(&lost_id), &[]).await;
    assert_eq!(retried.status, StatusCode::OK);
    assert_eq!(retried.body.len(), body_for(&archive(&lost_id)).len());
    assert_eq!(
        get(proxy.addr, &archive(&lost_id), &[]).await.status,
        StatusCode::FORBIDDEN
    );
    let addr = proxy.addr;
    drop(proxy.terminate_and_read_logs().await);

    let restarted = Process::spawn(dir.path(), &config);
    let served = ["disk-1".to_string(), lost_id].into_iter().chain(recorded);
    for id in served {
        assert_eq!(
            get(restarted.addr, &archive(&id), &[]).await.status,
            StatusCode::FORBIDDEN,
            "{id} forgotten after a restart ({addr})"
        );
    }
}
