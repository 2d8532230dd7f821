use super::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

fn spec(name: &str) -> FunctionSpec {
    FunctionSpec::from_yaml(&format!(
        "name: {name}\nruntime: python3\nhandler: main.handler\n"
    ))
    .unwrap()
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

/// Stores some package bytes; returns (sha, size).
fn put(store: &Store, bytes: &[u8]) -> (String, u64) {
    (store.put_package(bytes).unwrap(), bytes.len() as u64)
}

fn deploy(store: &Store, name: &str, promote: bool) -> RevisionRecord {
    let (sha, size) = put(store, format!("package of {name}").as_bytes());
    store
        .create_revision(&spec(name), &sha, size, promote)
        .unwrap()
}

#[test]
fn store_is_clone_send_sync() {
    fn assert<T: Clone + Send + Sync + 'static>() {}
    assert::<Store>();
}

#[test]
fn revision_numbering_and_promotion() {
    let (_d, store) = open();
    let r1 = deploy(&store, "hello", true);
    assert_eq!(r1.number, 1);
    let f = store.get_function("hello").unwrap().unwrap();
    assert_eq!((f.latest_revision, f.production_revision), (1, Some(1)));
    assert_eq!(f.runtime.as_deref(), Some("python3"));
    assert!(f.enabled);

    let r2 = deploy(&store, "hello", false);
    assert_eq!(r2.number, 2);
    let f = store.get_function("hello").unwrap().unwrap();
    assert_eq!((f.latest_revision, f.production_revision), (2, Some(1)));

    let r3 = deploy(&store, "hello", true);
    assert_eq!(r3.number, 3);
    assert_eq!(
        store
            .get_function("hello")
            .unwrap()
            .unwrap()
            .production_revision,
        Some(3)
    );

    let revs = store.list_revisions("hello").unwrap();
    assert_eq!(revs.iter().map(|r| r.number).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(revs[0].spec, spec("hello"));
    assert_eq!(store.get_revision("hello", 2).unwrap().unwrap(), r2);
    assert!(store.get_revision("hello", 4).unwrap().is_none());

    // Numbering is per function.
    assert_eq!(deploy(&store, "other", false).number, 1);
    let names: Vec<_> = store
        .list_functions()
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, ["hello", "other"]);
    assert_eq!(
        store
            .get_function("other")
            .unwrap()
            .unwrap()
            .production_revision,
        None
    );
}

#[test]
fn create_revision_validates_package() {
    let (_d, store) = open();
    let e = store
        .create_revision(&spec("f"), "nothex", 1, true)
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid { field, .. } if field == "package_sha256"),
        "{e}"
    );
    let missing = "a".repeat(64);
    let e = store
        .create_revision(&spec("f"), &missing, 1, true)
        .unwrap_err();
    assert!(e.to_string().contains("has not been uploaded"), "{e}");
    let (sha, size) = put(&store, b"abc");
    let e = store
        .create_revision(&spec("f"), &sha, size + 1, true)
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid { field, .. } if field == "package_size"),
        "{e}"
    );
    // Nothing was created by the failed attempts.
    assert!(store.get_function("f").unwrap().is_none());
}

#[test]
fn resolve_qualifiers() {
    let (_d, store) = open();
    deploy(&store, "f", true);
    deploy(&store, "f", false);
    assert_eq!(store.resolve("f", None).unwrap().number, 1);
    assert_eq!(store.resolve("f", Some("$LATEST")).unwrap().number, 2);
    assert_eq!(store.resolve("f", Some("2")).unwrap().number, 2);
    assert_eq!(store.resolve("f", Some("1")).unwrap().number, 1);
    store.set_alias("f", "staging", 2).unwrap();
    assert_eq!(store.resolve("f", Some("staging")).unwrap().number, 2);
    assert_eq!(store.resolve("f", Some("production")).unwrap().number, 1);

    let nf = |r: Result<RevisionRecord, StoreError>| match r {
        Err(StoreError::NotFound { what }) => what,
        other => panic!("expected NotFound, got {other:?}"),
    };
    assert_eq!(nf(store.resolve("nope", None)), "function `nope`");
    assert_eq!(
        nf(store.resolve("f", Some("canary"))),
        "alias `canary` of function `f`"
    );
    assert_eq!(
        nf(store.resolve("f", Some("7"))),
        "revision 7 of function `f`"
    );
    assert_eq!(
        nf(store.resolve("f", Some("99999999999"))),
        "revision 99999999999 of function `f`"
    );
    let e = store.resolve("nope", None).unwrap_err();
    assert_eq!(e.to_string(), "function `nope` not found");

    // A function with no revisions, and one with no production alias.
    store.create_function(&spec("empty")).unwrap();
    assert!(nf(store.resolve("empty", Some("$LATEST"))).contains("nothing deployed"));
    deploy(&store, "unpromoted", false);
    assert_eq!(
        nf(store.resolve("unpromoted", None)),
        "alias `production` of function `unpromoted`"
    );
    assert_eq!(
        store.resolve("unpromoted", Some("$LATEST")).unwrap().number,
        1
    );
}

