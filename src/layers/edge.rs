//! The edge of the request stack: what every request gets on the way in (token marked sensitive,
//! request id, access note) and out (its ROMA answer for any refusal or panic, id, access log).
//!
//! One layer instead of five (tower-http's sensitive-headers, request-id and catch-panic layers,
//! the access log and the rescue step): each boxed its own future or response body, which cost
//! about a quarter of the CPU of a refused request.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use http::header;
use http::{Request, Response, Version};
use tower::{Layer, Service};
use tracing::Instrument;

use super::access_log::{AccessNote, Entry, Outcome, Unanswered};
use super::auth::X_AUTH_TOKEN;
use super::request_id::{accept_or_make_request_id, X_REQUEST_ID};
use crate::body::ProxyBody;
use crate::error::ProxyError;

#[derive(Debug, Clone, Copy)]
pub struct EdgeLayer {
    /// Keep a client's well-formed `X-Request-Id` (SPEC §6 `trace.trust_incoming`).
    trust_incoming_id: bool,
}

impl EdgeLayer {
    pub fn new(trust_incoming_id: bool) -> EdgeLayer {
        EdgeLayer { trust_incoming_id }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;
    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            trust_incoming_id: self.trust_incoming_id,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
    trust_incoming_id: bool,
}

impl<S, B> Service<Request<B>> for Edge<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner layers refuse per request, never as a whole.
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // Before anything can log a header: the token is shown as "Sensitive" if ever printed.
        if let header::Entry::Occupied(mut tokens) = request.headers_mut().entry(X_AUTH_TOKEN) {
            tokens
                .iter_mut()
                .for_each(|token| token.set_sensitive(true));
        }
        let request_id = accept_or_make_request_id(request.headers_mut(), self.trust_incoming_id);
        let note = Arc::new(AccessNote::new(request_id));
        request.extensions_mut().insert(note.clone());
        let span = tracing::info_span!("request", request_id = %note.request_id());
        let unanswered = Unanswered::new(Entry::new(&request, note.clone(), span.clone()));
        // An early answer leaves an unread request body on the connection: HTTP/1 clients are
        // told to close rather than have the body parsed as the next request.
        let close = request.version() <= Version::HTTP_11 && has_body(&request);
        // A bug must cost one request a 500, never the connection or the process.
        let inner = &mut self.inner;
        // In the request's span, so what the inner layers log (or keep, like a claim) before
        // their futures run carries the request id too.
        let response = span
            .in_scope(|| std::panic::catch_unwind(AssertUnwindSafe(|| inner.call(request))))
            .map(|response| AssertUnwindSafe(response).catch_unwind());
        // When hyper drops the block below (the client left), the inner future must go before
        // the event is written, so the event sees the outcome it leaves (a released claim, say).
        // Never polled, the block drops this pair, whose fields drop in order. Polled, the inner
        // future is a binding of the match below, a scope inside `unanswered`'s, so it goes
        // first. A test checks both cases.
        let captured = (response, unanswered);
        Box::pin(
            async move {
                let (response, unanswered) = captured;
                let outcome = match response {
                    Ok(response) => response.await,
                    Err(panic) => Err(panic),
                };
                let mut response = match outcome {
                    Ok(Ok(response)) => response,
                    Ok(Err(error)) => {
                        // Any refusal on the archive route is an outcome of its own in the log.
                        if note.on_archive_route() && note.outcome().is_none() {
                            note.set_outcome(Outcome::Rejected);
                        }
                        if error.status().is_server_error() {
                            tracing::warn!(error = %error, "request failed");
                        }
                        error.into_response(note.request_id(), close)
                    }
                    Err(_) => {
                        tracing::error!("request handler panicked");
                        ProxyError::Internal.into_response(note.request_id(), close)
                    }
                };
                // The client gets this request's id, never one the upstream chose.
                response
                    .headers_mut()
                    .insert(X_REQUEST_ID, note.request_id_header().clone());
                Ok(unanswered.answer(response))
            }
            .instrument(span),
        )
    }
}

