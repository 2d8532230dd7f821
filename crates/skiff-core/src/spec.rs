//! `function.yaml`: the function spec, its defaults and its validation. Every error names the
//! field it is about and, for numbers, the allowed range.

use crate::units::{format_size, parse_duration, parse_size};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Default and bounds for `memory`.
pub const MEMORY_DEFAULT: u64 = 128 << 20;
pub const MEMORY_MIN: u64 = 64 << 20;
pub const MEMORY_MAX: u64 = 2 << 30;
/// Default and bounds for `timeout`.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
pub const TIMEOUT_MAX: Duration = Duration::from_secs(900);
/// Bounds of `memory` and `timeout` for `runtime: js` (an in-process isolate).
pub const JS_MEMORY_MAX: u64 = 512 << 20;
pub const JS_TIMEOUT_MIN: Duration = Duration::from_secs(1);
pub const JS_TIMEOUT_MAX: Duration = Duration::from_secs(30);
/// `concurrency` for `runtime: js`: an isolate is an event loop that interleaves its in-flight
/// invocations (Workers-style), so one instance may hold far more than a process-per-request
/// tier. The default lets an isolate overlap I/O waits without a change to `function.yaml`
/// while bounding how many invocations share one isolate's fate (a timeout, runaway loop or
/// out-of-memory fails every invocation in it); `concurrency: 1` keeps one at a time.
pub const JS_CONCURRENCY_DEFAULT: u32 = 100;
pub const JS_CONCURRENCY_MAX: u32 = 10_000;
/// Default and bounds for `tmp`.
pub const TMP_DEFAULT: u64 = 512 << 20;
pub const TMP_MIN: u64 = 1 << 20;
pub const TMP_MAX: u64 = 10 << 30;
/// Bounds for `concurrency` and `scale.max`.
pub const CONCURRENCY_MAX: u32 = 1000;
pub const SCALE_MAX: u32 = 1000;
/// Largest total size of `env` keys and values, as on AWS Lambda.
pub const ENV_MAX_BYTES: usize = 4096;

/// A spec validation failure, naming the offending field (dotted path, e.g. `scale.max`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

pub(crate) fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }
        impl $name {
            /// All accepted spellings, in declaration order.
            pub const ALL: &'static [&'static str] = &[$($text),+];
            /// The spelling used in `function.yaml`.
            pub fn as_str(self) -> &'static str { match self { $(Self::$variant => $text),+ } }
            /// Parses the `function.yaml` spelling.
            pub fn parse(s: &str) -> Option<Self> { match s { $($text => Some(Self::$variant),)+ _ => None } }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> { s.serialize_str(self.as_str()) }
        }
    };
}

string_enum!(
    /// How the function's code is run.
    Runtime { Python3 = "python3", Node = "node", Provided = "provided", Command = "command", Http = "http", Wasm = "wasm", Js = "js" }
);
string_enum!(
    /// Process isolation tier.
    SandboxKind { Native = "native", Gvisor = "gvisor", Microvm = "microvm" }
);
string_enum!(
    /// Outbound network policy. Nothing can ever connect in.
    Network { Outbound = "outbound", None = "none" }
);
string_enum!(
    /// Instance lifecycle mode.
    Mode { Ephemeral = "ephemeral", Warm = "warm", Checkpointed = "checkpointed", Branched = "branched", Persistent = "persistent" }
);

/// Instance scaling bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scale {
    pub min: u32,
    pub max: u32,
    #[serde(serialize_with = "ser_duration")]
    pub idle: Duration,
}

impl Default for Scale {
    fn default() -> Self {
        Scale {
            min: 0,
            max: 100,
            idle: Duration::from_secs(600),
        }
    }
}

/// A validated `function.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionSpec {
    pub name: String,
    pub runtime: Runtime,
    pub handler: String,
    pub sandbox: SandboxKind,
    #[serde(serialize_with = "ser_size")]
    pub memory: u64,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    pub concurrency: u32,
    pub scale: Scale,
    pub env: BTreeMap<String, String>,
    pub secrets: Vec<String>,
    pub network: Network,
    #[serde(serialize_with = "ser_size")]
    pub tmp: u64,
    pub mode: Mode,
    /// HTTP trigger route policy (`routes:`); `None` = one open default route `/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<crate::routes::Route>>,
}