#[test]
fn create_function_conflict_then_deploy() {
    let (_d, store) = open();
    let f = store.create_function(&spec("f")).unwrap();
    assert_eq!(f.latest_revision, 0);
    let e = store.create_function(&spec("f")).unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e}");
    assert_eq!(e.to_string(), "conflict: function `f` already exists");
    assert_eq!(deploy(&store, "f", true).number, 1);
    assert_eq!(
        store.get_function("f").unwrap().unwrap().created_at_ms,
        f.created_at_ms
    );
}

#[test]
fn aliases() {
    let (_d, store) = open();
    deploy(&store, "f", true);
    deploy(&store, "f", false);
    let a = store.set_alias("f", "beta", 2).unwrap();
    assert_eq!(
        (a.function.as_str(), a.name.as_str(), a.revision),
        ("f", "beta", 2)
    );
    assert_eq!(store.get_alias("f", "beta").unwrap().unwrap().revision, 2);
    store.set_alias("f", "beta", 1).unwrap();
    assert_eq!(store.get_alias("f", "beta").unwrap().unwrap().revision, 1);
    let names: Vec<_> = store
        .list_aliases("f")
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["beta", "production"]);

    assert!(store.set_alias("f", "beta", 3).unwrap_err().is_not_found());
    assert!(store.set_alias("g", "beta", 1).unwrap_err().is_not_found());
    for bad in ["123", "Beta", "$LATEST", ""] {
        let e = store.set_alias("f", bad, 1).unwrap_err();
        assert!(
            matches!(&e, StoreError::Invalid { field, .. } if field == "alias"),
            "{bad}: {e}"
        );
    }
    assert!(store.delete_alias("f", "beta").unwrap());
    assert!(!store.delete_alias("f", "beta").unwrap());
    assert!(store.get_alias("f", "beta").unwrap().is_none());
    assert!(store.list_aliases("nope").unwrap_err().is_not_found());
}

#[test]
fn delete_function_removes_everything() {
    let (_d, store) = open();
    deploy(&store, "f", true);
    deploy(&store, "f", false);
    store.set_alias("f", "beta", 2).unwrap();
    store.record_invocation(inv("f", "r1", 1, b"hello\n"));
    store.flush();
    assert_eq!(store.logs("f", 0, 10).unwrap().len(), 1);
    assert!(store.delete_function("f").unwrap());
    assert!(!store.delete_function("f").unwrap());
    assert!(store.get_function("f").unwrap().is_none());
    let conn = store.inner.conn.lock();
    for table in ["revisions", "aliases", "invocations", "logs"] {
        let n: i64 = conn
            .query_row(
                &format!("SELECT COUNT(*) FROM {table} WHERE function = 'f'"),
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0, "{table}");
    }
    drop(conn);
    // Recreated: numbering starts over.
    assert_eq!(deploy(&store, "f", true).number, 1);
}

#[test]
fn revisions_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (sha, rev) = {
        let store = Store::open(dir.path()).unwrap();
        let rev = deploy(&store, "durable", true);
        store.set_alias("durable", "beta", 1).unwrap();
        (rev.package_sha256.clone(), rev)
    };
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.get_revision("durable", 1).unwrap().unwrap(), rev);
    assert_eq!(
        store
            .resolve("durable", Some("beta"))
            .unwrap()
            .package_sha256,
        sha
    );
    assert!(store.package_path(&sha).is_file());
    let version: u32 = store
        .inner
        .conn
        .lock()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

#[test]
fn metadata_connection_is_fully_synchronous() {
    let (_d, store) = open();
    let conn = store.inner.conn.lock();
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "synchronous=FULL");
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let fk: i64 = conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(fk, 1);
}

/// Set (to a data dir) in a child process started by [`spawn_kill_child`].
pub(crate) const KILL_CHILD_ENV: &str = "SKIFF_STORE_KILL_CHILD_DIR";

