//! `auth.mode = "iam"` against a fake Keystone on loopback: project binding, caching, single
//! flight, expiry, forged identity headers, and IAM outages.

mod support;

use std::time::Duration;

use http::StatusCode;
use oncegate::ledger::KeyState;
use support::keystone::Keystone;
use support::*;

const SERVICE_TOKEN: &str = "service-secret";
const SERVICE_TOKEN_ENV: &str = "ONCEGATE_TEST_IAM_SERVICE_TOKEN";

fn iam_config(keystone: &Keystone, extra: &str) -> String {
    // Every test sets the same value: tests in this file share the process environment.
    std::env::set_var(SERVICE_TOKEN_ENV, SERVICE_TOKEN);
    format!(
        "[auth]\nmode = \"iam\"\n[auth.iam]\nurl = \"{}\"\nservice_token_env = \"{SERVICE_TOKEN_ENV}\"\n{extra}",
        keystone.url()
    )
}

async fn iam_get(addr: std::net::SocketAddr, path: &str, token: &str) -> Reply {
    request(addr, "GET", path, &[("x-auth-token", token)]).await
}

fn archive(id: &str) -> String {
    format!("{ARCHIVES}/{id}")
}

#[tokio::test]
async fn token_must_belong_to_the_project_and_identity_comes_from_iam() {
    let keystone = Keystone::start(SERVICE_TOKEN).await;
    let hour = Duration::from_secs(3600);
    keystone.add_token("tok-alice", Some("proj"), "u-alice", "alice", hour);
    keystone.add_token("tok-bob", Some("other"), "u-bob", "bob", hour);
    keystone.add_token("tok-domain", None, "u-dom", "dom", hour);
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, &iam_config(&keystone, "")).await;

    let forged = [
        ("x-auth-token", "tok-alice"),
        ("x-user-id", "admin"),
        ("x-user-name", "root"),
        ("x-project-id", "other"),
        ("x-identity-status", "Confirmed"),
    ];
    let path = archive("iam-1");
    let reply = request(proxy.addr, "GET", &path, &forged).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, body_for(&path));
    let seen = upstream.hits("iam-1");
    assert_eq!(seen.len(), 1);
    for (name, value) in [
        ("x-user-id", "u-alice"),
        ("x-user-name", "alice"),
        ("x-project-id", "proj"),
        ("x-identity-status", "Confirmed"),
    ] {
        let values: Vec<_> = seen[0].headers.get_all(name).iter().collect();
        assert_eq!(values, vec![value], "{name} comes from the verified token");
    }
    let KeyState::Served(record) = proxy.ledger.lookup("proj/inst/iam-1").await.unwrap() else {
        panic!("served");
    };
    assert_eq!(record.user_id.as_deref(), Some("u-alice"));

    // Another project's token: refused before the ledger or the upstream sees anything.
    let reply = iam_get(proxy.addr, &archive("iam-2"), "tok-bob").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.error_code(), "ROMA.1006");
    assert!(upstream.hits("iam-2").is_empty());
    assert_eq!(
        proxy.ledger.lookup("proj/inst/iam-2").await.unwrap(),
        KeyState::Unseen
    );
    let reply = iam_get(proxy.addr, "/v2/proj/jobs", "tok-bob").await;
    assert_eq!(
        reply.error_code(),
        "ROMA.1006",
        "any /v2/{{project_id}}/ path"
    );
    let reply = iam_get(proxy.addr, &archive("iam-3"), "tok-domain").await;
    assert_eq!(
        reply.error_code(),
        "ROMA.1006",
        "a token without a project matches none"
    );
    // A path about no project only needs a valid token.
    let reply = iam_get(proxy.addr, "/version", "tok-bob").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(upstream.hits("/version")[0].headers["x-user-id"], "u-bob");
}

#[tokio::test]
async fn unknown_tokens_are_400_and_remembered_briefly() {
    let keystone = Keystone::start(SERVICE_TOKEN).await;
    let upstream = Upstream::start().await;
    let proxy = start_proxy(
        &upstream,
        &iam_config(&keystone, "negative_cache_ttl = \"300ms\"\n"),
    )
    .await;
    for _ in 0..5 {
        let reply = iam_get(proxy.addr, &archive("unknown"), "tok-nobody").await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.error_code(), "ROMA.1002");
    }
    assert_eq!(keystone.hits(), 1, "negative results are cached");
    assert!(upstream.hits("unknown").is_empty());
    // Once the negative entry runs out, a token that became valid is accepted.
    keystone.add_token(
        "tok-nobody",
        Some("proj"),
        "u-new",
        "new",
        Duration::from_secs(3600),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reply = iam_get(proxy.addr, &archive("unknown"), "tok-nobody").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(keystone.hits(), 2);
}

