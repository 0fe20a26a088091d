//! Keystone v3 token verification for `auth.mode = "iam"` (SPEC §5), after keystonemiddleware's
//! `auth_token`: a bounded cache keyed by the token's SHA-256 and one IAM call per token at a time.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ACCEPT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use moka::future::Cache;
use serde::Deserialize;

use crate::config::{IamConfig, UpstreamConfig};
use crate::error::ProxyError;
use crate::pool::{describe, Pool};

/// Keystone answers with the whole token, service catalog included; anything bigger is not one.
const MAX_TOKEN_BODY: usize = 4 * 1024 * 1024;

/// Who a verified token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `None` for a domain-scoped or unscoped token: it matches no project.
    pub project_id: Option<String>,
    pub user_id: String,
    pub user_name: String,
    pub expires_at: SystemTime,
}

/// What the cache remembers of one token.
#[derive(Debug, Clone)]
enum Verdict {
    Valid(Arc<Identity>),
    /// IAM does not know the token (or it has expired): remembered for the negative TTL.
    Invalid,
}

pub struct IamVerifier {
    client: Pool<Empty<Bytes>>,
    tokens_uri: Uri,
    service_token: HeaderValue,
    timeout: Duration,
    cache: Cache<[u8; 32], Verdict>,
}

impl IamVerifier {
    /// IAM is reached like the upstream: same CA file and connect timeout; the whole exchange
    /// must finish within the upstream's response timeout.
    pub fn new(config: &IamConfig, upstream: &UpstreamConfig) -> Result<IamVerifier, String> {
        let service_token = std::env::var(&config.service_token_env)
            .ok()
            .map(|token| token.trim().to_string())
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                format!(
                    "auth.iam.service_token_env: environment variable {} is not set",
                    config.service_token_env
                )
            })?;
        let mut service_token = HeaderValue::from_str(&service_token).map_err(|_| {
            format!(
                "auth.iam.service_token_env: {} holds characters a header cannot carry",
                config.service_token_env
            )
        })?;
        service_token.set_sensitive(true);
        let tokens_uri = Uri::builder()
            .scheme(config.scheme.clone())
            .authority(config.authority.clone())
            .path_and_query(format!("{}/v3/auth/tokens", config.path_prefix))
            .build()
            .map_err(|e| format!("auth.iam.url: {e}"))?;
        let client = Pool::new(
            &config.scheme,
            &config.authority,
            upstream.connect_timeout,
            upstream.ca_file.as_deref(),
        )?;
        let cache = Cache::builder()
            .max_capacity(config.cache_capacity)
            .expire_after(VerdictExpiry {
                positive: config.cache_ttl,
                negative: config.negative_cache_ttl,
            })
            .build();
        Ok(IamVerifier {
            client,
            tokens_uri,
            service_token,
            timeout: upstream.response_timeout,
            cache,
        })
    }

    /// The token's identity, from the cache or from IAM. Concurrent first requests for one token
    /// share a single IAM call; a failure to reach IAM is not cached.
    pub async fn verify(
        &self,
        token: &[u8],
        digest: [u8; 32],
    ) -> Result<Arc<Identity>, ProxyError> {
        let entry = self
            .cache
            .entry(digest)
            .or_try_insert_with(self.fetch(token))
            .await
            .map_err(|e| ProxyError::IamUnavailable(e.to_string()))?;
        let result = if entry.is_fresh() { "miss" } else { "hit" };
        metrics::counter!("oncegate_iam_cache_total", "result" => result).increment(1);
        match entry.into_value() {
            Verdict::Valid(identity) if identity.expires_at > SystemTime::now() => Ok(identity),
            Verdict::Valid(_) => {
                // The entry's own expiry normally removes it first; a clock step may not.
                self.cache.invalidate(&digest).await;
                Err(ProxyError::BadToken("has expired"))
            }
            Verdict::Invalid => Err(ProxyError::BadToken("was rejected by IAM")),
        }
    }

    /// One `GET /v3/auth/tokens`: 200 → the identity; 404 (and 400) → the token is invalid;
    /// anything else, or no answer in time → IAM is unavailable.
    async fn fetch(&self, token: &[u8]) -> Result<Verdict, String> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.exchange(token))
            .await
            .unwrap_or_else(|_| Err("IAM did not answer in time".to_string()));
        let outcome = match &result {
            Ok(Verdict::Valid(_)) => "valid",
            Ok(Verdict::Invalid) => "invalid",
            Err(_) => "error",
        };
        metrics::counter!("oncegate_iam_requests_total", "outcome" => outcome).increment(1);
        metrics::histogram!("oncegate_iam_request_seconds").record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::warn!(error = %e, "token verification failed: IAM unavailable");
        }
        result
    }

    async fn exchange(&self, token: &[u8]) -> Result<Verdict, String> {
        let mut subject = HeaderValue::from_bytes(token)
            .map_err(|_| "token is not a header value".to_string())?;
        subject.set_sensitive(true);
        let request = Request::get(self.tokens_uri.clone())
            .header(ACCEPT, "application/json")
            .header(HeaderName::from_static("x-auth-token"), &self.service_token)
            .header(HeaderName::from_static("x-subject-token"), subject)
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("IAM unreachable: {}", describe(&e)))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => return Ok(Verdict::Invalid),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(format!(
                    "IAM refused the service token ({})",
                    response.status()
                ))
            }
            status => return Err(format!("IAM answered {status}")),
        }
        let body = Limited::new(response.into_body(), MAX_TOKEN_BODY)
            .collect()
            .await
            .map_err(|e| format!("IAM response body: {e}"))?
            .to_bytes();
        let identity = parse_token(&body)?;
        if identity.expires_at <= SystemTime::now() {
            return Ok(Verdict::Invalid);
        }
        Ok(Verdict::Valid(Arc::new(identity)))
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: TokenBody,
}

