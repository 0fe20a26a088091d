//! One access-log event and the request metrics per request (SPEC §6), written when the response
//! body ends or is dropped (so `bytes` and `outcome` are final), from what the layers noted.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::{BoxError, ProxyBody};
use crate::route::RouteMatch;

/// What became of a request on the archive route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    Served = 1,
    RefusedServed,
    RefusedInFlight,
    Released,
    Rejected,
    /// Released because the upstream failed or answered non-2xx; logged as `released`.
    UpstreamError,
}

impl Outcome {
    /// The log field's value (SPEC §6).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Served => "served",
            Outcome::RefusedServed => "refused_served",
            Outcome::RefusedInFlight => "refused_in_flight",
            Outcome::Released | Outcome::UpstreamError => "released",
            Outcome::Rejected => "rejected",
        }
    }

    /// The `outcome` label of `oncegate_downloads_total`: finer than the log, it tells a broken
    /// transfer from an upstream failure.
    pub fn metric_label(self) -> &'static str {
        match self {
            Outcome::UpstreamError => "upstream_error",
            other => other.as_str(),
        }
    }

    /// In discriminant order, from 1.
    const ALL: [Outcome; 6] = [
        Outcome::Served,
        Outcome::RefusedServed,
        Outcome::RefusedInFlight,
        Outcome::Released,
        Outcome::Rejected,
        Outcome::UpstreamError,
    ];

    fn from_u8(value: u8) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| *o as u8 == value)
    }
}

/// One request's facts, shared by the layers and its log event: the request id (set at the
/// edge), how its path was classified, and the outcome (set by the layer that decides it).
#[derive(Debug)]
pub struct AccessNote {
    request_id: HeaderValue,
    route: OnceLock<RouteMatch>,
    outcome: AtomicU8,
}

impl AccessNote {
    pub fn new(request_id: HeaderValue) -> AccessNote {
        AccessNote {
            request_id,
            route: OnceLock::new(),
            outcome: AtomicU8::new(0),
        }
    }

    /// The id as text (always visible ASCII: checked or made at the edge).
    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or_default()
    }

    pub fn request_id_header(&self) -> &HeaderValue {
        &self.request_id
    }

    /// Set once, by the classification step.
    pub fn set_route(&self, matched: RouteMatch) {
        let _ = self.route.set(matched);
    }

    /// `None` until the path is classified.
    pub fn route(&self) -> Option<&RouteMatch> {
        self.route.get()
    }

    pub fn on_archive_route(&self) -> bool {
        matches!(
            self.route(),
            Some(RouteMatch::Archive(_) | RouteMatch::Reject(_))
        )
    }

    pub fn set_outcome(&self, outcome: Outcome) {
        self.outcome.store(outcome as u8, Ordering::Release);
    }

    pub fn outcome(&self) -> Option<Outcome> {
        Outcome::from_u8(self.outcome.load(Ordering::Acquire))
    }
}

/// The request's classified path, if the edge and the classification step ran.
pub fn route_of<B>(request: &Request<B>) -> Option<&RouteMatch> {
    request.extensions().get::<Arc<AccessNote>>()?.route()
}

impl Default for AccessNote {
    /// For a layer used without the edge (tests): an empty id.
    fn default() -> AccessNote {
        AccessNote::new(HeaderValue::from_static(""))
    }
}

/// What the log event needs from the request, taken when it arrives.
pub struct Entry {
    started: Instant,
    method: http::Method,
    /// A copy: a shared `Uri` would keep hyper's read buffer in use for the whole request, and
    /// hyper then allocates a new one for its next read on the connection.
    path: Box<str>,
    note: Arc<AccessNote>,
    span: tracing::Span,
}

impl Entry {
    pub fn new<B>(request: &Request<B>, note: Arc<AccessNote>, span: tracing::Span) -> Entry {
        Entry {
            started: Instant::now(),
            method: request.method().clone(),
            path: request.uri().path().into(),
            note,
            span,
        }
    }
}

/// The response body, counted; the log event and the request metrics go out when it ends or is
/// dropped.
pub struct LoggedBody {
    inner: ProxyBody,
    bytes: u64,
    status: u16,
    /// Taken when the event has been written.
    entry: Option<Entry>,
}

impl LoggedBody {
    pub fn wrap(response: Response<ProxyBody>, entry: Entry) -> Response<ProxyBody> {
        let status = response.status().as_u16();
        response.map(|inner| {
            LoggedBody {
                inner,
                bytes: 0,
                status,
                entry: Some(entry),
            }
            .boxed_unsync()
        })
    }

