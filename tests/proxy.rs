//! End-to-end behaviour of the proxy started in-process, on real loopback sockets, against the
//! real test upstream of `support`.

mod support;

use std::time::Duration;

use http::StatusCode;
use oncegate::ledger::KeyState;
use support::*;

fn archive(id: &str) -> String {
    format!("{ARCHIVES}/{id}")
}

fn assert_roma_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "body: {:?}", reply.body);
    let json = reply.json();
    let object = json.as_object().unwrap();
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["error_code", "error_details", "error_msg", "request_id"]
    );
    assert_eq!(json["error_code"], code);
    for value in object.values() {
        let text = value.as_str().unwrap();
        assert!(!text.is_empty() && text.chars().count() <= 128);
    }
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(reply.headers["cache-control"], "no-store");
    assert_eq!(reply.headers["accept-ranges"], "none");
    assert_eq!(
        json["request_id"],
        reply.headers["x-request-id"].to_str().unwrap()
    );
}

#[tokio::test]
async fn first_download_is_served_and_the_second_refused() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;
    let path = archive("a1");

    let first = get(proxy.addr, &path, &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, body_for(&path));
    assert_eq!(first.headers["cache-control"], "no-store");
    assert_eq!(first.headers["accept-ranges"], "none");

    let second = get(proxy.addr, &path, &[]).await;
    assert_roma_error(&second, StatusCode::FORBIDDEN, "ROMA.00000101");
    assert_eq!(
        upstream.hits("/a1").len(),
        1,
        "a refused request never reaches the upstream"
    );

    // Same archive, other case: the key is folded.
    let upper = get(proxy.addr, &archive("A1"), &[]).await;
    assert_roma_error(&upper, StatusCode::FORBIDDEN, "ROMA.00000101");

    match proxy.ledger.lookup("proj/inst/a1").await.unwrap() {
        KeyState::Served(record) => {
            assert_eq!(record.bytes, body_for(&path).len() as u64);
            assert_eq!(
                record.request_id,
                first.headers["x-request-id"].to_str().unwrap()
            );
            assert_eq!(record.client, "127.0.0.1");
            use sha2::Digest;
            let digest = hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()));
            assert_eq!(record.token_sha256_prefix, digest[..16]);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn large_and_chunked_bodies_stream_through_intact() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;
    let big = get(proxy.addr, &archive("big-6-x"), &[]).await;
    assert_eq!(big.status, StatusCode::OK);
    assert_eq!(big.body.len(), 6 * 1024 * 1024);
    for (i, chunk) in big.body.chunks(64 * 1024).enumerate() {
        assert_eq!(chunk, &big_chunk(i)[..], "chunk {i} differs");
    }
    let chunked = get(proxy.addr, &archive("chunked-x"), &[]).await;
    assert_eq!(chunked.status, StatusCode::OK);
    assert_eq!(chunked.body.len(), 4 * 64 * 1024);
    assert_eq!(
        get(proxy.addr, &archive("chunked-x"), &[]).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(proxy.addr, &archive("big-6-x"), &[]).await.status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn of_200_concurrent_requests_exactly_one_is_served() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;
    let path = archive("slow-300-race");
    assert_eq!(race(&[proxy.addr], &path, 200).await, 1);
    assert_eq!(upstream.hits("slow-300-race").len(), 1);
}

#[tokio::test]
async fn upstream_errors_release_the_claim() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;
    for _ in 0..2 {
        let reply = get(proxy.addr, &archive("fail-1"), &[]).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            reply.error_code(),
            "ROMA.9999",
            "the upstream's own answer is passed on"
        );
    }
    assert_eq!(upstream.hits("fail-1").len(), 2);
    assert_eq!(
        proxy.ledger.lookup("proj/inst/fail-1").await.unwrap(),
        KeyState::Unseen
    );

    // Broken mid-body: the client sees a broken transfer and the archive stays downloadable.
    for _ in 0..2 {
        let (status, read) = get_partial(proxy.addr, &archive("reset-1"), usize::MAX).await;
        assert_eq!(status, StatusCode::OK);
        assert!(read < 16 * 64 * 1024);
    }
    assert_eq!(upstream.hits("reset-1").len(), 2);
}

