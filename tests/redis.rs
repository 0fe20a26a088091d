//! Several replicas sharing one real Redis: download-once across replicas, lease expiry after a
//! replica dies, renewal, resets seen everywhere, failing closed and recovering.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;

fn redis_extra(redis: &RedisServer, once: &str) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"t:\"\n{once}",
        redis.url()
    )
}

fn archive(id: &str) -> String {
    format!("{ARCHIVES}/{id}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_one_of_200_requests_across_two_replicas_is_served() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let a = start_proxy(&upstream, &redis_extra(&redis, "")).await;
    let b = start_proxy(&upstream, &redis_extra(&redis, "")).await;
    let path = archive("slow-300-shared");
    assert_eq!(race(&[a.addr, b.addr], &path, 200).await, 1);
    assert_eq!(upstream.hits("slow-300-shared").len(), 1);

    // Served on A: refused on B, then from B's cache without asking Redis.
    assert_eq!(
        get(a.addr, &archive("x1"), &[]).await.status,
        StatusCode::OK
    );
    for _ in 0..2 {
        let reply = get(b.addr, &archive("X1"), &[]).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        assert_eq!(reply.error_code(), "ROMA.00000101");
    }
    match b.ledger.lookup("proj/inst/x1").await.unwrap() {
        oncegate::ledger::KeyState::Served(record) => {
            assert_eq!(record.bytes, body_for(&archive("x1")).len() as u64)
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_on_one_replica_is_seen_by_the_others() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    std::env::set_var("ONCEGATE_TEST_REDIS_ADMIN", "adm");
    let config = |upstream: &Upstream| {
        let mut config = config_for(&upstream.url(), &redis_extra(&redis, ""));
        config.admin.token_env = Some("ONCEGATE_TEST_REDIS_ADMIN".into());
        config
    };
    let a = oncegate::start(config(&upstream)).await.unwrap();
    let b = oncegate::start(config(&upstream)).await.unwrap();
    let path = archive("again");
    assert_eq!(get(a.addr, &path, &[]).await.status, StatusCode::OK);
    assert_eq!(
        get(b.addr, &path, &[]).await.status,
        StatusCode::FORBIDDEN,
        "B caches the served key"
    );
    let reset = request(
        a.admin_addr,
        "DELETE",
        "/archives/proj/inst/again",
        &[("authorization", "Bearer adm")],
    )
    .await;
    assert_eq!(reset.status, StatusCode::OK);
    // Well under the cache lifetime: B heard the reset.
    let started = Instant::now();
    loop {
        let reply = get(b.addr, &path, &[]).await;
        if reply.status == StatusCode::OK {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "B still refuses after a reset"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_of_a_killed_replica_expires_after_the_lease() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = \"{{listen}}\"\n[upstream]\nurl = \"{}\"\n[admin]\nlisten = \"{{admin}}\"\n{}",
        upstream.url(),
        redis_extra(&redis, "[once]\ninflight_lease = \"1s\"\n")
    );
    let doomed = Process::spawn(dir.path(), &config);
    let survivor = start_proxy(
        &upstream,
        &redis_extra(&redis, "[once]\ninflight_lease = \"1s\"\n"),
    )
    .await;
    let path = archive("trickle-200-orphan");
    // Killed mid-transfer: the replica cannot release its claim.
    let transfer = tokio::spawn({
        let (addr, path) = (doomed.addr, path.clone());
        async move { get(addr, &path, &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    doomed.signal("KILL");
    let cut = transfer.await.unwrap();
    assert_eq!(cut.status, StatusCode::OK);
    assert!(cut.body.len() < 8 * 64 * 1024, "the transfer was not cut");
    let killed_at = Instant::now();
    assert_eq!(
        get(survivor.addr, &path, &[]).await.status,
        StatusCode::CONFLICT,
        "the dead claim still holds"
    );
    loop {
        let reply = get(survivor.addr, &path, &[]).await;
        if reply.status == StatusCode::OK {
            assert_eq!(reply.body.len(), 8 * 64 * 1024);
            break;
        }
        assert_eq!(reply.status, StatusCode::CONFLICT);
        assert!(
            killed_at.elapsed() < Duration::from_secs(5),
            "the claim never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        killed_at.elapsed() >= Duration::from_millis(500),
        "taken over before the lease ran out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_renewal_keeps_a_long_transfer_from_being_taken_over() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let once = "[once]\ninflight_lease = \"700ms\"\n";
    let a = start_proxy(&upstream, &redis_extra(&redis, once)).await;
    let b = start_proxy(&upstream, &redis_extra(&redis, once)).await;
    let path = archive("trickle-200-renewed");
    let long = tokio::spawn({
        let (addr, path) = (a.addr, path.clone());
        async move { get(addr, &path, &[]).await }
    });
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            get(b.addr, &path, &[]).await.status,
            StatusCode::CONFLICT,
            "taken over mid-way"
        );
    }
    let done = long.await.unwrap();
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(done.body.len(), 8 * 64 * 1024);
    assert_eq!(get(b.addr, &path, &[]).await.status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_the_archive_route_fails_closed_and_recovers() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, &redis_extra(&redis, "")).await;
    assert_eq!(
        get(proxy.addr, &archive("before"), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        request(proxy.admin_addr, "GET", "/readyz", &[])
            .await
            .status,
        StatusCode::OK
    );

    redis.stop();
    let refused = get(proxy.addr, &archive("during"), &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.error_code(), "APIC.9000");
    assert!(
        upstream.hits("/during").is_empty(),
        "forwarded without a claim"
    );
    assert_eq!(
        get(proxy.addr, "/v2/proj/jobs/1", &[]).await.status,
        StatusCode::OK,
        "other routes keep working"
    );
    assert_eq!(
        request(proxy.admin_addr, "GET", "/readyz", &[])
            .await
            .status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    redis.restart();
    let started = Instant::now();
    loop {
        let reply = get(proxy.addr, &archive("after"), &[]).await;
        if reply.status == StatusCode::OK {
            break;
        }
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        request(proxy.admin_addr, "GET", "/readyz", &[])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(proxy.addr, &archive("after"), &[]).await.status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn password_and_acl_user_urls_work() {
    let redis = RedisServer::start_with(&[
        "--requirepass",
        "s3cret",
        "--user",
        "gate",
        "on",
        ">gatepw",
        "~*",
        "&*",
        "+@all",
    ]);
    let upstream = Upstream::start().await;
    for url in [
        format!("redis://:s3cret@127.0.0.1:{}", redis.port),
        format!("redis://gate:gatepw@127.0.0.1:{}/0", redis.port),
    ] {
        let extra = format!("[store]\nkind = \"redis\"\nurl = \"{url}\"\n");
        let proxy = start_proxy(&upstream, &extra).await;
        let path = archive(&format!("pw-{}", url.len()));
        assert_eq!(
            get(proxy.addr, &path, &[]).await.status,
            StatusCode::OK,
            "{url}"
        );
        assert_eq!(
            get(proxy.addr, &path, &[]).await.status,
            StatusCode::FORBIDDEN,
            "{url}"
        );
    }
    let wrong = format!(
        "[store]\nkind = \"redis\"\nurl = \"redis://:nope@127.0.0.1:{}\"\n",
        redis.port
    );
    let proxy = start_proxy(&upstream, &wrong).await;
    let refused = get(proxy.addr, &archive("pw-wrong"), &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.error_code(), "APIC.9000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rediss_urls_speak_tls_with_the_system_trust_store() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let tls_port = free_port().to_string();
    let (cert, key, ca) = (
        pki.cert.to_str().unwrap(),
        pki.key.to_str().unwrap(),
        pki.ca.to_str().unwrap(),
    );
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        cert,
        "--tls-key-file",
        key,
        "--tls-ca-cert-file",
        ca,
        "--tls-auth-clients",
        "no",
    ]);
    // The system trust store is where operators add a private CA; rustls-native-certs reads
    // SSL_CERT_FILE first. Only this test's Redis connections use TLS in this process.
    std::env::set_var("SSL_CERT_FILE", &pki.ca);
    let upstream = Upstream::start().await;
    let extra = format!("[store]\nkind = \"redis\"\nurl = \"rediss://localhost:{tls_port}\"\n");
    let proxy = start_proxy(&upstream, &extra).await;
    let path = archive("over-tls");
    let first = get(proxy.addr, &path, &[]).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert_eq!(
        get(proxy.addr, &path, &[]).await.status,
        StatusCode::FORBIDDEN
    );
    drop(redis);
}

/// Redis forgets its scripts on a restart or `SCRIPT FLUSH`; the ledger loads them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_redis_has_forgotten_are_loaded_again() {
    use oncegate::ledger::redis::RedisLedger;
    use oncegate::ledger::{ClaimOutcome, KeyState, Ledger, ServedRecord};

    let redis = RedisServer::start();
    let ledger = RedisLedger::new(&redis.url(), "flush:", None).unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let admin = client.get_multiplexed_async_connection().await.unwrap();
    let lease = Duration::from_secs(30);
    let forget_scripts = || {
        let mut admin = admin.clone();
        async move {
            let () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut admin)
                .await
                .unwrap();
        }
    };
    let claim = |key: &'static str| {
        let ledger = &ledger;
        async move {
            match ledger.claim(key, lease).await.unwrap() {
                ClaimOutcome::Claimed(ticket) => ticket,
                other => panic!("{key}: {other:?}"),
            }
        }
    };

    let ticket = claim("a").await;
    forget_scripts().await;
    ledger.renew(&ticket, lease).await.unwrap();
    forget_scripts().await;
    ledger
        .commit(&ticket, ServedRecord::unreadable("a", 1))
        .await
        .unwrap();
    assert!(matches!(
        ledger.lookup("a").await.unwrap(),
        KeyState::Served(_)
    ));

    let ticket = claim("b").await;
    forget_scripts().await;
    ledger.release(&ticket).await.unwrap();
    assert!(matches!(
        ledger.lookup("b").await.unwrap(),
        KeyState::Unseen
    ));

    forget_scripts().await;
    assert_eq!(
        ledger.reset("a").await.unwrap(),
        oncegate::ledger::ResetOutcome::Reset
    );
    assert!(matches!(
        ledger.lookup("a").await.unwrap(),
        KeyState::Unseen
    ));
}

/// A claim's `SET` can land although its answer is never awaited: the client left while it was
/// on its way, or Redis answered too late. The ledger then gives the key back at once, instead of
/// leaving it "in flight", held by nobody, for the whole lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_answer_is_never_awaited_is_given_back() {
    use oncegate::ledger::redis::RedisLedger;
    use oncegate::ledger::{ClaimOutcome, KeyState, Ledger, LedgerError};

    let redis = RedisServer::start();
    let ledger = RedisLedger::new(&redis.url(), "unanswered:", None).unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let lease = Duration::from_secs(600);
    // Connected before the pause, so each claim's `SET` goes out when it is first polled.
    assert!(matches!(
        ledger.lookup("warm-up").await,
        Ok(KeyState::Unseen)
    ));

    for (key, patience) in [
        ("client-left", Duration::from_millis(300)),
        ("too-slow", Duration::from_secs(10)),
    ] {
        // Redis holds every write until unpaused: the claim's `SET` waits there, unanswered.
        let () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(60_000)
            .arg("WRITE")
            .query_async(&mut admin)
            .await
            .unwrap();
        let answer = tokio::time::timeout(patience, ledger.claim(key, lease)).await;
        match key {
            // The caller stopped waiting: the claim's future was dropped mid-flight.
            "client-left" => assert!(answer.is_err(), "{key}: {answer:?}"),
            // The ledger's own command timeout answered first.
            _ => assert!(
                matches!(answer, Ok(Err(LedgerError::Unavailable(_)))),
                "{key}: {answer:?}"
            ),
        }
        let () = redis::cmd("CLIENT")
            .arg("UNPAUSE")
            .query_async(&mut admin)
            .await
            .unwrap();
        // The `SET` lands now, and the release sent after it removes it again.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match ledger.lookup(key).await.unwrap() {
                KeyState::Unseen => break,
                state => assert!(
                    Instant::now() < deadline,
                    "{key} was left {state:?} for the rest of its lease"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            matches!(ledger.claim(key, lease).await, Ok(ClaimOutcome::Claimed(_))),
            "{key} can be claimed again"
        );
    }
}

/// End to end: a client that hangs up while its claim waits in Redis leaves the archive
/// downloadable at once, not "in flight" for the rest of the lease (10 minutes by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_during_its_claim_leaves_the_archive_downloadable() {
    use tokio::io::AsyncWriteExt;

    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, &redis_extra(&redis, "")).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let admin = client.get_multiplexed_async_connection().await.unwrap();
    let admin_command = |args: &'static [&'static str]| {
        let mut command = redis::cmd(args[0]);
        command.arg(&args[1..]);
        let mut admin = admin.clone();
        async move {
            match command
                .query_async::<redis::Value>(&mut admin)
                .await
                .unwrap()
            {
                redis::Value::BulkString(text) => String::from_utf8_lossy(&text).to_string(),
                redis::Value::VerbatimString { text, .. } => text,
                _ => String::new(),
            }
        }
    };
    // The unread bytes behind the `SET` that Redis holds back (a client paused on it has the
    // `b` flag), once there is one.
    let bytes_behind_held_set = || async {
        let clients = admin_command(&["CLIENT", "LIST"]).await;
        let held = clients
            .lines()
            .find(|line| line.contains(" flags=b ") && line.contains(" cmd=set "))?;
        let qbuf = held
            .split(' ')
            .find_map(|field| field.strip_prefix("qbuf="))?;
        qbuf.parse::<usize>().ok()
    };
    let within_5s = Instant::now() + Duration::from_secs(5);
    // The proxy's connection to Redis is made before the pause.
    assert_eq!(
        get(proxy.addr, &archive("warm"), &[]).await.status,
        StatusCode::OK
    );
    admin_command(&["CONFIG", "RESETSTAT"]).await;
    admin_command(&["CLIENT", "PAUSE", "60000", "WRITE"]).await;

    let path = archive("hung-up");
    let mut hung_up = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: oncegate\r\nX-Auth-Token: {TOKEN}\r\n\r\n");
    hung_up.write_all(head.as_bytes()).await.unwrap();
    while bytes_behind_held_set().await.is_none() {
        assert!(Instant::now() < within_5s, "the claim never reached Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client hangs up; the proxy drops its request, and the release follows the `SET`.
    drop(hung_up);
    while bytes_behind_held_set().await == Some(0) {
        assert!(Instant::now() < within_5s, "no release followed the claim");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin_command(&["CLIENT", "UNPAUSE"]).await;

    let mut status = StatusCode::CONFLICT;
    while status == StatusCode::CONFLICT {
        assert!(
            Instant::now() < within_5s + Duration::from_secs(5),
            "the archive stayed in flight"
        );
        status = get(proxy.addr, &path, &[]).await.status;
        if status == StatusCode::CONFLICT {
            // The release script may still be loading (Redis had not seen it yet).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(status, StatusCode::OK);
    assert_eq!(upstream.hits("hung-up").len(), 1);
    // The `SET` did land, and the release deleted it (the one `DEL` since the pause; commands
    // that scripts run count too).
    let stats = admin_command(&["INFO", "commandstats"]).await;
    assert!(stats.contains("cmdstat_del:calls=1,"), "{stats}");
}
