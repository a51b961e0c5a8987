//! The registration API (edgeProxy's auto-discovery, same routes and fields):
//!
//! | route | answer |
//! |---|---|
//! | `GET /health` | status, version, registered backends, uptime |
//! | `POST /api/v1/register` | registers (or updates) a backend: JSON id, app, region, ip, port; country, weight, soft_limit, hard_limit optional |
//! | `POST /api/v1/heartbeat/{id}` | keeps a registered backend in rotation |
//! | `GET /api/v1/backends` | the backends registered through this POP |
//! | `GET /api/v1/backends/{id}` | one of them |
//! | `DELETE /api/v1/backends/{id}` | deregisters it |
//!
//! With a token configured, every route but `/health` needs `Authorization: Bearer
//! <token>`. A bad request gets a 4xx naming the problem, and nothing is written.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::http::{self, Reply, error, json, not_allowed};
use crate::application::registry::{RegisterRequest, Registry};
use crate::domain::ports::RegistrationError;

/// A registration is a few hundred bytes; this leaves room and no more.
pub const MAX_BODY: usize = 16 * 1024;

struct State {
    registry: Arc<Registry>,
    token: Option<String>,
    started: tokio::time::Instant,
    idle: std::time::Duration,
}

pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    token: Option<String>,
    idle: std::time::Duration,
    shutdown: CancellationToken,
) {
    let state = Arc::new(State {
        registry,
        token,
        started: tokio::time::Instant::now(),
        idle,
    });
    http::serve(listener, "registration", idle, shutdown, move |req| {
        let state = Arc::clone(&state);
        async move { state.handle(req).await }
    })
    .await
}

impl State {
    async fn handle(&self, req: Request<Incoming>) -> Reply {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        if path == "/health" {
            return match method {
                Method::GET => self.health().await,
                _ => not_allowed("GET"),
            };
        }
        if !http::bearer_ok(&req, self.token.as_deref()) {
            return http::unauthorized();
        }
        let backend = path
            .strip_prefix("/api/v1/backends/")
            .filter(|id| !id.is_empty());
        let heartbeat = path
            .strip_prefix("/api/v1/heartbeat/")
            .filter(|id| !id.is_empty());
        match (path.as_str(), &method, backend, heartbeat) {
            ("/api/v1/register", &Method::POST, _, _) => self.register(req).await,
            ("/api/v1/register", _, _, _) => not_allowed("POST"),
            ("/api/v1/backends", &Method::GET, _, _) => match self.registry.list().await {
                Ok(list) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "total": list.len(), "backends": list }),
                ),
                Err(e) => failed(e),
            },
            ("/api/v1/backends", _, _, _) => not_allowed("GET"),
            (_, &Method::GET, Some(id), _) => match self.registry.get(id).await {
                Ok(b) => json(StatusCode::OK, &b),
                Err(e) => failed(e),
            },
            (_, &Method::DELETE, Some(id), _) => match self.registry.deregister(id).await {
                Ok(()) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "id": id, "deregistered": true }),
                ),
                Err(e) => failed(e),
            },
            (_, _, Some(_), _) => not_allowed("GET, DELETE"),
            (_, &Method::POST, _, Some(id)) => match self.registry.heartbeat(id).await {
                Ok(b) => json(StatusCode::OK, &b),
                Err(e) => failed(e),
            },
            (_, _, _, Some(_)) => not_allowed("POST"),
            _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
        }
    }

    async fn register(&self, req: Request<Incoming>) -> Reply {
        let body = match http::body(req, MAX_BODY, self.idle).await {
            Ok(b) => b,
            Err(reply) => {
                self.registry
                    .counters
                    .rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return reply;
            }
        };
        let parsed: RegisterRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                self.registry
                    .counters
                    .rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid registration: {e}"),
                );
            }
        };
        match self.registry.register(parsed).await {
            Ok(r) => json(StatusCode::OK, &r),
            Err(e) => failed(e),
        }
    }

    /// Unauthenticated, so answered from memory: no store read per request.
    async fn health(&self) -> Reply {
        let registered = self.registry.count();
        json(
            StatusCode::OK,
            &serde_json::json!({
                "status": "ok",
                "version": env!("CARGO_PKG_VERSION"),
                "backends": registered,
                "registered_backends": registered,
                "uptime_secs": self.started.elapsed().as_secs(),
            }),
        )
    }
}

fn failed(e: RegistrationError) -> Reply {
    let code = match &e {
        RegistrationError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        RegistrationError::Conflict(_) => StatusCode::CONFLICT,
        RegistrationError::NotFound(_) => StatusCode::NOT_FOUND,
        RegistrationError::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
        RegistrationError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(code, &e.to_string())
}
