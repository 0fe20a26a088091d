//! Authentication (SPEC §5): `presence` checks the token is there and well formed, `static`
//! matches its SHA-256 against configured tokens, `iam` asks Keystone. Runs before the ledger.

use std::collections::HashMap;
use std::future::Ready;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::future::{BoxFuture, Either};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response};
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

use crate::body::ProxyBody;
use crate::config::{AuthConfig, UpstreamConfig};
use crate::error::ProxyError;
use crate::iam::{IamVerifier, Identity};
use crate::layers::access_log::route_of;
use crate::route::{v2_project_segment, RouteMatch};

pub const X_AUTH_TOKEN: HeaderName = HeaderName::from_static("x-auth-token");
const MAX_TOKEN_LEN: usize = 100_000;

/// SHA-256 of the request's token, put into the request's extensions when authentication made
/// it: the ledger records a prefix of it, never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest(pub [u8; 32]);

impl TokenDigest {
    /// The identity kept in served records: the first 16 hex characters.
    pub fn prefix(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

pub fn token_digest(headers: &HeaderMap) -> Option<[u8; 32]> {
    headers
        .get(X_AUTH_TOKEN)
        .map(|token| Sha256::digest(token.as_bytes()).into())
}

/// The token value, checked for shape: present once, 1..=100000 visible ASCII characters.
fn presented_token(headers: &HeaderMap) -> Result<&[u8], ProxyError> {
    let mut values = headers.get_all(X_AUTH_TOKEN).iter();
    let token = match (values.next(), values.next()) {
        (None, _) => return Err(ProxyError::MissingToken),
        (Some(_), Some(_)) => return Err(ProxyError::BadToken("must be sent once")),
        (Some(token), None) => token.as_bytes(),
    };
    if token.is_empty() {
        return Err(ProxyError::MissingToken);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(ProxyError::BadToken("is longer than 100000 characters"));
    }
    if !token.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(ProxyError::BadToken("must be visible ASCII characters"));
    }
    Ok(token)
}

/// Identity headers an IAM-verified request carries upstream (keystonemiddleware's names); a
/// client's own copies are removed first so they cannot be forged.
const IDENTITY_HEADERS: [&str; 4] = [
    "x-project-id",
    "x-user-id",
    "x-user-name",
    "x-identity-status",
];

/// The settings the auth layer reads; swapped whole on a config reload.
pub type SharedAuthenticator = Arc<ArcSwap<Authenticator>>;

pub struct Authenticator {
    mode: Mode,
    fold_case: bool,
}

enum Mode {
    Presence,
    /// Digest → allowed projects (`None`: any).
    Static(HashMap<[u8; 32], Option<Vec<String>>>),
    Iam(Box<IamVerifier>),
}

impl Authenticator {
    /// `upstream` gives IAM its CA file and timeouts; fails when IAM's service token is missing.
    pub fn new(
        config: &AuthConfig,
        upstream: &UpstreamConfig,
        fold_case: bool,
    ) -> Result<Authenticator, String> {
        let mode = match config {
            AuthConfig::Presence => Mode::Presence,
            AuthConfig::Static(tokens) => Mode::Static(
                tokens
                    .iter()
                    .map(|t| (t.sha256, t.projects.clone()))
                    .collect(),
            ),
            AuthConfig::Iam(iam) => Mode::Iam(Box::new(IamVerifier::new(iam, upstream)?)),
        };
        Ok(Authenticator { mode, fold_case })
    }

    /// Whether checking a token needs a call out (and so an async step).
    fn is_remote(&self) -> bool {
        matches!(self.mode, Mode::Iam(_))
    }

