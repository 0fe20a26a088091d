//! Every response the proxy synthesizes, in one place.
//! `ProxyError` names each failure of SPEC §4; `into_response` turns it into the ROMA JSON shape.

use std::borrow::Cow;
use std::time::Duration;

use http::header::{HeaderValue, ACCEPT_RANGES, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE};
use http::{Response, StatusCode};

use crate::body::ProxyBody;
use crate::json;

/// The longest value any field of an error body may have (SPEC §1).
pub const MAX_FIELD_CHARS: usize = 128;
/// Room for four fields of up to 128 characters and the JSON around them: one allocation.
const ERROR_BODY_CAPACITY: usize = 640;

/// The most headers a synthesized error carries: `Content-Type`, `Cache-Control`,
/// `Accept-Ranges`, `Allow` or `Retry-After`, `Connection` and the edge's `X-Request-Id`.
const ERROR_HEADERS: usize = 6;

/// A failure the proxy answers itself instead of (or instead of continuing) forwarding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("X-Auth-Token header is missing")]
    MissingToken,
    #[error("X-Auth-Token is invalid: {0}")]
    BadToken(&'static str),
    #[error("token is not allowed for project")]
    ProjectForbidden,
    #[error("archive already downloaded")]
    AlreadyDownloaded,
    #[error("archive download in progress")]
    DownloadInProgress,
    #[error("path is not canonical: {0}")]
    NonCanonicalPath(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("invalid path parameter: {0}")]
    BadParameter(&'static str),
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Duration },
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(u64),
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
    #[error("IAM unavailable: {0}")]
    IamUnavailable(String),
    #[error("ledger unavailable: {0}")]
    StoreUnavailable(String),
    #[error("internal error")]
    Internal,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingToken
            | ProxyError::BadToken(_)
            | ProxyError::NonCanonicalPath(_)
            | ProxyError::BadParameter(_) => StatusCode::BAD_REQUEST,
            ProxyError::ProjectForbidden | ProxyError::AlreadyDownloaded => StatusCode::FORBIDDEN,
            ProxyError::DownloadInProgress => StatusCode::CONFLICT,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::IamUnavailable(_) | ProxyError::StoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn error_code(&self) -> &'static str {
        match self {
            ProxyError::MissingToken => "ROMA.1000",
            ProxyError::BadToken(_) => "ROMA.1002",
            ProxyError::ProjectForbidden => "ROMA.1006",
            ProxyError::AlreadyDownloaded => "ROMA.00000101",
            ProxyError::DownloadInProgress => "ROMA.00000102",
            ProxyError::NonCanonicalPath(_) | ProxyError::MethodNotAllowed => "ROMA.1007",
            ProxyError::BadParameter(_) => "ROMA.13000",
            ProxyError::RateLimited { .. } => "APIG.0308",
            ProxyError::PayloadTooLarge(_) => "APIG.0201",
            ProxyError::UpstreamUnreachable(_) => "APIC.0202",
            ProxyError::UpstreamTimeout => "APIC.0203",
            ProxyError::IamUnavailable(_) => "APIG.0613",
            ProxyError::StoreUnavailable(_) => "APIC.9000",
            ProxyError::Internal => "APIC.0000",
        }
    }

    fn summary(&self) -> &'static str {
        match self {
            ProxyError::MissingToken => "X-Auth-Token header is missing",
            ProxyError::BadToken(_) => "X-Auth-Token is invalid",
            ProxyError::ProjectForbidden => "token is not authorized for this project",
            ProxyError::AlreadyDownloaded => "asset package already downloaded",
            ProxyError::DownloadInProgress => "asset package download in progress",
            ProxyError::NonCanonicalPath(_) => "request path is not canonical",
            ProxyError::MethodNotAllowed => "method not allowed",
            ProxyError::BadParameter(_) => "invalid path parameter",
            ProxyError::RateLimited { .. } => "too many requests",
            ProxyError::PayloadTooLarge(_) => "request entity too large",
            ProxyError::UpstreamUnreachable(_) => "bad gateway",
            ProxyError::UpstreamTimeout => "gateway timeout",
            ProxyError::IamUnavailable(_) | ProxyError::StoreUnavailable(_) => {
                "service unavailable"
            }
            ProxyError::Internal => "internal error",
        }
    }

    /// Borrowed for every fixed text, so the common refusals allocate nothing here.
    fn details(&self) -> Cow<'static, str> {
        match self {
            ProxyError::MissingToken => "the request carries no X-Auth-Token header".into(),
            ProxyError::BadToken(why) => format!("X-Auth-Token {why}").into(),
            ProxyError::ProjectForbidden => "the token may not access this project".into(),
            ProxyError::AlreadyDownloaded => {
                "this asset package can be downloaded only once and has been downloaded".into()
            }
            ProxyError::DownloadInProgress => {
                "another download of this asset package is running; retry later".into()
            }
            ProxyError::NonCanonicalPath(why) => (*why).into(),
            ProxyError::MethodNotAllowed => "only GET is allowed on this resource".into(),
            ProxyError::BadParameter(why) => (*why).into(),
            ProxyError::RateLimited { retry_after } => {
                format!("retry after {} s", retry_after_secs(*retry_after)).into()
            }
            ProxyError::PayloadTooLarge(limit) => {
                format!("the request body is larger than {limit} bytes").into()
            }
            ProxyError::UpstreamUnreachable(why) => format!("upstream unreachable: {why}").into(),
            ProxyError::UpstreamTimeout => "the upstream did not answer in time".into(),
            // What went wrong inside is logged, not shown to the client.
            ProxyError::IamUnavailable(_) => {
                "the identity service could not verify the token".into()
            }
            ProxyError::StoreUnavailable(_) => "the download ledger is unreachable".into(),
            ProxyError::Internal => "the proxy failed to handle the request".into(),
        }
    }

    /// The response for this error. `close` asks HTTP/1 clients to drop the connection, used when
    /// the request body was never read.
    pub fn into_response(self, request_id: &str, close: bool) -> Response<ProxyBody> {
        let mut text = Vec::with_capacity(ERROR_BODY_CAPACITY);
        // The code and the summary are fixed texts with nothing to escape (a test checks each).
        text.extend_from_slice(b"{\"error_code\":\"");
        text.extend_from_slice(self.error_code().as_bytes());
        text.extend_from_slice(b"\",\"error_msg\":\"");
        text.extend_from_slice(self.summary().as_bytes());
        text.extend_from_slice(b"\",\"error_details\":");
        json::write_str(&mut text, truncate(&self.details()));
        text.extend_from_slice(b",\"request_id\":");
        json::write_str(&mut text, truncate(request_id));
        text.push(b'}');
        let mut response = Response::new(crate::body::full(text));
        // Room for every header set here and the edge's `X-Request-Id`, so the map never grows,
        // and no more: it stays within the allocator's per-thread cache (a map for 8 does not).
        *response.headers_mut() = http::HeaderMap::with_capacity(ERROR_HEADERS);
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        set_no_store(headers);
        match &self {
            ProxyError::MethodNotAllowed => {
                headers.insert(ALLOW, HeaderValue::from_static("GET"));
            }
            ProxyError::DownloadInProgress => {
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::RateLimited { retry_after } => {
                headers.insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(*retry_after)),
                );
            }
            _ => {}
        }
        if close {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// `Cache-Control: no-store` and `Accept-Ranges: none`, set on every synthesized error and on the
/// proxied archive so no cache or client ever replays or resumes a one-time download.
pub fn set_no_store(headers: &mut http::HeaderMap) {
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("none"));
}