#[derive(Deserialize)]
struct TokenBody {
    expires_at: String,
    user: Named,
    project: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    id: String,
    #[serde(default)]
    name: String,
}

fn parse_token(body: &[u8]) -> Result<Identity, String> {
    let parsed: TokenResponse =
        serde_json::from_slice(body).map_err(|e| format!("IAM token response: {e}"))?;
    let token = parsed.token;
    Ok(Identity {
        expires_at: parse_expiry(&token.expires_at)?,
        project_id: token.project.map(|project| project.id),
        user_id: token.user.id,
        user_name: token.user.name,
    })
}

/// Keystone writes `2026-11-28T20:00:00.000000Z`; an explicit `+00:00` is read the same way.
fn parse_expiry(text: &str) -> Result<SystemTime, String> {
    let utc = text
        .strip_suffix("+00:00")
        .map_or_else(|| text.to_string(), |base| format!("{base}Z"));
    humantime::parse_rfc3339_weak(&utc).map_err(|e| format!("IAM token expires_at {text:?}: {e}"))
}

/// Valid tokens are kept for `cache_ttl` but never past their `expires_at`; invalid ones for
/// `negative_cache_ttl`.
struct VerdictExpiry {
    positive: Duration,
    negative: Duration,
}

impl moka::Expiry<[u8; 32], Verdict> for VerdictExpiry {
    fn expire_after_create(&self, _: &[u8; 32], verdict: &Verdict, _: Instant) -> Option<Duration> {
        Some(match verdict {
            Verdict::Valid(identity) => identity
                .expires_at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .min(self.positive),
            Verdict::Invalid => self.negative,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keystone_token_bodies_are_read() {
        let body = br#"{"token":{"methods":["password"],"expires_at":"2030-01-02T03:04:05.000000Z",
            "user":{"id":"u1","name":"alice","domain":{"id":"default"}},
            "project":{"id":"p1","name":"proj"},"roles":[],"catalog":[]}}"#;
        let identity = parse_token(body).unwrap();
        assert_eq!(identity.project_id.as_deref(), Some("p1"));
        assert_eq!(identity.user_id, "u1");
        assert_eq!(identity.user_name, "alice");
        assert_eq!(
            identity.expires_at,
            humantime::parse_rfc3339("2030-01-02T03:04:05Z").unwrap()
        );
        let domain_scoped =
            br#"{"token":{"expires_at":"2030-01-02T03:04:05+00:00","user":{"id":"u2"}}}"#;
        let identity = parse_token(domain_scoped).unwrap();
        assert_eq!(identity.project_id, None);
        assert!(parse_token(br#"{"token":{"user":{"id":"u"}}}"#).is_err());
        assert!(parse_token(b"<html>").is_err());
    }

    #[test]
    fn cache_lifetime_never_passes_expiry() {
        let expiry = VerdictExpiry {
            positive: Duration::from_secs(300),
            negative: Duration::from_secs(10),
        };
        let soon = Verdict::Valid(Arc::new(Identity {
            project_id: None,
            user_id: "u".into(),
            user_name: String::new(),
            expires_at: SystemTime::now() + Duration::from_secs(5),
        }));
        let ttl = moka::Expiry::expire_after_create(&expiry, &[0; 32], &soon, Instant::now());
        assert!(ttl.unwrap() <= Duration::from_secs(5));
        let ttl =
            moka::Expiry::expire_after_create(&expiry, &[0; 32], &Verdict::Invalid, Instant::now());
        assert_eq!(ttl, Some(Duration::from_secs(10)));
    }
}
