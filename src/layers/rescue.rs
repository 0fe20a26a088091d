//! The rescue step: the one place where a `ProxyError` from any inner layer becomes its
//! ROMA-shaped response, stamped with the request id.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

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
        let response = self.inner.call(request);
        Box::pin(async move {
            Ok(match response.await {
                Ok(response) => response,
                Err(error) => {
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
