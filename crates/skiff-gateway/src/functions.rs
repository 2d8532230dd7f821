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
use skiff_core::FunctionSpec;
use skiff_store::{AliasTarget, Store};
use std::sync::Arc;

/// Runtimes and tiers this server can run today.
/// Refuses to point an alias at revisions that have publish blockers (409 listing them).
fn check_publishable(store: &Store, name: &str, revisions: &[u32]) -> ApiResult<()> {
    for &n in revisions {
        if let Some(rec) = store.get_revision(name, n)? {
            let blockers = skiff_core::publish::blockers(&rec.spec);
            if !blockers.is_empty() {
                return Err(ApiError::not_publishable(n, &blockers));
            }
        }
    }
    Ok(())
}

/// A revision resource: the stored record plus its publish blockers.
fn revision_json(rev: &skiff_store::RevisionRecord) -> Value {
    let mut v = json!(rev);
    let blockers = skiff_core::publish::blockers(&rev.spec);
    v["publishable"] = json!(blockers.is_empty());
    v["blockers"] = json!(blockers);
    v
}

/// Whether the top-level mapping of a function.yaml sets `key`.
fn sets_key(yaml: &str, key: &str) -> bool {
    serde_yaml::from_str::<serde_yaml::Value>(yaml)
        .ok()
        .and_then(|v| v.as_mapping().map(|m| m.contains_key(key)))
        .unwrap_or(false)
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

/// `DELETE /v1/functions/{name}`: the function, its revisions, aliases, records and events,
/// its instances, and then the packages no other revision uses.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let n = name.clone();
    let (packages, snapshots) = blocking(move || {
        let snapshots = st.store.list_snapshots(Some(&n))?;
        Ok(st
            .store
            .delete_function_packages(&n)?
            .map(|p| (p, snapshots)))
    })
    .await?
    .ok_or_else(|| ApiError::not_found(format!("function `{name}` not found")))?;
    state.revisions.invalidate(&name);
    state.policies.forget(&name);
    // Instances have the code mounted: stop them before removing it. This also stops its
    // branches and removes its workspace and revision snapshots.
    state.scheduler.remove_function(&name).await;
    let st = state.clone();
    blocking(move || {
        for snap in &snapshots {
            st.store.remove_snapshot_dir(&snap.id)?;
        }
        Ok(st.store.remove_unreferenced_packages(&packages)?)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PATCH /v1/functions/{name}` with `{"enabled": bool}`. Disabling makes every invoke path
/// answer 503 `function_disabled` and replaces instances (idle ones stop now, busy ones when
/// their invocation finishes).
pub async fn patch(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let v: Value = read_json(&headers, body, 64 << 10).await?;
    let obj = v
        .as_object()
        .ok_or_else(|| field_error("enabled", "body must be {\"enabled\": true|false}"))?;
    if let Some(k) = obj.keys().find(|k| *k != "enabled") {
        return Err(field_error(k, "unknown field (expected enabled)"));
    }
    let enabled = obj
        .get("enabled")
        .and_then(Value::as_bool)
        .ok_or_else(|| field_error("enabled", "must be true or false"))?;
    let st = state.clone();
    let n = name.clone();
    let f = blocking(move || {
        if !st.store.set_function_enabled(&n, enabled)? {
            return Err(ApiError::not_found(format!("function `{n}` not found")));
        }
        require_function(&st.store, &n)
    })
    .await?;
    state.revisions.invalidate(&name);
    if !enabled {
        state.scheduler.restart(&name);
    }
    Ok(Json(json!(f)))
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
    let default_sandbox = state.scheduler.default_sandbox();
    let rev = blocking(move || {
        let (mut spec, info) = Store::read_spec_from_package(&package)?;
        // A function that does not choose a tier gets the server's (`FAAS_RUNTIME`), fixed
        // in the stored revision so a later server default does not move it.
        if !sets_key(&info.spec_yaml, "sandbox")
            && !matches!(
                spec.runtime,
                skiff_core::Runtime::Js | skiff_core::Runtime::Wasm
            )
        {
            spec.sandbox = default_sandbox;
        }
        if spec.name != n {
            return Err(ApiError::bad_request(format!(
                "name: function.yaml says `{}` but the package was uploaded to `{n}`",
                spec.name
            ))
            .with("field", "name"));
        }
        // A revision with blockers may be stored to wait, never promoted.
        let blockers = skiff_core::publish::blockers(&spec);
        if promote && !blockers.is_empty() {
            let next = st
                .store
                .get_function(&n)?
                .map_or(1, |f| f.latest_revision + 1);
            return Err(ApiError::not_publishable(next, &blockers));
        }
        let sha = st.store.put_package(&package)?;
        let code_dir = st.store.unpack(&sha)?;
        Ok((spec, sha, code_dir, package.len() as u64))
    })
    .await?;
    let (spec, sha, code_dir, size) = rev;
    // The tier checks (and, for compiled runtimes, compiles ahead of time) the code before a
    // revision of it exists, so broken code is a 400 here, not a 502 on every request. A
    // revision that cannot start on this server (its tier or mode is not offered: stored
    // with promote=false to wait) is not checked: its tier may be missing.
    let startable = skiff_core::publish::blockers(&spec)
        .iter()
        .all(|b| b.allows_invoke());
    if startable {
        state
            .scheduler
            .check_code(&spec, &code_dir)
            .await
            .map_err(|e| {
                let what = match &e {
                    skiff_sandbox::SandboxError::Crashed { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                ApiError::bad_request(format!("handler: {what}")).with("field", "handler")
            })?;
    }
    let st = state.clone();
    let rev = blocking(move || Ok(st.store.create_revision(&spec, &sha, size, promote)?)).await?;
    state.revisions.invalidate(&name);
    Ok((StatusCode::CREATED, Json(revision_json(&rev))))
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
    Ok(Json(
        json!({ "revisions": revs.iter().map(revision_json).collect::<Vec<_>>() }),
    ))
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
    Ok(Json(revision_json(&rev)))
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

fn field_error(field: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("{field}: {message}")).with("field", field)
}

fn positive_revision(v: &Value, field: &str) -> ApiResult<u32> {
    v.as_i64()
        .filter(|n| *n > 0 && *n <= u32::MAX as i64)
        .map(|n| n as u32)
        .ok_or_else(|| field_error(field, "must be a positive whole number"))
}

/// An alias body: `{"revision": n}` or `{"routes": [{"revision": n, "weight": w}, …]}`.
fn alias_target(body: &Value) -> ApiResult<AliasTarget> {
    let obj = body.as_object().ok_or_else(|| {
        field_error(
            "revision",
            "body must be {\"revision\": n} or {\"routes\": [...]}",
        )
    })?;
    if let Some(k) = obj.keys().find(|k| *k != "revision" && *k != "routes") {
        return Err(field_error(
            k,
            "unknown field (expected revision or routes)",
        ));
    }
    match (obj.get("revision"), obj.get("routes")) {
        (Some(_), Some(_)) => Err(field_error(
            "routes",
            "give either revision or routes, not both",
        )),
        (None, None) => Err(field_error(
            "revision",
            "is required (or routes for a split)",
        )),
        (Some(r), None) => Ok(AliasTarget::Revision(positive_revision(r, "revision")?)),
        (None, Some(routes)) => {
            let items = routes
                .as_array()
                .ok_or_else(|| field_error("routes", "must be a list of {revision, weight}"))?;
            let mut pairs = Vec::with_capacity(items.len());
            for (i, r) in items.iter().enumerate() {
                let int = |k: &str| {
                    r.get(k).and_then(Value::as_i64).ok_or_else(|| {
                        field_error("routes", format!("routes[{i}].{k} must be a whole number"))
                    })
                };
                if let Some(k) = r
                    .as_object()
                    .and_then(|o| o.keys().find(|k| *k != "revision" && *k != "weight"))
                {
                    return Err(field_error(
                        "routes",
                        format!("routes[{i}].{k} is not a known field"),
                    ));
                }
                pairs.push((int("revision")?, int("weight")?));
            }
            let routes = skiff_core::split::validate(&pairs)
                .map_err(|e| ApiError::bad_request(e.to_string()).with("field", "routes"))?;
            Ok(AliasTarget::from_routes(routes))
        }
    }
}

fn check_alias(alias: &str) -> ApiResult<()> {
    if skiff_core::valid_name(alias) && !alias.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(field_error(
            "alias",
            "must match [a-z0-9-]{1,63} and not be all digits",
        ))
    }
}

/// `PUT /v1/functions/{name}/aliases/{alias}` with `{"revision": n}` or a weighted split
/// `{"routes": [{"revision": 3, "weight": 90}, {"revision": 4, "weight": 10}]}`.
pub async fn put_alias(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    check_alias(&alias)?;
    let body: Value = read_json(&headers, body, 64 << 10).await?;
    let target = alias_target(&body)?;
    let st = state.clone();
    let n = name.clone();
    let a = blocking(move || {
        require_function(&st.store, &n)?;
        let revisions: Vec<u32> = match &target {
            AliasTarget::Revision(r) => vec![*r],
            AliasTarget::Split(routes) => routes.iter().map(|r| r.revision).collect(),
        };
        check_publishable(&st.store, &n, &revisions)?;
        Ok(st.store.set_alias_target(&n, &alias, &target)?)
    })
    .await?;
    state.revisions.invalidate(&name);
    Ok(Json(json!(a)))
}

/// `GET /v1/functions/{name}/aliases/{alias}/history`: past values, newest first.
pub async fn alias_history(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let history = blocking(move || {
        st.store
            .get_alias(&name, &alias)?
            .ok_or_else(|| ApiError::not_found(format!("alias `{alias}` of `{name}` not found")))?;
        Ok(st.store.alias_history(&name, &alias)?)
    })
    .await?;
    Ok(Json(json!({ "history": history })))
}

/// `POST /v1/functions/{name}/aliases/{alias}/rollback` with an optional `{"to": n}`:
/// without `to`, back to the alias's previous value (see `Store::rollback_alias`).
pub async fn rollback(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let bytes = read_body(&headers, body, 64 << 10).await?;
    let to = if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let v: Value = serde_json::from_slice(&bytes).map_err(ApiError::invalid_json)?;
        let obj = v
            .as_object()
            .ok_or_else(|| field_error("to", "body must be {} or {\"to\": n}"))?;
        if let Some(k) = obj.keys().find(|k| *k != "to") {
            return Err(field_error(k, "unknown field (expected to)"));
        }
        match obj.get("to") {
            None | Some(Value::Null) => None,
            Some(n) => Some(positive_revision(n, "to")?),
        }
    };
    let st = state.clone();
    let n = name.clone();
    let a = blocking(move || {
        if let Some(to) = to {
            check_publishable(&st.store, &n, &[to])?;
        }
        Ok(st.store.rollback_alias(&n, &alias, to)?)
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

/// `GET /v1/functions/{name}/runtime`: whether it is enabled, and its instances (state
/// `idle`/`busy`/`draining`, age, invocations served, current memory), flat and per revision.
pub async fn runtime(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let st = state.clone();
    let n = name.clone();
    let f = blocking(move || require_function(&st.store, &n)).await?;
    let instances = state.scheduler.instances(&name);
    // `instances` is sorted by revision.
    let mut revisions: Vec<Value> = Vec::new();
    for chunk in instances.chunk_by(|a, b| a.revision == b.revision) {
        revisions.push(json!({ "revision": chunk[0].revision, "instances": chunk }));
    }
    Ok(Json(json!({
        "function": name,
        "enabled": f.enabled,
        "instances": instances,
        "revisions": revisions,
    })))
}

async fn require_exists(state: &Arc<AppState>, name: &str) -> ApiResult<()> {
    let st = state.clone();
    let n = name.to_string();
    blocking(move || require_function(&st.store, &n).map(|_| ())).await
}

/// `POST /v1/functions/{name}/runtime/restart`: graceful replacement of every instance.
pub async fn restart(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    require_exists(&state, &name).await?;
    Ok(Json(json!(state.scheduler.restart(&name))))
}

/// `POST /v1/functions/{name}/runtime/recycle`: stops idle instances now.
pub async fn recycle(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    require_exists(&state, &name).await?;
    Ok(Json(json!({ "stopped": state.scheduler.recycle(&name) })))
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
        let blockers = skiff_core::publish::blockers(&spec);
        if promote && !blockers.is_empty() {
            let next = st
                .store
                .get_function(&n)?
                .map_or(1, |f| f.latest_revision + 1);
            return Err(ApiError::not_publishable(next, &blockers));
        }
        Ok(st
            .store
            .create_revision(&spec, &base.package_sha256, base.package_size, promote)?)
    })
    .await?;
    state.revisions.invalidate(&name);
    Ok((StatusCode::CREATED, Json(revision_json(&rev))))
}

#[cfg(test)]
mod sets_key_tests {
    #[test]
    fn finds_top_level_keys_only() {
        assert!(super::sets_key("name: a\nsandbox: native\n", "sandbox"));
        assert!(super::sets_key("{name: a, sandbox: gvisor}", "sandbox"));
        assert!(!super::sets_key("name: a\nenv: {sandbox: x}\n", "sandbox"));
        assert!(!super::sets_key("name: a\n# sandbox: gvisor\n", "sandbox"));
        assert!(!super::sets_key(": not yaml [", "sandbox"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: Value) -> String {
        alias_target(&body).unwrap_err().extra["field"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn alias_bodies() {
        assert_eq!(
            alias_target(&json!({"revision": 3})).unwrap(),
            AliasTarget::Revision(3)
        );
        let split = alias_target(&json!({"routes": [
            {"revision": 3, "weight": 90}, {"revision": 4, "weight": 10}
        ]}))
        .unwrap();
        assert!(matches!(&split, AliasTarget::Split(r) if r.len() == 2));
        assert_eq!(split.primary(), 3);
        // One route of 100 % is a plain revision.
        assert_eq!(
            alias_target(&json!({"routes": [{"revision": 4, "weight": 100}]})).unwrap(),
            AliasTarget::Revision(4)
        );
        assert_eq!(field_of(json!({"revision": 0})), "revision");
        assert_eq!(field_of(json!({"revision": 1.5})), "revision");
        assert_eq!(field_of(json!([1])), "revision");
        assert_eq!(field_of(json!({"routes": {"revision": 1}})), "routes");
        assert_eq!(field_of(json!({"routes": [{"revision": 1}]})), "routes");
        assert_eq!(
            field_of(json!({"routes": [{"revision": 1, "weight": 100, "x": 1}]})),
            "routes"
        );
        assert_eq!(field_of(json!({"rev": 1})), "rev");
        let e = alias_target(&json!({"routes": [
            {"revision": 3, "weight": 90}, {"revision": 4, "weight": 20}
        ]}))
        .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("sum to 100 (got 110)"), "{}", e.message);
    }
}