#[tokio::test]
async fn unreachable_and_slow_upstreams_get_502_and_504_and_release() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let mut config = config_for(&closed, "");
    config.upstream.connect_timeout = Duration::from_secs(1);
    let proxy = oncegate::start(config).await.unwrap();
    for _ in 0..2 {
        let reply = get(proxy.addr, &archive("gone"), &[]).await;
        assert_roma_error(&reply, StatusCode::BAD_GATEWAY, "APIC.0202");
    }

    let upstream = Upstream::start().await;
    let mut config = config_for(&upstream.url(), "");
    config.upstream.response_timeout = Duration::from_millis(300);
    let proxy = oncegate::start(config).await.unwrap();
    for _ in 0..2 {
        let reply = get(proxy.addr, &archive("slow-2000-x"), &[]).await;
        assert_roma_error(&reply, StatusCode::GATEWAY_TIMEOUT, "APIC.0203");
    }
    assert_eq!(
        upstream.hits("slow-2000-x").len(),
        2,
        "a timed-out download is released"
    );

    // The header timeout does not cut an archive whose body pauses longer than it.
    let paused = get(proxy.addr, &archive("trickle-500-paused"), &[]).await;
    assert_eq!(paused.status, StatusCode::OK);
    assert_eq!(paused.body.len(), 8 * 64 * 1024);
}

#[tokio::test]
async fn client_abort_releases_in_complete_mode() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;
    let path = archive("big-8-abort");
    let (status, read) = get_partial(proxy.addr, &path, 128 * 1024).await;
    assert_eq!(status, StatusCode::OK);
    assert!(read >= 128 * 1024);
    wait_until(|| async {
        proxy.ledger.lookup("proj/inst/big-8-abort").await.unwrap() == KeyState::Unseen
    })
    .await;
    let again = get(proxy.addr, &path, &[]).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body.len(), 8 * 1024 * 1024);
}

#[tokio::test]
async fn client_abort_consumes_in_headers_mode() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "[once]\ncommit = \"headers\"\n").await;
    let path = archive("big-8-abort");
    let (status, _) = get_partial(proxy.addr, &path, 128 * 1024).await;
    assert_eq!(status, StatusCode::OK);
    match proxy.ledger.lookup("proj/inst/big-8-abort").await.unwrap() {
        KeyState::Served(record) => assert_eq!(
            record.bytes,
            8 * 1024 * 1024,
            "headers mode records the length"
        ),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_roma_error(
        &get(proxy.addr, &path, &[]).await,
        StatusCode::FORBIDDEN,
        "ROMA.00000101",
    );
}

#[tokio::test]
async fn other_methods_get_405_and_are_never_forwarded() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;
    for method in ["HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let reply = request(
            proxy.addr,
            method,
            &archive("m1"),
            &[("x-auth-token", TOKEN)],
        )
        .await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(reply.headers["allow"], "GET");
        assert_eq!(reply.headers["cache-control"], "no-store");
        if method != "HEAD" {
            assert_roma_error(&reply, StatusCode::METHOD_NOT_ALLOWED, "ROMA.1007");
        } else {
            assert!(reply.body.is_empty());
        }
    }
    assert!(upstream.hits("m1").is_empty());
    assert_eq!(
        get(proxy.addr, &archive("m1"), &[]).await.status,
        StatusCode::OK,
        "nothing was consumed"
    );
}

