//! One access-log event and the request metrics per request (SPEC §6), emitted when the
//! response body ends or is dropped, so `bytes` and the download `outcome` are final.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};
use tracing::Instrument;

use super::request_id::request_id_of;
use crate::body::{BoxError, ProxyBody};

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

/// Filled in by the inner layers (archive key, outcome) and read when the event is written.
#[derive(Debug, Default)]
pub struct AccessNote {
    archive: OnceLock<String>,
    outcome: AtomicU8,
}

impl AccessNote {
    pub fn set_archive(&self, key: &str) {
        let _ = self.archive.set(key.to_string());
    }

    pub fn set_outcome(&self, outcome: Outcome) {
        self.outcome.store(outcome as u8, Ordering::Release);
    }

    pub fn outcome(&self) -> Option<Outcome> {
        Outcome::from_u8(self.outcome.load(Ordering::Acquire))
    }
}

/// Records an outcome on the request's note, if the access-log layer is present.
pub fn note_outcome<B>(request: &Request<B>, outcome: Outcome) {
    if let Some(note) = request.extensions().get::<Arc<AccessNote>>() {
        note.set_outcome(outcome);
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct AccessLogLayer;

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog { inner }
    }
}

#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for AccessLog<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let note = Arc::new(AccessNote::default());
        request.extensions_mut().insert(note.clone());
        let request_id = request_id_of(&request);
        let span = tracing::info_span!("request", request_id = %request_id);
        let entry = Entry {
            started: Instant::now(),
            method: request.method().clone(),
            uri: request.uri().clone(),
            request_id,
            note,
            span: span.clone(),
        };
        let response = self.inner.call(request).instrument(span);
        Box::pin(async move {
            let Ok(response) = response.await;
            let (parts, body) = response.into_parts();
            let logged = LoggedBody {
                inner: body,
                bytes: 0,
                status: parts.status.as_u16(),
                entry: Some(entry),
            };
            Ok(Response::from_parts(
                parts,
                http_body_util::BodyExt::boxed_unsync(logged),
            ))
        })
    }
}

struct Entry {
    started: Instant,
    method: http::Method,
    /// Cloning a `Uri` shares its bytes: no copy of the path per request.
    uri: http::Uri,
    request_id: String,
    note: Arc<AccessNote>,
    span: tracing::Span,
}

struct LoggedBody {
    inner: ProxyBody,
    bytes: u64,
    status: u16,
    /// Taken when the event has been written.
    entry: Option<Entry>,
}

impl LoggedBody {
    fn finish(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        let duration = entry.started.elapsed();
        let duration_ms = duration.as_secs_f64() * 1000.0;
        let status = self.status;
        // Both are set on the archive route only (archive: when the path gave a key).
        let archive = entry.note.archive.get().map(String::as_str);
        let noted = entry.note.outcome();
        let outcome = noted.map(Outcome::as_str);
        let _enter = entry.span.enter();
        tracing::info!(
            target: "oncegate::access",
            request_id = %entry.request_id, method = %entry.method, path = %entry.uri.path(),
            status, duration_ms, bytes = self.bytes, archive, outcome,
            "request"
        );
        let handles = RequestMetrics::get();
        if let Some(noted) = noted {
            handles.downloads[noted as usize - 1].increment(1);
        }
        let archive_route = outcome.is_some();
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
}

/// The statuses the proxy itself answers with, and the usual upstream ones: their counters are
/// looked up once. Others go through the registry on each request.
const KNOWN_STATUSES: [u16; 18] = [
    200, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 409, 413, 429, 500, 502, 503, 504,
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
