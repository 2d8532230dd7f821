//! Management API handlers: functions, revisions, aliases, logs, secrets, health, metrics.

use crate::error::{ApiError, ApiResult};
use crate::invoke::{read_body, read_json};
use crate::{blocking, AppState, MAX_PACKAGE_BYTES};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use skiff_core::{FunctionSpec, Runtime, SandboxKind};
use skiff_store::Store;
use std::sync::Arc;

/// Runtimes and tiers this server can run today.
fn check_supported(spec: &FunctionSpec) -> ApiResult<()> {
    if matches!(spec.runtime, Runtime::Http | Runtime::Wasm | Runtime::Js) {
        return Err(ApiError::bad_request(format!(
            "runtime: `{}` is not supported by this server yet (supported: python3, node, provided, command)",
            spec.runtime
        ))
        .with("field", "runtime"));
    }
    if spec.sandbox != SandboxKind::Native {
        return Err(ApiError::bad_request(format!(
            "sandbox: `{}` is not available on this server yet (available: native)",
            spec.sandbox
        ))
        .with("field", "sandbox"));
    }
    if !matches!(
        spec.mode,
        skiff_core::Mode::Warm | skiff_core::Mode::Ephemeral
    ) {
        return Err(ApiError::bad_request(format!(
            "mode: `{}` is not supported by this server yet (supported: warm, ephemeral)",
            spec.mode
        ))
        .with("field", "mode"));
    }
    Ok(())
}

fn check_name(name: &str) -> ApiResult<()> {
    if skiff_core::valid_name(name) {
        Ok(())
    } else {
        Err(
            ApiError::bad_request(format!("name: `{name}` must match [a-z0-9-]{{1,63}}"))
                .with("field", "name"),
        )
    }
}

pub async fn health() -> impl IntoResponse {
    Json(
        json!({ "status": "healthy", "timestamp": skiff_core::units::rfc3339_ms(skiff_core::units::now_ms()), "version": env!("CARGO_PKG_VERSION") }),
    )
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state
            .scheduler
            .metrics
            .render(state.scheduler.instance_count())
            + &state.events.render_metrics(),
    )
}

/// `POST /v1/functions` with a JSON spec (same fields as function.yaml): registers the
/// function. Code arrives with `POST /v1/functions/{name}/revisions`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let value: Value = read_json(&headers, body, 1 << 20).await?;
    let spec = FunctionSpec::from_value(&value)?;
    check_supported(&spec)?;
    let st = state.clone();
    let rec = blocking(move || Ok(st.store.create_function(&spec)?)).await?;
    Ok((StatusCode::CREATED, Json(json!(rec))))
}

pub async fn list(State(state): State<Arc<AppState>>) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let fns = blocking(move || Ok(st.store.list_functions()?)).await?;
    Ok(Json(json!({ "functions": fns })))
}