pub(crate) fn ser_size<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_size(*v))
}

pub(crate) fn ser_duration<S: serde::Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
    let ms = v.as_millis();
    if ms.is_multiple_of(1000) {
        s.serialize_str(&format!("{}s", ms / 1000))
    } else {
        s.serialize_str(&format!("{ms}ms"))
    }
}

const TOP_KEYS: &[&str] = &[
    "name",
    "runtime",
    "handler",
    "sandbox",
    "memory",
    "timeout",
    "concurrency",
    "scale",
    "env",
    "secrets",
    "network",
    "tmp",
    "mode",
    "routes",
];

/// Environment variables Skiff sets itself; a spec may not override them.
const RESERVED_ENV: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_EXECUTION_ENV",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
    "TZ",
];

impl FunctionSpec {
    /// Parses and validates `function.yaml` text.
    pub fn from_yaml(text: &str) -> Result<Self, SpecError> {
        let value: Value = serde_yaml::from_str(text)
            .map_err(|e| err("function.yaml", format!("not valid YAML: {e}")))?;
        Self::from_value(&value)
    }

    /// Validates a spec given as a JSON/YAML value (the API accepts the same shape as the file).
    pub fn from_value(value: &Value) -> Result<Self, SpecError> {
        let map = value
            .as_object()
            .ok_or_else(|| err("function.yaml", "must be a mapping of fields"))?;
        for key in map.keys() {
            if !TOP_KEYS.contains(&key.as_str()) {
                return Err(err(
                    key,
                    format!("unknown field (allowed: {})", TOP_KEYS.join(", ")),
                ));
            }
        }
        let name = req_str(map, "name")?;
        if !crate::valid_name(&name) {
            return Err(err(
                "name",
                "must match [a-z0-9-]{1,63} and not start or end with '-'",
            ));
        }
        let runtime =
            enum_field(map, "runtime", Runtime::parse, Runtime::ALL)?.ok_or_else(|| {
                err(
                    "runtime",
                    format!("is required (one of {})", Runtime::ALL.join(", ")),
                )
            })?;
        let handler = match opt_str(map, "handler")? {
            Some(h) => h,
            None => match runtime {
                Runtime::Provided => "bootstrap".to_string(),
                Runtime::Python3 => "main.handler".to_string(),
                Runtime::Node => "index.handler".to_string(),
                Runtime::Js => "index.js".to_string(),
                // Stored, but a publish blocker (`missing_command`): see `publish`.
                Runtime::Http => String::new(),
                _ => return Err(err("handler", format!("is required for runtime {runtime}"))),
            },
        };
        if (handler.is_empty() && runtime != Runtime::Http)
            || handler.len() > 256
            || handler.contains('\0')
        {
            return Err(err("handler", "must be 1..256 characters"));
        }
        if matches!(runtime, Runtime::Python3 | Runtime::Node) && !handler.contains('.') {
            return Err(err(
                "handler",
                "must be module.function (e.g. main.handler)",
            ));
        }
        let sandbox = enum_field(map, "sandbox", SandboxKind::parse, SandboxKind::ALL)?
            .unwrap_or(SandboxKind::Native);
        let memory = size_field(map, "memory", MEMORY_DEFAULT, MEMORY_MIN, MEMORY_MAX)?;
        let timeout = duration_field(
            map,
            "timeout",
            TIMEOUT_DEFAULT,
            Duration::from_millis(1),
            TIMEOUT_MAX,
        )?;
        if runtime == Runtime::Wasm && !(handler.ends_with(".wasm") || handler.ends_with(".wat")) {
            return Err(err(
                "handler",
                "runtime wasm: must be the module file (e.g. app.wasm or app.wat)",
            ));
        }
        if runtime == Runtime::Js {
            if !(handler.ends_with(".js") || handler.ends_with(".mjs")) {
                return Err(err(
                    "handler",
                    "runtime js: must be the module file (e.g. index.js)",
                ));
            }
            if memory > JS_MEMORY_MAX {
                return Err(err(
                    "memory",
                    format!(
                        "runtime js: must be between {} and {}",
                        format_size(MEMORY_MIN),
                        format_size(JS_MEMORY_MAX)
                    ),
                ));
            }
            if !(JS_TIMEOUT_MIN..=JS_TIMEOUT_MAX).contains(&timeout) {
                return Err(err("timeout", "runtime js: must be between 1s and 30s"));
            }
        }
        let concurrency = if runtime == Runtime::Js {
            int_field(
                map,
                "concurrency",
                JS_CONCURRENCY_DEFAULT,
                1,
                JS_CONCURRENCY_MAX,
            )
            .map_err(|e| err("concurrency", format!("runtime js: {}", e.message)))?
        } else {
            int_field(map, "concurrency", 1, 1, CONCURRENCY_MAX)?
        };
        let scale = parse_scale(map.get("scale"))?;
        let env = parse_env(map.get("env"))?;
        let secrets = parse_secrets(map.get("secrets"))?;
        let network =
            enum_field(map, "network", Network::parse, Network::ALL)?.unwrap_or(Network::Outbound);
        let tmp = size_field(map, "tmp", TMP_DEFAULT, TMP_MIN, TMP_MAX)?;
        let mode = enum_field(map, "mode", Mode::parse, Mode::ALL)?.unwrap_or(Mode::Warm);
        let routes = crate::routes::parse_routes(map.get("routes"), timeout)?;
        Ok(FunctionSpec {
            name,
            runtime,
            handler,
            sandbox,
            memory,
            timeout,
            concurrency,
            scale,
            env,
            secrets,
            network,
            tmp,
            mode,
            routes,
        })
    }

