//! The one place where the order of the request layers is decided, and why.
//! Built once per listener; every connection clones it (shared state lives behind `Arc`).

use std::convert::Infallible;
use std::sync::Arc;

use http::header::HeaderName;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::body::{BoxError, ProxyBody};
use crate::error::ProxyError;
use crate::layers::access_log::AccessLogLayer;
use crate::layers::auth::{AuthLayer, SharedAuthenticator, X_AUTH_TOKEN};
use crate::layers::once::{OnceLayer, OncePolicy};
use crate::layers::rate_limit::{RateLimitLayer, SharedRateLimits};
use crate::layers::request_id::{drop_unacceptable_id, HexRequestId};
use crate::layers::rescue::RescueLayer;
use crate::route::RouteTemplate;
use crate::upstream::Upstream;

/// Everything the request layers share.
pub struct StackParts {
    pub trust_incoming_id: bool,
    pub rate_limits: SharedRateLimits,
    pub route: RouteTemplate,
    pub fold_case: bool,
    pub authenticator: SharedAuthenticator,
    pub once: Arc<OncePolicy>,
    pub upstream: Upstream,
}

pub fn build(
    parts: StackParts,
) -> impl Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible, Future: Send>
       + Clone
       + Send
       + 'static {
    let route = Arc::new(parts.route);
    let fold_case = parts.fold_case;
    ServiceBuilder::new()
        // Before anything can log a header: the token is shown as "Sensitive" if ever printed.
        .layer(SetSensitiveRequestHeadersLayer::new([
            HeaderName::from_static(X_AUTH_TOKEN),
        ]))
        // The id exists before the access log and every error, and goes back on every response.
        .map_request(drop_unacceptable_id::<Incoming>(parts.trust_incoming_id))
        .layer(SetRequestIdLayer::x_request_id(HexRequestId))
        .layer(PropagateRequestIdLayer::x_request_id())
        // Sees the final status of everything below, synthesized errors included.
        .layer(AccessLogLayer)
        // tower-http wraps the body in its own box type; turn it back into ours.
        .map_response(
            |response: Response<tower_http::body::UnsyncBoxBody<Bytes, BoxError>>| {
                response.map(BodyExt::boxed_unsync)
            },
        )
        .layer(CatchPanicLayer::custom(panic_response))
        // Classify the path once: auth needs the project, the once layer the key, the rescue step
        // and the access log whether this is the archive route.
        .map_request(move |mut request: Request<Incoming>| {
            let matched = route.classify(request.uri().path(), fold_case);
            request.extensions_mut().insert(matched);
            request
        })
        // Below this line layers fail with ProxyError; this turns them into ROMA responses.
        .layer(RescueLayer)
        // Cheapest refusal first, and before auth so bad tokens cannot be tried at full speed.
        .layer(RateLimitLayer::new(parts.rate_limits))
        // An unauthenticated request never touches the ledger.
        .layer(AuthLayer::new(parts.authenticator))
        .layer(OnceLayer::new(parts.once))
        .service(parts.upstream)
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response<ProxyBody> {
    tracing::error!("request handler panicked");
    let mut response = ProxyError::Internal.into_response("-", true);
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
}
