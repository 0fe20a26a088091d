//! The floor under oncegate's cost per request: its listener and upstream pool with none of its
//! layers, to tell what the stack costs from what hyper, tokio and the kernel cost on a machine.
//!
//! ```sh
//! cargo run --release --example floor -- forward 127.0.0.1:18098 http://127.0.0.1:18080
//! cargo run --release --example floor -- forward 127.0.0.1:18098 http://127.0.0.1:18080 redis://127.0.0.1:18379
//! cargo run --release --example floor -- refuse 127.0.0.1:18098
//! ```
//! `forward` sends every request to the upstream as it came and streams the answer back; given a
//! ledger (`memory`, or a Redis URL for oncegate's Redis ledger) it first claims the request's
//! path there and commits a record once the upstream's 2xx headers are in (a path already served
//! gets the refusal). `refuse` answers every request with a 403 shaped like oncegate's refusal
//! (same headers, a body of the same length), reading nothing but the request head.
//! `scripts/profile.sh floor` runs these next to nginx, haproxy and oncegate
//! (docs/BENCHMARKS.md).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_TYPE};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use oncegate::body::ProxyBody;
use oncegate::ledger::memory::MemoryLedger;
use oncegate::ledger::redis::RedisLedger;
use oncegate::ledger::{now_ms, ClaimOutcome, Ledger, ServedRecord};
use oncegate::pool::Pool;
use oncegate::server::{serve, Limits};

/// The proxy's allocator (src/main.rs), so the floor is measured on the same footing.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// As long as oncegate's refusal of an already served archive, request id included.
const REFUSAL: &str = concat!(
    r#"{"error_code":"ROMA.00000101","error_msg":"asset package already downloaded","#,
    r#""error_details":"this asset package can be downloaded only once and has been downloaded","#,
    r#""request_id":"00000000000000000000000000000000"}"#
);

fn refusal() -> Response<ProxyBody> {
    let mut response = Response::new(oncegate::body::full(Bytes::from_static(REFUSAL.as_bytes())));
    *response.status_mut() = StatusCode::FORBIDDEN;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("none"));
    headers.insert(
        "x-request-id",
        HeaderValue::from_static("00000000000000000000000000000000"),
    );
    response
}

fn usage() -> ! {
    eprintln!(
        "usage: floor forward <listen> <upstream url> [memory | <redis url>] | floor refuse <listen>"
    );
    std::process::exit(2)
}

const LEASE: Duration = Duration::from_secs(60);

/// Forwards `request` through `pool`; with a ledger, only on a won claim of its path, and the
/// record is committed before the response goes back.
async fn forward(
    pool: Pool<Incoming>,
    ledger: Option<Arc<dyn Ledger>>,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let claim = match &ledger {
        None => None,
        Some(ledger) => {
            let key = request.uri().path().to_string();
            match ledger.claim(&key, LEASE).await {
                Ok(ClaimOutcome::Claimed(ticket)) => Some((ledger, ticket)),
                _ => return refusal(),
            }
        }
    };
    let response = pool.request(request).await;
    let served = response.as_ref().is_ok_and(|r| r.status().is_success());
    if let Some((ledger, ticket)) = claim.as_ref().filter(|_| !served) {
        let _ = ledger.release(ticket).await;
    }
    let Ok(response) = response else {
        return status(StatusCode::BAD_GATEWAY);
    };
    if let Some((ledger, ticket)) = claim.filter(|_| served) {
        let record = ServedRecord {
            key: ticket.key.clone(),
            served_at_ms: now_ms(),
            request_id: "00000000000000000000000000000000".into(),
            bytes: 42,
            client: "127.0.0.1".into(),
            token_sha256_prefix: "0123456789abcdef".into(),
            user_id: None,
        };
        if ledger.commit(&ticket, record).await.is_err() {
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
    }
    response.map(|body| body.map_err(oncegate::body::BoxError::from).boxed_unsync())
}

fn status(status: StatusCode) -> Response<ProxyBody> {
    let mut response = Response::new(oncegate::body::empty());
    *response.status_mut() = status;
    response
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listen: SocketAddr = match args.get(1).map(|a| a.parse()) {
        Some(Ok(addr)) => addr,
        _ => usage(),
    };
    let limits = Limits {
        header_read_timeout: Duration::from_secs(30),
        max_connections: 10_000,
        grace: Duration::from_secs(1),
    };
    // One worker on the current-thread scheduler, as oncegate runs with one.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let listener = oncegate::server::bind(listen, "listen")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let forever = std::future::pending::<()>();
        match (args[0].as_str(), args.get(2)) {
            ("refuse", None) => {
                let service = tower::service_fn(|_: Request<Incoming>| async {
                    Ok::<_, Infallible>(refusal())
                });
                serve(listener, None, service, forever, limits).await
            }
            ("forward", Some(upstream)) => {
                let upstream: Uri = upstream.parse().unwrap_or_else(|_| usage());
                let (Some(scheme), Some(authority)) = (upstream.scheme(), upstream.authority())
                else {
                    usage()
                };
                let pool = Pool::<Incoming>::new(scheme, authority, Duration::from_secs(5), None)
                    .unwrap_or_else(|e| panic!("{e}"));
                let ledger: Option<Arc<dyn Ledger>> = match args.get(3).map(String::as_str) {
                    None => None,
                    Some("memory") => Some(Arc::new(MemoryLedger::new(None))),
                    Some(url) => Some(Arc::new(
                        RedisLedger::new(url, "floor:", None).unwrap_or_else(|e| panic!("{e}")),
                    )),
                };
                let service = tower::service_fn(move |request: Request<Incoming>| {
                    let answer = forward(pool.clone(), ledger.clone(), request);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                serve(listener, None, service, forever, limits).await
            }
            _ => usage(),
        }
    });
}
