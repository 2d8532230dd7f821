//! How a revision is launched inside a process sandbox: the program per runtime and the
//! function's environment (Lambda set, `SKIFF_*`, user env, secrets). Pure functions.

use crate::protocol::ExecMode;
use crate::spec::{secret_env_name, FunctionSpec, Runtime};

/// Where the code is mounted inside every process sandbox.
pub const TASK_ROOT: &str = "/var/task";
/// Where Skiff's runtime bootstraps are mounted.
pub const RUNTIME_DIR: &str = "/var/runtime";
/// Port of the Runtime API served by the agent to worker 0.
pub const RUNTIME_API_PORT: u16 = 9001;
/// Port the server of an `http` function listens on (`$PORT`, on `$HOST` = 127.0.0.1).
pub const HTTP_PORT: u16 = 8080;
/// Region reported to functions.
pub const REGION: &str = "local";

/// The program to start for a runtime, as paths inside the sandbox.
pub fn program(spec: &FunctionSpec) -> (ExecMode, Vec<String>) {
    let s = |x: &str| x.to_string();
    match spec.runtime {
        Runtime::Python3 => (
            ExecMode::RuntimeApi,
            // -S: no site-packages scan (≈20 ms of cold start); code and deps come from /var/task.
            vec![
                s("/usr/bin/python3"),
                s("-S"),
                s("-u"),
                format!("{RUNTIME_DIR}/python/bootstrap.py"),
            ],
        ),
        Runtime::Node => (
            ExecMode::RuntimeApi,
            vec![
                s("/usr/bin/node"),
                format!("{RUNTIME_DIR}/node/bootstrap.js"),
            ],
        ),
        Runtime::Provided => (ExecMode::RuntimeApi, vec![task_path(&spec.handler)]),
        Runtime::Http => (ExecMode::Http, command_line(&spec.handler)),
        // command, and anything else handled by a process: the handler is the executable.
        _ => (ExecMode::Command, command_line(&spec.handler)),
    }
}

/// A handler command line as argv, its program resolved against the task root.
fn command_line(handler: &str) -> Vec<String> {
    shell_words(handler)
        .into_iter()
        .enumerate()
        .map(|(i, w)| if i == 0 { task_path(&w) } else { w })
        .collect()
}

/// Resolves a handler path relative to the task root (absolute paths are kept).
fn task_path(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{TASK_ROOT}/{}", p.trim_start_matches("./"))
    }
}

/// Splits a handler like `./run.sh --fast` on whitespace (no shell: the words are argv).
fn shell_words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// Identity of the revision being launched, for the environment.
pub struct LaunchInfo<'a> {
    pub spec: &'a FunctionSpec,
    pub revision: u32,
    pub workspace: &'a str,
    /// Resolved secret values, in the order of `spec.secrets`.
    pub secrets: &'a [(String, String)],
    pub otel_endpoint: Option<&'a str>,
}

/// The function's complete environment. Later entries win on duplicates; the user's env and
/// secrets cannot override the reserved names (validated in the spec).
pub fn environment(info: &LaunchInfo<'_>) -> Vec<(String, String)> {
    let spec = info.spec;
    let s = |x: &str| x.to_string();
    let mut env = vec![
        (s("PATH"), s("/usr/local/bin:/usr/bin:/bin")),
        (s("LANG"), s("C.UTF-8")),
        (s("TZ"), s(":UTC")),
        (s("HOME"), s("/tmp")),
        (s("LAMBDA_TASK_ROOT"), s(TASK_ROOT)),
        (s("LAMBDA_RUNTIME_DIR"), s(RUNTIME_DIR)),
        (
            s("AWS_LAMBDA_RUNTIME_API"),
            format!("127.0.0.1:{RUNTIME_API_PORT}"),
        ),
        (s("AWS_LAMBDA_FUNCTION_NAME"), spec.name.clone()),
        (s("AWS_LAMBDA_FUNCTION_VERSION"), info.revision.to_string()),
        (
            s("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"),
            spec.memory_mb().to_string(),
        ),
        (
            s("AWS_LAMBDA_LOG_GROUP_NAME"),
            format!("/aws/lambda/{}", spec.name),
        ),
        (
            s("AWS_LAMBDA_LOG_STREAM_NAME"),
            format!("skiff/{}/{}", spec.name, info.revision),
        ),
        (s("AWS_LAMBDA_INITIALIZATION_TYPE"), s("on-demand")),
        (s("AWS_REGION"), s(REGION)),
        (s("AWS_DEFAULT_REGION"), s(REGION)),
        (
            s("AWS_EXECUTION_ENV"),
            format!("AWS_Lambda_{}", spec.runtime),
        ),
        (s("_HANDLER"), spec.handler.clone()),
        (s("SKIFF_FUNCTION_NAME"), spec.name.clone()),
        (s("SKIFF_FUNCTION_VERSION"), info.revision.to_string()),
        (s("SKIFF_WORKSPACE_NAME"), info.workspace.to_string()),
    ];
    if let Some(ep) = info.otel_endpoint {
        env.push((s("OTEL_EXPORTER_OTLP_ENDPOINT"), ep.to_string()));
    }
    if spec.runtime == crate::Runtime::Python3 {
        env.push((s("PYTHONPATH"), format!("{TASK_ROOT}:{RUNTIME_DIR}/python")));
        env.push((s("PYTHONDONTWRITEBYTECODE"), s("1")));
    }
    if spec.runtime == crate::Runtime::Node {
        env.push((
            s("NODE_PATH"),
            format!("{TASK_ROOT}/node_modules:{TASK_ROOT}"),
        ));
    }
    for (k, v) in &spec.env {
        upsert(&mut env, k, v);
    }
    for (name, value) in info.secrets {
        upsert(&mut env, &secret_env_name(name), value);
    }
    if spec.runtime == crate::Runtime::Http {
        // The agent waits for this port and the host connects to it: not overridable.
        upsert(&mut env, "PORT", &HTTP_PORT.to_string());
        upsert(&mut env, "HOST", "127.0.0.1");
    }
    env
}

