//! The one place where the order of the request layers is decided, and why.
//! Built once per listener; every connection clones it (shared state lives behind `Arc`).

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder};

use crate::body::ProxyBody;
use crate::layers::access_log::AccessNote;
use crate::layers::auth::{AuthLayer, SharedAuthenticator};
use crate::layers::edge::EdgeLayer;
use crate::layers::once::{OnceLayer, OncePolicy};
use crate::layers::rate_limit::{RateLimitLayer, SharedRateLimits};
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
        // Outermost, so it sees everything: it marks the token sensitive before anything can log
        // it, gives the request its id, and turns every refusal and panic below into a ROMA
        // response carrying that id; the access log sees the final status and body size.
        .layer(EdgeLayer::new(parts.trust_incoming_id))
        // Classify the path once: auth needs the project, the once layer the key, the access log
        // the key and whether this is the archive route.
        .map_request(move |request: Request<Incoming>| {
            if let Some(note) = request.extensions().get::<Arc<AccessNote>>() {
                note.set_route(route.classify(request.uri().path(), fold_case));
            }
            request
        })
        // Cheapest refusal first, and before auth so bad tokens cannot be tried at full speed.
        .layer(RateLimitLayer::new(parts.rate_limits))
        // An unauthenticated request never touches the ledger.
        .layer(AuthLayer::new(parts.authenticator))
        .layer(OnceLayer::new(parts.once))
        .service(parts.upstream)
}