#[tokio::test]
async fn partial_and_conditional_headers_are_stripped() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;
    let path = archive("r1");
    let reply = get(
        proxy.addr,
        &path,
        &[
            ("range", "bytes=0-9"),
            ("if-range", "\"x\""),
            ("if-none-match", "\"x\""),
            ("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, body_for(&path), "always the whole archive");
    let seen = &upstream.hits("/r1")[0];
    for name in ["range", "if-range", "if-none-match", "if-modified-since"] {
        assert!(!seen.headers.contains_key(name), "{name} was forwarded");
    }
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(
        &upstream,
        "[[rate_limit]]\nkey = \"ip\"\nper_second = 0.5\nburst = 2\n",
    )
    .await;
    assert_eq!(get(proxy.addr, "/other", &[]).await.status, StatusCode::OK);
    assert_eq!(
        get(proxy.addr, &archive("rl"), &[]).await.status,
        StatusCode::OK
    );
    let limited = get(proxy.addr, &archive("rl2"), &[]).await;
    assert_roma_error(&limited, StatusCode::TOO_MANY_REQUESTS, "APIG.0308");
    let wait: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    assert_eq!(
        proxy.ledger.lookup("proj/inst/rl2").await.unwrap(),
        KeyState::Unseen
    );
}

#[tokio::test]
async fn request_ids_are_kept_generated_and_propagated() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;
    let kept = get(proxy.addr, "/ping", &[("x-request-id", "client.id-42")]).await;
    assert_eq!(kept.headers["x-request-id"], "client.id-42");
    assert_eq!(
        upstream.hits("/ping")[0].headers["x-request-id"],
        "client.id-42"
    );

    let replaced = get(proxy.addr, "/ping2", &[("x-request-id", "bad id!")]).await;
    let id = replaced.headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 32);
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(
        upstream.hits("/ping2")[0].headers["x-request-id"],
        id.as_str()
    );

    let error = request(
        proxy.addr,
        "GET",
        &archive("x"),
        &[("x-request-id", "err-id")],
    )
    .await;
    assert_roma_error(&error, StatusCode::BAD_REQUEST, "ROMA.1000");
    assert_eq!(error.json()["request_id"], "err-id");

    let untrusting = start_proxy(&upstream, "[trace]\ntrust_incoming = false\n").await;
    let fresh = get(
        untrusting.addr,
        "/ping3",
        &[("x-request-id", "client.id-42")],
    )
    .await;
    assert_ne!(fresh.headers["x-request-id"], "client.id-42");
}

#[tokio::test]
async fn ambiguous_paths_are_rejected_and_never_forwarded() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;
    let cases = [
        (
            "GET /v2/proj/instances/inst/assets/archives//p1",
            400,
            "ROMA.1007",
        ),
        (
            "GET /v2/proj/instances/inst/assets/archives/p1/",
            400,
            "ROMA.1007",
        ),
        (
            "GET /v2/proj/instances/inst/assets/archives/p%31",
            400,
            "ROMA.1007",
        ),
        (
            "GET /v2/proj/instances/inst/assets/archives%2Fp1",
            400,
            "ROMA.1007",
        ),
        (
            "GET /v2/proj/instances/inst/assets/archives/x/../p1",
            400,
            "ROMA.1007",
        ),
        (
            "GET /v2/proj/instances/inst/assets/./archives/p1",
            400,
            "ROMA.1007",
        ),
        (
            "GET /v2/proj/instances/inst/assets/archives/p1;v=1",
            400,
            "ROMA.1007",
        ),
        (
            "GET /v2/proj/instances/inst/assets/archives\\p1",
            400,
            "ROMA.1007",
        ),
        (
            "GET /V2/proj/INSTANCES/inst/assets/archives/p1",
            400,
            "ROMA.1007",
        ),
        (
            "GET /v2/proj/instances/inst/assets/archives/%252e%252e",
            400,
            "ROMA.1007",
        ),
        (
            "GET /v2/proj/instances/inst/assets/archives/p$1",
            400,
            "ROMA.13000",
        ),
    ];
    for (head, status, code) in cases {
        let (got, body) = raw(proxy.addr, &format!("{head} HTTP/1.1")).await;
        assert_eq!(got, status, "{head}: {body}");
        assert!(body.contains(code), "{head}: {body}");
    }
    let long = "a".repeat(65);
    let (got, body) = raw(proxy.addr, &format!("GET {ARCHIVES}/{long} HTTP/1.1")).await;
    assert_eq!((got, body.contains("ROMA.13000")), (400, true), "{body}");
    assert!(upstream.hits("p1").is_empty(), "{:?}", upstream.hits("p1"));

    // Absolute form and a query string reduce to the canonical key.
    let (got, _) = raw(
        proxy.addr,
        &format!("GET http://example.com{ARCHIVES}/q1?a=1 HTTP/1.1"),
    )
    .await;
    assert_eq!(got, 200);
    let again = get(proxy.addr, &format!("{}?a=2", archive("q1")), &[]).await;
    assert_eq!(
        again.status,
        StatusCode::FORBIDDEN,
        "the query is not part of the key"
    );
    assert_eq!(
        upstream.hits("/q1")[0].path_and_query,
        format!("{ARCHIVES}/q1?a=1")
    );
}

