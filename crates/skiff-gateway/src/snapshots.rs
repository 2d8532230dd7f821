//! Snapshots of running instances and the branches forked from them:
//! `POST /v1/functions/{name}/snapshots`, `/v1/snapshots[/{id}]`, `POST /v1/snapshots/{id}/fork`,
//! `/v1/branches[/{id}]`, `POST /v1/branches/{id}/invoke`. The scheduler holds the branches;
//! the store keeps one row per snapshot and its image in `<data>/snapshots/<id>/`.

use crate::error::{ApiError, ApiResult};
use crate::invoke::{read_body, read_payload};
use crate::{blocking, AppState};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use skiff_core::Invocation;
use skiff_store::SnapshotRecord;
use std::sync::Arc;

/// Most branches one fork request starts.
pub const MAX_FORK: u64 = 64;

fn snapshot_json(rec: &SnapshotRecord) -> Value {
    json!({
        "id": rec.id,
        "function": rec.function,
        "revision": rec.revision,
        "created_at": skiff_core::units::rfc3339_ms(rec.created_at_ms),
        "created_at_ms": rec.created_at_ms,
        "size_bytes": rec.size_bytes,
    })
}

fn snapshot_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("snapshot `{id}` not found"))
}

/// Bytes of the files under `dir`.
fn dir_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// `POST /v1/functions/{name}/snapshots`: saves a running instance of the function (its
/// persistent instance or a warm one), leaving it running. 201 with the snapshot; 409
/// `no_running_instance` when none runs.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let n = name.clone();
    let id = format!("snap-{}", uuid::Uuid::new_v4());
    let i = id.clone();
    let dir = blocking(move || {
        st.store
            .get_function(&n)?
            .ok_or_else(|| ApiError::not_found(format!("function `{n}` not found")))?;
        Ok(st.store.snapshot_dir(&i)?)
    })
    .await?;
    let taken = match state.scheduler.snapshot(&name, &dir).await {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
    };
    let st = state.clone();
    let rec = blocking(move || {
        let size = dir_size(&dir);
        st.store
            .insert_snapshot(&id, &name, taken.revision, size)
            .inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&dir);
            })
            .map_err(ApiError::from)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(snapshot_json(&rec))))
}

#[derive(Deserialize)]
pub struct ListQuery {
    function: Option<String>,
}

/// `GET /v1/snapshots[?function=]`: newest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let recs = blocking(move || Ok(st.store.list_snapshots(q.function.as_deref())?)).await?;
    Ok(Json(
        json!({ "snapshots": recs.iter().map(snapshot_json).collect::<Vec<_>>() }),
    ))
}

async fn require_snapshot(state: &Arc<AppState>, id: &str) -> ApiResult<SnapshotRecord> {
    let st = state.clone();
    let i = id.to_string();
    blocking(move || Ok(st.store.get_snapshot(&i)?))
        .await?
        .ok_or_else(|| snapshot_not_found(id))
}

/// `GET /v1/snapshots/{id}`.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let rec = require_snapshot(&state, &id).await?;
    Ok(Json(snapshot_json(&rec)))
}

/// `DELETE /v1/snapshots/{id}`: stops the branches forked from it, removes its image. 204.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    require_snapshot(&state, &id).await?;
    state.scheduler.remove_snapshot_branches(&id).await;
    let st = state.clone();
    let i = id.clone();
    blocking(move || Ok(st.store.delete_snapshot(&i)?))
        .await?
        .ok_or_else(|| snapshot_not_found(&id))?;
    Ok(StatusCode::NO_CONTENT)
}

/// The `count` of a fork body: `{}` / empty → 1; otherwise a whole number in 1..=64.
fn fork_count(body: &[u8]) -> ApiResult<u32> {
    let field = |m: &str| ApiError::invalid_field("count", format!("count: {m}"));
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(1);
    }
    let v: Value = serde_json::from_slice(body).map_err(ApiError::invalid_json)?;
    let obj = v
        .as_object()
        .ok_or_else(|| field("body must be {\"count\": N}"))?;
    if let Some(k) = obj.keys().find(|k| *k != "count") {
        return Err(ApiError::invalid_field(
            k,
            format!("{k}: unknown field (expected count)"),
        ));
    }
    match obj.get("count") {
        None => Ok(1),
        Some(c) => c
            .as_u64()
            .filter(|n| (1..=MAX_FORK).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| {
                field(&format!(
                    "must be a whole number from 1 to {MAX_FORK}, got {c}"
                ))
            }),
    }
}

