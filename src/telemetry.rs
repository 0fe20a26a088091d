//! Logging (tracing-subscriber, json or pretty, `RUST_LOG` over `log.level`) and the
//! process-wide Prometheus recorder behind `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::{LogConfig, LogFormat};

/// Swaps the level filter of the installed subscriber (a reload changes `log.level`).
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber; `RUST_LOG`, when set, wins over `log.level`.
pub fn init_logging(config: &LogConfig) {
    let filter = rust_log_filter().unwrap_or_else(|| EnvFilter::new(&config.level));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match config.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
}

fn rust_log_filter() -> Option<EnvFilter> {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|value| EnvFilter::try_new(value).ok())
}

/// Applies a new `log.level`. Returns false when nothing changed: `RUST_LOG` is set (it wins),
/// or this process did not install the subscriber (tests embedding the proxy).
pub fn set_log_level(level: &str) -> Result<bool, String> {
    let Some(handle) = FILTER.get() else {
        return Ok(false);
    };
    if rust_log_filter().is_some() {
        return Ok(false);
    }
    let filter = EnvFilter::try_new(level).map_err(|e| format!("log.level: {e}"))?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    Ok(true)
}

/// The process-wide metrics recorder (installed on first use; tests start many apps).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .expect("static bucket list is not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            // Histogram samples pile up until drained: without upkeep they would grow without
            // bound between two scrapes.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("oncegate-metrics".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                });
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        "oncegate_requests_total",
        "Requests answered, by route and status."
    );
    metrics::describe_counter!(
        "oncegate_downloads_total",
        "Archive route requests, by outcome."
    );
    metrics::describe_counter!(
        "oncegate_rate_limited_total",
        "Requests refused by a rate limit."
    );
    metrics::describe_histogram!(
        "oncegate_request_duration_seconds",
        "Time from request to the end of the response body."
    );
    metrics::describe_histogram!(
        "oncegate_upstream_response_seconds",
        "Time until the upstream's response headers."
    );
}
