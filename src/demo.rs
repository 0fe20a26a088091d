//! `oncegate demo`: a bundled upstream that behaves like the ROMA Connect asset API (export job,
//! job status with `archive_id`, zip download) and the settings to run the proxy in front of it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::body::{self, ProxyBody};
use crate::config::{Config, UpstreamConfig};

pub const DEMO_PROJECT: &str = "demo-project";
pub const DEMO_INSTANCE: &str = "demo-instance";

/// The demo's proxy settings: `config/demo.toml`, with the given listen addresses and the
/// ledger in the temporary folder.
pub fn demo_config(listen: SocketAddr, admin: SocketAddr) -> Result<Config, String> {
    let text = include_str!("../config/demo.toml");
    let mut config = Config::from_toml(text, &std::env::temp_dir())
        .map_err(|e| format!("config/demo.toml: {e}"))?;
    config.server.listen = listen;
    config.admin.listen = admin;
    config.store = crate::config::StoreConfig::Embedded {
        path: std::env::temp_dir().join("oncegate-demo.redb"),
    };
    Ok(config)
}

/// The running demo upstream.
pub struct DemoUpstream {
    pub addr: SocketAddr,
    /// An archive prepared at start, so the printed commands work as they are.
    pub archive_id: String,
    pub job_id: String,
}

impl DemoUpstream {
    pub fn upstream_config(&self) -> UpstreamConfig {
        UpstreamConfig {
            scheme: http::uri::Scheme::HTTP,
            authority: self
                .addr
                .to_string()
                .parse()
                .expect("a socket address is an authority"),
            path_prefix: String::new(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(60),
            ca_file: None,
            preserve_host: false,
        }
    }
}

#[derive(Default)]
struct Jobs {
    /// job id → archive id
    archives: HashMap<String, String>,
}

/// Starts the demo upstream on a free loopback port; it runs until the process ends.
pub async fn start_upstream() -> Result<DemoUpstream, String> {
    let listener =
        crate::server::bind(SocketAddr::from(([127, 0, 0, 1], 0)), "demo upstream").await?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let jobs = Arc::new(Mutex::new(Jobs::default()));
    let (job_id, archive_id) = new_export(&jobs);
    let service = tower::service_fn(move |request| handle(jobs.clone(), request));
    tokio::spawn(crate::server::serve(
        listener,
        None,
        service,
        std::future::pending(),
        crate::server::Limits {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
            grace: Duration::ZERO,
        },
    ));
    Ok(DemoUpstream {
        addr,
        archive_id,
        job_id,
    })
}

fn new_export(jobs: &Mutex<Jobs>) -> (String, String) {
    let job_id = format!("{:016x}", rand::random::<u64>());
    let archive_id = format!("{:024x}", rand::random::<u128>() >> 32);
    jobs.lock()
        .unwrap_or_else(|e| e.into_inner())
        .archives
        .insert(job_id.clone(), archive_id.clone());
    (job_id, archive_id)
}

async fn handle(
    jobs: Arc<Mutex<Jobs>>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let segments: Vec<&str> = request
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .collect();
    let response = match (request.method(), segments.as_slice()) {
        (&Method::POST, ["v2", _, "instances", _, "assets", "export"]) => {
            let (job_id, _) = new_export(&jobs);
            json_response(StatusCode::OK, json!({ "job_id": job_id }))
        }
        (&Method::GET, ["v2", _, "instances", _, "assets", "jobs", job_id]) => {
            let archive = jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .archives
                .get(*job_id)
                .cloned();
            match archive {
                Some(archive_id) => json_response(
                    StatusCode::OK,
                    json!({ "id": job_id, "status": "success", "entities": { "archive_id": archive_id } }),
                ),
                None => roma_error(StatusCode::NOT_FOUND, "ROMA.00000404", "job not found"),
            }
        }
        (&Method::GET, ["v2", _, "instances", _, "assets", "archives", archive_id]) => {
            let known = jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .archives
                .values()
                .any(|a| a == archive_id);
            if known {
                let mut response = Response::new(body::full(archive_zip(archive_id)));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/zip"));
                response
            } else {
                roma_error(StatusCode::NOT_FOUND, "ROMA.00000404", "archive not found")
            }
        }
        _ => roma_error(StatusCode::NOT_FOUND, "ROMA.00000404", "no such resource"),
    };
    Ok(response)
}

/// A small zip holding the exported assets in the API's 200 shape.
fn archive_zip(archive_id: &str) -> Bytes {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let assets =
        json!({ "apps": "demo", "tasks": [{ "task_id": "t1" }], "archive_id": archive_id });
    let written = zip
        .start_file("assets.json", options)
        .and_then(|()| {
            zip.write_all(assets.to_string().as_bytes())
                .map_err(Into::into)
        })
        .and_then(|()| zip.start_file("README.txt", options))
        .and_then(|()| {
            zip.write_all(b"An oncegate demo asset package.\n")
                .map_err(Into::into)
        })
        .and_then(|()| zip.finish());
    written
        .map(|cursor| Bytes::from(cursor.into_inner()))
        .unwrap_or_default()
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn roma_error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let request_id = format!("{:032x}", rand::random::<u128>());
    json_response(
        status,
        json!({ "error_code": code, "error_msg": message, "error_details": message, "request_id": request_id }),
    )
}

/// The copy-pasteable walk-through printed at start.
pub fn instructions(proxy: SocketAddr, admin: SocketAddr, upstream: &DemoUpstream) -> String {
    let base = format!("http://{proxy}/v2/{DEMO_PROJECT}/instances/{DEMO_INSTANCE}/assets");
    let token = "-H 'X-Auth-Token: demo-token'";
    format!(
        "\noncegate demo: proxy on http://{proxy} (admin http://{admin}), demo upstream on http://{up}\n\n\
         # 1. the export job's status names the archive\n\
         curl -s {token} {base}/jobs/{job}\n\n\
         # 2. first download: 200 and a zip\n\
         curl -s -o asset.zip -w '%{{http_code}}\\n' {token} {base}/archives/{archive}\n\n\
         # 3. second download: refused with 403 ROMA.00000101\n\
         curl -s -w '\\n%{{http_code}}\\n' {token} {base}/archives/{archive}\n\n\
         # a new export job gives a new archive\n\
         curl -s -X POST {token} {base}/export\n\n\
         # metrics\n\
         curl -s http://{admin}/metrics | grep oncegate_\n\n\
         Stop with Ctrl-C.\n",
        up = upstream.addr,
        job = upstream.job_id,
        archive = upstream.archive_id,
    )
}
