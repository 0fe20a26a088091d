//! The admin listener (SPEC §9): `/healthz`, `/readyz`, `/metrics`, and, with a token,
//! lookup and reset of one archive key.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::body::{self, ProxyBody};
use crate::error::set_no_store;
use crate::layers::request_id::request_id_of;
use crate::ledger::{KeyState, Ledger, ResetOutcome};
use crate::net::ConnInfo;
use crate::route::{ArchiveKey, RouteTemplate};

pub struct Admin {
    pub ledger: Arc<dyn Ledger>,
    pub metrics: PrometheusHandle,
    pub route: RouteTemplate,
    pub fold_case: bool,
    /// The bearer token for `/archives/...`; `None` turns those routes off (404).
    pub token: Option<String>,
}

impl Admin {
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let path = request.uri().path();
        let response = match (request.method(), path) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                if self.ledger.ready().await {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
                }
            }
            (&Method::GET, "/metrics") => {
                let mut response = text(StatusCode::OK, self.metrics.render());
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            (method, path) if path.starts_with("/archives/") && self.token.is_some() => {
                self.archive(method, path, &request).await
            }
            _ => json_response(StatusCode::NOT_FOUND, json!({"error": "not found"})),
        };
        Ok(response)
    }

    async fn archive(
        &self,
        method: &Method,
        path: &str,
        request: &Request<Incoming>,
    ) -> Response<ProxyBody> {
        if let Some(denied) = self.check_bearer(request) {
            return denied;
        }
        let Some(key) = self.key_from_path(path) else {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "not an archive key"}),
            );
        };
        let result = match *method {
            Method::GET => self.ledger.lookup(key.as_str()).await.map(|state| {
                let (state, record) = describe(&state);
                json_response(StatusCode::OK, json!({"state": state, "record": record}))
            }),
            Method::DELETE => self.ledger.reset(key.as_str()).await.map(|outcome| {
                let (status, state, label) = match outcome {
                    ResetOutcome::Reset => (StatusCode::OK, "unseen", "reset"),
                    ResetOutcome::Unseen => (StatusCode::OK, "unseen", "unseen"),
                    ResetOutcome::InFlight => (StatusCode::CONFLICT, "in_flight", "in_flight"),
                };
                metrics::counter!("oncegate_admin_resets_total", "result" => label).increment(1);
                // Who: the holder of the admin token, from this address.
                let client = request
                    .extensions()
                    .get::<ConnInfo>()
                    .map(|conn| conn.peer.to_string())
                    .unwrap_or_default();
                tracing::info!(
                    target: "oncegate::admin",
                    request_id = %request_id_of(request), archive = %key.as_str(), result = label,
                    client = %client, at = %humantime::format_rfc3339_millis(SystemTime::now()),
                    "archive reset"
                );
                json_response(
                    status,
                    json!({"state": state, "record": null, "reset": outcome == ResetOutcome::Reset}),
                )
            }),
            _ => {
                let mut response = json_response(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "use GET or DELETE"}));
                response.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static("GET, DELETE"));
                return response;
            }
        };
        result.unwrap_or_else(|e| {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": e.to_string()}),
            )
        })
    }

    /// 401 without a bearer token, 403 with a wrong one; compared in constant time.
    fn check_bearer(&self, request: &Request<Incoming>) -> Option<Response<ProxyBody>> {
        let expected = self.token.as_deref()?.as_bytes();
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token);
        match presented {
            None => Some(json_response(
                StatusCode::UNAUTHORIZED,
                json!({"error": "bearer token required"}),
            )),
            Some(token) if bool::from(token.trim().as_bytes().ct_eq(expected)) => None,
            Some(_) => Some(json_response(
                StatusCode::FORBIDDEN,
                json!({"error": "wrong token"}),
            )),
        }
    }

    /// `/archives/{p}/{i}/{a}` → the key, folded like the proxy folds it.
    fn key_from_path(&self, path: &str) -> Option<ArchiveKey> {
        let rest = path.strip_prefix("/archives/")?;
        let valid = rest.split('/').all(|segment| {
            (1..=64).contains(&segment.len())
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
                && segment != "."
                && segment != ".."
        });
        if !valid {
            return None;
        }
        let key = if self.fold_case {
            rest.to_ascii_lowercase()
        } else {
            rest.to_string()
        };
        ArchiveKey::from_key_string(&self.route, &key)
    }
}

fn describe(state: &KeyState) -> (&'static str, serde_json::Value) {
    match state {
        KeyState::Unseen => ("unseen", serde_json::Value::Null),
        KeyState::InFlight => ("in_flight", serde_json::Value::Null),
        KeyState::Served(record) => (
            "served",
            json!({
                "key": record.key,
                "served_at": humantime::format_rfc3339_millis(record.served_at()).to_string(),
                "request_id": record.request_id,
                "bytes": record.bytes,
                "client": record.client,
                "token_sha256_prefix": record.token_sha256_prefix,
                "user_id": record.user_id,
            }),
        ),
    }
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    set_no_store(response.headers_mut());
    response
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    set_no_store(response.headers_mut());
    response
}