fn has_body<B>(request: &Request<B>) -> bool {
    let headers = request.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// The edge's answer (status, `X-Request-Id`, JSON body) to `request`, given `service`.
    async fn answer<S>(
        trust_incoming_id: bool,
        request: Request<()>,
        service: S,
    ) -> (http::StatusCode, String, serde_json::Value)
    where
        S: Service<Request<()>, Response = Response<ProxyBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        let response = EdgeLayer::new(trust_incoming_id)
            .layer(service)
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let id = response.headers()[X_REQUEST_ID]
            .to_str()
            .unwrap()
            .to_string();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, id, serde_json::from_slice(&body).unwrap())
    }

    fn with_id() -> Request<()> {
        Request::builder()
            .header(X_REQUEST_ID, "panic-1")
            .body(())
            .unwrap()
    }

    /// Sets the request's outcome when dropped.
    struct DecidesOnDrop(Arc<AccessNote>);

    impl Drop for DecidesOnDrop {
        fn drop(&mut self) {
            self.0.set_outcome(Outcome::Served);
        }
    }

    /// What a tracing subscriber writes, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl tracing_subscriber::fmt::MakeWriter<'_> for Captured {
        type Writer = Captured;
        fn make_writer(&self) -> Captured {
            self.clone()
        }
    }

    #[test]
    fn a_request_dropped_unanswered_is_logged_after_its_inner_future_is_gone() {
        for poll_first in [true, false] {
            let captured = Captured::default();
            let subscriber = tracing_subscriber::fmt()
                .json()
                .with_writer(captured.clone())
                .finish();
            let _logging = tracing::subscriber::set_default(subscriber);
            let never_answers = tower::service_fn(|request: Request<()>| {
                let note = request
                    .extensions()
                    .get::<Arc<AccessNote>>()
                    .unwrap()
                    .clone();
                let route = crate::route::RouteTemplate::parse(crate::config::DEFAULT_ROUTE);
                note.set_route(
                    route
                        .unwrap()
                        .classify("/v2/p/instances/i/assets/archives/a1", true),
                );
                let decides = DecidesOnDrop(note);
                async move {
                    let _decides = decides;
                    std::future::pending::<Result<Response<ProxyBody>, ProxyError>>().await
                }
            });
            let mut future = EdgeLayer::new(true).layer(never_answers).call(with_id());
            if poll_first {
                let waker = futures_util::task::noop_waker();
                assert!(future
                    .as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending());
            }
            drop(future); // as hyper does when the client hangs up
            let written = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
            let event: serde_json::Value = written
                .lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .find(|event: &serde_json::Value| event["target"] == "oncegate::access")
                .unwrap_or_else(|| panic!("no access event: {written}"));
            assert_eq!(event["fields"]["status"], 499, "{event}");
            assert_eq!(
                event["fields"]["outcome"], "served",
                "polled first: {poll_first}: {event}"
            );
        }
    }

    #[tokio::test]
    async fn panics_become_a_500_with_the_request_id() {
        let in_future = tower::service_fn(|_: Request<()>| async {
            if true {
                panic!("bug while handling");
            }
            Ok::<Response<ProxyBody>, ProxyError>(Response::new(crate::body::full("")))
        });
        let (status, id, body) = answer(true, with_id(), in_future).await;
        assert_eq!(status, http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error_code"], "APIC.0000");
        assert_eq!(body["request_id"], "panic-1");
        assert_eq!(id, "panic-1");

        let in_call = tower::service_fn(
            |_: Request<()>| -> std::future::Ready<Result<Response<ProxyBody>, ProxyError>> {
                panic!("bug before the future")
            },
        );
        let (status, _, body) = answer(true, with_id(), in_call).await;
        assert_eq!(status, http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["request_id"], "panic-1");
    }

    #[tokio::test]
    async fn refusals_get_their_roma_body_and_the_token_is_hidden_from_inner_layers() {
        let refuse = tower::service_fn(|request: Request<()>| async move {
            assert!(request.headers()[X_AUTH_TOKEN].is_sensitive());
            assert!(request.extensions().get::<Arc<AccessNote>>().is_some());
            Err::<Response<ProxyBody>, ProxyError>(ProxyError::AlreadyDownloaded)
        });
        let request = Request::builder()
            .header(X_AUTH_TOKEN, "secret")
            .body(())
            .unwrap();
        let (status, id, body) = answer(false, request, refuse).await;
        assert_eq!(status, http::StatusCode::FORBIDDEN);
        assert_eq!(id.len(), 32);
        assert_eq!(body["error_code"], "ROMA.00000101");
        assert_eq!(body["request_id"], id.as_str());
    }
}
