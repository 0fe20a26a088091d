//! Request ids (SPEC §6): keep a well-formed incoming `X-Request-Id` when trusted, else make one.
//! This file decides what counts as acceptable and makes ids; the edge layer applies them.

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Request};
use tower_http::request_id::{MakeRequestId, RequestId};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Makes ids of 32 lowercase hex characters (for the admin listener's tower-http layers).
#[derive(Debug, Clone, Copy, Default)]
pub struct HexRequestId;

impl MakeRequestId for HexRequestId {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        Some(RequestId::new(make_request_id()))
    }
}

/// A fresh id: 128 random bits as 32 lowercase hex characters.
pub fn make_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let random = rand::random::<u128>();
    let mut text = [0u8; 32];
    for (index, digit) in text.iter_mut().enumerate() {
        *digit = HEX[(random >> (124 - 4 * index)) as usize & 0xf];
    }
    match HeaderValue::from_bytes(&text) {
        Ok(id) => id,
        // Not reachable (hex digits are visible ASCII), but a response always needs an id.
        Err(_) => HeaderValue::from_static("00000000000000000000000000000000"),
    }
}

/// 1..=128 characters of `[A-Za-z0-9._-]`.
pub fn is_valid_request_id(value: &[u8]) -> bool {
    (1..=128).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether the request's own id may be kept: trusted, sent once, and well formed.
fn acceptable_incoming_id(headers: &HeaderMap, trust_incoming: bool) -> Option<&HeaderValue> {
    let mut ids = headers.get_all(X_REQUEST_ID).iter();
    match (ids.next(), ids.next()) {
        (Some(id), None) if trust_incoming && is_valid_request_id(id.as_bytes()) => Some(id),
        _ => None,
    }
}

/// Removes an incoming id that is untrusted, malformed or repeated, so a fresh one is made.
pub fn drop_unacceptable_id<B>(trust_incoming: bool) -> impl Fn(Request<B>) -> Request<B> + Clone {
    move |mut request: Request<B>| {
        if acceptable_incoming_id(request.headers(), trust_incoming).is_none() {
            request.headers_mut().remove(X_REQUEST_ID);
        }
        request
    }
}

/// The request's id: its own when acceptable, else a fresh one put in its headers (replacing any
/// it sent), so the upstream sees the same id as the client and the logs.
pub fn accept_or_make_request_id(headers: &mut HeaderMap, trust_incoming: bool) -> HeaderValue {
    if let Some(id) = acceptable_incoming_id(headers, trust_incoming) {
        return id.clone();
    }
    let id = make_request_id();
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

/// The admin listener's request id (set by tower-http's layer) as text.
pub fn request_id_of<B>(request: &Request<B>) -> String {
    request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity() {
        assert!(is_valid_request_id(b"abc-DEF_1.2"));
        assert!(is_valid_request_id(&[b'a'; 128]));
        assert!(!is_valid_request_id(&[b'a'; 129]));
        assert!(!is_valid_request_id(b""));
        assert!(!is_valid_request_id(b"a b"));
        assert!(!is_valid_request_id(b"a/b"));
    }

    #[test]
    fn generated_ids_are_32_hex() {
        let id = HexRequestId.make_request_id(&Request::new(())).unwrap();
        let text = id.header_value().to_str().unwrap();
        assert_eq!(text.len(), 32);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }

    #[test]
    fn an_acceptable_id_is_kept_and_any_other_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("client-7"));
        assert_eq!(accept_or_make_request_id(&mut headers, true), "client-7");
        let made = accept_or_make_request_id(&mut headers, false);
        assert_eq!(made.len(), 32);
        assert_eq!(
            headers.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(),
            [&made]
        );
        headers.append(X_REQUEST_ID, HeaderValue::from_static("second"));
        let made = accept_or_make_request_id(&mut headers, true);
        assert_eq!(
            headers.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(),
            [&made]
        );
    }

    #[test]
    fn untrusted_or_bad_ids_are_dropped() {
        let with = |id: &str| {
            Request::builder()
                .header(X_REQUEST_ID, id)
                .body(())
                .unwrap()
        };
        assert!(drop_unacceptable_id(true)(with("good-1"))
            .headers()
            .contains_key(X_REQUEST_ID));
        assert!(!drop_unacceptable_id(false)(with("good-1"))
            .headers()
            .contains_key(X_REQUEST_ID));
        assert!(!drop_unacceptable_id(true)(with("bad id"))
            .headers()
            .contains_key(X_REQUEST_ID));
        let twice = Request::builder()
            .header(X_REQUEST_ID, "a")
            .header(X_REQUEST_ID, "b")
            .body(())
            .unwrap();
        assert!(!drop_unacceptable_id(true)(twice)
            .headers()
            .contains_key(X_REQUEST_ID));
    }
}