fn require_function(store: &Store, name: &str) -> ApiResult<skiff_store::FunctionRecord> {
    store
        .get_function(name)?
        .ok_or_else(|| ApiError::not_found(format!("function `{name}` not found")))
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let (f, aliases) = blocking(move || {
        let f = require_function(&st.store, &name)?;
        let aliases = st.store.list_aliases(&name)?;
        Ok((f, aliases))
    })
    .await?;
    let instances = state.scheduler.instances(&f.name);
    Ok(Json(
        json!({ "function": f, "aliases": aliases, "instances": instances }),
    ))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let n = name.clone();
    let existed = blocking(move || Ok(st.store.delete_function(&n)?)).await?;
    if !existed {
        return Err(ApiError::not_found(format!("function `{name}` not found")));
    }
    state.revisions.invalidate(&name);
    state.policies.forget(&name);
    state.scheduler.remove_function(&name).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct UploadQuery {
    promote: Option<bool>,
}

/// `POST /v1/functions/{name}/revisions`: body is a package (tar + zstd) with `function.yaml`
/// at its root. Creates revision N+1 and, unless `?promote=false`, points `production` at it.
pub async fn upload_revision(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    check_name(&name)?;
    let package = read_body(&headers, body, MAX_PACKAGE_BYTES).await?;
    let st = state.clone();
    let promote = q.promote.unwrap_or(true);
    let n = name.clone();
    let rev = blocking(move || {
        let (spec, _) = Store::read_spec_from_package(&package)?;
        if spec.name != n {
            return Err(ApiError::bad_request(format!(
                "name: function.yaml says `{}` but the package was uploaded to `{n}`",
                spec.name
            ))
            .with("field", "name"));
        }
        check_supported(&spec)?;
        let sha = st.store.put_package(&package)?;
        st.store.unpack(&sha)?;
        Ok(st
            .store
            .create_revision(&spec, &sha, package.len() as u64, promote)?)
    })
    .await?;
    state.revisions.invalidate(&name);
    Ok((StatusCode::CREATED, Json(json!(rev))))
}

pub async fn list_revisions(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let revs = blocking(move || {
        require_function(&st.store, &name)?;
        Ok(st.store.list_revisions(&name)?)
    })
    .await?;
    Ok(Json(json!({ "revisions": revs })))
}

pub async fn get_revision(
    State(state): State<Arc<AppState>>,
    Path((name, number)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let number: u32 = number.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::bad_request("revision: must be a positive whole number").with("field", "revision")
    })?;
    let st = state.clone();
    let rev = blocking(move || {
        require_function(&st.store, &name)?;
        st.store
            .get_revision(&name, number)?
            .ok_or_else(|| ApiError::not_found(format!("revision {number} of `{name}` not found")))
    })
    .await?;
    Ok(Json(json!(rev)))
}

pub async fn list_aliases(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let aliases = blocking(move || {
        require_function(&st.store, &name)?;
        Ok(st.store.list_aliases(&name)?)
    })
    .await?;
    Ok(Json(json!({ "aliases": aliases })))
}

pub async fn get_alias(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let a = blocking(move || {
        require_function(&st.store, &name)?;
        st.store
            .get_alias(&name, &alias)?
            .ok_or_else(|| ApiError::not_found(format!("alias `{alias}` of `{name}` not found")))
    })
    .await?;
    Ok(Json(json!(a)))
}

#[derive(Deserialize)]
pub struct AliasBody {
    revision: Option<i64>,
}

pub async fn put_alias(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    check_name(&alias).map_err(|_| {
        ApiError::bad_request("alias: must match [a-z0-9-]{1,63}").with("field", "alias")
    })?;
    let b: AliasBody = read_json(&headers, body, 64 << 10).await?;
    let revision = match b.revision {
        Some(n) if n > 0 && n <= u32::MAX as i64 => n as u32,
        _ => {
            return Err(
                ApiError::bad_request("revision: must be a positive whole number")
                    .with("field", "revision"),
            )
        }
    };
    let st = state.clone();
    let n = name.clone();
    let a = blocking(move || {
        require_function(&st.store, &n)?;
        Ok(st.store.set_alias(&n, &alias, revision)?)
    })
    .await?;
    state.revisions.invalidate(&name);
    Ok(Json(json!(a)))
}

pub async fn delete_alias(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    if alias == "production" {
        return Err(
            ApiError::bad_request("alias: `production` cannot be deleted").with("field", "alias"),
        );
    }
    let st = state.clone();
    let n = name.clone();
    let removed = blocking(move || {
        require_function(&st.store, &n)?;
        Ok(st.store.delete_alias(&n, &alias)?)
    })
    .await?;
    state.revisions.invalidate(&name);
    if removed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("alias not found"))
    }
}

#[derive(Deserialize)]
pub struct LogQuery {
    after: Option<i64>,
    limit: Option<u32>,
}

pub async fn logs(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let lines = blocking(move || {
        require_function(&st.store, &name)?;
        st.store.flush();
        Ok(st.store.logs(
            &name,
            q.after.unwrap_or(0),
            q.limit.unwrap_or(1000).min(10_000),
        )?)
    })
    .await?;
    let next = lines.last().map(|l| l.id);
    Ok(Json(json!({ "lines": lines, "next": next })))
}

