//! TLS on both sides: an HTTPS listener (HTTP/1.1 and HTTP/2 by ALPN) and an HTTPS upstream
//! trusted through `upstream.ca_file`, with certificates made for the test.

mod support;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::*;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn acceptor(pki: &Pki) -> tokio_rustls::TlsAcceptor {
    let certs = CertificateDer::pem_file_iter(&pki.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn https_get(ca: &Path, url: &str, http2: bool) -> (StatusCode, http::Version, Bytes) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let connector = if http2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(http2)
        .build::<_, Empty<Bytes>>(connector);
    let request = http::Request::get(url)
        .header("x-auth-token", TOKEN)
        .body(Empty::new())
        .unwrap();
    let response = client.request(request).await.unwrap();
    let (status, version) = (response.status(), response.version());
    (
        status,
        version,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test]
async fn https_listener_serves_http1_and_http2() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let upstream = Upstream::start().await;
    let mut config = config_for(&upstream.url(), "");
    config.server.tls = Some(oncegate::config::TlsFiles {
        cert: pki.cert.clone(),
        key: pki.key.clone(),
    });
    let proxy = oncegate::start(config).await.unwrap();

    let path = format!("{ARCHIVES}/tls1");
    let (status, version, body) = https_get(
        &pki.ca,
        &format!("https://localhost:{}{path}", proxy.addr.port()),
        false,
    )
    .await;
    assert_eq!((status, version), (StatusCode::OK, http::Version::HTTP_11));
    assert_eq!(body, body_for(&path));
    assert_eq!(
        upstream.hits("/tls1")[0].headers["x-forwarded-proto"],
        "https"
    );

    let (status, version, _) = https_get(
        &pki.ca,
        &format!("https://127.0.0.1:{}{path}", proxy.addr.port()),
        true,
    )
    .await;
    assert_eq!(
        (status, version),
        (StatusCode::FORBIDDEN, http::Version::HTTP_2)
    );
}

#[tokio::test]
async fn https_upstream_is_trusted_through_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let upstream = Upstream::start_with_tls(Some(acceptor(&pki))).await;
    let url = upstream.url().replace("127.0.0.1", "localhost");

    // Without the CA the upstream's certificate is not trusted: 502, and nothing is consumed.
    let untrusting = start_proxy_at(&url, "").await;
    let path = format!("{ARCHIVES}/tls2");
    let refused = get(untrusting.addr, &path, &[]).await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
    assert_eq!(refused.error_code(), "APIC.0202");

    let mut config = config_for(&url, "");
    config.upstream.ca_file = Some(pki.ca.clone());
    let trusting = oncegate::start(config).await.unwrap();
    let reply = get(trusting.addr, &path, &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, body_for(&path));
    assert_eq!(
        upstream.hits("/tls2")[0].headers["host"],
        upstream.addr.to_string().replace("127.0.0.1", "localhost")
    );
}

#[tokio::test]
async fn https_iam_is_trusted_through_the_upstream_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let keystone = support::keystone::Keystone::start_with_tls("svc", Some(acceptor(&pki))).await;
    keystone.add_token(
        TOKEN,
        Some("proj"),
        "u-tls",
        "tls",
        std::time::Duration::from_secs(3600),
    );
    let upstream = Upstream::start().await;
    std::env::set_var("ONCEGATE_TEST_TLS_IAM_TOKEN", "svc");
    let auth = format!(
        "[auth]\nmode = \"iam\"\n[auth.iam]\nurl = \"{}\"\nservice_token_env = \"ONCEGATE_TEST_TLS_IAM_TOKEN\"\n",
        keystone.url()
    );
    let path = format!("{ARCHIVES}/tls-iam");

    // Without the CA, IAM's certificate is not trusted: 503, nothing forwarded.
    let untrusting = start_proxy(&upstream, &auth).await;
    let refused = get(untrusting.addr, &path, &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.error_code(), "APIG.0613");
    assert_eq!(keystone.hits(), 0, "no request got past the handshake");

    let mut config = config_for(&upstream.url(), &auth);
    config.upstream.ca_file = Some(pki.ca.clone());
    let trusting = oncegate::start(config).await.unwrap();
    let reply = get(trusting.addr, &path, &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(upstream.hits("/tls-iam")[0].headers["x-user-id"], "u-tls");
}