#[tokio::test]
async fn one_iam_call_serves_many_requests_even_concurrent_ones() {
    let keystone = Keystone::start(SERVICE_TOKEN).await;
    keystone.add_token(
        "tok-busy",
        Some("proj"),
        "u-busy",
        "busy",
        Duration::from_secs(3600),
    );
    keystone.set_delay(Duration::from_millis(300));
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, &iam_config(&keystone, "")).await;
    let addr = proxy.addr;
    let concurrent: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(
                async move { iam_get(addr, &archive(&format!("sf-{i}")), "tok-busy").await },
            )
        })
        .collect();
    for task in concurrent {
        assert_eq!(task.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(
        keystone.hits(),
        1,
        "concurrent first requests share one IAM call"
    );
    for i in 0..20 {
        let reply = iam_get(addr, &archive(&format!("seq-{i}")), "tok-busy").await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(keystone.hits(), 1, "later requests are cache hits");
    let metrics = request(proxy.admin_addr, "GET", "/metrics", &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("oncegate_iam_cache_total{result=\"hit\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn a_cached_token_stops_working_when_it_expires() {
    let keystone = Keystone::start(SERVICE_TOKEN).await;
    keystone.add_token(
        "tok-short",
        Some("proj"),
        "u-short",
        "short",
        Duration::from_millis(1500),
    );
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, &iam_config(&keystone, "cache_ttl = \"1h\"\n")).await;
    assert_eq!(
        iam_get(proxy.addr, &archive("exp-1"), "tok-short")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        iam_get(proxy.addr, &archive("exp-2"), "tok-short")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(keystone.hits(), 1);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let reply = iam_get(proxy.addr, &archive("exp-3"), "tok-short").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "ROMA.1002");
    assert!(upstream.hits("exp-3").is_empty());
}

#[tokio::test]
async fn iam_outages_fail_closed_with_503_and_are_not_cached() {
    let keystone = Keystone::start(SERVICE_TOKEN).await;
    keystone.add_token(
        "tok-ok",
        Some("proj"),
        "u-ok",
        "ok",
        Duration::from_secs(3600),
    );
    let upstream = Upstream::start().await;
    let proxy = start_proxy(&upstream, &iam_config(&keystone, "")).await;

    for status in [503, 500, 401] {
        keystone.set_forced_status(Some(status));
        let reply = iam_get(proxy.addr, &archive("outage"), "tok-ok").await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "IAM {status}"
        );
        assert_eq!(reply.error_code(), "APIG.0613");
        assert_eq!(
            reply.json()["request_id"],
            reply.headers["x-request-id"].to_str().unwrap()
        );
    }
    assert!(upstream.hits("outage").is_empty(), "nothing forwarded");
    assert_eq!(
        proxy.ledger.lookup("proj/inst/outage").await.unwrap(),
        KeyState::Unseen,
        "the ledger is not touched"
    );
    keystone.set_forced_status(None);
    let reply = iam_get(proxy.addr, &archive("outage"), "tok-ok").await;
    assert_eq!(reply.status, StatusCode::OK, "failures are not cached");

    // Nothing listening where IAM should be.
    let text = format!(
        "[auth]\nmode = \"iam\"\n[auth.iam]\nurl = \"http://127.0.0.1:{}\"\nservice_token_env = \"{SERVICE_TOKEN_ENV}\"\n",
        free_port()
    );
    let unreachable = start_proxy(&upstream, &text).await;
    let reply = iam_get(unreachable.addr, &archive("outage-2"), "tok-ok").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "APIG.0613");
    assert!(upstream.hits("outage-2").is_empty());
}

#[tokio::test]
async fn a_missing_service_token_stops_the_start() {
    let keystone = Keystone::start(SERVICE_TOKEN).await;
    let text = format!(
        "[auth]\nmode = \"iam\"\n[auth.iam]\nurl = \"{}\"\nservice_token_env = \"ONCEGATE_TEST_NEVER_SET\"\n",
        keystone.url()
    );
    let error = oncegate::start(config_for("http://127.0.0.1:9", &text))
        .await
        .err()
        .expect("refuses to start");
    assert!(error.contains("ONCEGATE_TEST_NEVER_SET"), "{error}");
}