pub async fn invocations(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let recs = blocking(move || {
        require_function(&st.store, &name)?;
        st.store.flush();
        Ok(st
            .store
            .list_invocations(&name, q.limit.unwrap_or(100).min(10_000))?)
    })
    .await?;
    Ok(Json(json!({ "invocations": recs })))
}

pub async fn runtime(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let n = name.clone();
    blocking(move || require_function(&st.store, &n).map(|_| ())).await?;
    Ok(Json(
        json!({ "function": name, "instances": state.scheduler.instances(&name) }),
    ))
}

#[derive(Deserialize)]
pub struct SecretBody {
    value: Option<String>,
}

pub async fn put_secret(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    if !skiff_core::spec::valid_secret_name(&name) {
        return Err(
            ApiError::bad_request("name: secret names must match [a-z0-9_-]{1,63}")
                .with("field", "name"),
        );
    }
    let b: SecretBody = read_json(&headers, body, 64 << 10).await?;
    let value = b
        .value
        .ok_or_else(|| ApiError::bad_request("value: is required").with("field", "value"))?;
    let st = state.clone();
    blocking(move || Ok(st.store.set_secret(&name, &value)?)).await?;
    state.revisions.clear();
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_secrets(State(state): State<Arc<AppState>>) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let names = blocking(move || Ok(st.store.list_secrets()?)).await?;
    Ok(Json(json!({ "secrets": names })))
}

pub async fn delete_secret(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let removed = blocking(move || Ok(st.store.delete_secret(&name)?)).await?;
    state.revisions.clear();
    if removed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("secret not found"))
    }
}

#[derive(Deserialize)]
pub struct RoutesQuery {
    qualifier: Option<String>,
    promote: Option<bool>,
}

/// `GET /v1/functions/{name}/routes[?qualifier=]`: the route policy of a revision
/// (default `production`); `routes: null` means the open default route `/`.
pub async fn get_routes(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<RoutesQuery>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let rec = blocking(move || Ok(st.store.resolve(&name, q.qualifier.as_deref())?)).await?;
    Ok(Json(json!({
        "function": rec.function,
        "revision": rec.number,
        "routes": rec.spec.routes,
    })))
}

/// `PUT /v1/functions/{name}/routes[?promote=false]` with `{"routes": [...]}` (or `null` for
/// the open default): creates a new revision with the `production` revision's package and
/// spec and these routes, and points `production` at it unless `promote=false`. Revisions stay
/// immutable.
pub async fn put_routes(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<RoutesQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let value: Value = read_json(&headers, body, 1 << 20).await?;
    let obj = value.as_object().ok_or_else(|| {
        ApiError::bad_request("routes: body must be {\"routes\": [...]}").with("field", "routes")
    })?;
    if let Some(k) = obj.keys().find(|k| *k != "routes") {
        return Err(
            ApiError::bad_request(format!("{k}: unknown field (allowed: routes)"))
                .with("field", k.clone()),
        );
    }
    let routes = obj.get("routes").cloned().ok_or_else(|| {
        ApiError::bad_request("routes: is required (null for the open default route)")
            .with("field", "routes")
    })?;
    let st = state.clone();
    let promote = q.promote.unwrap_or(true);
    let n = name.clone();
    let rev = blocking(move || {
        let base = st.store.resolve(&n, None)?;
        let mut spec = base.spec.to_value();
        if let Some(map) = spec.as_object_mut() {
            map.insert("routes".into(), routes);
        }
        let spec = FunctionSpec::from_value(&spec)?;
        Ok(st
            .store
            .create_revision(&spec, &base.package_sha256, base.package_size, promote)?)
    })
    .await?;
    state.revisions.invalidate(&name);
    Ok((StatusCode::CREATED, Json(json!(rev))))
}
