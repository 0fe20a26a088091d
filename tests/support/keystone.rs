//! A fake OpenStack Keystone v3 on loopback for the `iam` auth tests: `GET /v3/auth/tokens`
//! against a token table with projects and expiry, a hit counter, a delay and forced failures.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;

struct FakeToken {
    project_id: Option<String>,
    user_id: String,
    user_name: String,
    expires_at: SystemTime,
}

#[derive(Default)]
struct State {
    tokens: Mutex<HashMap<String, FakeToken>>,
    hits: AtomicUsize,
    delay: Mutex<Duration>,
    forced_status: Mutex<Option<u16>>,
}

pub struct Keystone {
    pub addr: SocketAddr,
    tls: bool,
    service_token: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
    /// Connection tasks, aborted with the server so kept-alive connections die with it too.
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Drop for Keystone {
    fn drop(&mut self) {
        self.task.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Keystone {
    pub async fn start(service_token: &str) -> Keystone {
        Keystone::start_with_tls(service_token, None).await
    }

    /// The same server speaking HTTPS with `acceptor`'s certificate when given.
    pub async fn start_with_tls(
        service_token: &str,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
    ) -> Keystone {
        let tls = acceptor.is_some();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (task_state, task_connections) = (state.clone(), connections.clone());
        let service_token = service_token.to_string();
        let expected = service_token.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, expected) = (task_state.clone(), expected.clone());
                let service = hyper::service::service_fn(move |request| {
                    handle(state.clone(), expected.clone(), request)
                });
                let connection =
                    tokio::spawn(super::serve_connection(stream, acceptor.clone(), service));
                task_connections.lock().unwrap().push(connection);
            }
        });
        Keystone {
            addr,
            tls,
            service_token,
            state,
            task,
            connections,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn service_token(&self) -> &str {
        &self.service_token
    }

    pub fn add_token(
        &self,
        token: &str,
        project_id: Option<&str>,
        user_id: &str,
        user_name: &str,
        expires_in: Duration,
    ) {
        self.state.tokens.lock().unwrap().insert(
            token.to_string(),
            FakeToken {
                project_id: project_id.map(str::to_string),
                user_id: user_id.to_string(),
                user_name: user_name.to_string(),
                expires_at: SystemTime::now() + expires_in,
            },
        );
    }

    pub fn revoke(&self, token: &str) {
        self.state.tokens.lock().unwrap().remove(token);
    }

    /// Calls to `/v3/auth/tokens` so far, failures included.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn reset_hits(&self) {
        self.state.hits.store(0, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// `Some(status)`: every call is answered with that status.
    pub fn set_forced_status(&self, status: Option<u16>) {
        *self.state.forced_status.lock().unwrap() = status;
    }
}

async fn handle(
    state: Arc<State>,
    service_token: String,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() != "/v3/auth/tokens" || request.method() != http::Method::GET {
        return Ok(error(404, "The resource could not be found.", "Not Found"));
    }
    state.hits.fetch_add(1, Ordering::SeqCst);
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(status) = *state.forced_status.lock().unwrap() {
        return Ok(error(status, "forced failure", "Forced"));
    }
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if header("x-auth-token").as_deref() != Some(service_token.as_str()) {
        return Ok(error(
            401,
            "The request you have made requires authentication.",
            "Unauthorized",
        ));
    }
    let Some(subject) = header("x-subject-token") else {
        return Ok(error(400, "X-Subject-Token is missing", "Bad Request"));
    };
    let now = SystemTime::now();
    let body = {
        let tokens = state.tokens.lock().unwrap();
        match tokens.get(&subject).filter(|t| t.expires_at > now) {
            None => None,
            Some(token) => {
                let mut body = serde_json::json!({
                    "token": {
                        "methods": ["password"],
                        "expires_at": humantime::format_rfc3339_micros(token.expires_at).to_string(),
                        "issued_at": humantime::format_rfc3339_micros(now).to_string(),
                        "user": {
                            "id": token.user_id,
                            "name": token.user_name,
                            "domain": {"id": "default", "name": "Default"}
                        },
                        "roles": [{"id": "r1", "name": "member"}],
                        "catalog": []
                    }
                });
                if let Some(project) = &token.project_id {
                    body["token"]["project"] = serde_json::json!({
                        "id": project,
                        "name": format!("{project}-name"),
                        "domain": {"id": "default", "name": "Default"}
                    });
                }
                Some(body)
            }
        }
    };
    let Some(body) = body else {
        let shown: String = subject.chars().take(8).collect();
        return Ok(error(
            404,
            &format!("Could not find token: {shown}"),
            "Not Found",
        ));
    };
    Ok(Response::builder()
        .header("content-type", "application/json")
        .header("x-subject-token", subject)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap())
}

fn error(status: u16, message: &str, title: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"error": {"code": status, "message": message, "title": title}});
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}
