//! The HTTP/1.1 connection pool for one origin (the upstream, or IAM): connections made with
//! hyper's `client::conn`, kept idle last-in first-out, handed back when a response body ends.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tower::ServiceExt;

use crate::body::BoxError;

/// Idle connections kept at most; more are closed when their response ends.
const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed instead of reused (servers drop them anyway).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect to {0}: {1}")]
    Connect(Authority, #[source] BoxError),
    #[error("connect to {0}: timed out")]
    ConnectTimeout(Authority),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// Every source and cause of an error on one line.
pub fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Plain TCP for `http`; TLS (web PKI roots plus `ca_file`) for `https`.
#[derive(Clone)]
enum Connector {
    Http(HttpConnector),
    Https(HttpsConnector<HttpConnector>),
}

struct Idle<B> {
    sender: http1::SendRequest<B>,
    since: Instant,
}

struct Shared<B> {
    connector: Connector,
    /// `scheme://authority`, what connections are made to.
    origin: Uri,
    authority: Authority,
    host: HeaderValue,
    connect_timeout: Duration,
    /// Newest at the back: reuse the warmest connection, let the oldest time out.
    idle: Mutex<VecDeque<Idle<B>>>,
}

/// The new connection and its response, after a retry.
type RetryResult<B> = Result<(http1::SendRequest<B>, Response<Incoming>), PoolError>;

pub struct Pool<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Pool {
            shared: self.shared.clone(),
        }
    }
}

impl<B> Pool<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// `ca_file` adds a trusted CA (from `upstream.ca_file`) to the web PKI roots for https.
    pub fn new(
        scheme: &Scheme,
        authority: &Authority,
        connect_timeout: Duration,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Pool<B>, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let connector = if *scheme == Scheme::HTTPS {
            Connector::Https(
                hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls_client_config(ca_file)?)
                    .https_only()
                    .enable_http1()
                    .wrap_connector(http),
            )
        } else {
            Connector::Http(http)
        };
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Pool {
            shared: Arc::new(Shared {
                connector,
                origin,
                authority: authority.clone(),
                host: HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?,
                connect_timeout,
                idle: Mutex::new(VecDeque::new()),
            }),
        })
    }

    /// Sends `request` (its path and query; the origin is the pool's) on an idle connection or
    /// a new one. A reused connection that turns out closed before the request was written is
    /// replaced by a new one once; nothing is ever sent twice.
    pub fn request(
        &self,
        mut request: Request<B>,
    ) -> impl Future<Output = Result<Response<PooledBody<B>>, PoolError>> + Send + '_ {
        // Prepared before the first await, so the future keeps one copy of the request.
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
        request
            .headers_mut()
            .entry(header::HOST)
            .or_insert_with(|| self.shared.host.clone());
        self.send(request)
    }

    /// An `async` block rather than an `async fn`: an async fn keeps a second slot for each
    /// argument, and the request is the largest part of this future.
    #[allow(clippy::manual_async_fn)]
    fn send(
        &self,
        request: Request<B>,
    ) -> impl Future<Output = Result<Response<PooledBody<B>>, PoolError>> + Send + '_ {
        async move {
            let (mut sender, reused) = match self.checkout().await {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            let response = match sender.try_send_request(request).await {
                Ok(response) => response,
                Err(failed) => {
                    let (retried, response) = self.retry(failed, reused).await?;
                    sender = retried;
                    response
                }
            };
            Ok(response.map(|body| PooledBody {
                body,
                lease: Some((sender, self.shared.clone())),
            }))
        }
    }

    /// A request a reused connection never sent goes out once more on a new connection. Boxed:
    /// taken rarely, and inline it would make every request's future as large.
    fn retry(
        &self,
        mut failed: hyper::client::conn::TrySendError<Request<B>>,
        reused: bool,
    ) -> Pin<Box<dyn Future<Output = RetryResult<B>> + Send + '_>> {
        Box::pin(async move {
            match failed.take_message() {
                Some(request) if reused => {
                    let mut sender = self.connect().await?;
                    let response = sender.send_request(request).await?;
                    Ok((sender, response))
                }
                _ => Err(failed.into_error().into()),
            }
        })
    }

    /// The newest idle connection that is still open and ready for a request.
    async fn checkout(&self) -> Option<http1::SendRequest<B>> {
        loop {
            let idle = self.shared.idle.lock().ok()?.pop_back()?;
            if idle.since.elapsed() >= IDLE_TIMEOUT || idle.sender.is_closed() {
                continue;
            }
            let mut sender = idle.sender;
            // Returned right at the end of a body, the connection may need a moment to be idle.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Boxed: connecting (TLS included) is a large future, and inline it would make every
    /// request's future as large, copied per request though connections are mostly reused.
    fn connect(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<http1::SendRequest<B>, PoolError>> + Send + '_>> {
        Box::pin(self.connect_now())
    }

    async fn connect_now(&self) -> Result<http1::SendRequest<B>, PoolError> {
        let shared = &self.shared;
        let connect = async {
            let connect_error = |e: BoxError| PoolError::Connect(shared.authority.clone(), e);
            let origin = shared.origin.clone();
            match shared.connector.clone() {
                Connector::Http(http) => {
                    let io = http
                        .oneshot(origin)
                        .await
                        .map_err(|e| connect_error(e.into()))?;
                    handshake(io).await
                }
                Connector::Https(https) => {
                    let io = https.oneshot(origin).await.map_err(connect_error)?;
                    handshake(io).await
                }
            }
        };
        tokio::time::timeout(shared.connect_timeout, connect)
            .await
            .map_err(|_| PoolError::ConnectTimeout(shared.authority.clone()))?
    }
}

/// Starts HTTP/1.1 on a fresh stream; the connection is driven by its own task until both the
/// pool and the last response body let go of it.
async fn handshake<IO, B>(io: IO) -> Result<http1::SendRequest<B>, PoolError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (sender, connection) = http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// A response body that gives its connection back to the pool once it has ended; dropped
/// earlier, the connection is closed (what is left of the body would be in its way).
pub struct PooledBody<B> {
    body: Incoming,
    lease: Option<(http1::SendRequest<B>, Arc<Shared<B>>)>,
}

impl<B> std::fmt::Debug for PooledBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("pooled", &self.lease.is_some())
            .finish()
    }
}

