//! oncegate: a reverse proxy that lets each asset package be downloaded exactly once.
//! `start` builds the whole app from a `Config`; the binary and the tests both use it.

pub mod admin;
pub mod body;
pub mod config;
pub mod demo;
pub mod error;
pub mod iam;
pub mod json;
pub mod layers;
pub mod ledger;
pub mod net;
pub mod pool;
pub mod reload;
pub mod route;
pub mod server;
pub mod stack;
pub mod telemetry;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, StoreConfig};
use crate::layers::auth::Authenticator;
use crate::layers::once::OncePolicy;
use crate::layers::rate_limit::RateLimits;
use crate::ledger::embedded::EmbeddedLedger;
use crate::ledger::memory::MemoryLedger;
use crate::ledger::redis::RedisLedger;
use crate::ledger::timed::Timed;
use crate::ledger::Ledger;
use crate::reload::{Live, ReloadReport};
use crate::upstream::Upstream;

/// Scrapes and operators: a small, separate budget so proxy load cannot starve the admin port.
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// A started proxy: its bound addresses and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ledger: Arc<dyn Ledger>,
    live: Arc<Live>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Re-reads the config file and applies what can change live (SIGHUP).
    pub fn reload_from(&self, path: &std::path::Path) -> Result<ReloadReport, String> {
        self.live.reload_from(path)
    }

    /// Applies a new config: auth, rate limits and log level change live.
    pub fn reload(&self, config: Config) -> Result<ReloadReport, String> {
        self.live.apply(config)
    }

    /// Stops accepting; running downloads get up to `server.shutdown_grace` to finish.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Resolves once the proxy has stopped and the ledger is flushed.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Checks what the config points at (certificates, CA file, admin token) without starting.
pub fn check_resources(config: &Config) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if let Some(tls) = &config.server.tls {
        if let Err(e) = server::tls_acceptor(&tls.cert, &tls.key) {
            problems.push(e);
        }
    }
    if let Err(e) = Upstream::new(&config.upstream, config.server.max_request_body) {
        problems.push(e);
    }
    if let Err(e) = admin_token(config) {
        problems.push(e);
    }
    if let Err(e) = Authenticator::new(&config.auth, &config.upstream, config.once.fold_case) {
        problems.push(e);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn admin_token(config: &Config) -> Result<Option<String>, String> {
    let Some(name) = &config.admin.token_env else {
        return Ok(None);
    };
    match std::env::var(name) {
        Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_string())),
        _ => Err(format!(
            "admin.token_env: environment variable {name} is not set"
        )),
    }
}

/// Binds both listeners, opens the ledger and starts serving. Any failure leaves nothing running.
pub async fn start(config: Config) -> Result<Running, String> {
    // One crypto provider for every TLS user in the process (listener, upstream, Redis).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = telemetry::metrics_handle();
    let listener = server::bind(config.server.listen, "server.listen").await?;
    let admin_listener = server::bind(config.admin.listen, "admin.listen").await?;
    let tls = match &config.server.tls {
        Some(files) => Some(server::tls_acceptor(&files.cert, &files.key)?),
        None => None,
    };
    let upstream = Upstream::new(&config.upstream, config.server.max_request_body)?;
    let admin_token = admin_token(&config)?;
    let authenticator = Authenticator::new(&config.auth, &config.upstream, config.once.fold_case)?;
    let ledger: Arc<dyn Ledger> = match &config.store {
        StoreConfig::Memory => Arc::new(Timed::new(MemoryLedger::new(config.once.retention))),
        StoreConfig::Embedded { path } => {
            let path = path.clone();
            let retention = config.once.retention;
            let opened =
                tokio::task::spawn_blocking(move || EmbeddedLedger::open(&path, retention))
                    .await
                    .map_err(|e| e.to_string())?;
            Arc::new(Timed::new(opened.map_err(|e| format!("store.path: {e}"))?))
        }
        StoreConfig::Redis { url, key_prefix } => Arc::new(Timed::new(
            RedisLedger::new(url, key_prefix, config.once.retention)
                .map_err(|e| format!("store.url: {e}"))?,
        )),
    };
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;

    let rate_limits = Arc::new(ArcSwap::from_pointee(RateLimits::new(
        &config.rate_limits,
        config.server.trusted_proxies.clone(),
    )));
    let authenticator = Arc::new(ArcSwap::from_pointee(authenticator));
    let stack = stack::build(stack::StackParts {
        trust_incoming_id: config.trace.trust_incoming,
        rate_limits: rate_limits.clone(),
        route: config.once.route.clone(),
        fold_case: config.once.fold_case,
        authenticator: authenticator.clone(),
        once: Arc::new(OncePolicy {
            ledger: ledger.clone(),
            commit: config.once.commit,
            lease: config.once.inflight_lease,
            trusted_proxies: config.server.trusted_proxies.clone(),
        }),
        upstream,
    });
    let admin = Arc::new(admin::Admin {
        ledger: ledger.clone(),
        metrics,
        route: config.once.route.clone(),
        fold_case: config.once.fold_case,
        token: admin_token,
    });

    let (stop, stopped) = watch::channel(false);
    let housekeeping = spawn_housekeeping(
        ledger.clone(),
        rate_limits.clone(),
        config.once.inflight_lease,
    );
    // The admin listener keeps the request-id rules of the proxy (SPEC §6: every response).
    let admin_service = tower::ServiceBuilder::new()
        .map_request(layers::request_id::drop_unacceptable_id::<
            hyper::body::Incoming,
        >(config.trace.trust_incoming))
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            layers::request_id::HexRequestId,
        ))
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .service(tower::service_fn(move |request| {
            admin.clone().handle(request)
        }));
    let admin_task = tokio::spawn(server::serve(
        admin_listener,
        None,
        admin_service,
        wait_for(stopped.clone()),
        server::Limits {
            header_read_timeout: config.server.header_read_timeout,
            max_connections: ADMIN_MAX_CONNECTIONS,
            grace: Duration::from_secs(1),
        },
    ));
    let limits = server::Limits {
        header_read_timeout: config.server.header_read_timeout,
        max_connections: config.server.max_connections,
        grace: config.server.shutdown_grace,
    };
    let live = Arc::new(Live::new(config, authenticator, rate_limits));
    let task_ledger = ledger.clone();
    let task = tokio::spawn(async move {
        server::serve(listener, tls, stack, wait_for(stopped), limits).await;
        housekeeping.abort();
        if let Err(e) = task_ledger.flush().await {
            tracing::error!(error = %e, "could not flush the ledger");
        }
        let _ = admin_task.await;
        tracing::info!("stopped");
    });
    tracing::info!(listen = %addr, admin = %admin_addr, "oncegate started");
    Ok(Running {
        addr,
        admin_addr,
        ledger,
        live,
        stop,
        task,
    })
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Prunes rate-limit state and sweeps records past retention on timers.
fn spawn_housekeeping(
    ledger: Arc<dyn Ledger>,
    rate_limits: layers::rate_limit::SharedRateLimits,
    lease: Duration,
) -> JoinHandle<()> {
    let sweep_every = (lease / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
    tokio::spawn(async move {
        let mut sweep = tokio::time::interval(sweep_every);
        let mut prune = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = sweep.tick() => ledger.sweep().await,
                _ = prune.tick() => {
                    let rate_limits = rate_limits.load();
                    if !rate_limits.is_empty() {
                        rate_limits.prune();
                    }
                }
            }
        }
    })
}
