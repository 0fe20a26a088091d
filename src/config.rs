//! The TOML configuration of SPEC §8: raw serde structs, then validation into typed settings.
//! Every problem is collected with the key it concerns, so `oncegate check` can list them all.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use ipnet::IpNet;
use serde::Deserialize;

use crate::route::RouteTemplate;

/// Validated configuration; every path is absolute or relative to the process's working folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub once: OnceConfig,
    pub store: StoreConfig,
    pub rate_limits: Vec<RateLimitConfig>,
    pub trace: TraceConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub trusted_proxies: Vec<IpNet>,
    pub tls: Option<TlsFiles>,
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's headers (and an idle keep-alive
    /// connection may wait for the next request).
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request body forwarded, in bytes (413 above it).
    pub max_request_body: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Prepended to every forwarded path; empty or starting with '/' and never ending with '/'.
    pub path_prefix: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// A body that pauses this long is cut (the transfer breaks and the claim is released).
    pub body_idle_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub preserve_host: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AuthConfig {
    Presence,
    Static(Vec<StaticToken>),
    Iam(IamConfig),
}

/// Keystone v3 token verification (SPEC §5).
#[derive(Debug, Clone, PartialEq)]
pub struct IamConfig {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Put before `/v3/auth/tokens`; empty or starting with '/' and never ending with '/'.
    pub path_prefix: String,
    /// The environment variable that holds the proxy's own (service) token.
    pub service_token_env: String,
    pub cache_ttl: Duration,
    pub negative_cache_ttl: Duration,
    pub cache_capacity: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StaticToken {
    pub sha256: [u8; 32],
    /// `None`: any project.
    pub projects: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitMode {
    Complete,
    Headers,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OnceConfig {
    pub route: RouteTemplate,
    pub commit: CommitMode,
    pub fold_case: bool,
    pub inflight_lease: Duration,
    /// `None`: keep served records forever.
    pub retention: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    Memory,
    Embedded {
        path: PathBuf,
    },
    /// Shared by replicas; `url` is `redis://`, `rediss://` (TLS) or `valkey://`, with
    /// password / ACL user when needed.
    Redis {
        url: String,
        key_prefix: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateKey {
    Ip,
    Token,
    Global,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    pub key: RateKey,
    /// Time between two requests at the steady rate (1 / per_second).
    pub period: Duration,
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    pub trust_incoming: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token_env: Option<String>,
}

/// All problems found in a config file, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads and validates a config file; relative paths in it are resolved against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![format!(
                "cannot read config file {}: {e}",
                path.display()
            )])
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::from_toml(&text, &base)
    }

    /// Parses and validates TOML text; `base` is the folder relative paths are resolved against.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigErrors> {
        let mut problems = Vec::new();
        let Some((raw, unreadable)) = parse_raw(text, &mut problems) else {
            return Err(ConfigErrors(problems));
        };
        let parsed = problems.len();
        let config = validate(raw, base, &mut problems);
        // A section that could not be read was validated from its defaults: what that says
        // about it is noise next to the real problem already reported.
        let mut index = 0;
        problems.retain(|problem| {
            index += 1;
            index <= parsed
                || !unreadable.iter().any(|section| {
                    problem.starts_with(&format!("{section}."))
                        || problem.starts_with(&format!("{section}["))
                })
        });
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(ConfigErrors(problems)),
        }
    }
}

