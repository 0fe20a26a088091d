//! Listeners: accept loop, optional TLS, HTTP/1.1 + HTTP/2 via hyper's auto builder, and a
//! graceful shutdown that lets running downloads finish for at most the grace period.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::future::Either;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

use crate::body::ProxyBody;
use crate::net::ConnInfo;

/// The largest request header block accepted over HTTP/2 (HTTP/1 allows about 400 KiB).
const MAX_HEADER_LIST: u32 = 256 * 1024;
/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("server.tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls_cert {}: no certificate found",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("server.tls_key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("server.tls_cert/tls_key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Calls `service` while hyper still holds the connection, rather than on the future's first
/// poll. The request's headers share hyper's read buffer: a refusal drops them here, before hyper
/// next reads the connection (to notice a client that hangs up), so it reuses that buffer instead
/// of allocating a new one. The stack is always ready (its layers refuse per request); should it
/// ever not be, the call waits for readiness as usual.
fn call_now<S, R>(mut service: S, request: R) -> Either<S::Future, Oneshot<S, R>>
where
    S: Service<R>,
{
    match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(())) => Either::Left(service.call(request)),
        // Polled again with the connection's waker, which then learns of readiness or the error.
        Poll::Ready(Err(_)) | Poll::Pending => Either::Right(service.oneshot(request)),
    }
}

pub async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{key} {addr}: cannot listen: {e}"))
}

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// For a request's headers, and for an idle keep-alive connection's next request.
    pub header_read_timeout: Duration,
    /// Connections served at once; further ones wait in the kernel's listen backlog.
    pub max_connections: usize,
    /// How long running requests may finish after `shutdown`.
    pub grace: Duration,
}

/// Serves connections until `shutdown` resolves, then waits up to `limits.grace` for open ones.
pub async fn serve<S>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // Tokens may be 100000 characters (SPEC §1): HTTP/2's default 16 KiB header list is too small.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_LIST);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        // At the limit nothing is accepted: new clients wait in the backlog, not in memory.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = ConnInfo {
            peer,
            tls: tls.is_some(),
        };
        let service = service.clone();
        let hyper_service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(conn);
            call_now(service.clone(), request)
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let result = match tls {
                None => {
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(stream), hyper_service))
                        .await
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(stream)) => stream,
                            _ => return,
                        };
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(stream), hyper_service))
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.grace) => tracing::warn!("shutdown grace period over; closing remaining connections"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts its calls; not ready until polled `busy_polls` times.
    #[derive(Clone)]
    struct Counting {
        calls: Arc<AtomicUsize>,
        busy_polls: Arc<AtomicUsize>,
    }

    impl Service<&'static str> for Counting {
        type Response = &'static str;
        type Error = Infallible;
        type Future = std::future::Ready<Result<&'static str, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.busy_polls.load(Ordering::SeqCst) == 0 {
                return Poll::Ready(Ok(()));
            }
            self.busy_polls.fetch_sub(1, Ordering::SeqCst);
            cx.waker().wake_by_ref();
            Poll::Pending
        }

        fn call(&mut self, request: &'static str) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(request))
        }
    }

    fn counting(busy_polls: usize) -> Counting {
        Counting {
            calls: Arc::default(),
            busy_polls: Arc::new(AtomicUsize::new(busy_polls)),
        }
    }

    #[tokio::test]
    async fn a_ready_stack_is_called_before_its_future_is_polled() {
        let service = counting(0);
        let answer = call_now(service.clone(), "request");
        assert_eq!(service.calls.load(Ordering::SeqCst), 1);
        assert_eq!(answer.await, Ok("request"));
    }

    #[tokio::test]
    async fn a_busy_stack_is_called_once_it_is_ready() {
        let service = counting(2);
        let answer = call_now(service.clone(), "request");
        assert_eq!(service.calls.load(Ordering::SeqCst), 0);
        assert_eq!(answer.await, Ok("request"));
        assert_eq!(service.calls.load(Ordering::SeqCst), 1);
        assert_eq!(service.busy_polls.load(Ordering::SeqCst), 0);
    }
}