    /// The normalized spec as JSON (the form stored with each revision).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("spec serializes")
    }

    /// Memory in MiB, as reported to functions (`AWS_LAMBDA_FUNCTION_MEMORY_SIZE`).
    pub fn memory_mb(&self) -> u64 {
        self.memory >> 20
    }
}

/// The environment variable a secret is exposed as: `db-password` → `DB_PASSWORD`.
pub fn secret_env_name(secret: &str) -> String {
    secret
        .chars()
        .map(|c| {
            if c == '-' || c == '.' {
                '_'
            } else {
                c.to_ascii_uppercase()
            }
        })
        .collect()
}

pub(crate) fn opt_str(map: &Map<String, Value>, key: &str) -> Result<Option<String>, SpecError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(err(key, format!("must be a string, got {}", kind(other)))),
    }
}

fn req_str(map: &Map<String, Value>, key: &str) -> Result<String, SpecError> {
    opt_str(map, key)?.ok_or_else(|| err(key, "is required"))
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn enum_field<T>(
    map: &Map<String, Value>,
    key: &str,
    parse: fn(&str) -> Option<T>,
    all: &[&str],
) -> Result<Option<T>, SpecError> {
    match opt_str(map, key)? {
        None => Ok(None),
        Some(s) => parse(&s)
            .map(Some)
            .ok_or_else(|| err(key, format!("`{s}` is not one of {}", all.join(", ")))),
    }
}

pub(crate) fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn size_field(
    map: &Map<String, Value>,
    key: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, SpecError> {
    size_value(map.get(key), key, default, min, max)
}

pub(crate) fn size_value(
    v: Option<&Value>,
    key: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, SpecError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(default);
    };
    let range = format!("allowed {}..{}", format_size(min), format_size(max));
    let text =
        scalar_text(v).ok_or_else(|| err(key, format!("must be a size like 128Mi ({range})")))?;
    let bytes = parse_size(&text)
        .ok_or_else(|| err(key, format!("`{text}` is not a size like 128Mi ({range})")))?;
    if bytes < min || bytes > max {
        return Err(err(key, format!("{text} is out of range ({range})")));
    }
    Ok(bytes)
}

fn duration_field(
    map: &Map<String, Value>,
    key: &str,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, SpecError> {
    duration_value(map.get(key), key, default, min, max)
}

pub(crate) fn duration_value(
    v: Option<&Value>,
    key: &str,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, SpecError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(default);
    };
    let range = format!("allowed {}ms..{}s", min.as_millis(), max.as_secs());
    let text =
        scalar_text(v).ok_or_else(|| err(key, format!("must be a duration like 30s ({range})")))?;
    let d = parse_duration(&text).ok_or_else(|| {
        err(
            key,
            format!("`{text}` is not a duration like 30s or 500ms ({range})"),
        )
    })?;
    if d < min || d > max {
        return Err(err(key, format!("{text} is out of range ({range})")));
    }
    Ok(d)
}

pub(crate) fn int_value(
    v: Option<&Value>,
    key: &str,
    default: u32,
    min: u32,
    max: u32,
) -> Result<u32, SpecError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(default);
    };
    let n = v.as_u64().ok_or_else(|| {
        err(
            key,
            format!("must be a whole number (allowed {min}..{max})"),
        )
    })?;
    if n < min as u64 || n > max as u64 {
        return Err(err(
            key,
            format!("{n} is out of range (allowed {min}..{max})"),
        ));
    }
    Ok(n as u32)
}

