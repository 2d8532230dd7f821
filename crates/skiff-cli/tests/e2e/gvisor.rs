//! The foundation's security and limit cases on the gVisor tier (`sandbox: gvisor`): the same
//! checks as the native tier's tests in `main.rs`, against gVisor variants of the fixtures.
//! Skipped (saying so) when `runsc` is not installed.

use super::*;

/// A server for gVisor tests, or `None` (printed) without runsc.
fn server() -> Option<Server> {
    if !runsc_on_path() {
        eprintln!("skipping: runsc is not on PATH (apt-get install runsc)");
        return None;
    }
    Some(Server::start())
}

fn gvisor_variant(fixture: &str, name: &str, extra: &[(&str, &str)]) -> tempfile::TempDir {
    let mut fields = vec![("name", name), ("sandbox", "gvisor")];
    fields.extend_from_slice(extra);
    fixture_variant(fixture, &fields)
}

#[test]
fn gvisor_confines_the_function() {
    let Some(s) = server() else { return };
    let f = gvisor_variant("fx-probe", "fx-probe-gv", &[]);
    s.deploy(f.path());
    assert_confined(&s, "fx-probe-gv", true);
}

#[test]
fn gvisor_network_policy_is_enforced() {
    let Some(s) = server() else { return };
    let none = gvisor_variant("fx-probe", "fx-probe-gvn", &[]);
    let out = gvisor_variant("fx-probe", "fx-probe-gvo", &[("network", "outbound")]);
    s.deploy(none.path());
    s.deploy(out.path());
    assert_network_policy(&s, "fx-probe-gvn", "fx-probe-gvo", 8);
}

#[test]
fn gvisor_timeout_and_memory_limits() {
    let Some(s) = server() else { return };
    let sleep = gvisor_variant("fx-sleep", "fx-sleep-gv", &[]);
    let hog = gvisor_variant("fx-memhog", "fx-memhog-gv", &[]);
    s.deploy(sleep.path());
    s.deploy(hog.path());
    // A gVisor cold start takes a few hundred ms more than native before the 1 s timeout runs.
    assert_timeout_kills(&s, "fx-sleep-gv", Duration::from_secs(3));
    assert_memory_limit(&s, "fx-memhog-gv");
}

/// `runtime: http` on gVisor: the native tier's proxy contract, over the agent's tunnel.
#[test]
fn gvisor_runs_an_http_server_function() {
    let Some(s) = server() else { return };
    let f = gvisor_variant("fx-http", "fx-http-gv", &[]);
    s.deploy(f.path());
    crate::http_runtime::assert_http_proxied(&s, "fx-http-gv");
}
