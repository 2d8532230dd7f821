//! Skiff's HTTP surface (axum): the management API under `/v1`, the invoke API, API-key
//! auth, `/health` and `/metrics`. Every entry point turns a request into an
//! [`skiff_core::Invocation`] and hands it to the scheduler; errors are mapped to HTTP in
//! [`error`] only.

use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::Router;
use skiff_scheduler::Scheduler;
use skiff_store::Store;
use std::sync::Arc;

pub mod apigw;
pub mod auth;
pub mod error;
pub mod events;
pub mod exec;
pub mod execute;
mod functions;
pub mod host;
mod invoke;
mod lambda;
pub mod policy;
mod proxy;
mod revisions;
pub mod seed;
mod snapshots;
mod stream;

pub use auth::Auth;
pub use error::{ApiError, ApiResult};
pub use revisions::RevisionCache;

/// Largest package upload accepted by `POST /v1/functions/{name}/revisions`.
pub const MAX_PACKAGE_BYTES: usize = 256 << 20;

/// Shared state of all handlers.
pub struct AppState {
    pub store: Store,
    pub scheduler: Arc<Scheduler>,
    pub auth: Auth,
    pub revisions: RevisionCache,
    /// Async invocation queue: wake-ups, shutdown and counters (see [`events`]).
    pub events: events::EventQueue,
    /// The seed-compatible ad-hoc invoke API (see [`seed`]).
    pub seed: seed::SeedState,
    /// Compiled route policies per revision (see [`policy`]).
    pub policies: policy::PolicyCache,
    /// Domain whose subdomains are function hosts (see [`host`]); `None` = host routing off.
    pub function_domain: Option<String>,
}

/// Gateway settings from `skiff serve`.
#[derive(Default, Clone)]
pub struct Options {
    /// `--function-domain`, normalized with [`host::parse_domain`].
    pub function_domain: Option<String>,
}

impl AppState {
    pub fn new(store: Store, scheduler: Arc<Scheduler>, auth: Auth) -> Arc<AppState> {
        AppState::with_options(store, scheduler, auth, Options::default())
    }

    pub fn with_options(
        store: Store,
        scheduler: Arc<Scheduler>,
        auth: Auth,
        options: Options,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            store,
            scheduler,
            auth,
            revisions: RevisionCache::default(),
            events: events::EventQueue::default(),
            seed: seed::SeedState::default(),
            policies: policy::PolicyCache::default(),
            function_domain: options.function_domain,
        })
    }
}

/// Runs blocking store work off the async executor.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("task failed: {e}")))?
}

/// The complete router.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route(
            "/v1/functions",
            post(functions::create).get(functions::list),
        )
        .route(
            "/v1/functions/{name}",
            get(functions::get)
                .delete(functions::delete)
                .patch(functions::patch),
        )
        .route(
            "/v1/functions/{name}/revisions",
            post(functions::upload_revision).get(functions::list_revisions),
        )
        .route(
            "/v1/functions/{name}/revisions/{number}",
            get(functions::get_revision),
        )
        .route("/v1/functions/{name}/aliases", get(functions::list_aliases))
        .route(
            "/v1/functions/{name}/aliases/{alias}",
            put(functions::put_alias)
                .get(functions::get_alias)
                .delete(functions::delete_alias),
        )
        .route(
            "/v1/functions/{name}/routes",
            get(functions::get_routes).put(functions::put_routes),
        )
        .route("/v1/functions/{name}/invoke", post(invoke::invoke))
        .route("/v1/functions/{name}/logs", get(functions::logs))
        .route("/v1/functions/{name}/dlq", get(events::list_dlq))
        .route(
            "/v1/functions/{name}/dlq/{id}",
            axum::routing::delete(events::delete_dead),
        )
        .route("/v1/functions/{name}/dlq/{id}/retry", post(events::redrive))
        .route("/v1/functions/{name}/events/{id}", get(events::get_event))
        .route(
            "/v1/functions/{name}/invocations",
            get(functions::invocations),
        )
        .route(
            "/v1/functions/{name}/aliases/{alias}/history",
            get(functions::alias_history),
        )
        .route(
            "/v1/functions/{name}/aliases/{alias}/rollback",
            post(functions::rollback),
        )
        .route("/v1/functions/{name}/runtime", get(functions::runtime))
        .route(
            "/v1/functions/{name}/runtime/restart",
            post(functions::restart),
        )
        .route(
            "/v1/functions/{name}/runtime/recycle",
            post(functions::recycle),
        )
        .route("/v1/functions/{name}/snapshots", post(snapshots::create))
        .route("/v1/snapshots", get(snapshots::list))
        .route(
            "/v1/snapshots/{id}",
            get(snapshots::get).delete(snapshots::delete),
        )
        .route("/v1/snapshots/{id}/fork", post(snapshots::fork))
        .route("/v1/branches", get(snapshots::list_branches))
        .route(
            "/v1/branches/{id}",
            get(snapshots::get_branch).delete(snapshots::delete_branch),
        )
        .route("/v1/branches/{id}/invoke", post(snapshots::invoke_branch))
        .route("/v1/secrets", get(functions::list_secrets))
        .route(
            "/v1/secrets/{name}",
            put(functions::put_secret).delete(functions::delete_secret),
        )
        .route("/metrics", get(functions::metrics))
        .layer(DefaultBodyLimit::max(MAX_PACKAGE_BYTES))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    let lambda_api = Router::new()
        .route(
            "/2015-03-31/functions/{function}/invocations",
            post(lambda::invoke),
        )
        // SDKs request ListFunctions with and without the trailing slash.
        .route("/2015-03-31/functions/", get(lambda::list_functions))
        .route("/2015-03-31/functions", get(lambda::list_functions))
        .route(
            "/2015-03-31/functions/{function}",
            get(lambda::get_function),
        )
        .route(
            "/2015-03-31/functions/{function}/configuration",
            get(lambda::get_configuration),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key_lambda,
        ));
    let seed_api = Router::new()
        .route("/functions/{function_id}/invoke", post(seed::invoke))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key_seed,
        ));
    let execute_api = Router::new()
        .route("/execute", post(execute::execute))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key_execute,
        ));
    let host_routing = state.function_domain.is_some();
    let app = Router::new()
        .route("/health", get(functions::health))
        .merge(seed_api)
        .merge(execute_api)
        .merge(apigw::routes())
        .merge(api)
        .merge(lambda_api)
        .fallback(|uri: axum::http::Uri| async move {
            if uri.path().starts_with("/2015-03-31/") {
                error::LambdaError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "UnknownOperationException",
                    format!("Skiff does not implement {}", uri.path()),
                )
                .into_response()
            } else {
                ApiError::not_found("no such route").into_response()
            }
        });
    if host_routing {
        // A layer on the whole router sees every request, before routing.
        app.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            host::route_by_host,
        ))
        .with_state(state)
    } else {
        app.with_state(state)
    }
}