fn int_field(
    map: &Map<String, Value>,
    key: &str,
    default: u32,
    min: u32,
    max: u32,
) -> Result<u32, SpecError> {
    int_value(map.get(key), key, default, min, max)
}

fn parse_scale(v: Option<&Value>) -> Result<Scale, SpecError> {
    let mut scale = Scale::default();
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(scale);
    };
    let map = v
        .as_object()
        .ok_or_else(|| err("scale", "must be a mapping {min, max, idle}"))?;
    for key in map.keys() {
        if !["min", "max", "idle"].contains(&key.as_str()) {
            return Err(err(
                format!("scale.{key}"),
                "unknown field (allowed: min, max, idle)",
            ));
        }
    }
    scale.max = int_value(map.get("max"), "scale.max", scale.max, 1, SCALE_MAX)?;
    scale.min = int_value(map.get("min"), "scale.min", scale.min, 0, scale.max)?;
    scale.idle = duration_value(
        map.get("idle"),
        "scale.idle",
        scale.idle,
        Duration::from_millis(100),
        Duration::from_secs(86_400),
    )?;
    Ok(scale)
}

fn valid_env_key(k: &str) -> bool {
    let mut bytes = k.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn parse_env(v: Option<&Value>) -> Result<BTreeMap<String, String>, SpecError> {
    let mut env = BTreeMap::new();
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(env);
    };
    let map = v
        .as_object()
        .ok_or_else(|| err("env", "must be a mapping of NAME: value"))?;
    let mut total = 0;
    for (k, v) in map {
        let field = format!("env.{k}");
        if !valid_env_key(k) {
            return Err(err(
                field,
                "is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)",
            ));
        }
        if RESERVED_ENV.contains(&k.as_str())
            || k.starts_with("AWS_LAMBDA_")
            || k.starts_with("SKIFF_")
        {
            return Err(err(field, "is reserved: Skiff sets it"));
        }
        let val =
            scalar_text(v).ok_or_else(|| err(&field, "must be a string, number or boolean"))?;
        if val.contains('\0') {
            return Err(err(field, "must not contain NUL"));
        }
        total += k.len() + val.len();
        env.insert(k.clone(), val);
    }
    if total > ENV_MAX_BYTES {
        return Err(err(
            "env",
            format!("is {total} bytes; at most {ENV_MAX_BYTES} allowed"),
        ));
    }
    Ok(env)
}

fn parse_secrets(v: Option<&Value>) -> Result<Vec<String>, SpecError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = v
        .as_array()
        .ok_or_else(|| err("secrets", "must be a list of secret names"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let s = item
            .as_str()
            .ok_or_else(|| err(format!("secrets[{i}]"), "must be a string"))?;
        if !valid_secret_name(s) {
            return Err(err(format!("secrets[{i}]"), "must match [a-z0-9_-]{1,63}"));
        }
        out.push(s.to_string());
    }
    Ok(out)
}