/// Reads the file section by section, so one wrong value does not hide the problems of the
/// other sections; unknown keys are collected everywhere.
/// Returns the sections as read (defaults where unreadable) and the names of unreadable ones.
fn parse_raw(text: &str, problems: &mut Vec<String>) -> Option<(RawConfig, Vec<String>)> {
    let table: toml::Table = match text.parse() {
        Ok(table) => table,
        Err(e) => {
            problems.push(describe_toml_error(text, &e));
            return None;
        }
    };
    let mut raw = RawConfig::default();
    let mut unreadable = Vec::new();
    for (name, value) in table {
        let ok = match name.as_str() {
            "server" => read_section(&name, value, &mut raw.server, problems),
            "upstream" => read_section(&name, value, &mut raw.upstream, problems),
            "auth" => read_section(&name, value, &mut raw.auth, problems),
            "once" => read_section(&name, value, &mut raw.once, problems),
            "store" => read_section(&name, value, &mut raw.store, problems),
            "rate_limit" => read_section(&name, value, &mut raw.rate_limit, problems),
            "trace" => read_section(&name, value, &mut raw.trace, problems),
            "log" => read_section(&name, value, &mut raw.log, problems),
            "admin" => read_section(&name, value, &mut raw.admin, problems),
            _ => {
                problems.push(format!("{name}: unknown key"));
                true
            }
        };
        if !ok {
            unreadable.push(name);
        }
    }
    Some((raw, unreadable))
}

/// Deserializes one top-level section into `slot`; false (and a problem naming the key) when a
/// value has the wrong type.
fn read_section<T: serde::de::DeserializeOwned>(
    name: &str,
    value: toml::Value,
    slot: &mut T,
    problems: &mut Vec<String>,
) -> bool {
    let join = |path: String| {
        if path.is_empty() || path == "." {
            name.to_string()
        } else if path.starts_with('[') {
            format!("{name}{path}")
        } else {
            format!("{name}.{path}")
        }
    };
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let result = serde_ignored::deserialize(
        serde_path_to_error::Deserializer::new(value, &mut track),
        |path| unknown.push(path.to_string()),
    );
    problems.extend(
        unknown
            .into_iter()
            .map(|key| format!("{}: unknown key", join(key))),
    );
    match result {
        Ok(parsed) => {
            *slot = parsed;
            true
        }
        Err(e) => {
            problems.push(format!(
                "{}: {}",
                join(track.path().to_string()),
                e.message().trim()
            ));
            false
        }
    }
}

fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let line = error
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let message = error.message().trim();
    match line {
        Some(line) => format!("invalid TOML at line {line}: {message}"),
        None => format!("invalid TOML: {message}"),
    }
}

