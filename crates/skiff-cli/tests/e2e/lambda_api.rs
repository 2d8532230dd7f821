//! The Lambda Invoke API against real boto3 (`tests/lambda/test_boto3.py`).

use crate::harness::*;
use std::process::Command;

#[test]
fn lambda_invoke_api_with_boto3() {
    let pydeps = python_deps("boto3", &["boto3==1.44.8"]);
    let key = "sk_lambda_test_key";
    let mut s = Server::start_with(&["--api-key", key]);
    s.key = Some(key.into());
    let echo = fixture("fx-echo");
    s.deploy(&echo);
    s.deploy(&echo);
    let r = s
        .http
        .put(format!("{}/v1/functions/fx-echo/aliases/stable", s.url))
        .bearer_auth(key)
        .body(r#"{"revision": 1}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    s.deploy(&fixture("fx-error"));
    s.deploy(&fixture("fx-sleep"));
    let cold = fixture_variant("fx-echo", &[("name", "fx-cold")]);
    s.deploy(cold.path());
    let busy = fixture_variant(
        "fx-sleep",
        &[
            ("name", "fx-busy"),
            ("timeout", "5s"),
            ("scale", "{max: 1}"),
        ],
    );
    s.deploy(busy.path());
    let out = Command::new("python3")
        .arg(repo_root().join("tests/lambda/test_boto3.py"))
        .env("PYTHONPATH", &pydeps)
        .env("SKIFF_ENDPOINT", &s.url)
        .env("SKIFF_KEY", key)
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "boto3 suite failed:\n{report}");
    assert!(report.contains("OK"), "{report}");
    assert!(s.healthy());
}
