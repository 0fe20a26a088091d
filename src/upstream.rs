//! The forwarder: a pooled HTTP/1.1 client to the upstream, header hygiene of RFC 9110 §7.6.1,
//! and the mapping of upstream failures to 502 / 504.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use tower_http::timeout::TimeoutBody;

use crate::body::ProxyBody;
use crate::config::UpstreamConfig;
use crate::error::ProxyError;
use crate::layers::request_id::X_REQUEST_ID;
use crate::net::{ip_text, ConnInfo};
use crate::pool::{describe, Pool, PoolError};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

/// A client's request body on its way upstream, cut at `server.max_request_body`.
type RequestBody = Limited<Incoming>;

struct Inner {
    client: Pool<RequestBody>,
    /// `oncegate_upstream_response_seconds`, looked up once.
    response_seconds: metrics::Histogram,
    max_request_body: u64,
    host: HeaderValue,
    path_prefix: String,
    response_timeout: Duration,
    body_idle_timeout: Duration,
    preserve_host: bool,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, max_request_body: u64) -> Result<Upstream, String> {
        let client = Pool::new(
            &config.scheme,
            &config.authority,
            config.connect_timeout,
            config.ca_file.as_deref(),
        )?;
        let host = HeaderValue::from_str(config.authority.as_str()).map_err(|e| e.to_string())?;
        Ok(Upstream {
            inner: Arc::new(Inner {
                client,
                response_seconds: metrics::histogram!("oncegate_upstream_response_seconds"),
                max_request_body,
                host,
                path_prefix: config.path_prefix.clone(),
                response_timeout: config.response_timeout,
                body_idle_timeout: config.body_idle_timeout,
                preserve_host: config.preserve_host,
            }),
        })
    }

    /// Sends the request upstream and returns its response with a streamed body. Errors before
    /// the response headers become 502 (unreachable, broken) or 504 (no answer in time).
    pub fn forward(
        &self,
        request: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'static {
        // Prepared before the first await, so the future keeps one copy of the request.
        let prepared = self.prepare(request);
        let inner = self.inner.clone();
        async move {
            let request = prepared?;
            let started = Instant::now();
            let sent = inner.client.request(request);
            let result = tokio::time::timeout(inner.response_timeout, sent).await;
            inner
                .response_seconds
                .record(started.elapsed().as_secs_f64());
            let response = match result {
                Err(_) => return Err(ProxyError::UpstreamTimeout),
                Ok(Err(e)) if is_body_limit(&e) => {
                    return Err(ProxyError::PayloadTooLarge(inner.max_request_body))
                }
                Ok(Err(e)) => return Err(ProxyError::UpstreamUnreachable(describe(&e))),
                Ok(Ok(response)) => response,
            };
            let (mut parts, body) = response.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            // The client gets this request's id (set at the edge), never the upstream's.
            parts.headers.remove(X_REQUEST_ID);
            // A body that stops flowing for this long counts as a dead upstream (the header
            // timeout is for the headers only: a slow archive may pause).
            let body = TimeoutBody::new(inner.body_idle_timeout, body)
                .map_err(Into::into)
                .boxed_unsync();
            Ok(Response::from_parts(parts, body))
        }
    }

    /// The request as it goes upstream: body cut at `server.max_request_body`, origin-form
    /// target, hop-by-hop headers out, `Host` and `X-Forwarded-*` set.
    fn prepare(&self, request: Request<Incoming>) -> Result<Request<RequestBody>, ProxyError> {
        let inner = &self.inner;
        let conn = request.extensions().get::<ConnInfo>().copied();
        let limit = inner.max_request_body;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit) {
            return Err(ProxyError::PayloadTooLarge(limit));
        }
        let (mut parts, body) = request.into_parts();
        let body = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
        // HTTP/2 clients send the host as :authority only.
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            let authority = parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        parts.uri = self.upstream_uri(&parts.uri)?;
        parts.version = Version::HTTP_11;
        remove_hop_by_hop(&mut parts.headers);
        let host = match (inner.preserve_host, original_host) {
            (true, Some(host)) => host,
            _ => inner.host.clone(),
        };
        parts.headers.insert(header::HOST, host);
        if let Some(conn) = conn {
            append_forwarded_for(&mut parts.headers, conn.peer);
            let proto = if conn.tls { "https" } else { "http" };
            parts
                .headers
                .insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        Ok(Request::from_parts(parts, body))
    }

    /// The request target upstream: origin-form, the path behind `upstream.path_prefix`.
    fn upstream_uri(&self, incoming: &Uri) -> Result<Uri, ProxyError> {
        let prefix = &self.inner.path_prefix;
        if prefix.is_empty() && incoming.scheme().is_none() && incoming.authority().is_none() {
            return Ok(incoming.clone());
        }
        let path_and_query = incoming.path_and_query().map_or("/", PathAndQuery::as_str);
        let path_and_query = if prefix.is_empty() {
            PathAndQuery::try_from(path_and_query)
        } else {
            PathAndQuery::try_from(format!("{prefix}{path_and_query}"))
        }
        .map_err(|_| ProxyError::Internal)?;
        Ok(Uri::from(path_and_query))
    }
}