// ---- raw shape of the file ----

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
    auth: RawAuth,
    once: RawOnce,
    store: RawStore,
    rate_limit: Vec<RawRateLimit>,
    trace: RawTrace,
    log: RawLog,
    admin: RawAdmin,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawServer {
    listen: String,
    trusted_proxies: Vec<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    shutdown_grace: String,
    header_read_timeout: String,
    max_connections: usize,
    max_request_body: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            trusted_proxies: Vec::new(),
            tls_cert: None,
            tls_key: None,
            shutdown_grace: "30s".into(),
            header_read_timeout: "30s".into(),
            max_connections: 10_000,
            max_request_body: 10 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawUpstream {
    url: Option<String>,
    connect_timeout: String,
    response_timeout: String,
    body_idle_timeout: Option<String>,
    ca_file: Option<String>,
    preserve_host: bool,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            url: None,
            connect_timeout: "3s".into(),
            response_timeout: "30s".into(),
            body_idle_timeout: None,
            ca_file: None,
            preserve_host: false,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawAuth {
    mode: Option<String>,
    tokens: Vec<RawToken>,
    iam: RawIam,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawIam {
    url: Option<String>,
    service_token_env: String,
    cache_ttl: String,
    negative_cache_ttl: String,
    cache_capacity: u64,
}

impl Default for RawIam {
    fn default() -> Self {
        RawIam {
            url: None,
            service_token_env: "ONCEGATE_IAM_SERVICE_TOKEN".into(),
            cache_ttl: "300s".into(),
            negative_cache_ttl: "10s".into(),
            cache_capacity: 100_000,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawToken {
    sha256: String,
    projects: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawOnce {
    route: String,
    commit: String,
    fold_case: bool,
    inflight_lease: String,
    retention: String,
}

impl Default for RawOnce {
    fn default() -> Self {
        RawOnce {
            route: DEFAULT_ROUTE.into(),
            commit: "complete".into(),
            fold_case: true,
            inflight_lease: "10m".into(),
            retention: "0s".into(),
        }
    }
}

/// The ROMA Connect asset download route (SPEC §1).
pub const DEFAULT_ROUTE: &str =
    "/v2/{project_id}/instances/{instance_id}/assets/archives/{archive_id}";

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawStore {
    kind: Option<String>,
    path: Option<String>,
    url: Option<String>,
    key_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawRateLimit {
    key: String,
    per_second: f64,
    burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawTrace {
    trust_incoming: bool,
}

impl Default for RawTrace {
    fn default() -> Self {
        RawTrace {
            trust_incoming: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawLog {
    format: String,
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "json".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawAdmin {
    listen: String,
    token_env: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: "127.0.0.1:9901".into(),
            token_env: None,
        }
    }
}

// ---- validation ----

/// Collects problems instead of stopping at the first, so `check` reports them all.
struct Checker<'a> {
    problems: &'a mut Vec<String>,
    base: &'a Path,
}

impl Checker<'_> {
    fn problem(&mut self, key: &str, message: impl fmt::Display) {
        self.problems.push(format!("{key}: {message}"));
    }

    fn duration(&mut self, key: &str, value: &str) -> Duration {
        match parse_duration(value) {
            Ok(duration) => duration,
            Err(message) => {
                self.problem(key, message);
                Duration::ZERO
            }
        }
    }

    fn positive_duration(&mut self, key: &str, value: &str) -> Duration {
        let duration = self.duration(key, value);
        if duration.is_zero() && parse_duration(value).is_ok() {
            self.problem(key, "must be greater than 0");
        }
        duration
    }

    /// One of a fixed set of words.
    fn choice<T: Copy>(&mut self, key: &str, value: &str, options: &[(&str, T)]) -> Option<T> {
        let found = options
            .iter()
            .find(|(name, _)| *name == value)
            .map(|(_, v)| *v);
        if found.is_none() {
            let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
            self.problem(key, format!("{value:?} is not one of {}", names.join(", ")));
        }
        found
    }

    fn socket_addr(&mut self, key: &str, value: &str) -> SocketAddr {
        value.parse().unwrap_or_else(|_| {
            self.problem(
                key,
                format!("{value:?} is not an address like \"127.0.0.1:8080\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    /// An `http://` or `https://` URL without a query: scheme, authority and the path prefix
    /// (no trailing '/').
    fn http_url(&mut self, key: &str, url: Option<&str>) -> Option<(Scheme, Authority, String)> {
        let Some(url) = url.filter(|url| !url.is_empty()) else {
            self.problem(key, "is required");
            return None;
        };
        let uri: http::Uri = match url.parse() {
            Ok(uri) => uri,
            Err(e) => {
                self.problem(key, format!("{url:?} is not a URL ({e})"));
                return None;
            }
        };
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            _ => {
                self.problem(key, format!("{url:?} must start with http:// or https://"));
                return None;
            }
        };
        let Some(authority) = uri.authority().cloned() else {
            self.problem(key, format!("{url:?} has no host"));
            return None;
        };
        if uri.query().is_some() {
            self.problem(key, "must not have a query string");
        }
        Some((
            scheme,
            authority,
            uri.path().trim_end_matches('/').to_string(),
        ))
    }

    fn path(&self, value: &str) -> PathBuf {
        let path = Path::new(value);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }
}

/// Parses "300ms", "30s", "10m", "7d" (and the other units humantime knows).
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value.trim())
        .map_err(|e| format!("{value:?} is not a duration like \"30s\" ({e})"))
}

fn validate(raw: RawConfig, base: &Path, problems: &mut Vec<String>) -> Option<Config> {
    let mut check = Checker { problems, base };

    let server = ServerConfig {
        listen: check.socket_addr("server.listen", &raw.server.listen),
        trusted_proxies: raw
            .server
            .trusted_proxies
            .iter()
            .filter_map(|cidr| {
                let parsed = cidr
                    .parse::<IpNet>()
                    .or_else(|_| cidr.parse::<std::net::IpAddr>().map(IpNet::from));
                parsed
                    .map_err(|_| {
                        check.problem("server.trusted_proxies", format!("{cidr:?} is not a CIDR"))
                    })
                    .ok()
            })
            .collect(),
        tls: match (&raw.server.tls_cert, &raw.server.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: check.path(cert),
                key: check.path(key),
            }),
            (None, None) => None,
            _ => {
                check.problem(
                    "server.tls_cert",
                    "tls_cert and tls_key must be set together",
                );
                None
            }
        },
        shutdown_grace: check.duration("server.shutdown_grace", &raw.server.shutdown_grace),
        header_read_timeout: check.positive_duration(
            "server.header_read_timeout",
            &raw.server.header_read_timeout,
        ),
        max_connections: raw.server.max_connections,
        max_request_body: raw.server.max_request_body,
    };
    if server.max_connections == 0 {
        check.problem("server.max_connections", "must be at least 1");
    }

    let upstream = validate_upstream(&raw.upstream, &mut check);
    let auth = validate_auth(raw.auth, &mut check);

    let route = RouteTemplate::parse(&raw.once.route)
        .map_err(|e| check.problem("once.route", e))
        .ok();
    let retention = check.duration("once.retention", &raw.once.retention);
    let commit = check.choice(
        "once.commit",
        &raw.once.commit,
        &[
            ("complete", CommitMode::Complete),
            ("headers", CommitMode::Headers),
        ],
    );
    let once = route.zip(commit).map(|(route, commit)| OnceConfig {
        route,
        commit,
        fold_case: raw.once.fold_case,
        inflight_lease: check.positive_duration("once.inflight_lease", &raw.once.inflight_lease),
        retention: (!retention.is_zero()).then_some(retention),
    });

    let store = validate_store(&raw.store, &mut check);

    let rate_limits = raw
        .rate_limit
        .iter()
        .enumerate()
        .filter_map(|(i, limit)| {
            let key = format!("rate_limit[{i}]");
            let kind = check.choice(
                &format!("{key}.key"),
                &limit.key,
                &[
                    ("ip", RateKey::Ip),
                    ("token", RateKey::Token),
                    ("global", RateKey::Global),
                ],
            );
            if !(limit.per_second.is_finite() && limit.per_second > 0.0) {
                check.problem(
                    &format!("{key}.per_second"),
                    "must be a number greater than 0",
                );
                return None;
            }
            if limit.burst == 0 {
                check.problem(&format!("{key}.burst"), "must be at least 1");
                return None;
            }
            Some(RateLimitConfig {
                key: kind?,
                period: Duration::from_secs_f64(1.0 / limit.per_second)
                    .max(Duration::from_nanos(1)),
                burst: limit.burst,
            })
        })
        .collect();

    let log_format = check.choice(
        "log.format",
        &raw.log.format,
        &[("json", LogFormat::Json), ("pretty", LogFormat::Pretty)],
    );
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
        check.problem(
            "log.level",
            format!("{:?} is not a log level or filter ({e})", raw.log.level),
        );
    }

    let admin = AdminConfig {
        listen: check.socket_addr("admin.listen", &raw.admin.listen),
        token_env: raw.admin.token_env.filter(|name| !name.is_empty()),
    };
    if admin.listen == server.listen && admin.listen.port() != 0 {
        check.problem("admin.listen", "must differ from server.listen");
    }

    Some(Config {
        server,
        upstream: upstream?,
        auth: auth?,
        once: once?,
        store: store?,
        rate_limits,
        trace: TraceConfig {
            trust_incoming: raw.trace.trust_incoming,
        },
        log: LogConfig {
            format: log_format?,
            level: raw.log.level,
        },
        admin,
    })
}

fn validate_upstream(raw: &RawUpstream, check: &mut Checker<'_>) -> Option<UpstreamConfig> {
    let connect_timeout = check.positive_duration("upstream.connect_timeout", &raw.connect_timeout);
    let response_timeout =
        check.positive_duration("upstream.response_timeout", &raw.response_timeout);
    // Unset: the response timeout, but at least a minute, so a slow archive may pause.
    let body_idle_timeout = match raw.body_idle_timeout.as_deref() {
        Some(value) => check.positive_duration("upstream.body_idle_timeout", value),
        None => response_timeout.max(Duration::from_secs(60)),
    };
    let ca_file = raw.ca_file.as_deref().map(|p| check.path(p));
    let (scheme, authority, path_prefix) = check.http_url("upstream.url", raw.url.as_deref())?;
    Some(UpstreamConfig {
        scheme,
        authority,
        path_prefix,
        connect_timeout,
        response_timeout,
        body_idle_timeout,
        ca_file,
        preserve_host: raw.preserve_host,
    })
}

fn validate_auth(raw: RawAuth, check: &mut Checker<'_>) -> Option<AuthConfig> {
    let mode = raw.mode.as_deref().unwrap_or("presence");
    match mode {
        // Keys another mode would use (tokens, iam) are ignored, like the commented examples.
        "presence" => Some(AuthConfig::Presence),
        "static" => {
            if raw.tokens.is_empty() {
                check.problem(
                    "auth.tokens",
                    "auth.mode = \"static\" needs at least one [[auth.tokens]] entry",
                );
            }
            let mut tokens = Vec::new();
            for (i, token) in raw.tokens.into_iter().enumerate() {
                let mut sha256 = [0u8; 32];
                if hex::decode_to_slice(token.sha256.trim(), &mut sha256).is_err() {
                    check.problem(
                        &format!("auth.tokens[{i}].sha256"),
                        "must be 64 hex characters",
                    );
                    continue;
                }
                if let Some(projects) = &token.projects {
                    if projects.iter().any(String::is_empty) {
                        check.problem(
                            &format!("auth.tokens[{i}].projects"),
                            "must not contain an empty name",
                        );
                    }
                }
                tokens.push(StaticToken {
                    sha256,
                    projects: token.projects,
                });
            }
            Some(AuthConfig::Static(tokens))
        }
        "iam" => {
            let iam = raw.iam;
            let url = check.http_url("auth.iam.url", iam.url.as_deref());
            if iam.service_token_env.is_empty() {
                check.problem("auth.iam.service_token_env", "must not be empty");
            }
            let cache_ttl = check.duration("auth.iam.cache_ttl", &iam.cache_ttl);
            let negative_cache_ttl =
                check.duration("auth.iam.negative_cache_ttl", &iam.negative_cache_ttl);
            if iam.cache_capacity == 0 {
                check.problem("auth.iam.cache_capacity", "must be at least 1");
            }
            let (scheme, authority, path_prefix) = url?;
            Some(AuthConfig::Iam(IamConfig {
                scheme,
                authority,
                path_prefix,
                service_token_env: iam.service_token_env,
                cache_ttl,
                negative_cache_ttl,
                cache_capacity: iam.cache_capacity,
            }))
        }
        other => {
            check.problem(
                "auth.mode",
                format!("{other:?} is not one of presence, static, iam"),
            );
            None
        }
    }
}

fn validate_store(raw: &RawStore, check: &mut Checker<'_>) -> Option<StoreConfig> {
    let kind = raw.kind.as_deref().unwrap_or("embedded");
    // Keys another kind would use (path, url, key_prefix) are ignored.
    match kind {
        "embedded" => {
            let path = raw.path.as_deref().unwrap_or("data/oncegate.redb");
            if path.is_empty() {
                check.problem("store.path", "must not be empty");
            }
            Some(StoreConfig::Embedded {
                path: check.path(path),
            })
        }
        "memory" => Some(StoreConfig::Memory),
        "redis" => {
            let Some(url) = raw.url.as_deref().filter(|u| !u.is_empty()) else {
                check.problem("store.url", "is required with store.kind = \"redis\"");
                return None;
            };
            if let Err(e) = redis::Client::open(url) {
                check.problem("store.url", format!("is not a Redis URL ({e})"));
                return None;
            }
            Some(StoreConfig::Redis {
                url: url.to_string(),
                key_prefix: raw.key_prefix.clone().unwrap_or_else(|| "oncegate:".into()),
            })
        }
        other => {
            check.problem(
                "store.kind",
                format!("{other:?} is not one of embedded, memory, redis"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml(text, Path::new("/etc/oncegate"))
    }

    #[test]
    fn minimal_config_gets_spec_defaults() {
        let config = load("[upstream]\nurl = \"http://127.0.0.1:9000/prefix/\"\n").unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(30));
        assert_eq!(config.upstream.path_prefix, "/prefix");
        assert_eq!(config.once.commit, CommitMode::Complete);
        assert!(config.once.fold_case);
        assert_eq!(config.once.inflight_lease, Duration::from_secs(600));
        assert_eq!(config.once.retention, None);
        assert!(
            matches!(&config.store, StoreConfig::Embedded { path } if path == Path::new("/etc/oncegate/data/oncegate.redb"))
        );
        assert!(config.rate_limits.is_empty());
        assert!(config.trace.trust_incoming);
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.admin.listen, "127.0.0.1:9901".parse().unwrap());
    }

    #[test]
    fn unknown_keys_are_named() {
        let errors =
            load("[server]\nlistn = \"x\"\n[upstream]\nurl = \"http://a\"\nfoo = 1\n").unwrap_err();
        assert!(
            errors.0.iter().any(|e| e.contains("server.listn")),
            "{errors}"
        );
        assert!(
            errors.0.iter().any(|e| e.contains("upstream.foo")),
            "{errors}"
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let errors = load(
            "[server]\nlisten = \"nowhere\"\nshutdown_grace = \"soon\"\n[upstream]\nurl = \"ftp://x\"\n\
             [once]\ninflight_lease = \"0s\"\n[[rate_limit]]\nkey = \"ip\"\nper_second = 0\nburst = 1\n",
        )
        .unwrap_err();
        for key in [
            "server.listen",
            "server.shutdown_grace",
            "upstream.url",
            "once.inflight_lease",
            "rate_limit[0].per_second",
        ] {
            assert!(
                errors.0.iter().any(|e| e.starts_with(key)),
                "{key} missing in {errors}"
            );
        }
    }

    #[test]
    fn one_wrong_value_does_not_hide_the_others() {
        let errors = load(
            "[server]\nbogus = 1\nlisten = 8080\n[once]\ncommit = \"later\"\n\
             [[rate_limit]]\nkey = \"ipx\"\nper_second = 1\nburst = 1\n\
             [upstream]\nurl = \"http://a\"\nconnect_timeout = 3\n[log]\nformat = \"yaml\"\n",
        )
        .unwrap_err();
        for key in [
            "server.bogus",
            "server.listen",
            "once.commit",
            "rate_limit[0].key",
            "upstream.connect_timeout",
            "log.format",
        ] {
            assert!(
                errors.0.iter().any(|e| e.starts_with(key)),
                "{key} missing in {errors}"
            );
        }
    }

    #[test]
    fn keys_of_other_kinds_and_modes_are_ignored() {
        let config = load(
            "[upstream]\nurl = \"http://a\"\n[store]\nkind = \"memory\"\npath = \"data/x.redb\"\n\
             [auth]\nmode = \"presence\"\n[[auth.tokens]]\nsha256 = \"00\"\n",
        )
        .unwrap();
        assert!(matches!(config.store, StoreConfig::Memory));
    }

    #[test]
    fn type_errors_name_the_key() {
        let errors =
            load("[upstream]\nurl = \"http://a\"\n[once]\ncommit = \"sometimes\"\n").unwrap_err();
        assert!(errors.0[0].starts_with("once.commit"), "{errors}");
        let errors = load("[upstream]\nurl = 5\n").unwrap_err();
        assert!(errors.0[0].starts_with("upstream.url"), "{errors}");
    }

    #[test]
    fn iam_settings_and_redis_needs_a_url() {
        let errors = load("[upstream]\nurl = \"http://a\"\n[auth]\nmode = \"iam\"\n").unwrap_err();
        assert_eq!(errors.0, vec!["auth.iam.url: is required".to_string()]);
        let errors = load(
            "[upstream]\nurl = \"http://a\"\n[auth]\nmode = \"iam\"\n[auth.iam]\nurl = \"ftp://i\"\ncache_ttl = \"soon\"\ncache_capacity = 0\nrealm = 1\n",
        )
        .unwrap_err();
        for key in [
            "auth.iam.realm: unknown key",
            "auth.iam.url",
            "auth.iam.cache_ttl",
            "auth.iam.cache_capacity",
        ] {
            assert!(
                errors.0.iter().any(|e| e.starts_with(key)),
                "{key}: {errors}"
            );
        }
        let config = load(
            "[upstream]\nurl = \"http://a\"\n[auth]\nmode = \"iam\"\n[auth.iam]\nurl = \"https://iam.example.com/identity/\"\nnegative_cache_ttl = \"0s\"\n",
        )
        .unwrap();
        let AuthConfig::Iam(iam) = config.auth else {
            panic!("iam mode expected");
        };
        assert_eq!(iam.path_prefix, "/identity");
        assert_eq!(iam.service_token_env, "ONCEGATE_IAM_SERVICE_TOKEN");
        assert_eq!(iam.cache_ttl, Duration::from_secs(300));
        assert_eq!(iam.negative_cache_ttl, Duration::ZERO);
        assert_eq!(iam.cache_capacity, 100_000);
        let errors =
            load("[upstream]\nurl = \"http://a\"\n[store]\nkind = \"redis\"\n").unwrap_err();
        assert!(errors.0[0].contains("store.url"), "{errors}");
        let errors =
            load("[upstream]\nurl = \"http://a\"\n[store]\nkind = \"redis\"\nurl = \"http://x\"\n")
                .unwrap_err();
        assert!(errors.0[0].contains("store.url"), "{errors}");
        let config = load(
            "[upstream]\nurl = \"http://a\"\n[store]\nkind = \"redis\"\nurl = \"rediss://user:pw@h:6380/0\"\n",
        )
        .unwrap();
        assert!(
            matches!(config.store, StoreConfig::Redis { ref key_prefix, .. } if key_prefix == "oncegate:")
        );
    }

    #[test]
    fn durations_and_relative_paths() {
        assert_eq!(parse_duration("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert!(parse_duration("7 parsecs").is_err());
        let config = load(
            "[server]\ntls_cert = \"tls/c.pem\"\ntls_key = \"/abs/k.pem\"\n[upstream]\nurl = \"https://a\"\nca_file = \"ca.pem\"\n",
        )
        .unwrap();
        let tls = config.server.tls.unwrap();
        assert_eq!(tls.cert, Path::new("/etc/oncegate/tls/c.pem"));
        assert_eq!(tls.key, Path::new("/abs/k.pem"));
        assert_eq!(
            config.upstream.ca_file.unwrap(),
            Path::new("/etc/oncegate/ca.pem")
        );
    }

    #[test]
    fn static_tokens_are_validated() {
        let good = format!("[upstream]\nurl = \"http://a\"\n[auth]\nmode = \"static\"\n[[auth.tokens]]\nsha256 = \"{}\"\nprojects = [\"p1\"]\n", "ab".repeat(32));
        assert!(matches!(load(&good).unwrap().auth, AuthConfig::Static(ref t) if t.len() == 1));
        let bad = "[upstream]\nurl = \"http://a\"\n[auth]\nmode = \"static\"\n[[auth.tokens]]\nsha256 = \"zz\"\n";
        assert!(load(bad).unwrap_err().0[0].starts_with("auth.tokens[0].sha256"));
    }

    #[test]
    fn shipped_config_files_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for name in ["oncegate.toml", "demo.toml"] {
            let path = root.join(name);
            if let Err(e) = Config::load(&path) {
                panic!("{}: {e}", path.display());
            }
        }
    }
}