/// Whole seconds, rounded up and at least 1, so a client that waits that long is let through.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// At most `MAX_FIELD_CHARS` characters.
fn truncate(value: &str) -> &str {
    // Never more characters than bytes: the common short value needs no scan.
    if value.len() <= MAX_FIELD_CHARS {
        return value;
    }
    match value.char_indices().nth(MAX_FIELD_CHARS) {
        None => value,
        Some((end, _)) => &value[..end],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    fn body_of(response: Response<ProxyBody>) -> serde_json::Value {
        use http_body_util::BodyExt;
        let body = futures_util::FutureExt::now_or_never(response.into_body().collect())
            .unwrap()
            .unwrap()
            .to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    #[test]
    fn fields_that_need_escaping_stay_valid_json() {
        let odd = "quote \" backslash \\ tab \t bell \u{7} é";
        let body =
            body_of(ProxyError::UpstreamUnreachable(odd.to_string()).into_response("id-1", false));
        assert_eq!(
            body["error_details"],
            format!("upstream unreachable: {odd}")
        );
        assert_eq!(body["request_id"], "id-1");
        assert_eq!(body["error_code"], "APIC.0202");
        assert_eq!(body["error_msg"], "bad gateway");
    }

    #[test]
    fn codes_and_summaries_need_no_escaping() {
        for error in every_error() {
            for text in [error.error_code(), error.summary()] {
                let mut escaped = Vec::new();
                json::write_str(&mut escaped, text);
                assert_eq!(escaped, format!("\"{text}\"").into_bytes(), "{error:?}");
                assert!(text.chars().count() <= MAX_FIELD_CHARS, "{error:?}");
            }
        }
    }

    #[test]
    fn long_fields_are_cut_at_a_character_boundary() {
        let accented = "é".repeat(200);
        let body = body_of(ProxyError::Internal.into_response(&accented, false));
        assert_eq!(body["request_id"], "é".repeat(MAX_FIELD_CHARS));
    }

    /// One error of each kind.
    fn every_error() -> [ProxyError; 15] {
        [
            ProxyError::MissingToken,
            ProxyError::BadToken("x"),
            ProxyError::ProjectForbidden,
            ProxyError::AlreadyDownloaded,
            ProxyError::DownloadInProgress,
            ProxyError::NonCanonicalPath("x"),
            ProxyError::MethodNotAllowed,
            ProxyError::BadParameter("x"),
            ProxyError::RateLimited {
                retry_after: Duration::from_secs(3),
            },
            ProxyError::PayloadTooLarge(1),
            ProxyError::UpstreamUnreachable("x".into()),
            ProxyError::UpstreamTimeout,
            ProxyError::IamUnavailable("x".into()),
            ProxyError::StoreUnavailable("x".into()),
            ProxyError::Internal,
        ]
    }

    #[test]
    fn the_header_map_of_an_error_never_grows() {
        let room = http::HeaderMap::<HeaderValue>::with_capacity(ERROR_HEADERS).capacity();
        for error in every_error() {
            let name = format!("{error:?}");
            let mut response = error.into_response("id-1", true);
            let headers = response.headers_mut();
            headers.insert(
                crate::layers::request_id::X_REQUEST_ID,
                HeaderValue::from_static("id-1"),
            );
            assert!(headers.contains_key(CONNECTION), "{name}");
            assert_eq!(headers.capacity(), room, "{name}");
        }
    }

    #[test]
    fn every_field_is_capped() {
        let long = "x".repeat(500);
        let response = ProxyError::UpstreamUnreachable(long.clone()).into_response(&long, false);
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let value = body_of(response);
        for field in ["error_code", "error_msg", "error_details", "request_id"] {
            let text = value[field].as_str().unwrap();
            assert!(
                !text.is_empty() && text.chars().count() <= MAX_FIELD_CHARS,
                "{field}"
            );
        }
    }
}