/// `POST /v1/snapshots/{id}/fork` with `{"count": N}`: restores N branches at once. 201
/// `{"branches": [...]}`.
pub async fn fork(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let body = read_body(&headers, body, 64 << 10).await?;
    let count = fork_count(&body)?;
    let st = state.clone();
    let i = id.clone();
    let (rev, dir) = blocking(move || {
        let snap = st
            .store
            .get_snapshot(&i)?
            .ok_or_else(|| snapshot_not_found(&i))?;
        let rec = st
            .store
            .get_revision(&snap.function, snap.revision)?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "revision {} of `{}` not found",
                    snap.revision, snap.function
                ))
            })?;
        let rev = crate::revisions::prepare(&st, rec)?;
        Ok((rev, st.store.snapshot_dir(&i)?))
    })
    .await?;
    let branches = state.scheduler.fork(&rev, &id, &dir, count).await?;
    Ok((StatusCode::CREATED, Json(json!({ "branches": branches }))))
}

#[derive(Deserialize)]
pub struct BranchQuery {
    snapshot: Option<String>,
}

/// `GET /v1/branches[?snapshot=]`: oldest first.
pub async fn list_branches(
    State(state): State<Arc<AppState>>,
    Query(q): Query<BranchQuery>,
) -> impl IntoResponse {
    let mut branches = state.scheduler.branches();
    if let Some(s) = &q.snapshot {
        branches.retain(|b| &b.snapshot == s);
    }
    Json(json!({ "branches": branches }))
}

fn branch_not_found(id: &str) -> ApiError {
    ApiError::from(skiff_scheduler::SchedError::BranchNotFound(id.to_string()))
}

/// `GET /v1/branches/{id}`.
pub async fn get_branch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    state
        .scheduler
        .branch(&id)
        .map(Json)
        .ok_or_else(|| branch_not_found(&id))
}

/// `DELETE /v1/branches/{id}`: stops it. 204.
pub async fn delete_branch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    if state.scheduler.delete_branch(&id).await {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(branch_not_found(&id))
    }
}

/// `POST /v1/branches/{id}/invoke`: a JSON event in, the function's reply out, exactly as
/// `POST /v1/functions/{name}/invoke` answers. Recorded under the branch's function.
pub async fn invoke_branch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let info = state
        .scheduler
        .branch(&id)
        .ok_or_else(|| branch_not_found(&id))?;
    // A disabled function's branches answer 503 like every other way in (cached lookup).
    crate::revisions::resolve(&state, &info.function, Some(&info.revision.to_string())).await?;
    let payload = read_payload(&headers, body).await?;
    let request_id = crate::exec::request_id();
    let inv = Invocation {
        request_id: request_id.clone(),
        function: info.function.clone(),
        qualifier: None,
        payload,
        client_context: None,
        trace_id: None,
    };
    let started_at_ms = skiff_core::units::now_ms();
    let mut result = match state.scheduler.invoke_branch(&id, inv).await {
        Ok(out) => Ok(out),
        Err(skiff_scheduler::SchedError::Invoke(o)) => Err(o),
        Err(e) => return Err(e.into()),
    };
    crate::exec::record_as(
        &state,
        &info.function,
        info.revision,
        request_id.clone(),
        started_at_ms,
        &mut result,
    );
    crate::invoke::output_response(&request_id, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_count_defaults_and_names_the_field() {
        assert_eq!(fork_count(b"").unwrap(), 1);
        assert_eq!(fork_count(b"{}").unwrap(), 1);
        assert_eq!(fork_count(br#"{"count": 64}"#).unwrap(), 64);
        for bad in [
            &br#"{"count": 0}"#[..],
            br#"{"count": 65}"#,
            br#"{"count": -1}"#,
            br#"{"count": 1.5}"#,
            br#"{"count": "2"}"#,
            b"[1]",
        ] {
            let e = fork_count(bad).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(
                e.extra["field"],
                "count",
                "{}",
                String::from_utf8_lossy(bad)
            );
            assert!(e.message.starts_with("count:"), "{}", e.message);
        }
        let e = fork_count(br#"{"n": 2}"#).unwrap_err();
        assert_eq!(e.extra["field"], "n");
        assert_eq!(fork_count(b"{").unwrap_err().code, "invalid_json");
    }
}