fn upsert(env: &mut Vec<(String, String)>, k: &str, v: &str) {
    match env.iter_mut().find(|(key, _)| key == k) {
        Some(slot) => slot.1 = v.to_string(),
        None => env.push((k.to_string(), v.to_string())),
    }
}

/// The package file `handler` names inside `code_dir`: a plain relative path (a leading `./`
/// allowed; no `..`, no absolute path) ending in one of `extensions`. `None` otherwise.
pub fn package_file(
    code_dir: &std::path::Path,
    handler: &str,
    extensions: &[&str],
) -> Option<std::path::PathBuf> {
    let h = handler.trim().trim_start_matches("./");
    let rel = std::path::Path::new(h);
    let ok_ext = rel
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.contains(&e));
    let plain = rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    (!h.is_empty() && ok_ext && plain && !rel.is_absolute()).then(|| code_dir.join(rel))
}

/// The ARN reported to functions for an invocation with an optional qualifier.
pub fn function_arn(name: &str, qualifier: Option<&str>) -> String {
    match qualifier {
        Some(q) => format!("arn:aws:lambda:{REGION}:000000000000:function:{name}:{q}"),
        None => format!("arn:aws:lambda:{REGION}:000000000000:function:{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_and_env() {
        let spec = FunctionSpec::from_yaml(
            "name: f\nruntime: command\nhandler: ./run.sh -x\nenv: {A: b}\nsecrets: [db-pass]\n",
        )
        .unwrap();
        let (mode, argv) = program(&spec);
        assert_eq!(mode, ExecMode::Command);
        assert_eq!(argv, ["/var/task/run.sh", "-x"]);
        let secrets = vec![("db-pass".to_string(), "s3cret".to_string())];
        let env = environment(&LaunchInfo {
            spec: &spec,
            revision: 3,
            workspace: "default",
            secrets: &secrets,
            otel_endpoint: None,
        });
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("A"), Some("b"));
        assert_eq!(get("DB_PASS"), Some("s3cret"));
        assert_eq!(get("AWS_LAMBDA_FUNCTION_VERSION"), Some("3"));
        assert_eq!(get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"), Some("128"));
    }

    #[test]
    fn lambda_environment_is_complete() {
        let spec = FunctionSpec::from_yaml(
            "name: fx\nruntime: provided\nhandler: bootstrap\nmemory: 256Mi\nenv: {WITH_EQUALS: \"a=b=c\"}\n",
        )
        .unwrap();
        let env = environment(&LaunchInfo {
            spec: &spec,
            revision: 7,
            workspace: "default",
            secrets: &[],
            otel_endpoint: None,
        });
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("{k} is not set"))
        };
        assert_eq!(get("AWS_LAMBDA_FUNCTION_NAME"), "fx");
        assert_eq!(get("AWS_LAMBDA_FUNCTION_VERSION"), "7");
        assert_eq!(get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"), "256");
        assert_eq!(get("AWS_LAMBDA_LOG_GROUP_NAME"), "/aws/lambda/fx");
        assert_eq!(get("AWS_LAMBDA_LOG_STREAM_NAME"), "skiff/fx/7");
        assert_eq!(get("AWS_REGION"), REGION);
        assert_eq!(get("AWS_DEFAULT_REGION"), REGION);
        assert_eq!(get("AWS_EXECUTION_ENV"), "AWS_Lambda_provided");
        assert_eq!(get("_HANDLER"), "bootstrap");
        assert_eq!(get("LAMBDA_TASK_ROOT"), "/var/task");
        assert_eq!(get("LAMBDA_RUNTIME_DIR"), "/var/runtime");
        assert_eq!(get("AWS_LAMBDA_RUNTIME_API"), "127.0.0.1:9001");
        assert_eq!(get("TZ"), ":UTC");
        assert_eq!(get("WITH_EQUALS"), "a=b=c");
        // Every name appears once.
        let mut names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate names in {env:?}");
    }

    #[test]
    fn http_runtime_runs_the_handler_with_port_and_host() {
        let spec = FunctionSpec::from_yaml(
            "name: w\nruntime: http\nhandler: ./serve --fast\nenv: {PORT: '1'}\n",
        )
        .unwrap();
        let (mode, argv) = program(&spec);
        assert_eq!(mode, ExecMode::Http);
        assert_eq!(argv, ["/var/task/serve", "--fast"]);
        let env = environment(&LaunchInfo {
            spec: &spec,
            revision: 1,
            workspace: "d",
            secrets: &[],
            otel_endpoint: None,
        });
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PORT"), Some("8080"), "PORT is not overridable");
        assert_eq!(get("HOST"), Some("127.0.0.1"));
    }

    #[test]
    fn arn_carries_the_qualifier() {
        assert_eq!(
            function_arn("f", Some("3")),
            "arn:aws:lambda:local:000000000000:function:f:3"
        );
        assert_eq!(
            function_arn("f", None),
            "arn:aws:lambda:local:000000000000:function:f"
        );
    }
}
