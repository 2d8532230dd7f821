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

    // The AWS CLI (v1, from PyPI) as docs/lambda.md shows it.
    let awscli = python_deps("awscli", &["awscli==1.46.3"]);
    let tmp = tempfile::tempdir().unwrap();
    let outfile = tmp.path().join("out.json");
    let aws = |args: &[&str]| {
        Command::new("python3")
            .args(["-m", "awscli", "lambda", "invoke", "--endpoint-url", &s.url])
            .args(args)
            .arg(&outfile)
            .env("PYTHONPATH", &awscli)
            .env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", "unused")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .output()
            .unwrap()
    };
    let out = aws(&[
        "--function-name",
        "fx-echo:stable",
        "--payload",
        r#"{"via": "aws-cli", "log": "from the cli"}"#,
        "--log-type",
        "Tail",
    ]);
    assert!(out.status.success(), "aws lambda invoke: {out:?}");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            meta["StatusCode"].as_i64(),
            meta["ExecutedVersion"].as_str()
        ),
        (Some(200), Some("1")),
        "{meta}"
    );
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&outfile).unwrap()).unwrap();
    assert_eq!(result["event"]["via"], "aws-cli", "{result}");
    let out = aws(&["--function-name", "missing-fn"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ResourceNotFoundException"),
        "{out:?}"
    );
    assert!(s.healthy());
}
