//! Live reload (SIGHUP): a running proxy takes over new auth settings, rate limits and log level
//! without dropping connections or ledger state; everything else is reported as needing a restart.

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::layers::auth::{Authenticator, SharedAuthenticator};
use crate::layers::rate_limit::{RateLimits, SharedRateLimits};
use crate::telemetry;

/// The parts of a running proxy a reload may replace, and the config they came from.
pub struct Live {
    pub authenticator: SharedAuthenticator,
    pub rate_limits: SharedRateLimits,
    current: Mutex<Config>,
}

/// What a reload changed, by config section.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub applied: Vec<&'static str>,
    /// Changed in the file, still running with the old value until a restart.
    pub needs_restart: Vec<&'static str>,
}

impl Live {
    pub fn new(
        config: Config,
        authenticator: SharedAuthenticator,
        rate_limits: SharedRateLimits,
    ) -> Live {
        Live {
            authenticator,
            rate_limits,
            current: Mutex::new(config),
        }
    }

    /// Applies what can change live. Everything new is built before anything is swapped, so a
    /// failure (an IAM service token that is not set, say) leaves the running config whole.
    pub fn apply(&self, new: Config) -> Result<ReloadReport, String> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        // The running upstream and case folding stay in force until a restart; IAM follows them.
        let authenticator = (new.auth != current.auth)
            .then(|| Authenticator::new(&new.auth, &current.upstream, current.once.fold_case))
            .transpose()?;
        let rate_limits = (new.rate_limits != current.rate_limits)
            .then(|| RateLimits::new(&new.rate_limits, current.server.trusted_proxies.clone()));

        let mut report = ReloadReport::default();
        if let Some(authenticator) = authenticator {
            self.authenticator.store(Arc::new(authenticator));
            current.auth = new.auth.clone();
            report.applied.push("auth");
        }
        if let Some(rate_limits) = rate_limits {
            self.rate_limits.store(Arc::new(rate_limits));
            current.rate_limits = new.rate_limits.clone();
            report.applied.push("rate_limit");
        }
        if new.log.level != current.log.level {
            if telemetry::set_log_level(&new.log.level)? {
                report.applied.push("log.level");
            } else {
                tracing::info!("log.level changed but RUST_LOG is set and wins; left as it is");
            }
            current.log.level = new.log.level.clone();
        }
        let restart_only = [
            ("server", new.server != current.server),
            ("upstream", new.upstream != current.upstream),
            ("once", new.once != current.once),
            ("store", new.store != current.store),
            ("trace", new.trace != current.trace),
            ("log.format", new.log.format != current.log.format),
            ("admin", new.admin != current.admin),
        ];
        report.needs_restart = restart_only
            .into_iter()
            .filter_map(|(section, changed)| changed.then_some(section))
            .collect();
        Ok(report)
    }

    /// Re-reads `path` and applies it, logging the result; an invalid file changes nothing.
    pub fn reload_from(&self, path: &Path) -> Result<ReloadReport, String> {
        let result = Config::load(path)
            .map_err(|errors| errors.to_string())
            .and_then(|config| self.apply(config));
        match &result {
            Ok(report) => {
                metrics::counter!("oncegate_config_reloads_total", "result" => "applied")
                    .increment(1);
                tracing::info!(
                    config = %path.display(), applied = ?report.applied, "config reloaded"
                );
                if !report.needs_restart.is_empty() {
                    tracing::warn!(
                        config = %path.display(), sections = ?report.needs_restart,
                        "config changes that need a restart to take effect; still running with the old values"
                    );
                }
            }
            Err(error) => {
                metrics::counter!("oncegate_config_reloads_total", "result" => "rejected")
                    .increment(1);
                tracing::error!(
                    config = %path.display(), error = %error,
                    "config reload rejected; still running with the old config"
                );
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arc_swap::ArcSwap;

    fn config(extra: &str) -> Config {
        let text = format!("[upstream]\nurl = \"http://127.0.0.1:9\"\n{extra}");
        Config::from_toml(&text, Path::new(".")).unwrap()
    }

    fn live(config: Config) -> Live {
        let authenticator =
            Authenticator::new(&config.auth, &config.upstream, config.once.fold_case).unwrap();
        let rate_limits = RateLimits::new(&config.rate_limits, Vec::new());
        Live::new(
            config,
            Arc::new(ArcSwap::from_pointee(authenticator)),
            Arc::new(ArcSwap::from_pointee(rate_limits)),
        )
    }

    #[test]
    fn live_sections_apply_and_the_rest_waits_for_a_restart() {
        let live = live(config(""));
        let before = live.rate_limits.load_full();
        let report = live
            .apply(config(
                "[[rate_limit]]\nkey = \"global\"\nper_second = 1\nburst = 1\n[server]\nlisten = \"127.0.0.1:1\"\n[store]\nkind = \"memory\"\n",
            ))
            .unwrap();
        assert_eq!(report.applied, vec!["rate_limit"]);
        assert_eq!(report.needs_restart, vec!["server", "store"]);
        assert!(!Arc::ptr_eq(&before, &live.rate_limits.load_full()));
        // The same file again changes nothing and keeps the limiter state.
        let kept = live.rate_limits.load_full();
        let report = live
            .apply(config(
                "[[rate_limit]]\nkey = \"global\"\nper_second = 1\nburst = 1\n",
            ))
            .unwrap();
        assert!(report.applied.is_empty());
        assert!(Arc::ptr_eq(&kept, &live.rate_limits.load_full()));
    }

    #[test]
    fn a_new_auth_that_cannot_be_built_changes_nothing() {
        let live = live(config(""));
        let auth_before = live.authenticator.load_full();
        let limits_before = live.rate_limits.load_full();
        let error = live
            .apply(config(
                "[auth]\nmode = \"iam\"\n[auth.iam]\nurl = \"http://127.0.0.1:9\"\nservice_token_env = \"ONCEGATE_TEST_UNSET_VARIABLE\"\n[[rate_limit]]\nkey = \"ip\"\nper_second = 1\nburst = 1\n",
            ))
            .unwrap_err();
        assert!(error.contains("ONCEGATE_TEST_UNSET_VARIABLE"), "{error}");
        assert!(Arc::ptr_eq(&auth_before, &live.authenticator.load_full()));
        assert!(Arc::ptr_eq(&limits_before, &live.rate_limits.load_full()));
    }
}
