//! Test support: a real upstream on loopback with failure modes, a proxy started in-process or
//! as the real binary, and small HTTP clients (pooled, and raw for hand-made request lines).
#![allow(dead_code)]

pub mod keystone;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use oncegate::body::BoxError;
use oncegate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const TOKEN: &str = "test-token-0123456789";
pub const ARCHIVES: &str = "/v2/proj/instances/inst/assets/archives";

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
}

/// Serves one accepted connection (HTTP/1.1 or HTTP/2), over TLS when `acceptor` is given.
pub async fn serve_connection<S, B>(
    stream: TcpStream,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    service: S,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let _ = match acceptor {
        None => {
            builder
                .serve_connection(TokioIo::new(stream), service)
                .await
        }
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
            Err(_) => return,
        },
    };
}

/// A real upstream on a free loopback port. The archive id picks its behaviour:
/// `big-<MiB>-*` streams that many MiB (with Content-Length), `chunked-*` streams without a
/// length, `fail-*` answers 500, `reset-*` breaks the connection mid-body, `hangup-*` closes it
/// before any response, `short-*` sends less than its Content-Length, `slow-<ms>-*` waits
/// before the headers, `trickle-<ms>-*` sends 8 chunks <ms> apart; anything else gets
/// `body_for(path)`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
    tls: bool,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        Upstream::start_with_tls(None).await
    }

    /// The same upstream, speaking HTTPS with `acceptor`'s certificate when given.
    pub async fn start_with_tls(acceptor: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task_seen = seen.clone();
        let tls = acceptor.is_some();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = task_seen.clone();
                let service = hyper::service::service_fn(move |request| {
                    upstream_handle(seen.clone(), request)
                });
                tokio::spawn(serve_connection(stream, acceptor.clone(), service));
            }
        });
        Upstream {
            addr,
            seen,
            task,
            tls,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn hits(&self, path_fragment: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path_and_query.contains(path_fragment))
            .cloned()
            .collect()
    }
}

/// The body the upstream serves for an ordinary path.
pub fn body_for(path: &str) -> Bytes {
    Bytes::from(format!("archive bytes for {path}\n").repeat(8))
}

/// Deterministic content of the n-th MiB-sized download, so corruption is detected.
pub fn big_chunk(index: usize) -> Bytes {
    let byte = (index % 251) as u8;
    Bytes::from(vec![byte; 64 * 1024])
}

pub const TINY_CHUNK: usize = 1000;

/// The n-th chunk of a `tiny-*` archive: each chunk differs, so a bad join is detected.
pub fn tiny_chunk(index: usize) -> Bytes {
    Bytes::from(vec![b'a' + index as u8; TINY_CHUNK])
}

type UpstreamBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