impl<B> PooledBody<B> {
    fn give_back(&mut self) {
        let Some((sender, shared)) = self.lease.take() else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        let Ok(mut idle) = shared.idle.lock() else {
            return;
        };
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle {
                sender,
                since: Instant::now(),
            });
        }
        while idle
            .front()
            .is_some_and(|oldest| oldest.since.elapsed() >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
    }
}

impl<B> Drop for PooledBody<B> {
    fn drop(&mut self) {
        // Bodies known to be empty (a 204, a `Content-Length: 0`) are never polled.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

impl<B> Body for PooledBody<B> {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.give_back(),
            // A broken body: the connection is not reused.
            Poll::Ready(Some(Err(_))) => self.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn tls_client_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "upstream.ca_file {}: no certificate found",
                path.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A loopback HTTP/1.1 server written byte by byte: each connection answers requests with
    /// `body` until it has answered `per_connection` of them, then closes without a word (a
    /// keep-alive timeout as a client sees it). Counts connections.
    async fn upstream(body: &'static [u8], per_connection: usize) -> (Authority, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = Authority::try_from(listener.local_addr().unwrap().to_string()).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    for _ in 0..per_connection {
                        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buffer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                        buffer.drain(..end + 4);
                        let head =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                        if stream.write_all(head.as_bytes()).await.is_err()
                            || stream.write_all(body).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        (authority, connections)
    }

    fn pool(authority: &Authority) -> Pool<Empty<Bytes>> {
        Pool::new(&Scheme::HTTP, authority, Duration::from_secs(2), None).unwrap()
    }

    async fn get(pool: &Pool<Empty<Bytes>>, path: &str) -> Bytes {
        let request = Request::get(path).body(Empty::new()).unwrap();
        let response = pool.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn one_connection_serves_requests_one_after_another() {
        let (authority, connections) = upstream(b"hello", usize::MAX).await;
        let pool = pool(&authority);
        for _ in 0..20 {
            assert_eq!(get(&pool, "/a").await, "hello");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_replaced() {
        let (authority, connections) = upstream(b"hello", 1).await;
        let pool = pool(&authority);
        for round in 0..10 {
            assert_eq!(get(&pool, "/a").await, "hello", "round {round}");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 10);
    }

    #[tokio::test]
    async fn a_body_dropped_half_way_closes_its_connection() {
        static BIG: [u8; 1 << 20] = [b'x'; 1 << 20];
        let (authority, connections) = upstream(&BIG, usize::MAX).await;
        let pool = pool(&authority);
        let request = Request::get("/big").body(Empty::new()).unwrap();
        let mut body = pool.request(request).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        // The next request must not read the rest of the first body as its answer.
        assert_eq!(get(&pool, "/big").await.len(), BIG.len());
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        assert_eq!(get(&pool, "/big").await.len(), BIG.len());
        assert_eq!(
            connections.load(Ordering::SeqCst),
            2,
            "a whole body returns it"
        );
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_a_connection_and_all_come_back() {
        let (authority, connections) = upstream(b"hello", usize::MAX).await;
        let pool = pool(&authority);
        let burst = || {
            let requests: Vec<_> = (0..8)
                .map(|_| {
                    let pool = pool.clone();
                    tokio::spawn(async move { get(&pool, "/a").await })
                })
                .collect();
            async move {
                for request in requests {
                    assert_eq!(request.await.unwrap(), "hello");
                }
            }
        };
        burst().await;
        let opened = connections.load(Ordering::SeqCst);
        assert!((1..=8).contains(&opened));
        burst().await;
        burst().await;
        assert!(connections.load(Ordering::SeqCst) <= 8);
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_naming_the_origin() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority = Authority::try_from(listener.local_addr().unwrap().to_string()).unwrap();
        drop(listener);
        let request = Request::get("/a").body(Empty::new()).unwrap();
        let error = pool(&authority).request(request).await.unwrap_err();
        assert!(
            describe(&error).contains(authority.as_str()),
            "{}",
            describe(&error)
        );
    }
}
