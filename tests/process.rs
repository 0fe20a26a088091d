//! The real binary, driven through its CLI, config file, signals and HTTP only: crash safety,
//! graceful shutdown, config errors, logs, memory use and the demo.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;

fn embedded_config(upstream: &Upstream, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"{{listen}}\"\nshutdown_grace = \"10s\"\n\
         [upstream]\nurl = \"{}\"\n\
         [store]\nkind = \"embedded\"\npath = \"state/ledger.redb\"\n\
         [admin]\nlisten = \"{{admin}}\"\n{extra}",
        upstream.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn served_records_survive_kill_9_and_restart() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_config(&upstream, "");
    let mut proxy = Process::spawn(dir.path(), &config);
    let paths: Vec<String> = (0..5).map(|i| format!("{ARCHIVES}/crash{i}")).collect();
    for path in &paths {
        let reply = get(proxy.addr, path, &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, body_for(path));
    }
    // No pause: a client holding the whole archive implies a durable record.
    proxy.signal("KILL");
    proxy.wait_exit(Duration::from_secs(5));
    assert!(
        dir.path().join("state/ledger.redb").exists(),
        "store.path is relative to the config file"
    );

    let restarted = Process::spawn(dir.path(), &config);
    for path in &paths {
        let reply = get(restarted.addr, path, &[]).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path} served twice after a crash"
        );
        assert_eq!(reply.error_code(), "ROMA.00000101");
    }
    assert_eq!(
        get(restarted.addr, &format!("{ARCHIVES}/fresh"), &[])
            .await
            .status,
        StatusCode::OK
    );
    for i in 0..5 {
        assert_eq!(upstream.hits(&format!("/crash{i}")).len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_a_running_download_finish_then_exits_0() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Process::spawn(dir.path(), &embedded_config(&upstream, ""));
    let addr = proxy.addr;
    let download =
        tokio::spawn(async move { get(addr, &format!("{ARCHIVES}/trickle-150-term"), &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after SIGTERM"
    );
    let reply = download.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), 8 * 64 * 1024);
    let code = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));

    // The download that finished during shutdown is on record.
    let restarted = Process::spawn(dir.path(), &embedded_config(&upstream, ""));
    let again = get(restarted.addr, &format!("{ARCHIVES}/trickle-150-term"), &[]).await;
    assert_eq!(again.status, StatusCode::FORBIDDEN);
}

