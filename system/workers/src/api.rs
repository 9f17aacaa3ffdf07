//! The workers process's HTTP API: `/healthz` (liveness), `/readyz` (red while a
//! partition is stuck, naming it), `/metrics`, and the read API over the projections
//! (`/api/audit/...`, `/api/analytics/minutes`, `/api/search`).

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use sqlx::PgPool;
use std::sync::Arc;

use crate::health::PartitionWatch;
use crate::queries;

/// What the routes read: the projections' database, the process's metrics, and the
/// stuck-partition watch behind /readyz.
#[derive(Clone)]
pub struct Api {
    pub pool: PgPool,
    pub metrics: PrometheusHandle,
    pub watch: Arc<PartitionWatch>,
}

type ApiResult = Result<Json<serde_json::Value>, (axum::http::StatusCode, String)>;

fn unavailable(e: sqlx::Error) -> (axum::http::StatusCode, String) {
    (axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<i64>,
    hours: Option<i64>,
    q: Option<String>,
    tenant: Option<String>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// /healthz, /readyz, /metrics and the read API, on `api`.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(a): State<Api>| async move {
                let stuck = a.watch.stuck(std::time::Instant::now());
                let code = if stuck.is_empty() {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                };
                let body = serde_json::json!({
                    "ready": stuck.is_empty(),
                    "stuck_after_s": a.watch.stuck_after().as_secs_f64(),
                    "stuck": stuck,
                });
                (code, Json(body))
            }),
        )
        .route(
            "/metrics",
            get(|State(a): State<Api>| async move { a.metrics.render() }),
        )
        .route(
            "/api/audit/users/{id}",
            get(
                |State(a): State<Api>, Path(id): Path<String>, Query(l): Query<Limit>| async move {
                    let rows = queries::audit_by_user(&a.pool, &id, l.limit.unwrap_or(100))
                        .await
                        .map_err(unavailable)?;
                    ApiResult::Ok(Json(serde_json::json!({ "user_id": id, "events": rows })))
                },
            ),
        )
        .route(
            "/api/audit/conversations/{id}",
            get(
                |State(a): State<Api>, Path(id): Path<String>, Query(l): Query<Limit>| async move {
                    let rows =
                        queries::audit_by_conversation(&a.pool, &id, l.limit.unwrap_or(1000))
                            .await
                            .map_err(unavailable)?;
                    ApiResult::Ok(Json(
                        serde_json::json!({ "conversation_id": id, "events": rows }),
                    ))
                },
            ),
        )
        .route(
            "/api/audit/errors",
            get(|State(a): State<Api>, Query(l): Query<Limit>| async move {
                let hours = l.hours.unwrap_or(24);
                let rows = queries::audit_errors(&a.pool, hours, now_ms(), l.limit.unwrap_or(100))
                    .await
                    .map_err(unavailable)?;
                ApiResult::Ok(Json(serde_json::json!({ "hours": hours, "events": rows })))
            }),
        )
        .route(
            "/api/audit/counts",
            get(|State(a): State<Api>| async move {
                let counts = queries::audit_counts(&a.pool).await.map_err(unavailable)?;
                ApiResult::Ok(Json(serde_json::json!(counts
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(
                ))))
            }),
        )
        .route(
            "/api/analytics/minutes",
            get(|State(a): State<Api>, Query(l): Query<Limit>| async move {
                let since = now_ms() - l.hours.unwrap_or(1) * 3_600_000;
                let rows = queries::analytics_minutes(&a.pool, since, l.limit.unwrap_or(1000))
                    .await
                    .map_err(unavailable)?;
                ApiResult::Ok(Json(serde_json::json!({ "minutes": rows })))
            }),
        )
        .route(
            "/api/search",
            get(|State(a): State<Api>, Query(l): Query<Limit>| async move {
                let (Some(q), Some(tenant)) = (l.q, l.tenant) else {
                    return Err((
                        axum::http::StatusCode::BAD_REQUEST,
                        "give ?tenant=...&q=...".to_string(),
                    ));
                };
                let hits = queries::search(&a.pool, &tenant, &q, l.limit.unwrap_or(20))
                    .await
                    .map_err(unavailable)?;
                ApiResult::Ok(Json(serde_json::json!({ "query": q, "hits": hits })))
            }),
        )
        .with_state(api)
}
