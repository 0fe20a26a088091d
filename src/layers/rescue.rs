//! The rescue step: the one place where a `ProxyError` (or a panic) from any inner layer becomes
//! its ROMA-shaped response, stamped with the request id.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use http::{header, Request, Response, Version};
use tower::{Layer, Service};

use super::access_log::{AccessNote, Outcome};
use super::request_id::request_id_of;
use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::route::RouteMatch;

#[derive(Debug, Clone, Copy, Default)]
pub struct RescueLayer;

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;
    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Rescue<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Rescue<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let request_id = request_id_of(&request);
        // Any refusal on the archive route is an outcome of its own in the access log.
        let archive_note = match request.extensions().get::<RouteMatch>() {
            Some(RouteMatch::Archive(key)) => Some(Some(key.as_str().to_string())),
            Some(RouteMatch::Reject(_)) => Some(None),
            _ => None,
        }
        .and_then(|key| Some((request.extensions().get::<Arc<AccessNote>>()?.clone(), key)));
        // An early answer leaves an unread request body on the connection: HTTP/1 clients are
        // told to close rather than have the body parsed as the next request.
        let close = request.version() <= Version::HTTP_11 && has_body(&request);
        // A bug must cost one request a 500, never the connection or the process.
        let inner = &mut self.inner;
        let response = match std::panic::catch_unwind(AssertUnwindSafe(|| inner.call(request))) {
            Ok(response) => AssertUnwindSafe(response).catch_unwind(),
            Err(_) => {
                tracing::error!("request handler panicked");
                let response = ProxyError::Internal.into_response(&request_id, close);
                return Box::pin(std::future::ready(Ok(response)));
            }
        };
        Box::pin(async move {
            Ok(match response.await {
                Ok(Ok(response)) => response,
                Err(_) => {
                    tracing::error!("request handler panicked");
                    ProxyError::Internal.into_response(&request_id, close)
                }
                Ok(Err(error)) => {
                    if let Some((note, key)) = archive_note {
                        if let Some(key) = key {
                            note.set_archive(&key);
                        }
                        if note.outcome().is_none() {
                            note.set_outcome(Outcome::Rejected);
                        }
                    }
                    if error.status().is_server_error() {
                        tracing::warn!(error = %error, "request failed");
                    }
                    error.into_response(&request_id, close)
                }
            })
        })
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

    async fn answer<S>(service: S) -> (http::StatusCode, serde_json::Value)
    where
        S: Service<Request<()>, Response = Response<ProxyBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        let mut request = Request::new(());
        request
            .extensions_mut()
            .insert(tower_http::request_id::RequestId::new(
                http::HeaderValue::from_static("panic-1"),
            ));
        let response = RescueLayer.layer(service).oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn panics_become_a_500_with_the_request_id() {
        let in_future = tower::service_fn(|_: Request<()>| async {
            if true {
                panic!("bug while handling");
            }
            Ok::<Response<ProxyBody>, ProxyError>(Response::new(crate::body::full("")))
        });
        let (status, body) = answer(in_future).await;
        assert_eq!(status, http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error_code"], "APIC.0000");
        assert_eq!(body["request_id"], "panic-1");

        let in_call = tower::service_fn(
            |_: Request<()>| -> std::future::Ready<Result<Response<ProxyBody>, ProxyError>> {
                panic!("bug before the future")
            },
        );
        let (status, body) = answer(in_call).await;
        assert_eq!(status, http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["request_id"], "panic-1");
    }
}
