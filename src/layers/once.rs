//! The download-once layer (SPEC §2): on the archive route, claim the key, forward the winner,
//! then commit or release. The body wrapper is the only place that knows a transfer completed.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, Either};
use http::header::{self, HeaderName};
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use super::access_log::{AccessNote, Outcome};
use super::auth::{token_digest, TokenDigest};
use crate::body::{BoxError, ProxyBody};
use crate::config::CommitMode;
use crate::error::{set_no_store, ProxyError};
use crate::iam::Identity;
use crate::ledger::{now_ms, ClaimOutcome, Ledger, LedgerError, ServedRecord, Ticket};
use crate::net::{client_ip, ip_text, ConnInfo};
use crate::route::{RejectKind, RouteMatch};

/// Request headers that would let a client fetch part of an archive or a cached nothing.
const PARTIAL_REQUEST_HEADERS: [HeaderName; 4] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
];

pub struct OncePolicy {
    pub ledger: Arc<dyn Ledger>,
    pub commit: CommitMode,
    pub lease: Duration,
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

#[derive(Clone)]
pub struct OnceLayer {
    policy: Arc<OncePolicy>,
}

impl OnceLayer {
    pub fn new(policy: Arc<OncePolicy>) -> OnceLayer {
        OnceLayer { policy }
    }
}

impl<S> Layer<S> for OnceLayer {
    type Service = Once<S>;
    fn layer(&self, inner: S) -> Once<S> {
        Once {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Once<S> {
    inner: S,
    policy: Arc<OncePolicy>,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send>>;

impl<S, B> Service<Request<B>> for Once<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> ResponseFuture {
        let note = request
            .extensions()
            .get::<Arc<AccessNote>>()
            .cloned()
            .unwrap_or_default();
        let key = match note.route() {
            None | Some(RouteMatch::NotRoute) => return Box::pin(self.inner.call(request)),
            Some(RouteMatch::Reject(rejection)) => {
                note.set_outcome(Outcome::Rejected);
                let error = match rejection.kind {
                    RejectKind::NonCanonical => ProxyError::NonCanonicalPath(rejection.reason),
                    RejectKind::BadParameter => ProxyError::BadParameter(rejection.reason),
                };
                return Box::pin(std::future::ready(Err(error)));
            }
            Some(RouteMatch::Archive(key)) => key.shared(),
        };
        if request.method() != Method::GET {
            note.set_outcome(Outcome::Rejected);
            return Box::pin(std::future::ready(Err(ProxyError::MethodNotAllowed)));
        }
        // Most stores answer on the spot: a refusal then needs no download future at all.
        let claimed = match self.policy.ledger.claim_now(&key, self.policy.lease) {
            None => None,
            // Held by a guard from here on: a future dropped before it is first polled still
            // gives the key back.
            Some(answer) => match claimed_ticket(answer, &note) {
                Ok(ticket) => Some(Claim::new(self.policy.ledger.clone(), ticket, note.clone())),
                Err(refusal) => return Box::pin(std::future::ready(Err(refusal))),
            },
        };
        for name in &PARTIAL_REQUEST_HEADERS {
            request.headers_mut().remove(name);
        }
        // Take the service that was driven to readiness, leave a fresh clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(download(
            self.policy.clone(),
            inner,
            request,
            key,
            note,
            claimed,
        ))
    }
}

/// The ticket of a won claim, or the refusal for any other answer (noted for the access log).
fn claimed_ticket(
    answer: Result<ClaimOutcome, LedgerError>,
    note: &AccessNote,
) -> Result<Ticket, ProxyError> {
    match answer {
        Ok(ClaimOutcome::Claimed(ticket)) => Ok(ticket),
        Ok(ClaimOutcome::Served) => {
            note.set_outcome(Outcome::RefusedServed);
            Err(ProxyError::AlreadyDownloaded)
        }
        Ok(ClaimOutcome::InFlight) => {
            note.set_outcome(Outcome::RefusedInFlight);
            Err(ProxyError::DownloadInProgress)
        }
        Err(e) => {
            note.set_outcome(Outcome::Rejected);
            Err(ProxyError::StoreUnavailable(e.to_string()))
        }
    }
}

/// Claims the key (unless `claimed` already holds it), forwards, then commits or releases.
/// The request becomes its record draft and its forwarding future before anything is awaited,
/// so the download's future (boxed once per download) holds neither the request nor a copy of
/// it: under ~1 KiB, it comes from the allocator's per-thread cache.
fn download<S, B>(
    policy: Arc<OncePolicy>,
    mut inner: S,
    request: Request<B>,
    key: Arc<str>,
    note: Arc<AccessNote>,
    claimed: Option<Claim>,
) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = ProxyError>,
{
    let record = RecordDraft {
        key: key.clone(),
        request_id: note.request_id().to_string(),
        client: request
            .extensions()
            .get::<ConnInfo>()
            .map(|conn| {
                ip_text(client_ip(
                    conn.peer.ip(),
                    request.headers(),
                    &policy.trusted_proxies,
                ))
            })
            .unwrap_or_default(),
        token_sha256_prefix: request
            .extensions()
            .get::<TokenDigest>()
            .copied()
            .or_else(|| token_digest(request.headers()).map(TokenDigest))
            .map(|digest| digest.prefix())
            .unwrap_or_default(),
        user_id: request
            .extensions()
            .get::<Arc<Identity>>()
            .map(|identity| identity.user_id.clone()),
    };
    // Only polled once the claim is held. The service below (the upstream) prepares the request
    // here and sends nothing before it is polled, so a lost claim forwards nothing.
    let forwarding = inner.call(request);
    match claimed {
        Some(claim) => Either::Left(forward_claimed(policy, claim, forwarding, record)),
        None => Either::Right(async move {
            let answer = policy.ledger.claim(&key, policy.lease).await;
            let ticket = claimed_ticket(answer, &note)?;
            let claim = Claim::new(policy.ledger.clone(), ticket, note);
            forward_claimed(policy, claim, forwarding, record).await
        }),
    }
}

/// Forwards on a held claim, then commits or releases it. An `async move` block rather than an
/// `async fn`: its captures are used in place, where an `async fn` keeps a second copy of each
/// argument in its future.
#[allow(clippy::manual_async_fn)]
fn forward_claimed(
    policy: Arc<OncePolicy>,
    mut claim: Claim,
    forwarding: impl Future<Output = Result<Response<ProxyBody>, ProxyError>>,
    record: RecordDraft,
) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> {
    async move {
        // Errors and non-2xx answers drop `claim`, which gives the key back. Dropped while it
        // waits (the client left), `claim` is noted as an ordinary release, not the upstream's.
        let mut response = match forwarding.await {
            Ok(response) if response.status().is_success() => response,
            answered => {
                claim.blame_upstream();
                return answered;
            }
        };
        set_no_store(response.headers_mut());
        let expected = content_length(&response);
        match policy.commit {
            CommitMode::Headers => {
                let record = record.finish(expected.unwrap_or(0));
                claim.commit(record).await?;
                Ok(response)
            }
            // A small archive is read whole and recorded before anything goes out, so the client
            // gets headers and body in one write instead of the headers and, after the commit, the
            // held-back body. The promise is the same: no byte of it leaves before the record is
            // durable (stricter than holding back only the final chunk).
            CommitMode::Complete if expected.is_some_and(|length| length <= WHOLE_BODY_LIMIT) => {
                let (parts, body) = response.into_parts();
                let bytes = match read_whole(body, expected.unwrap_or(0)).await {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        // Answered with a 502 or 504, so noted as the upstream's failure.
                        claim.blame_upstream();
                        return Err(e);
                    }
                };
                claim.commit(record.finish(bytes.len() as u64)).await?;
                Ok(Response::from_parts(parts, crate::body::full(bytes)))
            }
            CommitMode::Complete => Ok(response.map(|body| {
                OnceBody {
                    inner: body,
                    span: claim.span.clone(),
                    claim: Some(claim),
                    record: Some(record),
                    expected,
                    sent: 0,
                    held: None,
                    tail: VecDeque::new(),
                    commit: None,
                    committed: false,
                    lease: policy.lease,
                    last_renewal: Instant::now(),
                    renewal: None,
                }
                .boxed_unsync()
            })),
        }
    }
}

/// Archives up to this size (by their Content-Length) are read whole before they are answered:
/// about what arrives with the headers in hyper's first reads. Anything larger streams (SPEC §1).
const WHOLE_BODY_LIMIT: u64 = 16 * 1024;

/// The whole upstream body, which must be exactly `expected` bytes long. A body that breaks,
/// stalls past `upstream.body_idle_timeout` or has the wrong length is the upstream's failure
/// (502, or 504 for the stall), and the caller's claim is given back.
async fn read_whole(mut body: ProxyBody, expected: u64) -> Result<Bytes, ProxyError> {
    let mut first: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    let mut length = 0u64;
    // The last byte ends the read: waiting for the stream's end would cost another wake-up.
    while length < expected {
        let Some(frame) = body.frame().await else {
            return Err(ProxyError::UpstreamUnreachable(
                "upstream body shorter than its Content-Length".into(),
            ));
        };
        let frame = frame.map_err(|e| {
            if e.is::<tower_http::timeout::TimeoutError>() {
                ProxyError::UpstreamTimeout
            } else {
                ProxyError::UpstreamUnreachable(format!("archive body broke off: {e}"))
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        length += data.len() as u64;
        if length > expected {
            return Err(ProxyError::UpstreamUnreachable(
                "upstream body longer than its Content-Length".into(),
            ));
        }
        // One chunk (the usual case) is passed on without a copy.
        if first.is_none() && joined.is_empty() {
            first = Some(data);
            continue;
        }
        if let Some(first) = first.take() {
            joined.reserve(expected as usize);
            joined.extend_from_slice(&first);
        }
        joined.extend_from_slice(&data);
    }
    Ok(first.unwrap_or_else(|| Bytes::from(joined)))
}

fn content_length(response: &Response<ProxyBody>) -> Option<u64> {
    response
        .headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The fields of a served record known before the transfer.
struct RecordDraft {
    key: Arc<str>,
    request_id: String,
    client: String,
    token_sha256_prefix: String,
    user_id: Option<String>,
}

impl RecordDraft {
    fn finish(self, bytes: u64) -> ServedRecord {
        ServedRecord {
            key: self.key.to_string(),
            served_at_ms: now_ms(),
            request_id: self.request_id,
            bytes,
            client: self.client,
            token_sha256_prefix: self.token_sha256_prefix,
            user_id: self.user_id,
        }
    }
}

/// A held claim: committing consumes it, and dropping it any other way releases the key.
struct Claim {
    ledger: Arc<dyn Ledger>,
    ticket: Option<Ticket>,
    note: Arc<AccessNote>,
    /// The request's span, so a release after the response is gone still logs its request id.
    span: tracing::Span,
    /// How a release is noted: a broken transfer, or an upstream that failed before the body.
    release_outcome: Outcome,
}

impl Claim {
    /// Counted in `oncegate_downloads_in_flight` until committed or released.
    fn new(ledger: Arc<dyn Ledger>, ticket: Ticket, note: Arc<AccessNote>) -> Claim {
        in_flight_gauge().increment(1.0);
        Claim {
            ledger,
            ticket: Some(ticket),
            note,
            span: tracing::Span::current(),
            release_outcome: Outcome::Released,
        }
    }

    /// A release from now on is the upstream's failure (`upstream_error` in the metrics).
    fn blame_upstream(&mut self) {
        self.release_outcome = Outcome::UpstreamError;
    }

    fn ticket(&self) -> Option<&Ticket> {
        self.ticket.as_ref()
    }

    /// Records the download. Once polled, the commit runs to its end even if its caller stops
    /// waiting (a client gone mid-commit): the record may already be on its way to the store, so
    /// giving the key back could let it be downloaded twice (README, "Commit modes"). A runtime
    /// shutting down drops such a task; the client never got the end, so that is no second
    /// download either, and a record that landed stays.
    fn commit(mut self, record: ServedRecord) -> Commit {
        let span = self.span.clone();
        let note = self.note.clone();
        // Boxed: it holds the claim, the record and the ticket, and the download's own future
        // stays small enough for the allocator's per-thread cache.
        Commit {
            commit: Some(Box::pin(async move {
                // The claim keeps its ticket until the key is served: dropped any other way (a
                // failed write, a panic in the store) it gives the key back.
                let Some(ticket) = &self.ticket else {
                    return Err(ProxyError::Internal);
                };
                match self.ledger.commit(ticket, record).await {
                    Ok(()) => {
                        self.ticket = None;
                        self.note.set_outcome(Outcome::Served);
                        Ok(())
                    }
                    Err(e) => Err(ProxyError::StoreUnavailable(e.to_string())),
                }
            })),
            started: false,
            span,
            note,
        }
    }
}

/// A commit (`Claim::commit`), polled in place. Dropped after it started and before it ended, it
/// moves to a task of its own instead of being cancelled. The common path pays nothing for that.
struct Commit {
    commit: Option<BoxFuture<'static, Result<(), ProxyError>>>,
    started: bool,
    span: tracing::Span,
    /// Its request's log event is written when the waiter goes, before the commit ends.
    note: Arc<AccessNote>,
}

impl Future for Commit {
    type Output = Result<(), ProxyError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.started = true;
        // Out while it is polled: a commit that panics is dropped as the panic unwinds (its
        // claim released), never left behind for `drop` to resume in a task.
        let Some(mut commit) = self.commit.take() else {
            return Poll::Ready(Err(ProxyError::Internal));
        };
        let polled = commit.as_mut().poll(cx);
        if polled.is_pending() {
            self.commit = Some(commit);
        }
        polled
    }
}

impl Drop for Commit {
    fn drop(&mut self) {
        // Never polled: nothing reached the store, and the claim inside is simply released.
        if !self.started {
            return;
        }
        let Some(commit) = self.commit.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // What the log shows: the record is on its way, and the archive counts as served.
            self.note.set_outcome(Outcome::Served);
            let finish = async move {
                if let Err(e) = commit.await {
                    tracing::warn!(error = %e, "could not record a download whose client left; the archive can be fetched again");
                }
            };
            runtime.spawn(tracing::Instrument::instrument(finish, self.span.clone()));
        }
    }
}

/// Looked up once: two registry lookups per download otherwise.
fn in_flight_gauge() -> &'static metrics::Gauge {
    static GAUGE: std::sync::OnceLock<metrics::Gauge> = std::sync::OnceLock::new();
    GAUGE.get_or_init(|| metrics::gauge!("oncegate_downloads_in_flight"))
}

impl Drop for Claim {
    fn drop(&mut self) {
        in_flight_gauge().decrement(1.0);
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        self.note.set_outcome(self.release_outcome);
        let ledger = self.ledger.clone();
        let release = async move {
            if let Err(e) = ledger.release(&ticket).await {
                // The lease still runs out, so the key comes free later all the same.
                tracing::warn!(key = %ticket.key, error = %e, "could not release claim");
            }
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(tracing::Instrument::instrument(release, self.span.clone()));
        }
    }
}

/// The archive body in `complete` mode: passes bytes through, renews the lease while they flow,
/// and holds the final chunk back until the served record is durable.
struct OnceBody {
    inner: ProxyBody,
    /// The request's span: hyper polls the body outside it, and log lines need it back.
    span: tracing::Span,
    /// Held until the commit starts, which takes it over.
    claim: Option<Claim>,
    record: Option<RecordDraft>,
    /// The upstream's Content-Length: its last byte identifies the final chunk without waiting
    /// for the end of the stream.
    expected: Option<u64>,
    sent: u64,
    /// Without a length, one chunk is kept back until the next shows it was not the last.
    held: Option<Frame<Bytes>>,
    /// What goes out once the commit is done.
    tail: VecDeque<Frame<Bytes>>,
    commit: Option<Commit>,
    committed: bool,
    lease: Duration,
    last_renewal: Instant,
    renewal: Option<BoxFuture<'static, Result<(), LedgerError>>>,
}

impl OnceBody {
    /// Starts the commit once all bytes are in; false if there is no claim left to commit.
    fn start_commit(&mut self) -> bool {
        let (Some(claim), Some(record)) = (self.claim.take(), self.record.take()) else {
            return false;
        };
        self.commit = Some(claim.commit(record.finish(self.sent)));
        true
    }

    /// Renews at a third of the lease, without ever delaying the bytes.
    fn poll_renewal(&mut self, cx: &mut Context<'_>) -> Result<(), BoxError> {
        if self.renewal.is_none() && self.last_renewal.elapsed() >= self.lease / 3 {
            if let Some(ticket) = self.claim.as_ref().and_then(Claim::ticket).cloned() {
                let ledger = self.claim.as_ref().map(|c| c.ledger.clone());
                let lease = self.lease;
                if let Some(ledger) = ledger {
                    self.renewal =
                        Some(Box::pin(async move { ledger.renew(&ticket, lease).await }));
                }
            }
        }
        if let Some(renewal) = &mut self.renewal {
            if let Poll::Ready(result) = renewal.as_mut().poll(cx) {
                self.renewal = None;
                self.last_renewal = Instant::now();
                match result {
                    Ok(()) => {}
                    // Someone else may hold the key now: this transfer must not complete.
                    Err(LedgerError::LostClaim(key)) => {
                        return Err(format!("claim on {key} expired").into())
                    }
                    Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
                }
            }
        }
        Ok(())
    }

    fn fail(&mut self, error: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.claim = None; // releases
        self.tail.clear();
        self.held = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for OnceBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let _span = this.span.clone().entered();
        loop {
            if this.committed {
                return Poll::Ready(this.tail.pop_front().map(Ok));
            }
            if let Some(commit) = &mut this.commit {
                let result = ready!(Pin::new(commit).poll(cx));
                this.commit = None;
                return match result {
                    Ok(()) => {
                        this.committed = true;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not record the download; withholding its end");
                        this.fail(e.into())
                    }
                };
            }
            if let Err(e) = this.poll_renewal(cx) {
                return this.fail(e);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        this.sent += data.len() as u64;
                        match this.expected {
                            Some(expected) if this.sent >= expected => {
                                this.tail.push_back(frame);
                                if !this.start_commit() {
                                    return this.fail("download claim lost".into());
                                }
                            }
                            Some(_) => return Poll::Ready(Some(Ok(frame))),
                            None => {
                                if let Some(previous) = this.held.replace(frame) {
                                    return Poll::Ready(Some(Ok(previous)));
                                }
                            }
                        }
                    } else {
                        // Trailers end the stream.
                        this.tail.extend(this.held.take());
                        this.tail.push_back(frame);
                        if !this.start_commit() {
                            return this.fail("download claim lost".into());
                        }
                    }
                }
                Some(Err(e)) => return this.fail(e),
                None => {
                    if this.expected.is_some_and(|expected| expected != this.sent) {
                        return this.fail("upstream body shorter than its Content-Length".into());
                    }
                    this.tail.extend(this.held.take());
                    if !this.start_commit() {
                        return this.fail("download claim lost".into());
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.committed && self.tail.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match self.expected {
            Some(expected) => {
                SizeHint::with_exact(expected.saturating_sub(self.sent) + self.tail_len())
            }
            None => SizeHint::default(),
        }
    }
}

impl OnceBody {
    fn tail_len(&self) -> u64 {
        self.tail
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.len() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::memory::MemoryLedger;
    use crate::ledger::KeyState;
    use crate::route::RouteTemplate;

    fn archive_request(path: &str) -> Request<()> {
        let route = RouteTemplate::parse(crate::config::DEFAULT_ROUTE).unwrap();
        let note = AccessNote::default();
        note.set_route(route.classify(path, true));
        Request::builder()
            .uri(path)
            .extension(Arc::new(note))
            .body(())
            .unwrap()
    }

    /// A memory ledger whose commits wait for a permit, so a test can act while one runs.
    struct GatedLedger {
        inner: MemoryLedger,
        commit_started: tokio::sync::Notify,
        gate: tokio::sync::Semaphore,
        /// A bug in the store's commit.
        panics: bool,
    }

    #[async_trait::async_trait]
    impl Ledger for GatedLedger {
        async fn claim(&self, key: &str, lease: Duration) -> Result<ClaimOutcome, LedgerError> {
            self.inner.claim(key, lease).await
        }
        async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<(), LedgerError> {
            self.inner.renew(ticket, lease).await
        }
        async fn commit(&self, ticket: &Ticket, record: ServedRecord) -> Result<(), LedgerError> {
            self.commit_started.notify_one();
            assert!(!self.panics, "the store's commit panicked");
            let _permit = self.gate.acquire().await;
            self.inner.commit(ticket, record).await
        }
        async fn release(&self, ticket: &Ticket) -> Result<(), LedgerError> {
            self.inner.release(ticket).await
        }
        async fn lookup(&self, key: &str) -> Result<KeyState, LedgerError> {
            self.inner.lookup(key).await
        }
        async fn reset(&self, key: &str) -> Result<crate::ledger::ResetOutcome, LedgerError> {
            self.inner.reset(key).await
        }
        async fn ready(&self) -> bool {
            true
        }
        async fn sweep(&self) {}
        async fn flush(&self) -> Result<(), LedgerError> {
            Ok(())
        }
    }

    /// A once layer over a gated ledger, in front of an upstream answering `archive` with a
    /// Content-Length.
    fn gated_once(
        archive: &'static [u8],
        panics: bool,
    ) -> (
        Arc<GatedLedger>,
        impl Service<Request<()>, Response = Response<ProxyBody>, Error = ProxyError>,
    ) {
        let ledger = Arc::new(GatedLedger {
            inner: MemoryLedger::new(None),
            commit_started: tokio::sync::Notify::new(),
            gate: tokio::sync::Semaphore::new(0),
            panics,
        });
        let policy = Arc::new(OncePolicy {
            ledger: ledger.clone(),
            commit: CommitMode::Complete,
            lease: Duration::from_secs(60),
            trusted_proxies: Vec::new(),
        });
        let upstream = tower::service_fn(move |_: Request<()>| async move {
            let mut response = Response::new(crate::body::full(archive));
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, archive.len().into());
            Ok::<_, ProxyError>(response)
        });
        (ledger, OnceLayer::new(policy).layer(upstream))
    }

    fn note_of(request: &Request<()>) -> Arc<AccessNote> {
        request
            .extensions()
            .get::<Arc<AccessNote>>()
            .unwrap()
            .clone()
    }

    /// After the client left mid-commit: its event says served, and once the commit may end the
    /// key is served, not free.
    async fn served_although_its_client_left(ledger: &GatedLedger, note: &AccessNote, key: &str) {
        assert_eq!(
            note.outcome(),
            Some(Outcome::Served),
            "what its log event shows"
        );
        let state = state_once_the_commit_may_end(ledger, key).await;
        assert!(
            matches!(state, KeyState::Served(_)),
            "a started commit ends in a record, not a free key: {state:?}"
        );
    }

    /// Lets the gated commit finish, then waits (bounded) for the key to leave "in flight".
    async fn state_once_the_commit_may_end(ledger: &GatedLedger, key: &str) -> KeyState {
        ledger.gate.add_permits(1);
        for _ in 0..1000 {
            let state = ledger.lookup(key).await.unwrap();
            if state != KeyState::InFlight {
                return state;
            }
            tokio::task::yield_now().await;
        }
        KeyState::InFlight
    }

    #[tokio::test]
    async fn a_small_archive_whose_client_left_mid_commit_stays_served() {
        let (ledger, mut once) = gated_once(b"small zip", false);
        let request = archive_request("/v2/p/instances/i/assets/archives/s1");
        let note = note_of(&request);
        let mut answer = Box::pin(once.call(request));
        tokio::select! {
            _ = &mut answer => panic!("answered before the commit ended"),
            _ = ledger.commit_started.notified() => {}
        }
        drop(answer); // the client is gone
        served_although_its_client_left(&ledger, &note, "p/i/s1").await;
        let again = once
            .call(archive_request("/v2/p/instances/i/assets/archives/s1"))
            .await;
        assert!(matches!(again, Err(ProxyError::AlreadyDownloaded)));
    }

    #[tokio::test]
    async fn a_streamed_archive_whose_client_left_mid_commit_stays_served() {
        static LARGE: [u8; 64 * 1024] = [7; 64 * 1024];
        let (ledger, mut once) = gated_once(&LARGE, false);
        let request = archive_request("/v2/p/instances/i/assets/archives/l1");
        let note = note_of(&request);
        let response = once.call(request).await.unwrap();
        let mut body = response.into_body();
        tokio::select! {
            _ = body.frame() => panic!("the final chunk went out before the commit ended"),
            _ = ledger.commit_started.notified() => {}
        }
        drop(body); // the client is gone
        served_although_its_client_left(&ledger, &note, "p/i/l1").await;
    }

    #[tokio::test]
    async fn a_commit_that_panics_is_not_resumed_and_gives_its_key_back() {
        use futures_util::FutureExt;
        let (ledger, mut once) = gated_once(b"small zip", true);
        let request = archive_request("/v2/p/instances/i/assets/archives/p1");
        let note = note_of(&request);
        // As the edge does: the panic becomes a 500, and the future is dropped.
        let answer = std::panic::AssertUnwindSafe(once.call(request))
            .catch_unwind()
            .await;
        assert!(answer.is_err(), "the panic reaches the edge");
        assert_ne!(
            note.outcome(),
            Some(Outcome::Served),
            "nothing was recorded"
        );
        for _ in 0..100 {
            if ledger.lookup("p/i/p1").await.unwrap() == KeyState::Unseen {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(ledger.lookup("p/i/p1").await.unwrap(), KeyState::Unseen);
    }

    #[tokio::test]
    async fn a_claim_whose_future_is_never_polled_is_given_back() {
        let ledger: Arc<dyn Ledger> = Arc::new(MemoryLedger::new(None));
        let policy = Arc::new(OncePolicy {
            ledger: ledger.clone(),
            commit: CommitMode::Complete,
            lease: Duration::from_secs(60),
            trusted_proxies: Vec::new(),
        });
        let upstream = tower::service_fn(|_: Request<()>| async {
            Ok::<_, ProxyError>(Response::new(crate::body::full("zip")))
        });
        let mut once = OnceLayer::new(policy).layer(upstream);
        let unpolled = once.call(archive_request("/v2/p/instances/i/assets/archives/a1"));
        assert_eq!(ledger.lookup("p/i/a1").await.unwrap(), KeyState::InFlight);
        drop(unpolled);
        // The release runs as a task of its own.
        for _ in 0..100 {
            if ledger.lookup("p/i/a1").await.unwrap() == KeyState::Unseen {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(ledger.lookup("p/i/a1").await.unwrap(), KeyState::Unseen);
        let again = once
            .call(archive_request("/v2/p/instances/i/assets/archives/a1"))
            .await;
        assert!(again.is_ok(), "the key can be claimed again");
    }
}