    /// Checks the request's token without calling out; on success returns its digest when the
    /// check needed one. `presence` does not hash: most of its requests never need the digest
    /// (a refusal), and the once layer hashes the token itself for a served record.
    pub fn check<B>(&self, request: &Request<B>) -> Result<Option<TokenDigest>, ProxyError> {
        let token = presented_token(request.headers())?;
        match &self.mode {
            Mode::Presence => Ok(None),
            Mode::Static(tokens) => {
                let digest = TokenDigest(Sha256::digest(token).into());
                let projects = tokens
                    .get(&digest.0)
                    .ok_or(ProxyError::BadToken("is not recognised"))?;
                if let Some(allowed) = projects {
                    self.require_project(request, |project| {
                        allowed.iter().any(|name| self.same_project(name, project))
                    })?;
                }
                Ok(Some(digest))
            }
            Mode::Iam(_) => Err(ProxyError::Internal),
        }
    }

    /// The full check: the local one, or IAM's verdict plus the project match. Marks the request
    /// with the token's digest (and, after IAM, its identity).
    pub async fn authenticate<B>(&self, request: &mut Request<B>) -> Result<(), ProxyError> {
        let Mode::Iam(iam) = &self.mode else {
            if let Some(digest) = self.check(request)? {
                request.extensions_mut().insert(digest);
            }
            return Ok(());
        };
        let token = presented_token(request.headers())?;
        let digest = TokenDigest(Sha256::digest(token).into());
        let identity = iam.verify(token, digest.0).await?;
        self.require_project(request, |project| {
            identity
                .project_id
                .as_deref()
                .is_some_and(|id| self.same_project(id, project))
        })?;
        set_identity_headers(request.headers_mut(), &identity);
        request.extensions_mut().insert(digest);
        request.extensions_mut().insert(identity);
        Ok(())
    }

    /// 403 when the request is about a project (`/v2/{project_id}/...`) the token may not use.
    fn require_project<B>(
        &self,
        request: &Request<B>,
        allowed: impl Fn(&str) -> bool,
    ) -> Result<(), ProxyError> {
        match project_of(request) {
            Some(project) if !allowed(&project) => Err(ProxyError::ProjectForbidden),
            _ => Ok(()),
        }
    }