/// Re-runs this test binary as a child that runs only `test` (which writes under `dir` and
/// prints `ACK n` lines), for tests that SIGKILL it mid-write.
pub(crate) fn spawn_kill_child(test: &str, dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(KILL_CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Not a real test on its own: run by `revisions_survive_sigkill` in a child process.
#[test]
fn kill_child_writes_revisions() {
    let Ok(dir) = std::env::var(KILL_CHILD_ENV) else {
        return;
    };
    let store = Store::open(Path::new(&dir)).unwrap();
    let (sha, size) = put(&store, b"victim package");
    let mut out = std::io::stdout().lock();
    for i in 1u32.. {
        let rev = store
            .create_revision(&spec("victim"), &sha, size, i % 2 == 1)
            .unwrap();
        writeln!(out, "ACK {}", rev.number).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn revisions_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_kill_child("tests::kill_child_writes_revisions", dir.path());
    let mut acked = 0u32;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("ACK ") {
            acked = n.parse().unwrap();
            if acked == 25 {
                // SIGKILL right after create_revision returned.
                child.kill().unwrap();
                break;
            }
        }
    }
    child.wait().unwrap();
    assert_eq!(acked, 25, "child did not get far enough");
    let store = Store::open(dir.path()).unwrap();
    let revs = store.list_revisions("victim").unwrap();
    assert!(
        revs.len() as u32 >= acked,
        "lost acknowledged revisions: {} < {acked}",
        revs.len()
    );
    for n in 1..=acked {
        assert!(
            store.get_revision("victim", n).unwrap().is_some(),
            "revision {n} lost"
        );
    }
    let prod = store.resolve("victim", None).unwrap().number;
    assert!(prod >= 25 && prod % 2 == 1, "production = {prod}");
}

#[test]
fn put_package_is_content_addressed_and_idempotent() {
    let (_d, store) = open();
    let bytes = b"some package bytes";
    let sha = store.put_package(bytes).unwrap();
    assert_eq!(sha, hex::encode(Sha256::digest(bytes)));
    let path = store.package_path(&sha);
    assert_eq!(
        path,
        store
            .data_dir()
            .join("artifacts/sha256")
            .join(format!("{sha}.tar.zst"))
    );
    assert_eq!(fs::read(&path).unwrap(), bytes);
    assert_eq!(store.put_package(bytes).unwrap(), sha);
    assert_eq!(fs::read(&path).unwrap(), bytes);
    assert_ne!(store.put_package(b"other").unwrap(), sha);
    assert_eq!(store.read_package(&sha).unwrap(), bytes);
    // No temporaries left behind.
    assert_eq!(
        fs::read_dir(store.data_dir().join("artifacts/tmp"))
            .unwrap()
            .count(),
        0
    );
}

/// A function directory for packing tests.
fn sample_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    fs::write(
        p.join("function.yaml"),
        "name: packed\nruntime: python3\nhandler: main.handler\nmemory: 256Mi\n",
    )
    .unwrap();
    fs::write(p.join("main.py"), "def handler(e, c):\n    return e\n").unwrap();
    fs::create_dir_all(p.join("lib/sub")).unwrap();
    fs::write(p.join("lib/sub/data.txt"), "data").unwrap();
    fs::write(p.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(p.join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(p.join("main.py"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("sub/data.txt", p.join("lib/link.txt")).unwrap();
    for skipped in [
        ".git",
        "__pycache__",
        "target",
        "node_modules/.cache",
        "lib/__pycache__",
    ] {
        fs::create_dir_all(p.join(skipped)).unwrap();
        fs::write(p.join(skipped).join("junk"), "junk").unwrap();
    }
    fs::write(p.join("node_modules/keep.js"), "1").unwrap();
    d
}

#[test]
fn pack_dir_round_trip_and_unpack() {
    let src = sample_dir();
    let mut progress = Vec::new();
    let bytes = Store::pack_dir(src.path(), |n| progress.push(n)).unwrap();
    assert!(!progress.is_empty() && progress.windows(2).all(|w| w[0] <= w[1]));
    // Deterministic.
    assert_eq!(Store::pack_dir(src.path(), |_| {}).unwrap(), bytes);

    let (spec, info) = Store::read_spec_from_package(&bytes).unwrap();
    assert_eq!(spec.name, "packed");
    assert_eq!(spec.memory, 256 << 20);
    assert!(info.spec_yaml.contains("name: packed"));
    assert_eq!(info.unpacked_bytes, *progress.last().unwrap());

    let (_d, store) = open();
    let sha = store.put_package(&bytes).unwrap();
    let code = store.unpack(&sha).unwrap();
    assert_eq!(code, store.code_path(&sha));
    assert_eq!(store.unpack(&sha).unwrap(), code, "idempotent");
    let mode = |p: &str| {
        fs::symlink_metadata(code.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("run.sh"), 0o755);
    assert_eq!(mode("main.py"), 0o644);
    assert_eq!(mode("lib"), 0o755);
    assert_eq!(mode("lib/sub/data.txt"), 0o644);
    assert_eq!(
        fs::read_to_string(code.join("lib/link.txt")).unwrap(),
        "data"
    );
    assert_eq!(
        fs::read_link(code.join("lib/link.txt")).unwrap(),
        Path::new("sub/data.txt")
    );
    assert_eq!(
        fs::read_to_string(code.join("node_modules/keep.js")).unwrap(),
        "1"
    );
    for skipped in [
        ".git",
        "__pycache__",
        "target",
        "node_modules/.cache",
        "lib/__pycache__",
    ] {
        assert!(!code.join(skipped).exists(), "{skipped} should be skipped");
    }
    // Deterministic headers.
    let mut ar = tar::Archive::new(zstd::Decoder::new(bytes.as_slice()).unwrap());
    let mut paths = Vec::new();
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        assert_eq!(e.header().mtime().unwrap(), 0);
        assert_eq!(e.header().uid().unwrap(), 0);
        assert_eq!(e.header().gid().unwrap(), 0);
        paths.push(e.path().unwrap().to_string_lossy().into_owned());
    }
    assert_eq!(paths[0], "function.yaml");
    assert!(paths
        .iter()
        .all(|p| !p.starts_with('/') && !p.contains("..")));
}

#[test]
fn read_spec_errors() {
    let e = Store::read_spec_from_package(b"PK\x03\x04 not a tarball").unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid { field, .. } if field == "package"),
        "{e}"
    );
    let garbage = zstd::encode_all(&b"definitely not tar"[..], 3).unwrap();
    let e = Store::read_spec_from_package(&garbage).unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid { field, .. } if field == "package"),
        "{e}"
    );

    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("main.py"), "").unwrap();
    let e = Store::read_spec_from_package(&Store::pack_dir(d.path(), |_| {}).unwrap()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "package: no function.yaml at the archive root"
    );

    fs::write(
        d.path().join("function.yaml"),
        "name: x\nruntime: python3\nmemory: 4Gi\n",
    )
    .unwrap();
    let e = Store::read_spec_from_package(&Store::pack_dir(d.path(), |_| {}).unwrap()).unwrap_err();
    match e {
        StoreError::Invalid { field, message } => {
            assert_eq!(field, "memory");
            assert!(message.contains("64Mi..2Gi"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

/// path, type, link target, data
type RawEntry<'a> = (&'a str, tar::EntryType, Option<&'a str>, &'a [u8]);

/// Builds a tar.zst by hand so hostile paths get through.
fn raw_package(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (path, kind, link, data) in entries {
        let mut h = tar::Header::new_old();
        {
            let old = h.as_old_mut();
            old.name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                old.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    zstd::encode_all(out.as_slice(), 3).unwrap()
}

#[test]
fn unpack_rejects_hostile_archives() {
    use tar::EntryType as T;
    let (d, store) = open();
    let spec_file: RawEntry<'_> = (
        "function.yaml",
        T::Regular,
        None,
        b"name: x\nruntime: python3\n",
    );
    let cases: Vec<(&str, Vec<RawEntry<'_>>)> = vec![
        ("..", vec![spec_file, ("../evil", T::Regular, None, b"x")]),
        (
            "..",
            vec![spec_file, ("a/../../evil", T::Regular, None, b"x")],
        ),
        (
            "absolute",
            vec![spec_file, ("/tmp/evil", T::Regular, None, b"x")],
        ),
        (
            "outside",
            vec![spec_file, ("link", T::Symlink, Some("../../etc"), b"")],
        ),
        (
            "outside",
            vec![spec_file, ("link", T::Symlink, Some("/etc/passwd"), b"")],
        ),
        (
            "outside",
            vec![spec_file, ("a/b/link", T::Symlink, Some("../../../x"), b"")],
        ),
        (
            "..",
            vec![spec_file, ("hard", T::Link, Some("../outside"), b"")],
        ),
        (
            "absolute",
            vec![spec_file, ("hard", T::Link, Some("/etc/shadow"), b"")],
        ),
        ("device", vec![spec_file, ("fifo", T::Fifo, None, b"")]),
        ("device", vec![spec_file, ("dev", T::Char, None, b"")]),
    ];
    for (expect, entries) in cases {
        let bytes = raw_package(&entries);
        let e = Store::read_spec_from_package(&bytes).unwrap_err();
        assert!(
            matches!(&e, StoreError::Invalid { field, message } if field == "package" && message.contains(expect)),
            "read_spec {entries:?}: {e}"
        );
        let sha = store.put_package(&bytes).unwrap();
        let e = store.unpack(&sha).unwrap_err();
        assert!(
            matches!(&e, StoreError::Invalid { field, message } if field == "package" && message.contains(expect)),
            "unpack {entries:?}: {e}"
        );
        assert!(!store.code_path(&sha).exists());
    }
    // Writing through a symlink (even one pointing inside) is refused at unpack time.
    let bytes = raw_package(&[
        ("sub/", T::Directory, None, b""),
        ("d", T::Symlink, Some("sub"), b""),
        ("d/x", T::Regular, None, b"x"),
    ]);
    let sha = store.put_package(&bytes).unwrap();
    let e = store.unpack(&sha).unwrap_err();
    assert!(e.to_string().contains("through a symlink"), "{e}");
    // A benign symlink replaced by a file does not write through it.
    let bytes = raw_package(&[
        ("l", T::Symlink, Some("target"), b""),
        ("l", T::Regular, None, b"replaced"),
    ]);
    let sha = store.put_package(&bytes).unwrap();
    let code = store.unpack(&sha).unwrap();
    assert_eq!(fs::read_to_string(code.join("l")).unwrap(), "replaced");
    assert!(!code.join("target").exists());
    // Hard links inside the package are fine.
    let bytes = raw_package(&[
        ("dir/a", T::Regular, None, b"shared"),
        ("h", T::Link, Some("dir/a"), b""),
    ]);
    let sha = store.put_package(&bytes).unwrap();
    let code = store.unpack(&sha).unwrap();
    assert_eq!(fs::read_to_string(code.join("h")).unwrap(), "shared");

    // Nothing escaped, and no temporaries were left.
    assert!(!d.path().join("evil").exists() && !d.path().parent().unwrap().join("evil").exists());
    let leftovers: Vec<_> = fs::read_dir(store.data_dir().join("code"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn unpack_caps_size_and_checks_digest() {
    let (_d, store) = open();
    // A zstd bomb: highly compressible, bigger than the cap once unpacked.
    let big = vec![0u8; (MAX_UNPACKED_BYTES + 1) as usize];
    let bytes = raw_package(&[("big", tar::EntryType::Regular, None, &big)]);
    assert!(bytes.len() < 1 << 20);
    let e = Store::read_spec_from_package(&bytes).unwrap_err();
    assert!(e.to_string().contains("more than 250 MiB"), "{e}");
    let sha = store.put_package(&bytes).unwrap();
    assert!(store
        .unpack(&sha)
        .unwrap_err()
        .to_string()
        .contains("more than 250 MiB"));

    // Package bytes that do not match their name.
    let good = raw_package(&[("a", tar::EntryType::Regular, None, b"a")]);
    let other = raw_package(&[("b", tar::EntryType::Regular, None, b"b")]);
    let sha = store.put_package(&good).unwrap();
    fs::write(store.package_path(&sha), &other).unwrap();
    assert!(matches!(store.unpack(&sha), Err(StoreError::Corrupt(_))));
    assert!(!store.code_path(&sha).exists());
    assert!(store.unpack(&"0".repeat(64)).unwrap_err().is_not_found());
    assert!(matches!(
        store.unpack("../../etc"),
        Err(StoreError::Invalid { .. })
    ));
}

fn inv(function: &str, request_id: &str, revision: u32, logs: &[u8]) -> InvocationRecord {
    InvocationRecord {
        request_id: request_id.to_string(),
        function: function.to_string(),
        revision,
        started_at_ms: now_ms(),
        duration_us: 1234,
        status: "ok".to_string(),
        cold: true,
        error: None,
        logs: logs.to_vec(),
    }
}

#[test]
fn invocations_and_logs_via_background_writer() {
    let (_d, store) = open();
    deploy(&store, "f", true);
    store.record_invocation(inv("f", "r1", 1, b"one\ntwo\r\n"));
    let mut failed = inv("f", "r2", 1, b"boom \xff\n");
    failed.status = "function_error".into();
    failed.error = Some("ValueError: boom".into());
    failed.cold = false;
    store.record_invocation(failed.clone());
    store.record_invocation(inv("f", "r3", 1, b""));
    store.record_invocation(inv("ghost", "r4", 1, b"nobody\n"));
    store.flush();

    let invs = store.list_invocations("f", 10).unwrap();
    assert_eq!(
        invs.iter()
            .map(|i| i.request_id.as_str())
            .collect::<Vec<_>>(),
        ["r3", "r2", "r1"]
    );
    assert_eq!(
        invs[1],
        InvocationRecord {
            logs: Vec::new(),
            ..failed
        }
    );
    assert_eq!(store.list_invocations("f", 1).unwrap().len(), 1);
    assert!(store
        .list_invocations("ghost", 10)
        .unwrap_err()
        .is_not_found());

    let logs = store.logs("f", 0, 100).unwrap();
    let lines: Vec<_> = logs.iter().map(|l| l.line.as_str()).collect();
    assert_eq!(lines, ["one", "two", "boom \u{fffd}"]);
    assert!(logs.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(logs[2].request_id, "r2");
    let after = store.logs("f", logs[0].id, 1).unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].line, "two");
    assert!(store.logs("f", logs[2].id, 10).unwrap().is_empty());

    let got = store.get_invocation("r1").unwrap().unwrap();
    assert_eq!(got.logs, b"one\ntwo\n");
    let json = serde_json::to_value(&got).unwrap();
    assert_eq!(json["logs"], "one\ntwo\n");
    let back: InvocationRecord = serde_json::from_value(json).unwrap();
    assert_eq!(back, got);
    assert_eq!(store.dropped_invocations(), 0);

    // Records survive a reopen (Drop of the store commits what is queued).
    let dir = store.data_dir().to_path_buf();
    store.record_invocation(inv("f", "r5", 1, b"last\n"));
    drop(store);
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.list_invocations("f", 1).unwrap()[0].request_id, "r5");
}

#[test]
fn retention_prunes_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        log_retention: 5,
        invocation_retention: 3,
        ..StoreOptions::default()
    };
    let store = Store::open_with(dir.path(), opts).unwrap();
    deploy(&store, "f", true);
    deploy(&store, "g", true);
    for i in 0..10 {
        store.record_invocation(inv(
            "f",
            &format!("r{i}"),
            1,
            format!("line {i}a\nline {i}b\n").as_bytes(),
        ));
    }
    store.record_invocation(inv("g", "g0", 1, b"g\n"));
    store.flush();
    let invs = store.list_invocations("f", 100).unwrap();
    assert_eq!(
        invs.iter()
            .map(|i| i.request_id.as_str())
            .collect::<Vec<_>>(),
        ["r9", "r8", "r7"]
    );
    let lines: Vec<_> = store
        .logs("f", 0, 100)
        .unwrap()
        .into_iter()
        .map(|l| l.line)
        .collect();
    assert_eq!(
        lines,
        ["line 7b", "line 8a", "line 8b", "line 9a", "line 9b"]
    );
    assert_eq!(store.logs("g", 0, 100).unwrap().len(), 1);
}

#[test]
fn full_queue_drops_and_counts_instead_of_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        queue_capacity: 8,
        invocation_retention: 100_000,
        ..StoreOptions::default()
    };
    let store = Store::open_with(dir.path(), opts).unwrap();
    deploy(&store, "f", true);
    let sent = 20_000u64;
    for i in 0..sent {
        store.record_invocation(inv("f", &format!("r{i}"), 1, b""));
    }
    store.flush();
    let stored = store.list_invocations("f", 100_000).unwrap().len() as u64;
    assert!(
        store.dropped_invocations() > 0,
        "a tiny queue should overflow"
    );
    assert_eq!(stored + store.dropped_invocations(), sent);
}

#[test]
fn api_keys_store_only_digests() {
    let (_d, store) = open();
    assert!(!store.has_api_keys().unwrap());
    let (key, rec) = store.create_api_key("laptop").unwrap();
    assert!(key.starts_with("sk_") && key.len() == 43, "{key}");
    assert!(key[3..].bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(rec.label, "laptop");
    assert!(store.has_api_keys().unwrap());
    let digest = Store::key_digest(&key);
    assert_eq!(digest, hex::encode(Sha256::digest(key.as_bytes())));
    assert!(store.api_key_exists(&digest).unwrap());
    assert!(!store
        .api_key_exists(&Store::key_digest("sk_wrong"))
        .unwrap());
    let (key2, _) = store.create_api_key("ci").unwrap();
    assert_ne!(key, key2);
    assert_eq!(store.list_api_keys().unwrap().len(), 2);

    // Grep the database files: the plaintext is nowhere, the digest is there.
    let mut raw = Vec::new();
    for suffix in ["", "-wal"] {
        let p = store.data_dir().join(format!("skiff.db{suffix}"));
        if let Ok(b) = fs::read(&p) {
            raw.extend(b);
        }
    }
    let contains = |needle: &str| raw.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(contains(&digest), "digest should be stored");
    assert!(
        !contains(&key) && !contains(&key[3..]),
        "plaintext key found in the database"
    );

    assert!(store.revoke_api_key(rec.id).unwrap());
    assert!(!store.revoke_api_key(rec.id).unwrap());
    assert!(!store.api_key_exists(&digest).unwrap());
    assert!(store.has_api_keys().unwrap());
    assert!(store.create_api_key("bad\nlabel").is_err());
}

#[test]
fn secrets_round_trip() {
    let (_d, store) = open();
    assert_eq!(store.get_secret("db-password").unwrap(), None);
    store.set_secret("db-password", "hunter2").unwrap();
    store.set_secret("api_token", "t0k3n").unwrap();
    assert_eq!(
        store.get_secret("db-password").unwrap().as_deref(),
        Some("hunter2")
    );
    store.set_secret("db-password", "correct horse").unwrap();
    assert_eq!(
        store.get_secret("db-password").unwrap().as_deref(),
        Some("correct horse")
    );
    assert_eq!(store.list_secrets().unwrap(), ["api_token", "db-password"]);
    assert!(store.delete_secret("api_token").unwrap());
    assert!(!store.delete_secret("api_token").unwrap());
    assert_eq!(store.list_secrets().unwrap(), ["db-password"]);
    let e = store.set_secret("Bad Name", "x").unwrap_err();
    assert!(matches!(&e, StoreError::Invalid { field, .. } if field == "name"));
    assert!(store
        .set_secret("big", &"x".repeat(MAX_SECRET_BYTES + 1))
        .is_err());
    assert!(!format!("{store:?}").contains("correct horse"));
    let mode = fs::metadata(store.db_path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn gc_removes_unreferenced_artifacts() {
    let (_d, store) = open();
    let src = sample_dir();
    let pkg_a = Store::pack_dir(src.path(), |_| {}).unwrap();
    fs::write(src.path().join("extra.txt"), "more").unwrap();
    let pkg_b = Store::pack_dir(src.path(), |_| {}).unwrap();
    let sha_a = store.put_package(&pkg_a).unwrap();
    let sha_b = store.put_package(&pkg_b).unwrap();
    store
        .create_revision(&spec("a"), &sha_a, pkg_a.len() as u64, true)
        .unwrap();
    store
        .create_revision(&spec("b"), &sha_b, pkg_b.len() as u64, true)
        .unwrap();
    store.unpack(&sha_a).unwrap();
    store.unpack(&sha_b).unwrap();
    // Uploaded but not deployed yet: protected.
    let sha_c = store.put_package(b"in flight").unwrap();

    assert_eq!(store.gc_artifacts().unwrap(), 0);
    store.delete_function("b").unwrap();
    let freed = store.gc_artifacts().unwrap();
    assert!(freed >= pkg_b.len() as u64, "freed {freed}");
    assert!(!store.package_path(&sha_b).exists());
    assert!(!store.code_path(&sha_b).exists());
    assert!(store.package_path(&sha_a).exists());
    assert!(store.code_path(&sha_a).exists());
    assert!(store.package_path(&sha_c).exists());
    assert_eq!(store.gc_artifacts().unwrap(), 0);
}

/// Measures the hot-path costs. `cargo test --release -p skiff-store -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_costs() {
    let (_d, store) = open();
    deploy(&store, "f", true);
    let (sha, size) = put(&store, b"bench package");
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        store.create_revision(&spec("f"), &sha, size, true).unwrap();
    }
    let per_rev = t.elapsed() / n;

    let records: Vec<_> = (0..5_000)
        .map(|i| inv("f", &format!("req-{i}"), 1, b"a log line\nanother\n"))
        .collect();
    let t = Instant::now();
    for r in records {
        store.record_invocation(r);
    }
    let per_record = t.elapsed() / 5_000;
    let t = Instant::now();
    store.flush();
    let flush = t.elapsed();
    println!(
        "create_revision (synchronous=FULL): {per_rev:?}/op; record_invocation enqueue: {per_record:?}/op; \
         flush of 5000 records: {flush:?}; dropped: {}",
        store.dropped_invocations()
    );
}

fn routes(r: &[(u32, u8)]) -> AliasTarget {
    AliasTarget::Split(
        r.iter()
            .map(|&(revision, weight)| skiff_core::split::Route { revision, weight })
            .collect(),
    )
}

#[test]
fn split_aliases_resolve_whole_and_persist() {
    let (dir, store) = open();
    for _ in 0..4 {
        deploy(&store, "f", false);
    }
    store.set_alias("f", "production", 3).unwrap();
    let a = store
        .set_alias_target("f", "production", &routes(&[(3, 90), (4, 10)]))
        .unwrap();
    assert_eq!(a.revision, 3, "primary is the largest weight");
    assert_eq!(a.routes.as_ref().map(Vec::len), Some(2));
    // Ties go to the first route.
    let b = store
        .set_alias_target("f", "beta", &routes(&[(2, 50), (1, 50)]))
        .unwrap();
    assert_eq!(b.revision, 2);
    let r = store.resolve_routes("f", None).unwrap();
    assert!(r.enabled);
    let got: Vec<(u32, u8)> = r.routes.iter().map(|(rec, w)| (rec.number, *w)).collect();
    assert_eq!(got, [(3, 90), (4, 10)]);
    // `resolve` gives the primary; plain qualifiers resolve to one route of weight 100.
    assert_eq!(store.resolve("f", None).unwrap().number, 3);
    let one = store.resolve_routes("f", Some("2")).unwrap();
    assert_eq!(
        (one.routes.len(), one.routes[0].0.number, one.routes[0].1),
        (1, 2, 100)
    );
    assert_eq!(
        store
            .get_function("f")
            .unwrap()
            .unwrap()
            .production_revision,
        Some(3)
    );
    // Every revision of a split must exist.
    let e = store
        .set_alias_target("f", "beta", &routes(&[(2, 50), (9, 50)]))
        .unwrap_err();
    assert!(e.to_string().contains("revision 9"), "{e}");
    // Disabled shows in the resolution.
    store.set_function_enabled("f", false).unwrap();
    assert!(!store.resolve_routes("f", None).unwrap().enabled);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let a = store.get_alias("f", "production").unwrap().unwrap();
    assert_eq!(a.routes.unwrap()[1].weight, 10);
}

#[test]
fn rollback_follows_alias_history() {
    let (_d, store) = open();
    deploy(&store, "f", true); // production: 1
    deploy(&store, "f", true); // 2
    deploy(&store, "f", false); // 3, waiting
    store.set_alias("f", "production", 3).unwrap();
    store.set_alias("f", "production", 3).unwrap(); // unchanged: not a history entry
    let hist: Vec<u32> = store
        .alias_history("f", "production")
        .unwrap()
        .iter()
        .map(|h| h.revision)
        .collect();
    assert_eq!(hist, [3, 2, 1]);
    assert_eq!(
        store
            .rollback_alias("f", "production", None)
            .unwrap()
            .revision,
        2
    );
    // A second rollback undoes the first.
    assert_eq!(
        store
            .rollback_alias("f", "production", None)
            .unwrap()
            .revision,
        3
    );
    assert_eq!(
        store
            .rollback_alias("f", "production", Some(1))
            .unwrap()
            .revision,
        1
    );
    assert!(store
        .rollback_alias("f", "production", Some(7))
        .unwrap_err()
        .is_not_found());
    assert!(store
        .rollback_alias("f", "nope", None)
        .unwrap_err()
        .is_not_found());
    // A split comes back whole.
    store
        .set_alias_target("f", "production", &routes(&[(2, 90), (3, 10)]))
        .unwrap();
    store.set_alias("f", "production", 3).unwrap();
    let back = store.rollback_alias("f", "production", None).unwrap();
    assert_eq!(back.routes.map(|r| r.len()), Some(2));
    // Without history: the revision below the current one; none below is a conflict.
    store
        .inner
        .conn
        .lock()
        .execute("DELETE FROM alias_history", [])
        .unwrap();
    store.set_alias("f", "beta", 1).unwrap();
    store
        .inner
        .conn
        .lock()
        .execute("DELETE FROM alias_history", [])
        .unwrap();
    store.set_alias("f", "production", 3).unwrap();
    store
        .inner
        .conn
        .lock()
        .execute("DELETE FROM alias_history", [])
        .unwrap();
    assert_eq!(
        store
            .rollback_alias("f", "production", None)
            .unwrap()
            .revision,
        2
    );
    assert!(matches!(
        store.rollback_alias("f", "beta", None).unwrap_err(),
        StoreError::Conflict(_)
    ));
    // Deleting the alias drops its history.
    store.delete_alias("f", "beta").unwrap();
    assert!(store.alias_history("f", "beta").unwrap().is_empty());
}

#[test]
fn migration_seeds_alias_history() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        deploy(&store, "f", true);
        deploy(&store, "f", true);
        // Pretend the database predates migration 3.
        let conn = store.inner.conn.lock();
        conn.execute_batch(
            "DROP TABLE snapshots; DROP TABLE alias_history; ALTER TABLE aliases DROP COLUMN routes; PRAGMA user_version = 2;",
        )
        .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let hist = store.alias_history("f", "production").unwrap();
    assert_eq!(hist.len(), 1);
    assert_eq!(hist[0].revision, 2);
    // No earlier history: rollback falls back to the revision below.
    assert_eq!(
        store
            .rollback_alias("f", "production", None)
            .unwrap()
            .revision,
        1
    );
}

#[test]
fn deleting_a_function_removes_only_unshared_packages() {
    let (_d, store) = open();
    let (shared, n) = put(&store, b"shared package");
    let (own, m) = put(&store, b"own package");
    store.create_revision(&spec("a"), &shared, n, true).unwrap();
    store.create_revision(&spec("b"), &shared, n, true).unwrap();
    store.create_revision(&spec("b"), &own, m, true).unwrap();
    std::fs::create_dir_all(store.code_path(&own)).unwrap();
    let mut pkgs = store.delete_function_packages("b").unwrap().unwrap();
    pkgs.sort();
    let mut want = vec![shared.clone(), own.clone()];
    want.sort();
    assert_eq!(pkgs, want);
    let freed = store.remove_unreferenced_packages(&pkgs).unwrap();
    assert!(freed >= m, "freed {freed}");
    assert!(!store.package_path(&own).exists());
    assert!(!store.code_path(&own).exists());
    assert!(store.package_path(&shared).exists(), "still used by `a`");
    assert!(store.delete_function_packages("b").unwrap().is_none());
    // An upload not yet deployed is protected.
    let (pending, _) = put(&store, b"uploading");
    assert_eq!(
        store
            .remove_unreferenced_packages(std::slice::from_ref(&pending))
            .unwrap(),
        0
    );
    assert!(store.package_path(&pending).exists());
}

#[test]
fn snapshots_rows_follow_their_revision() {
    let (_d, store) = open();
    deploy(&store, "f", true);
    deploy(&store, "g", true);
    // The revision must exist.
    assert!(store
        .insert_snapshot("snap-x", "f", 9, 10)
        .unwrap_err()
        .is_not_found());
    // Ids become directory names: nothing that could leave `snapshots/`.
    for bad in ["", "../x", "A", "a/b", &"a".repeat(65)] {
        assert!(matches!(
            store.insert_snapshot(bad, "f", 1, 1),
            Err(StoreError::Invalid { ref field, .. }) if field == "id"
        ));
        assert!(store.snapshot_dir(bad).is_err());
    }
    let a = store.insert_snapshot("snap-a", "f", 1, 4096).unwrap();
    assert_eq!(
        (a.function.as_str(), a.revision, a.size_bytes),
        ("f", 1, 4096)
    );
    std::thread::sleep(std::time::Duration::from_millis(2));
    store.insert_snapshot("snap-b", "g", 1, 1).unwrap();
    assert!(matches!(
        store.insert_snapshot("snap-a", "f", 1, 1),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.get_snapshot("snap-a").unwrap(), Some(a.clone()));
    let all: Vec<String> = store
        .list_snapshots(None)
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(all, ["snap-b", "snap-a"], "newest first");
    assert_eq!(store.list_snapshots(Some("f")).unwrap(), vec![a.clone()]);

    // Deleting removes the row and the image directory.
    let dir = store.snapshot_dir("snap-a").unwrap();
    assert!(dir.ends_with("snapshots/snap-a"));
    std::fs::create_dir_all(dir.join("inner")).unwrap();
    std::fs::write(dir.join("inner/pages"), b"x").unwrap();
    assert_eq!(store.delete_snapshot("snap-a").unwrap(), Some(a));
    assert!(!dir.exists());
    assert_eq!(store.get_snapshot("snap-a").unwrap(), None);
    assert_eq!(store.delete_snapshot("snap-a").unwrap(), None);

    // Deleting the function deletes its snapshot rows.
    assert!(store.delete_function("g").unwrap());
    assert!(store.list_snapshots(None).unwrap().is_empty());
}
