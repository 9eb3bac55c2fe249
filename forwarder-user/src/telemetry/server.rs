//! `/metrics`, `/healthz` and `/readyz` over HTTP/1.1 (hyper), served by the daemon on
//! `--metrics-addr` (loopback by default).
//!
//! - `/metrics`: the [`exposition`](super::exposition), read from the pinned maps at each
//!   scrape off the runtime's thread (`spawn_blocking`); 500 with the error if they cannot be
//!   read.
//! - `/healthz`: 200 while the process answers.
//! - `/readyz`: 200 once the config is applied, 503 before.
//!
//! GET and HEAD only (405 with `Allow` otherwise), 404 for any other path; connections are
//! kept alive between requests, and one that sends no complete request head within
//! [`HEADER_TIMEOUT`] is closed.

use std::{convert::Infallible, path::PathBuf, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tracing::{debug, warn};

use super::{DaemonCounters, exposition};

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// How long a connection may take to send a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

const TEXT: &str = "text/plain; charset=utf-8";

/// Serves until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, pin: PathBuf, counters: Arc<DaemonCounters>) {
    let endpoints = Arc::new(Endpoints { pin, counters });
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let endpoints = endpoints.clone();
                async move { Ok::<_, Infallible>(endpoints.answer(req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(sock), service);
            if let Err(e) = conn.await {
                debug!("metrics: connection: {e}");
            }
        });
    }
}

struct Endpoints {
    pin: PathBuf,
    counters: Arc<DaemonCounters>,
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, content_type.parse().expect("a valid header value"));
    r
}

impl Endpoints {
    /// HEAD is answered as GET; hyper sends the head only (with the body's length).
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let known = matches!(req.uri().path(), "/metrics" | "/healthz" | "/readyz");
        if !known {
            return text(StatusCode::NOT_FOUND, TEXT, "not found\n");
        }
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed: GET or HEAD\n");
            r.headers_mut().insert(ALLOW, "GET, HEAD".parse().expect("a valid header value"));
            return r;
        }
        match req.uri().path() {
            "/metrics" => {
                let (pin, counters) = (self.pin.clone(), self.counters.clone());
                match tokio::task::spawn_blocking(move || exposition::render(&pin, &counters)).await {
                    Ok(Ok(body)) => text(StatusCode::OK, exposition::CONTENT_TYPE, body),
                    Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("metrics: {e}\n")),
                }
            }
            "/healthz" => text(StatusCode::OK, TEXT, "ok\n"),
            _ if self.counters.ready.load(std::sync::atomic::Ordering::SeqCst) => text(StatusCode::OK, TEXT, "ready\n"),
            _ => text(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n"),
        }
    }
}