    /// With `fold_case`, `/v2/ABC/...` is the same project (and archive key) as `/v2/abc/...`.
    fn same_project(&self, name: &str, project: &str) -> bool {
        if self.fold_case {
            name.eq_ignore_ascii_case(project)
        } else {
            name == project
        }
    }
}

fn set_identity_headers(headers: &mut HeaderMap, identity: &Identity) {
    for name in IDENTITY_HEADERS {
        headers.remove(name);
    }
    let values = [
        ("x-project-id", identity.project_id.as_deref()),
        ("x-user-id", Some(identity.user_id.as_str())),
        ("x-user-name", Some(identity.user_name.as_str())),
        ("x-identity-status", Some("Confirmed")),
    ];
    for (name, value) in values {
        // A value a header cannot carry (a control character in a user name) is left out.
        if let Some(value) = value.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
}

/// The project a request is about: the archive key's `project_id`, or the `/v2/{project_id}/`
/// prefix of any other path.
fn project_of<B>(request: &Request<B>) -> Option<String> {
    match route_of(request) {
        Some(RouteMatch::Archive(key)) => key.param("project_id").map(str::to_string),
        _ => v2_project_segment(request.uri().path()).map(str::to_string),
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    authenticator: SharedAuthenticator,
}

impl AuthLayer {
    pub fn new(authenticator: SharedAuthenticator) -> AuthLayer {
        AuthLayer { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    authenticator: SharedAuthenticator,
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    /// Boxed only for IAM, which has to wait for its answer.
    type Future = Either<
        Ready<Result<Response<ProxyBody>, ProxyError>>,
        Either<S::Future, BoxFuture<'static, Result<Response<ProxyBody>, ProxyError>>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let authenticator = self.authenticator.load();
        if authenticator.is_remote() {
            // The service that was polled ready goes into the future; a clone stays behind.
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            let authenticator = arc_swap::Guard::into_inner(authenticator);
            return Either::Right(Either::Right(Box::pin(async move {
                authenticator.authenticate(&mut request).await?;
                inner.call(request).await
            })));
        }
        match authenticator.check(&request) {
            Ok(digest) => {
                if let Some(digest) = digest {
                    request.extensions_mut().insert(digest);
                }
                Either::Right(Either::Left(self.inner.call(request)))
            }
            Err(error) => Either::Left(std::future::ready(Err(error))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StaticToken;
    use crate::layers::access_log::AccessNote;
    use crate::route::RouteTemplate;

    fn upstream() -> UpstreamConfig {
        crate::config::Config::from_toml("[upstream]\nurl = \"http://127.0.0.1:9\"\n", ".".as_ref())
            .unwrap()
            .upstream
    }

    fn request(token: Option<&str>, path: &str) -> Request<()> {
        let mut builder = Request::builder().uri(path);
        if let Some(token) = token {
            builder = builder.header(X_AUTH_TOKEN, token);
        }
        let mut request = builder.body(()).unwrap();
        let route = RouteTemplate::parse(crate::config::DEFAULT_ROUTE).unwrap();
        let note = AccessNote::default();
        note.set_route(route.classify(path, true));
        request.extensions_mut().insert(Arc::new(note));
        request
    }

    #[test]
    fn presence_mode_checks_shape() {
        let auth = Authenticator::new(&AuthConfig::Presence, &upstream(), true).unwrap();
        assert_eq!(
            auth.check(&request(None, "/x")),
            Err(ProxyError::MissingToken)
        );
        assert_eq!(
            auth.check(&request(Some(""), "/x")),
            Err(ProxyError::MissingToken)
        );
        assert!(matches!(
            auth.check(&request(Some("a b"), "/x")),
            Err(ProxyError::BadToken(_))
        ));
        assert!(matches!(
            auth.check(&request(Some(&"a".repeat(100_001)), "/x")),
            Err(ProxyError::BadToken(_))
        ));
        assert!(auth
            .check(&request(Some(&"a".repeat(100_000)), "/x"))
            .is_ok());
        let twice = Request::builder()
            .header(X_AUTH_TOKEN, "a")
            .header(X_AUTH_TOKEN, "b")
            .body(())
            .unwrap();
        assert!(matches!(auth.check(&twice), Err(ProxyError::BadToken(_))));
    }

    #[test]
    fn static_mode_checks_digest_and_project() {
        let sha = |t: &str| -> [u8; 32] { Sha256::digest(t.as_bytes()).into() };
        let config = AuthConfig::Static(vec![
            StaticToken {
                sha256: sha("alpha"),
                projects: Some(vec!["P1".into()]),
            },
            StaticToken {
                sha256: sha("root"),
                projects: None,
            },
        ]);
        let auth = Authenticator::new(&config, &upstream(), true).unwrap();
        let archive = "/v2/p1/instances/i/assets/archives/a";
        assert!(auth.check(&request(Some("alpha"), archive)).is_ok());
        assert_eq!(
            auth.check(&request(
                Some("alpha"),
                "/v2/p2/instances/i/assets/archives/a"
            )),
            Err(ProxyError::ProjectForbidden)
        );
        assert_eq!(
            auth.check(&request(Some("alpha"), "/v2/p2/other")),
            Err(ProxyError::ProjectForbidden)
        );
        assert!(auth.check(&request(Some("alpha"), "/health")).is_ok());
        assert!(auth.check(&request(Some("root"), "/v2/p9/x")).is_ok());
        assert!(matches!(
            auth.check(&request(Some("beta"), archive)),
            Err(ProxyError::BadToken(_))
        ));
        let strict = Authenticator::new(&config, &upstream(), false).unwrap();
        assert_eq!(
            strict.check(&request(Some("alpha"), "/v2/p1/x")),
            Err(ProxyError::ProjectForbidden)
        );
    }

    #[test]
    fn digest_prefix_is_16_hex() {
        let digest = TokenDigest(Sha256::digest(b"secret").into());
        assert_eq!(digest.prefix().len(), 16);
        assert!(!digest.prefix().contains("secret"));
    }
}