#[tokio::test]
async fn other_paths_are_forwarded_with_clean_headers() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy_at(&format!("{}/base/", upstream.url()), "").await;
    let reply = get(
        proxy.addr,
        "/v2/proj/jobs/1?x=%2F&y",
        &[
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "5"),
            ("proxy-connection", "keep-alive"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-end", "kept"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = &upstream.hits("/jobs/1")[0];
    assert_eq!(seen.path_and_query, "/base/v2/proj/jobs/1?x=%2F&y");
    for name in ["x-hop", "keep-alive", "proxy-connection"] {
        assert!(!seen.headers.contains_key(name), "{name} forwarded");
    }
    assert_eq!(seen.headers["x-end"], "kept");
    assert_eq!(seen.headers["x-forwarded-for"], "192.0.2.1, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["host"], upstream.addr.to_string());
    assert_eq!(
        seen.headers["x-auth-token"], TOKEN,
        "the token goes to the upstream"
    );

    let mut config = config_for(&upstream.url(), "");
    config.upstream.preserve_host = true;
    let proxy = oncegate::start(config).await.unwrap();
    get(proxy.addr, "/host-check", &[("host", "client.example")]).await;
    assert_eq!(
        upstream.hits("/host-check")[0].headers["host"],
        "client.example"
    );
}

#[tokio::test]
async fn authentication_comes_before_the_ledger() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;
    let missing = request(proxy.addr, "GET", &archive("auth1"), &[]).await;
    assert_roma_error(&missing, StatusCode::BAD_REQUEST, "ROMA.1000");
    let empty = request(
        proxy.addr,
        "GET",
        &archive("auth1"),
        &[("x-auth-token", "")],
    )
    .await;
    assert_roma_error(&empty, StatusCode::BAD_REQUEST, "ROMA.1000");
    assert_eq!(
        proxy.ledger.lookup("proj/inst/auth1").await.unwrap(),
        KeyState::Unseen
    );
    assert!(upstream.hits("auth1").is_empty());

    let digest = |token: &str| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    };
    let extra = format!(
        "[auth]\nmode = \"static\"\n[[auth.tokens]]\nsha256 = \"{}\"\nprojects = [\"proj\"]\n",
        digest(TOKEN)
    );
    let proxy = start_proxy(&upstream, &extra).await;
    let wrong = request(
        proxy.addr,
        "GET",
        &archive("auth2"),
        &[("x-auth-token", "nope")],
    )
    .await;
    assert_roma_error(&wrong, StatusCode::BAD_REQUEST, "ROMA.1002");
    let other_project = get(
        proxy.addr,
        "/v2/elsewhere/instances/i/assets/archives/auth2",
        &[],
    )
    .await;
    assert_roma_error(&other_project, StatusCode::FORBIDDEN, "ROMA.1006");
    assert_eq!(
        get(proxy.addr, &archive("auth2"), &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn leases_are_renewed_while_bytes_flow_and_dead_claims_expire() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "[once]\ninflight_lease = \"600ms\"\n").await;
    // 8 chunks 150 ms apart: well past the lease, but renewed as the bytes flow.
    let path = archive("trickle-150-long");
    let addr = proxy.addr;
    let long = tokio::spawn({
        let path = path.clone();
        async move { get(addr, &path, &[]).await }
    });
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let reply = get(proxy.addr, &path, &[]).await;
        assert_eq!(reply.status, StatusCode::CONFLICT, "taken over mid-way");
    }
    let done = long.await.unwrap();
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(done.body.len(), 8 * 64 * 1024);
    assert_eq!(
        get(proxy.addr, &path, &[]).await.status,
        StatusCode::FORBIDDEN
    );

    // A holder stuck before the headers renews nothing: its claim expires and another request
    // wins; the stuck one can then no longer complete.
    let stuck_path = archive("slow-1500-stuck");
    let stuck = tokio::spawn({
        let path = stuck_path.clone();
        async move { get(addr, &path, &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(900)).await;
    let second = get(proxy.addr, &stuck_path, &[]).await;
    assert_eq!(
        second.status,
        StatusCode::OK,
        "the expired claim was taken over"
    );
    let first = stuck.await;
    assert!(
        !matches!(&first, Ok(reply) if reply.status == StatusCode::OK && reply.body == second.body),
        "the stuck holder completed too"
    );
}

#[tokio::test]
async fn retention_lets_records_expire() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "[once]\nretention = \"700ms\"\n").await;
    let path = archive("ret");
    assert_eq!(get(proxy.addr, &path, &[]).await.status, StatusCode::OK);
    assert_eq!(
        get(proxy.addr, &path, &[]).await.status,
        StatusCode::FORBIDDEN
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(get(proxy.addr, &path, &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn graceful_shutdown_lets_a_running_download_finish() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;
    let addr = proxy.addr;
    let download =
        tokio::spawn(async move { get(addr, &archive("trickle-100-shutdown"), &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting"
    );
    let reply = download.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), 8 * 64 * 1024);
    let ledger = proxy.ledger.clone();
    tokio::time::timeout(Duration::from_secs(5), proxy.wait())
        .await
        .expect("stops");
    assert!(matches!(
        ledger
            .lookup("proj/inst/trickle-100-shutdown")
            .await
            .unwrap(),
        KeyState::Served(_)
    ));
}

#[tokio::test]
async fn admin_reports_health_metrics_and_manages_keys() {
    std::env::set_var("ONCEGATE_TEST_ADMIN_TOKEN", "s3cret");
    let upstream = Upstream::start().await;
    let mut config = config_for(&upstream.url(), "");
    config.admin.token_env = Some("ONCEGATE_TEST_ADMIN_TOKEN".into());
    let proxy = oncegate::start(config).await.unwrap();
    let admin = proxy.admin_addr;
    assert_eq!(
        request(admin, "GET", "/healthz", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        request(admin, "GET", "/readyz", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(proxy.addr, &archive("adm"), &[]).await.status,
        StatusCode::OK
    );
    let metrics =
        String::from_utf8(request(admin, "GET", "/metrics", &[]).await.body.to_vec()).unwrap();
    for name in [
        "oncegate_requests_total",
        "oncegate_downloads_total",
        "oncegate_upstream_response_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }

    let health = request(admin, "GET", "/healthz", &[]).await;
    assert_eq!(
        health.headers["x-request-id"].len(),
        32,
        "admin responses carry a request id"
    );
    let key = "/archives/proj/inst/ADM";
    assert_eq!(
        request(admin, "GET", key, &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        request(admin, "GET", key, &[("authorization", "Bearer nope")])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let bearer = [("authorization", "Bearer s3cret")];
    let state = request(admin, "GET", key, &bearer).await.json();
    assert_eq!(state["state"], "served");
    assert_eq!(state["record"]["bytes"], body_for(&archive("adm")).len());
    let lowercase = [("authorization", "bearer s3cret")];
    let reset = request(admin, "DELETE", key, &lowercase).await;
    assert_eq!(
        reset.status,
        StatusCode::OK,
        "auth schemes are case-insensitive"
    );
    assert_eq!(
        request(admin, "GET", key, &bearer).await.json()["state"],
        "unseen"
    );
    assert_eq!(
        get(proxy.addr, &archive("adm"), &[]).await.status,
        StatusCode::OK,
        "downloadable once more"
    );
}

#[tokio::test]
async fn http2_clients_are_served() {
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, "").await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let path = archive("h2");
    let first = http::Request::get(format!("http://{}{path}", proxy.addr))
        .header("x-auth-token", TOKEN)
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = client.request(first).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, body_for(&path));
    assert_eq!(
        get(proxy.addr, &path, &[]).await.status,
        StatusCode::FORBIDDEN
    );

    // The longest token the API allows fits through both protocols.
    let long_token = "t".repeat(100_000);
    let long = http::Request::get(format!("http://{}{}", proxy.addr, archive("h2-long")))
        .header("x-auth-token", long_token.as_str())
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(client.request(long).await.unwrap().status(), StatusCode::OK);
    let h1 = request(
        proxy.addr,
        "GET",
        &archive("h1-long"),
        &[("x-auth-token", long_token.as_str())],
    )
    .await;
    assert_eq!(h1.status, StatusCode::OK);
}

async fn wait_until<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met within 2 s");
}

#[tokio::test]
async fn admin_archive_api_looks_up_and_resets_on_local_ledgers() {
    std::env::set_var("ONCEGATE_TEST_ADMIN_TOKEN", "s3cret");
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let stores = [
        "[store]\nkind = \"memory\"\n".to_string(),
        format!(
            "[store]\nkind = \"embedded\"\npath = \"{}\"\n",
            dir.path().join("admin.redb").display()
        ),
    ];
    for (round, store) in stores.iter().enumerate() {
        let mut config = config_for(&upstream.url(), store);
        config.admin.token_env = Some("ONCEGATE_TEST_ADMIN_TOKEN".into());
        let proxy = oncegate::start(config).await.unwrap();
        let (addr, admin) = (proxy.addr, proxy.admin_addr);
        let bearer = [("authorization", "Bearer s3cret")];
        let id = format!("trickle-100-admin{round}");
        let key = format!("/archives/proj/inst/{id}");

        for _ in 0..2 {
            let state = request(admin, "GET", &key, &bearer).await.json();
            assert_eq!(state["state"], "unseen", "a lookup consumes nothing");
            assert!(state["record"].is_null());
        }
        let path = archive(&id);
        let running = tokio::spawn(async move { get(addr, &path, &[]).await });
        let mut state = serde_json::Value::Null;
        for _ in 0..100 {
            state = request(admin, "GET", &key, &bearer).await.json();
            if state["state"] == "in_flight" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(state["state"], "in_flight");
        assert!(state["record"].is_null());
        let refused = request(admin, "DELETE", &key, &bearer).await;
        assert_eq!(
            refused.status,
            StatusCode::CONFLICT,
            "no reset while in flight"
        );
        assert_eq!(refused.json()["state"], "in_flight");
        assert_eq!(running.await.unwrap().status, StatusCode::OK);

        let state = request(admin, "GET", &key, &bearer).await.json();
        assert_eq!(state["state"], "served");
        assert_eq!(state["record"]["bytes"], 8 * 64 * 1024);
        assert_eq!(state["record"]["request_id"].as_str().unwrap().len(), 32);
        let reset = request(admin, "DELETE", &key, &bearer).await;
        assert_eq!(reset.status, StatusCode::OK);
        assert_eq!(reset.json()["reset"], true);
        assert_eq!(
            get(addr, &archive(&id), &[]).await.status,
            StatusCode::OK,
            "exactly one more download"
        );
        assert_eq!(
            get(addr, &archive(&id), &[]).await.status,
            StatusCode::FORBIDDEN
        );
        let nothing = request(admin, "DELETE", "/archives/proj/inst/never", &bearer).await;
        assert_eq!(nothing.status, StatusCode::OK);
        assert_eq!(nothing.json()["reset"], false);
        assert_eq!(
            request(admin, "DELETE", &key, &[]).await.status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            request(admin, "DELETE", &key, &[("authorization", "Bearer s3cre")])
                .await
                .status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            get(addr, &archive(&id), &[]).await.status,
            StatusCode::FORBIDDEN,
            "refused resets change nothing"
        );
        let metrics = request(admin, "GET", "/metrics", &[]).await;
        let metrics = String::from_utf8_lossy(&metrics.body).to_string();
        for line in [
            "oncegate_admin_resets_total{result=\"in_flight\"}",
            "oncegate_admin_resets_total{result=\"reset\"}",
            "oncegate_downloads_in_flight",
            "oncegate_ledger_operation_seconds_bucket{op=\"claim\"",
        ] {
            assert!(metrics.contains(line), "{line} missing:\n{metrics}");
        }
        proxy.shutdown();
        proxy.wait().await;
    }
}