#[test]
fn config_problems_exit_2_with_one_line_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().to_string()
    };
    let base = "[upstream]\nurl = \"http://127.0.0.1:9\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";

    let unknown = write(
        "unknown.toml",
        &format!("{base}[server]\nlisten = \"127.0.0.1:0\"\nlisten_port = 1\n"),
    );
    let (code, _, stderr) = run_binary(&["run", "--config", &unknown]);
    assert_eq!(code, 2);
    assert!(stderr.contains("server.listen_port"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let bad_value = write(
        "bad.toml",
        &format!("{base}[once]\ncommit = \"eventually\"\n"),
    );
    let (code, _, stderr) = run_binary(&["--config", &bad_value]);
    assert_eq!(code, 2);
    assert!(stderr.contains("once.commit"), "{stderr}");

    let missing = dir.path().join("nope.toml").to_string_lossy().to_string();
    let (code, _, stderr) = run_binary(&["run", "--config", &missing]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("nope.toml") && stderr.trim().lines().count() == 1,
        "{stderr}"
    );

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let in_use = write(
        "busy.toml",
        &format!("{base}[server]\nlisten = \"127.0.0.1:{port}\"\n[store]\nkind = \"memory\"\n"),
    );
    let (code, _, stderr) = run_binary(&["run", "--config", &in_use]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(&port.to_string()) && stderr.contains("server.listen"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let many = write(
        "many.toml",
        "[server]\nlisten = \"x\"\nshutdown_grace = \"later\"\n[upstream]\nurl = \"ftp://a\"\n[log]\nlevel = \"info\"\ncolour = true\nformat = \"yaml\"\n[once]\ncommit = \"later\"\n[admin]\nlisten = 9901\n",
    );
    let (code, _, stderr) = run_binary(&["check", "--config", &many]);
    assert_eq!(code, 2);
    for key in [
        "server.listen",
        "server.shutdown_grace",
        "upstream.url",
        "log.colour",
        "log.format",
        "once.commit",
        "admin.listen",
    ] {
        assert!(stderr.contains(key), "{key} not reported: {stderr}");
    }

    let good = write("good.toml", base);
    let (code, stdout, stderr) = run_binary(&["check", "--config", &good]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok"));
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/oncegate.toml");
    assert_eq!(run_binary(&["check", "--config", shipped]).0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_process_cannot_share_the_ledger_file() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let _first = Process::spawn(dir.path(), &embedded_config(&upstream, ""));
    let config = embedded_config(&upstream, "")
        .replace("{listen}", &format!("127.0.0.1:{}", free_port()))
        .replace("{admin}", &format!("127.0.0.1:{}", free_port()));
    let path = dir.path().join("second.toml");
    std::fs::write(&path, config).unwrap();
    let (code, _, stderr) = run_binary(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(stderr.contains("store.path"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_token_never_appears_in_logs() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "Secret-Token-7f3a9c";
    let config = embedded_config(&upstream, "[log]\nformat = \"json\"\nlevel = \"trace\"\n");
    let proxy = Process::spawn(dir.path(), &config);
    let token = [("x-auth-token", secret)];
    let archive = format!("{ARCHIVES}/logged");
    for (method, path) in [
        ("GET", archive.as_str()),
        ("GET", archive.as_str()),
        ("HEAD", archive.as_str()),
        ("GET", "/v2/proj/instances/inst/assets/archives//x"),
        ("GET", "/other"),
        ("GET", "/v2/proj/instances/inst/assets/archives/fail-1"),
    ] {
        request(proxy.addr, method, path, &token).await;
    }
    let reply = request(
        proxy.addr,
        "GET",
        &archive,
        &[("x-auth-token", secret), ("x-request-id", "logged-id-1")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = proxy.terminate_and_read_logs().await;
    assert!(!logs.is_empty());
    assert!(!logs.contains(secret), "the token leaked into the logs");
    let access: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["target"] == "oncegate::access")
        .collect();
    assert!(access.len() >= 7, "{logs}");
    let refused = access
        .iter()
        .find(|e| e["request_id"] == "logged-id-1")
        .expect("access event with the id");
    for field in [
        "method",
        "path",
        "status",
        "duration_ms",
        "bytes",
        "archive",
        "outcome",
    ] {
        assert!(!refused[field].is_null(), "{field} missing in {refused}");
    }
    assert_eq!(refused["outcome"], "refused_served");
    assert_eq!(refused["path"], archive.as_str());
    assert_eq!(refused["archive"], "proj/inst/logged");
    assert_eq!(refused["status"], 403);
    let outcomes: Vec<&str> = access
        .iter()
        .filter_map(|e| e["outcome"].as_str())
        .collect();
    for outcome in ["served", "refused_served", "rejected", "released"] {
        assert!(
            outcomes.contains(&outcome),
            "{outcome} not logged: {outcomes:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_20_mib_downloads_stay_under_64_mib_resident() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Process::spawn(
        dir.path(),
        &embedded_config(&upstream, "[log]\nlevel = \"warn\"\n"),
    );
    let addr = proxy.addr;
    let downloads: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(async move { get(addr, &format!("{ARCHIVES}/big-20-mem{i}"), &[]).await })
        })
        .collect();
    let (mut peak, mut huge_pages) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while downloads.iter().any(|d| !d.is_finished()) && Instant::now() < deadline {
        peak = peak.max(proxy.rss_kib());
        huge_pages = huge_pages.max(proxy.huge_page_kib());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for download in downloads {
        let reply = download.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body.len(), 20 * 1024 * 1024);
    }
    assert!(peak > 0, "RSS was never read");
    assert!(peak < 64 * 1024, "peak resident memory {peak} KiB");
    eprintln!("peak RSS during 8 x 20 MiB: {peak} KiB, {huge_pages} KiB in huge pages");
    // Each huge page would make 2 MiB resident at a time. The proxy turns them off for itself
    // at start, whatever the host's mode; where the kernel gives them only to memory that asks,
    // nothing of the proxy's may ask (its allocator is built not to).
    assert_ne!(proxy.may_use_huge_pages(), Some(true), "huge pages are on");
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.contains("[madvise]") {
        assert_eq!(huge_pages, 0, "the proxy asked for transparent huge pages");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_serves_an_archive_once() {
    let (listen, admin) = (free_port(), free_port());
    let mut child = Command::new(binary())
        .args([
            "demo",
            "--listen",
            &format!("127.0.0.1:{listen}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ])
        .env_remove("RUST_LOG")
        .env("TMPDIR", tempfile::tempdir().unwrap().keep())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let printed = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            text.push_str(&line);
            text.push('\n');
            if line.contains("Ctrl-C") {
                break;
            }
        }
        text
    })
    .await
    .unwrap();
    let url = printed
        .split_whitespace()
        .find(|word| word.contains("/assets/archives/"))
        .expect("a download command")
        .to_string();
    let path = url
        .trim_start_matches(&format!("http://127.0.0.1:{listen}"))
        .to_string();
    let addr = format!("127.0.0.1:{listen}").parse().unwrap();
    let first = request(addr, "GET", &path, &[("x-auth-token", "demo-token")]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(first.body.starts_with(b"PK\x03\x04"), "a zip");
    let second = request(addr, "GET", &path, &[("x-auth-token", "demo-token")]).await;
    assert_eq!(second.status, StatusCode::FORBIDDEN);
    assert_eq!(second.error_code(), "ROMA.00000101");
    assert!(printed.contains("curl"), "{printed}");
    let _ = Command::new("kill")
        .args(["-s", "INT", &child.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_hangs_up_before_its_answer_still_gets_an_access_event() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_config(&upstream, "[log]\nformat = \"json\"\n");
    let proxy = Process::spawn(dir.path(), &config);
    let path = format!("{ARCHIVES}/slow-1500");
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: oncegate\r\nX-Auth-Token: {TOKEN}\r\nX-Request-Id: gone-1\r\n\r\n"
    );
    client.write_all(head.as_bytes()).await.unwrap();
    // Once the upstream has the request, the claim is held; then the client hangs up.
    for _ in 0..100 {
        if !upstream.hits("slow-1500").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream.hits("slow-1500").len(), 1);
    drop(client);
    // The claim is given back (a moment after the hang-up is noticed): the archive is served.
    let mut status = StatusCode::CONFLICT;
    for _ in 0..50 {
        status = get(proxy.addr, &path, &[]).await.status;
        if status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::OK);
    // Counted as a broken transfer, not as the upstream's failure.
    let metrics = request(proxy.admin, "GET", "/metrics", &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body).to_string();
    for line in [
        "oncegate_downloads_total{outcome=\"released\"} 1",
        "oncegate_downloads_total{outcome=\"served\"} 1",
        "oncegate_requests_total{route=\"archive\",status=\"499\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing: {metrics}");
    }
    let upstream_errors = metrics
        .lines()
        .find_map(|line| line.strip_prefix("oncegate_downloads_total{outcome=\"upstream_error\"} "))
        .unwrap_or("0");
    assert_eq!(upstream_errors, "0", "{metrics}");
    let logs = proxy.terminate_and_read_logs().await;
    let event = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["target"] == "oncegate::access" && l["request_id"] == "gone-1")
        .unwrap_or_else(|| panic!("no access event for the request whose client left: {logs}"));
    assert_eq!(event["status"], 499, "{event}");
    assert_eq!(event["outcome"], "released", "{event}");
    assert_eq!(event["archive"], "proj/inst/slow-1500", "{event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_log_line_of_a_request_carries_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let closed = format!("http://127.0.0.1:{}", free_port());
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[upstream]\nurl = \"{closed}\"\nconnect_timeout = \"1s\"\n\
         [store]\nkind = \"memory\"\n[admin]\nlisten = \"{{admin}}\"\n[log]\nformat = \"json\"\n"
    );
    let proxy = Process::spawn(dir.path(), &config);
    let reply = get(
        proxy.addr,
        &format!("{ARCHIVES}/lost"),
        &[("x-request-id", "lost-upstream-1")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    let rejected = get(
        proxy.addr,
        &format!("{ARCHIVES}/bad%2Fid"),
        &[("x-request-id", "bad-path-1")],
    )
    .await;
    assert_eq!(rejected.status, StatusCode::BAD_REQUEST);
    let admin = request(
        proxy.admin,
        "GET",
        "/healthz",
        &[("x-request-id", "admin-1")],
    )
    .await;
    assert_eq!(
        admin.headers["x-request-id"], "admin-1",
        "admin responses carry the id too"
    );
    let logs = proxy.terminate_and_read_logs().await;
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let of_request: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l.to_string().contains("lost-upstream-1"))
        .collect();
    assert!(
        of_request
            .iter()
            .any(|l| l["level"] == "WARN" && l["target"] != "oncegate::access"),
        "the failure line lacks the request id: {logs}"
    );
    let rejected_event = lines
        .iter()
        .find(|l| l["target"] == "oncegate::access" && l["request_id"] == "bad-path-1")
        .expect("access event of the rejected path");
    assert_eq!(rejected_event["outcome"], "rejected");
    assert!(
        rejected_event["archive"].is_null(),
        "a rejected path has no key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rust_log_overrides_the_configured_level() {
    let upstream = Upstream::start().await;
    let quiet = embedded_config(&upstream, "[log]\nformat = \"json\"\nlevel = \"error\"\n");
    for (rust_log, expect_access) in [(None, false), (Some("oncegate::access=info"), true)] {
        let dir = tempfile::tempdir().unwrap();
        let proxy = Process::spawn_with_env(dir.path(), &quiet, rust_log);
        assert_eq!(get(proxy.addr, "/ping", &[]).await.status, StatusCode::OK);
        let logs = proxy.terminate_and_read_logs().await;
        assert_eq!(
            logs.contains("oncegate::access"),
            expect_access,
            "RUST_LOG={rust_log:?}: {logs}"
        );
    }
}

fn sha256_hex(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// A reloaded config for a running `Process`: the same listeners, new `extra` sections.
fn rewrite_config(proxy: &Process, upstream: &Upstream, extra: &str) {
    let text = embedded_config(upstream, extra)
        .replace("{listen}", &proxy.addr.to_string())
        .replace("{admin}", &proxy.admin.to_string());
    std::fs::write(proxy.dir.join("oncegate.toml"), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_applies_new_tokens_rate_limits_and_log_level_live() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let auth = |token: &str| {
        format!(
            "[auth]\nmode = \"static\"\n[[auth.tokens]]\nsha256 = \"{}\"\n",
            sha256_hex(token)
        )
    };
    let first = format!("{}[log]\nlevel = \"info\"\n", auth("alpha"));
    let proxy = Process::spawn(dir.path(), &embedded_config(&upstream, &first));
    let with = |token: &'static str| [("x-auth-token", token)];
    let served = format!("{ARCHIVES}/before-reload");
    assert_eq!(
        request(proxy.addr, "GET", &served, &with("alpha"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        request(proxy.addr, "GET", "/marker-before", &with("beta"))
            .await
            .error_code(),
        "ROMA.1002"
    );
    // A download in progress across the reload.
    let addr = proxy.addr;
    let running = tokio::spawn(async move {
        request(
            addr,
            "GET",
            &format!("{ARCHIVES}/trickle-100-reload"),
            &[("x-auth-token", "alpha")],
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;

    // New token, a global rate limit, a quieter log, and a change that needs a restart.
    let second = format!(
        "{}[[rate_limit]]\nkey = \"global\"\nper_second = 0.2\nburst = 4\n[log]\nlevel = \"warn\"\n[trace]\ntrust_incoming = false\n",
        auth("beta")
    );
    rewrite_config(&proxy, &upstream, &second);
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    // "config reloaded" is an info event, and this reload turns info off; the warning is seen.
    while !proxy.stderr().contains("need a restart") {
        assert!(Instant::now() < deadline, "no reload: {}", proxy.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let statuses = [
        request(proxy.addr, "GET", "/marker-after", &with("alpha")).await,
        request(proxy.addr, "GET", "/marker-after", &with("beta")).await,
        request(proxy.addr, "GET", &served, &with("beta")).await,
    ];
    assert_eq!(
        statuses[0].error_code(),
        "ROMA.1002",
        "the old token is gone"
    );
    assert_eq!(statuses[1].status, StatusCode::OK, "the new token works");
    assert_eq!(
        statuses[2].error_code(),
        "ROMA.00000101",
        "ledger state survives a reload"
    );
    let mut limited = false;
    for _ in 0..6 {
        let reply = request(proxy.addr, "GET", "/marker-after", &with("beta")).await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(reply.error_code(), "APIG.0308");
            limited = true;
            break;
        }
    }
    assert!(limited, "the new rate limit applies");
    let finished = running.await.unwrap();
    assert_eq!(finished.status, StatusCode::OK);
    assert_eq!(
        finished.body.len(),
        8 * 64 * 1024,
        "a running download survives the reload"
    );

    // An invalid file changes nothing: the rate limit of the second config stays in force.
    rewrite_config(&proxy, &upstream, "[auth]\nmode = \"sometimes\"\n");
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !proxy.stderr().contains("config reload rejected") {
        assert!(
            Instant::now() < deadline,
            "no rejection: {}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        request(proxy.addr, "GET", "/marker-after", &with("beta"))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let metrics = request(proxy.admin, "GET", "/metrics", &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(
        metrics.contains("oncegate_config_reloads_total{result=\"rejected\"} 1"),
        "{metrics}"
    );

    let logs = proxy.terminate_and_read_logs().await;
    assert!(logs.contains("auth.mode"), "the rejection names the key");
    let restart = logs
        .lines()
        .find(|line| line.contains("need a restart"))
        .expect("restart-only changes are reported");
    assert!(restart.contains("trace"), "{restart}");
    assert!(logs.contains("/marker-before"), "info events before");
    assert!(
        !logs.contains("/marker-after"),
        "no info events after the level became warn"
    );
}