    fn finish(&mut self) {
        if let Some(entry) = self.entry.take() {
            log_event(entry, self.status, self.bytes);
        }
    }
}

/// A request's log event until its response exists (`Unanswered::answer`). hyper drops the future
/// of a request whose client hangs up before the answer; the event is then written on drop, with
/// status 499 (never sent; nginx's "client closed request"), so every request still has one.
pub struct Unanswered(Option<Entry>);

/// The status logged for a request whose client left before its response.
pub const CLIENT_CLOSED: u16 = 499;

impl Unanswered {
    pub fn new(entry: Entry) -> Unanswered {
        Unanswered(Some(entry))
    }

    pub fn answer(mut self, response: Response<ProxyBody>) -> Response<ProxyBody> {
        match self.0.take() {
            Some(entry) => LoggedBody::wrap(response, entry),
            None => response,
        }
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        // The outcome is whatever was decided before the client left (a claim released, a
        // record on its way), and none when nothing was (it left during authentication, say).
        if let Some(entry) = self.0.take() {
            log_event(entry, CLIENT_CLOSED, 0);
        }
    }
}

/// The access-log event and the request metrics of a finished request.
fn log_event(entry: Entry, status: u16, bytes: u64) {
    let duration = entry.started.elapsed();
    let duration_ms = duration.as_secs_f64() * 1000.0;
    // Both are set on the archive route only (archive: when the path gave a key).
    let archive = match entry.note.route() {
        Some(RouteMatch::Archive(key)) => Some(key.as_str()),
        _ => None,
    };
    let noted = entry.note.outcome();
    let outcome = noted.map(Outcome::as_str);
    let _enter = entry.span.enter();
    tracing::info!(
        target: "oncegate::access",
        request_id = entry.note.request_id(), method = %entry.method, path = %entry.path,
        status, duration_ms, bytes, archive, outcome,
        "request"
    );
    let handles = RequestMetrics::get();
    if let Some(noted) = noted {
        handles.downloads[noted as usize - 1].increment(1);
    }
    let archive_route = entry.note.on_archive_route();
    handles.duration[usize::from(archive_route)].record(duration.as_secs_f64());
    match KNOWN_STATUSES.iter().position(|known| *known == status) {
        Some(index) => handles.requests[usize::from(archive_route)][index].increment(1),
        None => {
            let route = if archive_route { "archive" } else { "other" };
            metrics::counter!("oncegate_requests_total", "route" => route, "status" => status.to_string())
                .increment(1);
        }
    }
}

/// The statuses the proxy itself answers with, and the usual upstream ones: their counters are
/// looked up once. Others go through the registry on each request.
const KNOWN_STATUSES: [u16; 19] = [
    200, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 409, 413, 429, 499, 500, 502, 503, 504,
];

/// Metric handles bound once to the installed recorder (a registry lookup hashes the name and
/// every label, on every call).
struct RequestMetrics {
    /// By `Outcome as u8 - 1`.
    downloads: Vec<metrics::Counter>,
    /// [other, archive].
    duration: [metrics::Histogram; 2],
    /// [other, archive] × `KNOWN_STATUSES`.
    requests: [Vec<metrics::Counter>; 2],
}

impl RequestMetrics {
    fn get() -> &'static RequestMetrics {
        static HANDLES: OnceLock<RequestMetrics> = OnceLock::new();
        HANDLES.get_or_init(|| {
            let requests = |route: &'static str| {
                KNOWN_STATUSES
                    .iter()
                    .map(|status| {
                        metrics::counter!("oncegate_requests_total", "route" => route, "status" => status.to_string())
                    })
                    .collect()
            };
            RequestMetrics {
                downloads: Outcome::ALL
                    .iter()
                    .map(|outcome| {
                        metrics::counter!("oncegate_downloads_total", "outcome" => outcome.metric_label())
                    })
                    .collect(),
                duration: ["other", "archive"].map(|route| {
                    metrics::histogram!("oncegate_request_duration_seconds", "route" => route)
                }),
                requests: [requests("other"), requests("archive")],
            }
        })
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if self.entry.is_some() {
            // Drop the inner body first: a download body decides its outcome when it goes.
            self.inner = crate::body::empty();
            self.finish();
        }
    }
}
