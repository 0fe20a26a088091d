//! Request ids (SPEC §6): keep a well-formed incoming `X-Request-Id` when trusted, else make one.
//! tower-http's set/propagate layers do the rest; this file decides what counts as acceptable.

use http::{HeaderValue, Request};
use tower_http::request_id::{MakeRequestId, RequestId};

pub const X_REQUEST_ID: &str = "x-request-id";

/// Makes ids of 32 lowercase hex characters.
#[derive(Debug, Clone, Copy, Default)]
pub struct HexRequestId;

impl MakeRequestId for HexRequestId {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        let id = format!("{:032x}", rand::random::<u128>());
        HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

/// 1..=128 characters of `[A-Za-z0-9._-]`.
pub fn is_valid_request_id(value: &[u8]) -> bool {
    (1..=128).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Removes an incoming id that is untrusted, malformed or repeated, so a fresh one is made.
pub fn drop_unacceptable_id<B>(trust_incoming: bool) -> impl Fn(Request<B>) -> Request<B> + Clone {
    move |mut request: Request<B>| {
        let headers = request.headers_mut();
        let mut ids = headers.get_all(X_REQUEST_ID).iter();
        let keep = match (ids.next(), ids.next()) {
            (Some(id), None) => trust_incoming && is_valid_request_id(id.as_bytes()),
            _ => false,
        };
        if !keep {
            headers.remove(X_REQUEST_ID);
        }
        request
    }
}

/// The request's id as text; empty only if the request-id layer did not run.
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