async fn upstream_handle(
    seen: Arc<Mutex<Vec<Seen>>>,
    request: Request<Incoming>,
) -> Result<Response<UpstreamBody>, BoxError> {
    let path = request.uri().path().to_string();
    seen.lock().unwrap().push(Seen {
        method: request.method().to_string(),
        path_and_query: request
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: request.headers().clone(),
    });
    let id = path.rsplit('/').next().unwrap_or_default().to_string();
    let parts: Vec<&str> = id.split('-').collect();
    let number = |i: usize| {
        parts
            .get(i)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(1)
    };
    let response = match parts[0] {
        "big" => {
            let chunks = number(1) as usize * 16;
            let stream = futures_util::stream::iter((0..chunks).map(|i| Ok::<_, BoxError>(Frame::data(big_chunk(i)))));
            Response::builder()
                .header("content-length", (chunks * 64 * 1024).to_string())
                .header("content-type", "application/zip")
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        "chunked" => {
            let stream = futures_util::stream::iter((0..4).map(|i| Ok::<_, BoxError>(Frame::data(big_chunk(i)))));
            Response::builder().body(StreamBody::new(stream).boxed()).unwrap()
        }
        "fail" => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .header("content-type", "application/json")
            .body(full(r#"{"error_code":"ROMA.9999","error_msg":"boom","error_details":"x","request_id":"u"}"#))
            .unwrap(),
        "reset" => {
            // The headers and two chunks go out, then the connection breaks.
            let stream = futures_util::stream::unfold(0usize, |i| async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                match i {
                    0 | 1 => Some((Ok::<_, BoxError>(Frame::data(big_chunk(i))), i + 1)),
                    2 => Some((Err::<Frame<Bytes>, BoxError>("upstream reset".into()), i + 1)),
                    _ => None,
                }
            });
            Response::builder()
                .header("content-length", (16 * 64 * 1024).to_string())
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        // The connection is dropped before any response.
        "hangup" => return Err("upstream hangs up".into()),
        // Content-Length promises 16 chunks; 4 come, then the body ends.
        "short" => {
            // Paced, so the headers and the first chunks are on the wire before the body ends.
            let stream = futures_util::stream::unfold(0usize, |i| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                (i < 4).then(|| (Ok::<_, BoxError>(Frame::data(big_chunk(i))), i + 1))
            });
            Response::builder()
                .header("content-length", (16 * 64 * 1024).to_string())
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        // A small archive (3 × 1,000 bytes, paced) that is read whole before it is answered:
        // `tiny-whole` arrives intact, `tiny-reset` breaks and `tiny-short` ends after the first
        // chunk, `tiny-stall` pauses 700 ms after it; `tiny-empty` is an empty archive.
        "tiny" if parts.get(1) == Some(&"empty") => Response::builder()
            .header("content-length", "0")
            .body(full(Bytes::new()))
            .unwrap(),
        "tiny" => {
            let behaviour = parts.get(1).copied().unwrap_or("whole").to_string();
            let stream = futures_util::stream::unfold(0usize, move |i| {
                let behaviour = behaviour.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    match (behaviour.as_str(), i) {
                        (_, 3) | ("short", 1) => None,
                        ("reset", 1) => Some((Err::<Frame<Bytes>, BoxError>("upstream reset".into()), 9)),
                        (_, 9) => None,
                        ("stall", 1) => {
                            tokio::time::sleep(Duration::from_millis(700)).await;
                            Some((Ok(Frame::data(tiny_chunk(i))), i + 1))
                        }
                        _ => Some((Ok(Frame::data(tiny_chunk(i))), i + 1)),
                    }
                }
            });
            Response::builder()
                .header("content-length", (3 * TINY_CHUNK).to_string())
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        "slow" => {
            tokio::time::sleep(Duration::from_millis(number(1))).await;
            Response::new(full(body_for(&path)))
        }
        "trickle" => {
            let gap = Duration::from_millis(number(1));
            let stream = futures_util::stream::unfold(0usize, move |i| async move {
                if i == 8 {
                    return None;
                }
                tokio::time::sleep(gap).await;
                Some((Ok::<_, BoxError>(Frame::data(big_chunk(i))), i + 1))
            });
            Response::builder()
                .header("content-length", (8 * 64 * 1024).to_string())
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        _ => Response::new(full(body_for(&path))),
    };
    Ok(response)
}

fn full(bytes: impl Into<Bytes>) -> UpstreamBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Config text for a proxy on free loopback ports in front of `upstream`, plus `extra` TOML.
pub fn config_text(upstream: &str, extra: &str) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\
         [upstream]\nurl = \"{upstream}\"\nresponse_timeout = \"5s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n"
    );
    if !extra.contains("[store]") {
        text.push_str("[store]\nkind = \"memory\"\n");
    }
    text.push_str(extra);
    text
}

pub async fn start_proxy(upstream: &Upstream, extra: &str) -> oncegate::Running {
    oncegate::start(config_for(&upstream.url(), extra))
        .await
        .expect("proxy starts")
}

/// The validated config of `config_text`, for tests that change typed fields before starting.
pub fn config_for(upstream_url: &str, extra: &str) -> Config {
    Config::from_toml(&config_text(upstream_url, extra), Path::new(".")).expect("valid test config")
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }

    pub fn error_code(&self) -> String {
        self.json()["error_code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A GET with the test token plus `headers`.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    request(
        addr,
        "GET",
        path,
        &[&[("x-auth-token", TOKEN)], headers].concat(),
    )
    .await
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    try_request(addr, method, path, headers)
        .await
        .expect("request")
}

/// Like `request`, but `None` when the connection ends without a response.
pub async fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<Reply> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = client()
        .request(builder.body(Empty::new()).unwrap())
        .await
        .ok()?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Some(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Sends `head` (request line and headers, without the final blank line) as is, with
/// `Connection: close`, and returns the status and body.
pub async fn raw(addr: SocketAddr, head: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request =
        format!("{head}\r\nHost: {addr}\r\nX-Auth-Token: {TOKEN}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply)).await;
    let text = String::from_utf8_lossy(&reply).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Reads the whole body of a streamed GET, or stops after `limit` bytes (dropping the connection).
pub async fn get_partial(addr: SocketAddr, path: &str, limit: usize) -> (StatusCode, usize) {
    let request = Request::builder()
        .uri(format!("http://{addr}{path}"))
        .header("x-auth-token", TOKEN)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = client().request(request).await.expect("request");
    let status = response.status();
    let mut body = response.into_body();
    let mut read = 0;
    while read < limit {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
            _ => break,
        }
    }
    (status, read)
}

// ---- the real binary ----

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_oncegate"))
}

/// A port nobody listens on, taken below the kernel's ephemeral range (32768 and up by
/// default): a port the kernel handed out could be taken by an outgoing connection before the
/// process under test binds it. Each call in a test binary gets a different one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let seed = std::process::id().wrapping_mul(7919) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + SPAN);
}

/// The binary running with a config file in its own folder; killed when dropped.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub stderr_path: PathBuf,
}

impl Process {
    /// Writes `config` (with `{listen}` / `{admin}` filled in) to `dir` and starts the binary.
    pub fn spawn(dir: &Path, config: &str) -> Process {
        Process::spawn_with_env(dir, config, None)
    }

    /// Like `spawn`, with `RUST_LOG` set to `rust_log` (it is removed otherwise).
    pub fn spawn_with_env(dir: &Path, config: &str, rust_log: Option<&str>) -> Process {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = config
            .replace("{listen}", &addr.to_string())
            .replace("{admin}", &admin.to_string());
        let config_path = dir.join("oncegate.toml");
        std::fs::write(&config_path, text).unwrap();
        let stderr_path = dir.join(format!("stderr-{}.log", addr.port()));
        let mut command = Command::new(binary());
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .env_remove("RUST_LOG");
        if let Some(filter) = rust_log {
            command.env("RUST_LOG", filter);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let process = Process {
            child,
            addr,
            admin,
            dir: dir.to_path_buf(),
            stderr_path,
        };
        process.wait_ready();
        process
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(self.admin).is_err() {
            assert!(
                Instant::now() < deadline,
                "binary did not start: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM, waits (off the runtime) for a clean exit, and returns everything it logged.
    pub async fn terminate_and_read_logs(mut self) -> String {
        self.signal("TERM");
        tokio::task::spawn_blocking(move || {
            assert_eq!(
                self.wait_exit(Duration::from_secs(10)),
                Some(0),
                "did not exit cleanly"
            );
            self.stderr()
        })
        .await
        .unwrap()
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        self.proc_field("status", "VmRSS:").unwrap_or(0)
    }

    /// Resident memory in transparent huge pages, in KiB.
    pub fn huge_page_kib(&self) -> u64 {
        self.proc_field("smaps_rollup", "AnonHugePages:")
            .unwrap_or(0)
    }

    /// Whether the kernel may give the process transparent huge pages; `None` on kernels that
    /// do not say (before 5.0).
    pub fn may_use_huge_pages(&self) -> Option<bool> {
        self.proc_field("status", "THP_enabled:").map(|v| v != 0)
    }

    /// The number after `label` in `/proc/<pid>/<file>`.
    fn proc_field(&self, file: &str, label: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/{file}", self.pid())).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(label))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with `args`; returns (exit code, stdout, stderr).
pub fn run_binary(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

/// A proxy in front of an upstream given by URL (e.g. with a path prefix).
pub async fn start_proxy_at(upstream_url: &str, extra: &str) -> oncegate::Running {
    oncegate::start(config_for(upstream_url, extra))
        .await
        .expect("proxy starts")
}

// ---- certificates ----

pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA and a certificate for localhost / 127.0.0.1 signed by it, as PEM files in `dir`.
pub fn make_pki(dir: &Path) -> Pki {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

// ---- a real Redis ----

/// `redis-server` on a free loopback port, without persistence; killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    extra_args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// With extra `redis-server` arguments, e.g. `["--requirepass", "pw"]`.
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        let extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            extra_args,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port.
    pub fn restart(&mut self) {
        let binary =
            std::env::var("ONCEGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let port = self.port.to_string();
        let child = Command::new(&binary)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary} ({e}); install Debian's redis-server (scripts/test does)"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `count` concurrent GETs of `path`, spread over `addrs`, checks that every loser got a
/// proper 409 (with `Retry-After: 1`) or 403, and returns how many got 200.
pub async fn race(addrs: &[SocketAddr], path: &str, count: usize) -> usize {
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let (addr, path) = (addrs[i % addrs.len()], path.to_string());
            tokio::spawn(async move { get(addr, &path, &[]).await })
        })
        .collect();
    let mut served = 0;
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status {
            StatusCode::OK => served += 1,
            StatusCode::CONFLICT => {
                assert_eq!(reply.error_code(), "ROMA.00000102");
                assert_eq!(reply.headers["retry-after"], "1");
            }
            StatusCode::FORBIDDEN => assert_eq!(reply.error_code(), "ROMA.00000101"),
            other => panic!("unexpected {other}: {:?}", reply.body),
        }
    }
    served
}