impl tower::Service<Request<Incoming>> for Upstream {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = futures_util::future::BoxFuture<'static, Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        // The pool queues requests itself.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        Box::pin(self.forward(request))
    }
}

/// Whether sending failed because the client's body went past `server.max_request_body`.
fn is_body_limit(error: &PoolError) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<LengthLimitError>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): `Connection`, every header it names, and the fixed list.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none, and most responses only `Connection: keep-alive`: look before
    // removing, and make a name only for a header that is there.
    if !headers.keys().any(is_fixed_hop_by_hop) {
        return;
    }
    let connection = headers.get_all(header::CONNECTION);
    // The usual `Connection: keep-alive` (or `close`) names nothing to look for.
    if connection.iter().all(|value| {
        let value = value.as_bytes();
        value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
    }) {
        remove_fixed_hop_by_hop(headers);
        return;
    }
    let named: Vec<HeaderName> = connection
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        // `keep-alive` and `close`, the usual tokens, need no lookup: the first goes below anyway.
        .filter(|token| !names_fixed_hop_by_hop(token) && !token.eq_ignore_ascii_case("close"))
        .filter(|name| headers.contains_key(*name))
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    remove_fixed_hop_by_hop(headers);
}

fn remove_fixed_hop_by_hop(headers: &mut HeaderMap) {
    while let Some(name) = headers
        .keys()
        .find(|name| is_fixed_hop_by_hop(name))
        .cloned()
    {
        headers.remove(name);
    }
}

/// The names RFC 9110 §7.6.1 and common practice make hop-by-hop whatever `Connection` says.
static FIXED_HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Compared as names, not as text: a standard name's text is looked up in a table each time.
fn is_fixed_hop_by_hop(name: &HeaderName) -> bool {
    FIXED_HOP_BY_HOP.contains(name)
}

/// Whether a `Connection` token (case-insensitive) is one of [`FIXED_HOP_BY_HOP`].
fn names_fixed_hop_by_hop(token: &str) -> bool {
    FIXED_HOP_BY_HOP
        .iter()
        .any(|name| token.eq_ignore_ascii_case(name.as_str()))
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let peer = ip_text(peer.ip());
    let value = match headers.entry(X_FORWARDED_FOR) {
        header::Entry::Vacant(entry) => {
            if let Ok(value) = HeaderValue::try_from(peer) {
                entry.insert(value);
            }
            return;
        }
        header::Entry::Occupied(entry) => {
            let mut earlier: Vec<&str> = entry.iter().filter_map(|v| v.to_str().ok()).collect();
            earlier.push(&peer);
            earlier.join(", ")
        }
    };
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::TRAILER, HeaderValue::from_static("x"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn the_usual_connection_tokens_go_with_their_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive, CLOSE, x-absent, X-Named"),
        );
        headers.insert("x-named", HeaderValue::from_static("1"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("42"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::CONTENT_LENGTH));

        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut headers = HeaderMap::new();
        append_forwarded_for(&mut headers, "10.0.0.1:5".parse().unwrap());
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1");
        headers.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        append_forwarded_for(&mut headers, "[::1]:5".parse().unwrap());
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 1.1.1.1, ::1");
    }
}