/// Secret names: `[a-z0-9_-]{1,63}`.
pub fn valid_secret_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<FunctionSpec, SpecError> {
        FunctionSpec::from_yaml(y)
    }

    #[test]
    fn defaults() {
        let s = parse("name: hello\nruntime: python3\nhandler: main.handler\n").unwrap();
        assert_eq!(s.memory, MEMORY_DEFAULT);
        assert_eq!(s.timeout, TIMEOUT_DEFAULT);
        assert_eq!(s.tmp, TMP_DEFAULT);
        assert_eq!(s.concurrency, 1);
        assert_eq!(s.scale, Scale::default());
        assert_eq!(s.network, Network::Outbound);
        assert_eq!(s.mode, Mode::Warm);
        assert_eq!(s.sandbox, SandboxKind::Native);
    }

    #[test]
    fn full_spec_round_trips() {
        let y = "name: thumbnail\nruntime: python3\nhandler: main.handler\nsandbox: native\nmemory: 256Mi\ntimeout: 1500ms\nconcurrency: 2\nscale: {min: 0, max: 5, idle: 10s}\nenv: {LOG_LEVEL: info, N: 3}\nsecrets: [db-password]\nnetwork: none\ntmp: 64Mi\nmode: warm\n";
        let s = parse(y).unwrap();
        assert_eq!(s.env["N"], "3");
        assert_eq!(s.timeout, Duration::from_millis(1500));
        let again = FunctionSpec::from_value(&s.to_value()).unwrap();
        assert_eq!(s, again);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "name: a\nruntime: python3\nhandler: m.h\nbogus: 1\n",
                "bogus",
            ),
            (
                "name: a\nruntime: python3\nhandler: m.h\nmemory: 4Gi\n",
                "memory",
            ),
            (
                "name: a\nruntime: python3\nhandler: m.h\nmemory: lots\n",
                "memory",
            ),
            (
                "name: a\nruntime: python3\nhandler: m.h\ntimeout: 901s\n",
                "timeout",
            ),
            ("name: a\nruntime: cobol\n", "runtime"),
            ("name: A_b\nruntime: python3\n", "name"),
            ("runtime: python3\n", "name"),
            ("name: a\nruntime: python3\nscale: {max: 0}\n", "scale.max"),
            (
                "name: a\nruntime: python3\nscale: {speed: 1}\n",
                "scale.speed",
            ),
            (
                "name: a\nruntime: python3\nenv: {AWS_LAMBDA_X: 1}\n",
                "env.AWS_LAMBDA_X",
            ),
            ("name: a\nruntime: python3\nenv: {\"1x\": 1}\n", "env.1x"),
            (
                "name: a\nruntime: python3\nsecrets: [Bad Name]\n",
                "secrets[0]",
            ),
            ("name: a\nruntime: python3\nconcurrency: 0\n", "concurrency"),
            ("name: a\nruntime: command\n", "handler"),
            ("name: a\nruntime: python3\nnetwork: lan\n", "network"),
            ("name: a\nruntime: python3\ntmp: 100Gi\n", "tmp"),
        ];
        for (y, field) in cases {
            let e = parse(y).unwrap_err();
            assert_eq!(e.field, field, "{y} gave {e}");
        }
        for (y, field) in [
            ("name: a\nruntime: js\nhandler: index.py\n", "handler"),
            ("name: a\nruntime: js\nmemory: 1Gi\n", "memory"),
            ("name: a\nruntime: js\ntimeout: 500ms\n", "timeout"),
            ("name: a\nruntime: js\ntimeout: 31s\n", "timeout"),
            ("name: a\nruntime: js\nconcurrency: 0\n", "concurrency"),
            ("name: a\nruntime: js\nconcurrency: 10001\n", "concurrency"),
            ("name: a\nruntime: js\nconcurrency: many\n", "concurrency"),
        ] {
            assert_eq!(parse(y).unwrap_err().field, field, "{y}");
        }
        let js = parse("name: a\nruntime: js\n").unwrap();
        assert_eq!(
            (js.handler.as_str(), js.memory, js.concurrency),
            ("index.js", MEMORY_DEFAULT, JS_CONCURRENCY_DEFAULT)
        );
        let e = parse("name: a\nruntime: js\nconcurrency: 20000\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "concurrency: runtime js: 20000 is out of range (allowed 1..10000)"
        );
        let js = parse("name: a\nruntime: js\nconcurrency: 10000\n").unwrap();
        assert_eq!(js.concurrency, JS_CONCURRENCY_MAX);
        let js = parse("name: a\nruntime: js\nconcurrency: 1\n").unwrap();
        assert_eq!(js.concurrency, 1);
        // Other runtimes keep their bound.
        assert_eq!(
            parse("name: a\nruntime: python3\nconcurrency: 1001\n")
                .unwrap_err()
                .field,
            "concurrency"
        );
        let e = parse("name: a\nruntime: python3\nmemory: 4Gi\n").unwrap_err();
        assert!(e.message.contains("64Mi..2Gi"), "{e}");
    }

    #[test]
    fn secret_names_map_to_env() {
        assert_eq!(secret_env_name("db-password"), "DB_PASSWORD");
    }
}
