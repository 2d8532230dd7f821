#!/usr/bin/env python3
"""Tests for Skiff's runtime bootstraps, examples and test-fixture functions.

Plain script, no pytest:  python3 runtimes/tests/test_bootstraps.py [name-substring ...]
Exits non-zero on failure and ends with `N passed, M failed`.

A fake Lambda Runtime API (2018-06-01) runs in-process on an ephemeral port; each bootstrap runs
as a subprocess against it with a temporary LAMBDA_TASK_ROOT, exactly as the agent would start it
(python: `python3 -u bootstrap.py`, node: `node bootstrap.js`, provided: the binary). Command
functions are run directly with the payload on stdin.
"""

import base64
import http.server
import json
import os
import queue
import re
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
RUNTIMES = os.path.dirname(HERE)
REPO = os.path.dirname(RUNTIMES)
PY_BOOTSTRAP = os.path.join(RUNTIMES, "python", "bootstrap.py")
NODE_BOOTSTRAP = os.path.join(RUNTIMES, "node", "bootstrap.js")
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
NODE = "/usr/bin/node" if os.path.exists("/usr/bin/node") else shutil.which("node")
WAIT = 10.0


class Skip(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Fake Runtime API


class FakeRuntimeApi:
    """Serves /next from a queue of events and records responses, errors and init errors."""

    def __init__(self, drop_after_post=False):
        self.drop_after_post = drop_after_post  # close kept-alive connections silently
        self.events = queue.Queue()
        self.results = {}  # request id -> dict(kind, body, headers)
        self.init_errors = []
        self.peers = set()  # client (host, port) seen: one per connection
        self.requests = []  # (method, path)
        self.cond = threading.Condition()
        self.closed = False
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def _body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reply(self, status, body=b"", headers=None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                with api.cond:
                    api.peers.add(self.client_address)
                    api.requests.append(("GET", self.path))
                if self.path != "/2018-06-01/runtime/invocation/next":
                    return self._reply(404, b'{"errorMessage":"not found"}')
                while True:
                    if api.closed:
                        self.close_connection = True
                        return self._reply(503, b"{}")
                    try:
                        request_id, body, headers = api.events.get(timeout=0.1)
                        break
                    except queue.Empty:
                        continue
                self._reply(200, body, headers)

            def do_POST(self):
                body = self._body()
                with api.cond:
                    api.peers.add(self.client_address)
                    api.requests.append(("POST", self.path))
                m = re.fullmatch(r"/2018-06-01/runtime/invocation/([^/]+)/(response|error)", self.path)
                if m:
                    with api.cond:
                        api.results[m.group(1)] = {
                            "kind": m.group(2), "body": body, "headers": dict(self.headers.items()),
                        }
                        api.cond.notify_all()
                    self._reply(202, b'{"status":"OK"}')
                    if api.drop_after_post:
                        self.close_connection = True  # without a `Connection: close` header
                    return
                if self.path == "/2018-06-01/runtime/init/error":
                    with api.cond:
                        api.init_errors.append({"body": body, "headers": dict(self.headers.items())})
                        api.cond.notify_all()
                    return self._reply(202, b'{"status":"OK"}')
                self._reply(404, b'{"errorMessage":"not found"}')

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a bootstrap killed mid-request: expected, not interesting

        self.server = Server(("127.0.0.1", 0), Handler)
        self.address = "127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def push(self, event=None, raw=None, deadline_ms=None, client_context=None, identity=None,
             trace_id=None, arn="arn:aws:lambda:local:000000000000:function:test"):
        request_id = str(uuid.uuid4())
        body = raw if raw is not None else json.dumps(event if event is not None else {}).encode()
        headers = {
            "Lambda-Runtime-Aws-Request-Id": request_id,
            "Lambda-Runtime-Deadline-Ms": str(deadline_ms or int(time.time() * 1000) + 30_000),
            "Lambda-Runtime-Invoked-Function-Arn": arn,
            "Lambda-Runtime-Trace-Id": trace_id or "Root=1-00000000-%s;Sampled=0" % request_id.replace("-", "")[:24],
        }
        if client_context is not None:
            headers["Lambda-Runtime-Client-Context"] = json.dumps(client_context)
        if identity is not None:
            headers["Lambda-Runtime-Cognito-Identity"] = json.dumps(identity)
        self.events.put((request_id, body, headers))
        return request_id

    def wait(self, request_id, timeout=WAIT, proc=None):
        deadline = time.time() + timeout
        with self.cond:
            while request_id not in self.results:
                left = deadline - time.time()
                if left <= 0:
                    raise AssertionError("no result for %s within %.0fs%s" % (request_id, timeout, proc.describe() if proc else ""))
                if proc is not None and proc.p.poll() is not None:
                    # Exited: give a just-sent result a moment to land.
                    self.cond.wait(0.2)
                    if request_id not in self.results:
                        raise AssertionError("bootstrap exited (%s) without a result%s" % (proc.p.returncode, proc.describe()))
                    break
                self.cond.wait(min(left, 0.1))
            return self.results[request_id]

    def invoke(self, proc=None, **kw):
        rid = self.push(**kw)
        return rid, self.wait(rid, proc=proc)

    def wait_init_error(self, timeout=WAIT, proc=None):
        deadline = time.time() + timeout
        with self.cond:
            while not self.init_errors:
                left = deadline - time.time()
                if left <= 0:
                    raise AssertionError("no init error within %.0fs%s" % (timeout, proc.describe() if proc else ""))
                self.cond.wait(min(left, 0.1))
            return self.init_errors[0]

    def close(self):
        self.closed = True
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------
# Bootstrap processes


class Proc:
    def __init__(self, argv, env, cwd, stdin=None):
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL if stdin is None else stdin,
                                  stdout=self.out, stderr=self.err)

    def _read(self, f):
        f.seek(0)
        return f.read().decode("utf-8", "replace")

    @property
    def stdout(self):
        return self._read(self.out)

    @property
    def stderr(self):
        return self._read(self.err)

    def describe(self):
        return "\n--- stdout:\n%s--- stderr:\n%s" % (self.stdout[-3000:], self.stderr[-3000:])

    def wait_exit(self, timeout=WAIT):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("bootstrap did not exit%s" % self.describe())

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def base_env(api, task_root, handler, extra=None):
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TZ": ":UTC",
        "HOME": task_root,
        "LAMBDA_TASK_ROOT": task_root,
        "LAMBDA_RUNTIME_DIR": RUNTIMES,
        "AWS_LAMBDA_RUNTIME_API": api.address,
        "AWS_LAMBDA_FUNCTION_NAME": "test-fn",
        "AWS_LAMBDA_FUNCTION_VERSION": "7",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/test-fn",
        "AWS_LAMBDA_LOG_STREAM_NAME": "skiff/test-fn/7",
        "AWS_REGION": "local",
        "AWS_DEFAULT_REGION": "local",
        "_HANDLER": handler,
        "PYTHONPATH": "%s:%s" % (task_root, os.path.join(RUNTIMES, "python")),
        "PYTHONDONTWRITEBYTECODE": "1",
        "NODE_PATH": "%s/node_modules:%s" % (task_root, task_root),
    }
    env.update(extra or {})
    return env


class Session:
    """A fake API plus one bootstrap process for a task root; cleaned up on exit."""

    def __init__(self, runtime, files=None, handler=None, task_root=None, env=None, drop_after_post=False):
        self.tmp = None
        if task_root is None:
            self.tmp = tempfile.mkdtemp(prefix="skiff-rt-test-")
            task_root = self.tmp
            for name, text in (files or {}).items():
                path = os.path.join(task_root, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
        self.task_root = task_root
        self.api = FakeRuntimeApi(drop_after_post)
        environ = base_env(self.api, task_root, handler, env)
        if runtime == "python":
            argv = [PYTHON, "-u", PY_BOOTSTRAP]
        elif runtime == "node":
            if not NODE:
                raise Skip("node not installed")
            argv = [NODE, NODE_BOOTSTRAP]
        else:
            argv = [runtime]
        self.proc = Proc(argv, environ, cwd="/")

    def invoke(self, **kw):
        return self.api.invoke(proc=self.proc, **kw)

    def ok(self, **kw):
        """Invokes and returns the decoded successful result."""
        rid, res = self.invoke(**kw)
        assert res["kind"] == "response", "expected a response, got %s: %s%s" % (res["kind"], res["body"], self.proc.describe())
        return json.loads(res["body"]) if res["body"] else None

    def fail(self, **kw):
        """Invokes and returns (decoded error body, headers)."""
        rid, res = self.invoke(**kw)
        assert res["kind"] == "error", "expected an error, got %s: %s%s" % (res["kind"], res["body"], self.proc.describe())
        return json.loads(res["body"]), res["headers"]

    def init_error(self):
        err = self.api.wait_init_error(proc=self.proc)
        code = self.proc.wait_exit()
        return json.loads(err["body"]), err["headers"], code

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.api.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Test registry and assertions

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def eq(actual, expected, what=""):
    assert actual == expected, "%s: expected %r, got %r" % (what or "value", expected, actual)


def near(actual, expected, tolerance, what=""):
    assert abs(actual - expected) <= tolerance, "%s: expected %r ± %r, got %r" % (what or "value", expected, tolerance, actual)


# ---------------------------------------------------------------------------------------------
# Python bootstrap

PY_MAIN = '''
import os
COUNT = 0
def handler(event, context):
    global COUNT
    COUNT += 1
    print("hello from handler", COUNT)
    return {"echo": event, "count": COUNT, "pid": os.getpid()}
def text(event, context):
    return "hi"
def nothing(event, context):
    return None
def raw(event, context):
    return b"\\x00raw"
def boom(event, context):
    raise ValueError("boom")
def unserializable(event, context):
    return {"x": object()}
def ctx(event, context):
    cc = context.client_context
    return {
        "function_name": context.function_name,
        "function_version": context.function_version,
        "invoked_function_arn": context.invoked_function_arn,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "aws_request_id": context.aws_request_id,
        "log_group_name": context.log_group_name,
        "log_stream_name": context.log_stream_name,
        "remaining": context.get_remaining_time_in_millis(),
        "trace": os.environ.get("_X_AMZN_TRACE_ID"),
        "identity": [context.identity.cognito_identity_id, context.identity.cognito_identity_pool_id],
        "client_context": None if cc is None else {
            "custom": cc.custom, "env": cc.env,
            "client": None if cc.client is None else cc.client.app_title,
        },
    }
'''


@test
def py_success_two_invocations_one_connection():
    with Session("python", {"main.py": PY_MAIN}, "main.handler") as s:
        a = s.ok(event={"x": 1})
        b = s.ok(event={"y": [1, 2]})
        eq(a["echo"], {"x": 1}, "first event")
        eq(b["echo"], {"y": [1, 2]}, "second event")
        eq((a["count"], b["count"]), (1, 2), "warm module state")
        eq(a["pid"], b["pid"], "same process")
        eq(len(s.api.peers), 1, "one keep-alive connection")
        assert "hello from handler 1" in s.proc.stdout, s.proc.describe()


@test
def py_result_encoding():
    with Session("python", {"main.py": PY_MAIN}, "main.text") as s:
        _, res = s.invoke(event={})
        eq(res["body"], b'"hi"', "a str result is JSON-encoded")
    with Session("python", {"main.py": PY_MAIN}, "main.nothing") as s:
        _, res = s.invoke(event={})
        eq(res["body"], b"null", "None result")
    with Session("python", {"main.py": PY_MAIN}, "main.raw") as s:
        _, res = s.invoke(event={})
        eq(res["body"], b"\x00raw", "bytes are sent as is")


@test
def py_handler_error_shape():
    with Session("python", {"main.py": PY_MAIN}, "main.boom") as s:
        err, headers = s.fail(event={})
        eq(err["errorType"], "ValueError", "errorType")
        eq(err["errorMessage"], "boom", "errorMessage")
        assert isinstance(err["stackTrace"], list) and err["stackTrace"], err
        assert any("main.py" in line and "boom" in line for line in err["stackTrace"]), err["stackTrace"]
        assert not any("bootstrap.py" in line for line in err["stackTrace"]), err["stackTrace"]
        eq(headers.get("Lambda-Runtime-Function-Error-Type"), "Unhandled", "error type header")
        # The process survives a handler error.
        err2, _ = s.fail(event={})
        eq(err2["errorType"], "ValueError", "second error")
        assert "[ERROR] ValueError: boom" in s.proc.stderr, s.proc.describe()
        assert "Traceback (most recent call last):" in s.proc.stderr, s.proc.describe()


@test
def py_marshal_and_unmarshal_errors():
    with Session("python", {"main.py": PY_MAIN}, "main.unserializable") as s:
        err, _ = s.fail(event={})
        eq(err["errorType"], "Runtime.MarshalError", "unserializable result")
    with Session("python", {"main.py": PY_MAIN}, "main.handler") as s:
        err, _ = s.fail(raw=b"{not json")
        eq(err["errorType"], "Runtime.UnmarshalError", "invalid event JSON")
        eq(s.ok(raw=b"")["echo"], {}, "empty body is {}")


@test
def py_init_error_missing_module():
    with Session("python", {"main.py": PY_MAIN}, "nosuch.handler") as s:
        err, headers, code = s.init_error()
        eq(err["errorType"], "Runtime.ImportModuleError", "errorType")
        eq(err["errorMessage"], "Unable to import module 'nosuch': No module named 'nosuch'", "errorMessage")
        eq(headers.get("Lambda-Runtime-Function-Error-Type"), "Runtime.ImportModuleError", "header")
        eq(code, 1, "exit code")
    # A module that imports something missing.
    with Session("python", {"main.py": "import not_installed_pkg\n"}, "main.handler") as s:
        err, _, code = s.init_error()
        eq(err["errorType"], "Runtime.ImportModuleError", "errorType")
        eq(err["errorMessage"], "Unable to import module 'main': No module named 'not_installed_pkg'", "errorMessage")


@test
def py_init_error_missing_function():
    with Session("python", {"main.py": PY_MAIN}, "main.nope") as s:
        err, _, code = s.init_error()
        eq(err["errorType"], "Runtime.HandlerNotFound", "errorType")
        eq(err["errorMessage"], "Handler 'nope' missing on module 'main'", "errorMessage")
        eq(code, 1, "exit code")


@test
def py_init_error_syntax_and_exception():
    with Session("python", {"main.py": "def handler(:\n"}, "main.handler") as s:
        err, _, _ = s.init_error()
        eq(err["errorType"], "Runtime.UserCodeSyntaxError", "syntax error")
    with Session("python", {"main.py": "raise KeyError('cfg')\n"}, "main.handler") as s:
        err, _, _ = s.init_error()
        eq(err["errorType"], "KeyError", "exception at import")
    with Session("python", {"main.py": PY_MAIN}, "nodot") as s:
        err, _, _ = s.init_error()
        eq(err["errorType"], "Runtime.MalformedHandlerName", "malformed handler")


@test
def py_dotted_handler_paths():
    files = {"pkg/__init__.py": "", "pkg/mod.py": "def fn(event, context):\n    return {'where': __name__}\n"}
    for handler in ("pkg/mod.fn", "pkg.mod.fn"):
        with Session("python", files, handler) as s:
            eq(s.ok(event={}), {"where": "pkg.mod"}, handler)


@test
def py_context_fields():
    with Session("python", {"main.py": PY_MAIN}, "main.ctx") as s:
        deadline = int(time.time() * 1000) + 5000
        cc = {"custom": {"k": "v"}, "env": {"platform": "test"}, "client": {"app_title": "app"}}
        rid, res = s.invoke(event={}, deadline_ms=deadline, client_context=cc,
                            identity={"cognitoIdentityId": "id-1", "cognitoIdentityPoolId": "pool-1"},
                            trace_id="Root=1-abc;Sampled=1")
        c = json.loads(res["body"])
        eq(c["function_name"], "test-fn", "function_name")
        eq(c["function_version"], "7", "function_version")
        eq(c["invoked_function_arn"], "arn:aws:lambda:local:000000000000:function:test", "arn")
        eq(c["memory_limit_in_mb"], 256, "memory_limit_in_mb (int)")
        eq(c["aws_request_id"], rid, "aws_request_id")
        eq(c["log_group_name"], "/aws/lambda/test-fn", "log_group_name")
        eq(c["log_stream_name"], "skiff/test-fn/7", "log_stream_name")
        near(c["remaining"], deadline - time.time() * 1000, 1000, "remaining time")
        assert 0 < c["remaining"] <= 5000, c
        eq(c["trace"], "Root=1-abc;Sampled=1", "_X_AMZN_TRACE_ID")
        eq(c["identity"], ["id-1", "pool-1"], "identity")
        eq(c["client_context"], {"custom": {"k": "v"}, "env": {"platform": "test"}, "client": "app"}, "client context")
        # Without the optional headers.
        c2 = s.ok(event={})
        eq(c2["client_context"], None, "no client context")
        eq(c2["identity"], [None, None], "no identity")


@test
def py_honours_task_root_and_logging():
    code = ("import logging\nlog = logging.getLogger()\n"
            "def handler(e, c):\n    log.warning('warned %s', 1)\n    return 1\n")
    with Session("python", {"app.py": code}, "app.handler") as s:
        _, res = s.invoke(event={})
        eq(res["body"], b"1", "result")
        assert re.search(r"\[WARNING\]\t\S+Z\t[0-9a-f-]{36}\twarned 1", s.proc.stdout), s.proc.describe()


@test
def py_sys_exit_reports_then_exits():
    with Session("python", {"main.py": "import sys\ndef handler(e, c):\n    sys.exit(4)\n"}, "main.handler") as s:
        err, _ = s.fail(event={})
        eq(err["errorType"], "Runtime.ExitError", "errorType")
        eq(s.proc.wait_exit(), 4, "exit code")


# ---------------------------------------------------------------------------------------------
# Node bootstrap

NODE_INDEX = r'''
let count = 0;
exports.handler = async (event, context) => {
  count += 1;
  console.log('hello from handler', count);
  return { echo: event, count, pid: process.pid };
};
exports.callback = (event, context, callback) => {
  setTimeout(() => callback(null, { via: 'callback', event }), 20);
};
exports.callbackError = (event, context, callback) => {
  callback(new RangeError('cb failed'));
};
exports.sync = (event) => ({ sync: true });
exports.text = async () => 'hi';
exports.nothing = async () => undefined;
exports.boom = async () => { throw new TypeError('boom'); };
exports.throwString = async () => { throw 'just a string'; };
exports.uncaught = (event, context, callback) => {
  setTimeout(() => { throw new Error('async explosion'); }, 10);
};
exports.rejection = async () => {
  Promise.reject(new Error('nobody catches me'));
  await new Promise((r) => setTimeout(r, 200));
  return 'late';
};
exports.nested = { deeper: { fn: async () => 'nested ok' } };
exports.ctx = async (event, context) => ({
  functionName: context.functionName,
  functionVersion: context.functionVersion,
  invokedFunctionArn: context.invokedFunctionArn,
  memoryLimitInMB: context.memoryLimitInMB,
  awsRequestId: context.awsRequestId,
  logGroupName: context.logGroupName,
  logStreamName: context.logStreamName,
  remaining: context.getRemainingTimeInMillis(),
  waits: context.callbackWaitsForEmptyEventLoop,
  trace: process.env._X_AMZN_TRACE_ID,
  identity: context.identity === undefined ? null : context.identity,
  clientContext: context.clientContext === undefined ? null : context.clientContext,
});
'''


@test
def node_async_two_invocations_one_connection():
    with Session("node", {"index.js": NODE_INDEX}, "index.handler") as s:
        a = s.ok(event={"x": 1})
        b = s.ok(event={"y": 2})
        eq(a["echo"], {"x": 1}, "first event")
        eq(b["echo"], {"y": 2}, "second event")
        eq((a["count"], b["count"]), (1, 2), "warm module state")
        eq(a["pid"], b["pid"], "same process")
        eq(len(s.api.peers), 1, "one keep-alive connection")
        assert re.search(r"\S+Z\t[0-9a-f-]{36}\tINFO\thello from handler 1", s.proc.stdout), s.proc.describe()


@test
def node_callback_style():
    with Session("node", {"index.js": NODE_INDEX}, "index.callback") as s:
        eq(s.ok(event={"a": 1}), {"via": "callback", "event": {"a": 1}}, "callback result")
        eq(s.ok(event={"a": 2}), {"via": "callback", "event": {"a": 2}}, "second callback result")
    with Session("node", {"index.js": NODE_INDEX}, "index.callbackError") as s:
        err, _ = s.fail(event={})
        eq((err["errorType"], err["errorMessage"]), ("RangeError", "cb failed"), "callback error")


@test
def node_sync_and_encoding():
    with Session("node", {"index.js": NODE_INDEX}, "index.sync") as s:
        eq(s.ok(event={}), {"sync": True}, "sync handler")
    with Session("node", {"index.js": NODE_INDEX}, "index.text") as s:
        _, res = s.invoke(event={})
        eq(res["body"], b'"hi"', "string result is JSON-encoded")
    with Session("node", {"index.js": NODE_INDEX}, "index.nothing") as s:
        _, res = s.invoke(event={})
        eq(res["body"], b"null", "undefined result")


@test
def node_handler_error_shape():
    with Session("node", {"index.js": NODE_INDEX}, "index.boom") as s:
        err, headers = s.fail(event={})
        eq(err["errorType"], "TypeError", "errorType")
        eq(err["errorMessage"], "boom", "errorMessage")
        assert isinstance(err["stackTrace"], list) and any("index.js" in l for l in err["stackTrace"]), err
        eq(headers.get("Lambda-Runtime-Function-Error-Type"), "Unhandled", "header")
        err2, _ = s.fail(event={})
        eq(err2["errorType"], "TypeError", "process survives")
        assert "Invoke Error" in s.proc.stderr, s.proc.describe()
    with Session("node", {"index.js": NODE_INDEX}, "index.throwString") as s:
        err, _ = s.fail(event={})
        eq((err["errorType"], err["errorMessage"]), ("string", "just a string"), "thrown string")


@test
def node_uncaught_exception_reports_and_exits():
    with Session("node", {"index.js": NODE_INDEX}, "index.uncaught") as s:
        err, _ = s.fail(event={})
        eq((err["errorType"], err["errorMessage"]), ("Error", "async explosion"), "uncaught exception")
        eq(s.proc.wait_exit(), 1, "exit code")
    with Session("node", {"index.js": NODE_INDEX}, "index.rejection") as s:
        err, _ = s.fail(event={})
        eq(err["errorMessage"], "nobody catches me", "unhandled rejection")
        eq(s.proc.wait_exit(), 1, "exit code")


@test
def node_init_errors():
    with Session("node", {"index.js": NODE_INDEX}, "nosuch.handler") as s:
        err, headers, code = s.init_error()
        eq(err["errorType"], "Runtime.ImportModuleError", "missing module")
        assert "Cannot find module 'nosuch'" in err["errorMessage"], err
        eq(headers.get("Lambda-Runtime-Function-Error-Type"), "Runtime.ImportModuleError", "header")
        eq(code, 1, "exit code")
    with Session("node", {"index.js": NODE_INDEX}, "index.nope") as s:
        err, _, code = s.init_error()
        eq(err["errorType"], "Runtime.HandlerNotFound", "missing function")
        eq(err["errorMessage"], "index.nope is undefined or not exported", "message")
        eq(code, 1, "exit code")
    with Session("node", {"index.js": "exports.handler = 42;\n"}, "index.handler") as s:
        err, _, _ = s.init_error()
        eq(err["errorType"], "Runtime.HandlerNotFound", "not a function")
    with Session("node", {"index.js": "require('not-installed-pkg');\n"}, "index.handler") as s:
        err, _, _ = s.init_error()
        eq(err["errorType"], "Runtime.ImportModuleError", "missing dependency")
        assert "not-installed-pkg" in err["errorMessage"], err
    with Session("node", {"index.js": "exports.handler = async () => {;\n"}, "index.handler") as s:
        err, _, _ = s.init_error()
        eq(err["errorType"], "Runtime.UserCodeSyntaxError", "syntax error")
    with Session("node", {"index.js": "throw new RangeError('bad config');\n"}, "index.handler") as s:
        err, _, _ = s.init_error()
        eq((err["errorType"], err["errorMessage"]), ("RangeError", "bad config"), "throw at load")


@test
def node_module_kinds_and_paths():
    cases = [
        ({"app.mjs": "export const handler = async (e) => ({ kind: 'mjs', e });\n"}, "app.handler", "mjs"),
        ({"app.cjs": "exports.handler = async () => ({ kind: 'cjs' });\n"}, "app.handler", "cjs"),
        ({"package.json": '{"type": "module"}', "app.js": "export async function handler() { return { kind: 'esm-js' }; }\n"},
         "app.handler", "esm-js"),
        ({"src/lib/app.js": "exports.handler = async () => ({ kind: 'subdir' });\n"}, "src/lib/app.handler", "subdir"),
        ({"app.mjs": "await new Promise((r) => setTimeout(r, 10));\nexport const handler = async () => ({ kind: 'tla' });\n"},
         "app.handler", "tla"),
    ]
    for files, handler, kind in cases:
        with Session("node", files, handler) as s:
            eq(s.ok(event={})["kind"], kind, handler + " " + ",".join(files))
    with Session("node", {"index.js": NODE_INDEX}, "index.nested.deeper.fn") as s:
        _, res = s.invoke(event={})
        eq(res["body"], b'"nested ok"', "nested handler path")


@test
def node_context_fields():
    with Session("node", {"index.js": NODE_INDEX}, "index.ctx") as s:
        deadline = int(time.time() * 1000) + 5000
        cc = {"custom": {"k": "v"}, "env": {"platform": "test"}}
        rid, res = s.invoke(event={}, deadline_ms=deadline, client_context=cc,
                            identity={"cognitoIdentityId": "id-1", "cognitoIdentityPoolId": "pool-1"},
                            trace_id="Root=1-abc;Sampled=1")
        c = json.loads(res["body"])
        eq(c["functionName"], "test-fn", "functionName")
        eq(c["functionVersion"], "7", "functionVersion")
        eq(c["invokedFunctionArn"], "arn:aws:lambda:local:000000000000:function:test", "arn")
        eq(c["memoryLimitInMB"], "256", "memoryLimitInMB (a string, as on AWS)")
        eq(c["awsRequestId"], rid, "awsRequestId")
        eq(c["logGroupName"], "/aws/lambda/test-fn", "logGroupName")
        eq(c["logStreamName"], "skiff/test-fn/7", "logStreamName")
        near(c["remaining"], deadline - time.time() * 1000, 1000, "remaining time")
        eq(c["waits"], True, "callbackWaitsForEmptyEventLoop")
        eq(c["trace"], "Root=1-abc;Sampled=1", "_X_AMZN_TRACE_ID")
        eq(c["identity"], {"cognitoIdentityId": "id-1", "cognitoIdentityPoolId": "pool-1"}, "identity")
        eq(c["clientContext"], cc, "client context")
        c2 = s.ok(event={})
        eq(c2["clientContext"], None, "no client context")


@test
def node_bad_event_json():
    with Session("node", {"index.js": NODE_INDEX}, "index.handler") as s:
        err, _ = s.fail(raw=b"{nope")
        eq(err["errorType"], "Runtime.UnmarshalError", "invalid event")
        eq(s.ok(raw=b"")["echo"], {}, "empty body is {}")


# ---------------------------------------------------------------------------------------------
# Examples and fixtures

TOP_KEYS = {"name", "runtime", "handler", "sandbox", "memory", "timeout", "concurrency", "scale", "env",
            "secrets", "network", "tmp", "mode", "routes"}


def read_spec(directory):
    """A minimal reader for our function.yaml files: `key: scalar` and `key: {a: b, c: d}`."""
    spec = {}
    with open(os.path.join(directory, "function.yaml")) as f:
        for line in f:
            line = line.split(" #")[0].rstrip()
            if not line or line.lstrip().startswith("#"):
                continue
            assert not line.startswith(" "), "unsupported YAML in %s: %r" % (directory, line)
            key, _, value = line.partition(":")
            value = value.strip()
            if value.startswith("{"):
                assert value.endswith("}"), line
                inner = {}
                for item in filter(None, (x.strip() for x in value[1:-1].split(","))):
                    k, _, v = item.partition(":")
                    inner[k.strip()] = v.strip()
                value = inner
            spec[key.strip()] = value
    return spec


def function_dirs():
    out = []
    for parent in (os.path.join(REPO, "examples"), os.path.join(REPO, "tests", "fixtures")):
        for name in sorted(os.listdir(parent)):
            d = os.path.join(parent, name)
            if os.path.isfile(os.path.join(d, "function.yaml")):
                out.append(d)
    return out


def fn_session(directory, env=None):
    spec = read_spec(directory)
    runtime = {"python3": "python", "node": "node"}[spec["runtime"]]
    extra = {"AWS_LAMBDA_FUNCTION_NAME": spec["name"]}
    if isinstance(spec.get("env"), dict):
        extra.update(spec["env"])
    extra.update(env or {})
    return Session(runtime, handler=spec["handler"], task_root=directory, env=extra)


def fixture(name):
    return os.path.join(REPO, "tests", "fixtures", name)


def example(name):
    return os.path.join(REPO, "examples", name)


def run_command(directory, payload, env=None):
    spec = read_spec(directory)
    words = spec["handler"].split()
    exe = os.path.join(directory, words[0][2:] if words[0].startswith("./") else words[0])
    assert os.access(exe, os.X_OK), "%s is not executable" % exe
    environ = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "AWS_LAMBDA_FUNCTION_NAME": spec["name"]}
    environ.update(env or {})
    return subprocess.run([exe] + words[1:], input=payload, capture_output=True, env=environ, cwd=directory, timeout=WAIT)


@test
def specs_are_well_formed():
    names = set()
    dirs = function_dirs()
    assert len(dirs) >= 11, dirs
    for d in dirs:
        spec = read_spec(d)
        unknown = set(spec) - TOP_KEYS
        assert not unknown, "%s: unknown keys %s" % (d, unknown)
        eq(spec["name"], os.path.basename(d), "name matches directory")
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", spec["name"]), spec["name"]
        assert spec["runtime"] in ("python3", "node", "provided", "command", "http", "js", "wasm"), spec
        assert spec["name"] not in names, "duplicate name " + spec["name"]
        names.add(spec["name"])
        if spec["runtime"] in ("python3", "node"):
            module = spec["handler"].rsplit(".", 1)[0]
            exts = (".py",) if spec["runtime"] == "python3" else (".js", ".mjs", ".cjs")
            assert any(os.path.isfile(os.path.join(d, module + e)) for e in exts), "%s: no module for %s" % (d, spec["handler"])
        if spec["runtime"] == "command":
            exe = os.path.join(d, spec["handler"].split()[0])
            assert os.access(exe, os.X_OK), exe + " not executable"
    expected = {"python-hello", "node-hello", "provided-hello", "command-hello", "fx-echo", "fx-error", "fx-sleep",
                "fx-memhog", "fx-probe", "fx-node-echo", "fx-cmd-echo", "fx-apigw"}
    assert expected <= names, expected - names
    want = {
        "fx-echo": {"scale": {"idle": "2s"}, "env": {"GREETING": "hi"}},
        "fx-sleep": {"timeout": "1s"},
        "fx-memhog": {"memory": "128Mi"},
        "fx-probe": {"memory": "128Mi", "tmp": "16Mi", "network": "none", "timeout": "10s"},
        "provided-hello": {"runtime": "provided", "handler": "bootstrap"},
    }
    for name, fields in want.items():
        d = fixture(name) if name.startswith("fx-") else example(name)
        spec = read_spec(d)
        for k, v in fields.items():
            eq(spec.get(k), v, "%s %s" % (name, k))


@test
def example_python_hello():
    with fn_session(example("python-hello")) as s:
        rid, res = s.invoke(event={"name": "Ada"})
        eq(json.loads(res["body"]), {"message": "Hello, Ada!", "function": "python-hello", "request_id": rid}, "reply")
        eq(s.ok(event={})["message"], "Hello, world!", "default name")


@test
def example_node_hello():
    with fn_session(example("node-hello")) as s:
        rid, res = s.invoke(event={"name": "Ada"})
        eq(json.loads(res["body"]), {"message": "Hello, Ada!", "function": "node-hello", "request_id": rid}, "reply")
        eq(s.ok(event={})["message"], "Hello, world!", "default name")


def provided_binary():
    candidates = [os.path.join(example("provided-hello"), "dist", "bootstrap")]
    for target in (os.environ.get("CARGO_TARGET_DIR"), "/work/target-runtimes", os.path.join(REPO, "target")):
        if target:
            candidates += [os.path.join(target, "release", "bootstrap"), os.path.join(target, "debug", "bootstrap")]
    found = [c for c in candidates if os.access(c, os.X_OK)]
    if not found:
        raise Skip("provided-hello not built (run examples/provided-hello/build.sh)")
    return max(found, key=os.path.getmtime)


@test
def example_provided_hello():
    binary = provided_binary()
    with Session(binary, handler="bootstrap", task_root=os.path.dirname(binary)) as s:
        eq(s.ok(event={"name": "Ada", "other": {"name": "no"}}), {"message": "Hello, Ada!", "runtime": "provided"}, "reply")
        eq(s.ok(event={"name": "Zoë \"Q\""}), {"message": "Hello, Zoë \"Q\"!", "runtime": "provided"}, "escaping")
        eq(s.ok(raw=b""), {"message": "Hello, world!", "runtime": "provided"}, "no event")
        eq(len(s.api.peers), 1, "one keep-alive connection")


@test
def reconnects_when_the_agent_drops_idle_connections():
    """The agent may close a kept-alive connection between requests; each bootstrap must reconnect."""
    cases = [("python", {"main.py": PY_MAIN}, "main.handler"), ("node", {"index.js": NODE_INDEX}, "index.handler")]
    try:
        cases.append((provided_binary(), {}, "bootstrap"))
    except Skip:
        pass
    for runtime, files, handler in cases:
        if runtime == "node" and not NODE:
            continue
        with Session(runtime, files, handler, drop_after_post=True) as s:
            for i in range(3):
                s.ok(event={"name": "n%d" % i})
            assert len(s.api.peers) >= 3, (runtime, s.api.peers)


@test
def example_command_hello():
    r = run_command(example("command-hello"), b'{"name": "Ada"}')
    eq(r.returncode, 0, "exit code")
    eq(json.loads(r.stdout), {"message": "Hello, Ada!", "runtime": "command", "function": "command-hello"}, "reply")
    assert b"greeting Ada" in r.stderr, r.stderr
    eq(json.loads(run_command(example("command-hello"), b"").stdout)["message"], "Hello, world!", "empty stdin")


@test
def fixture_fx_echo():
    with fn_session(fixture("fx-echo")) as s:
        deadline = int(time.time() * 1000) + 3000
        a = s.ok(event={"hello": "world"}, deadline_ms=deadline, client_context={"custom": {"c": 1}})
        b = s.ok(event=[1, 2])
        eq(a["event"], {"hello": "world"}, "event")
        eq(b["event"], [1, 2], "non-object event")
        eq(a["env"]["GREETING"], "hi", "env from function.yaml")
        eq(a["env"]["AWS_LAMBDA_FUNCTION_NAME"], "fx-echo", "function name env")
        assert a["env"]["_X_AMZN_TRACE_ID"].startswith("Root="), a["env"]
        eq(a["instance"], b["instance"], "same instance (warm)")
        eq(a["pid"], b["pid"], "same pid")
        eq((a["invocations"], b["invocations"]), (1, 2), "invocation counter")
        near(a["remaining_ms"], 3000, 1000, "remaining_ms")
        eq(a["context"]["client_context"], {"custom": {"c": 1}, "env": None}, "client context")
        eq(a["context"]["function_name"], "fx-echo", "context.function_name")


@test
def fixture_fx_error():
    with fn_session(fixture("fx-error")) as s:
        err, _ = s.fail(event={})
        eq((err["errorType"], err["errorMessage"]), ("ValueError", "boom: bad input"), "error")


@test
def fixture_fx_apigw():
    with fn_session(fixture("fx-apigw")) as s:
        ev = {"version": "2.0", "rawPath": "/echo/x", "queryStringParameters": {"a": "1"}}
        eq(s.ok(event=ev)["event"], ev, "echo")
        eq(s.ok(event={"rawPath": "/value"}), [1, "two", None, {"k": True}], "plain value")
        data = bytes(range(256))
        r = s.ok(event={"rawPath": "/binary", "body": base64.b64encode(data).decode(), "isBase64Encoded": True})
        eq((base64.b64decode(r["body"]), r["isBase64Encoded"]), (data, True), "binary round trip")
        r = s.ok(event={"rawPath": "/custom", "queryStringParameters": {"status": "418"}})
        eq((r["statusCode"], r["cookies"], r["body"]), (418, ["session=abc; Path=/; HttpOnly", "theme=dark"], "created"), "custom")
        err, _ = s.fail(event={"rawPath": "/error"})
        eq(err["errorType"], "ValueError", "error")


@test
def fixture_fx_sleep():
    with fn_session(fixture("fx-sleep")) as s:
        t = time.time()
        eq(s.ok(event={"seconds": 0.2}), {"slept": 0.2}, "reply")
        assert time.time() - t >= 0.2


@test
def fixture_fx_memhog():
    with fn_session(fixture("fx-memhog")) as s:
        eq(s.ok(event={"mb": 16}), {"allocated_mb": 16}, "reply")


@test
def fixture_fx_probe():
    tmp = tempfile.mkdtemp(prefix="skiff-probe-")
    try:
        for name in ("fx-probe",):
            with fn_session(fixture(name)) as s:
                w = s.ok(event={"check": "whoami"})
                eq((w["ok"], w["check"], w["uid"]), (True, "whoami", os.getuid()), "whoami")
                assert "CapEff" in w["status"] and "NoNewPrivs" in w["status"], w["status"]
                assert "AWS_LAMBDA_RUNTIME_API" in w["env_keys"], w
                target = os.path.join(tmp, "f-" + name)
                eq(s.ok(event={"check": "write", "path": target}), {"ok": True, "check": "write"}, "write")
                r = s.ok(event={"check": "read", "path": target})
                eq((r["ok"], r["data"]), (True, "skiff-probe\n"), "read back")
                r = s.ok(event={"check": "read", "path": os.path.join(tmp, "missing")})
                eq((r["ok"], r["errno"]), (False, 2), "read missing")
                assert r["error"].startswith("FileNotFoundError:"), r
                r = s.ok(event={"check": "write", "path": "/proc/1/nonexistent/x"})
                eq(r["ok"], False, "write refused")
                fill = os.path.join(tmp, "fill")
                r = s.ok(event={"check": "tmpfill", "mb": 3, "path": fill})
                eq((r["ok"], r["bytes_written"], r["error"]), (True, 3 << 20, None), "tmpfill")
                assert not os.path.exists(fill), "tmpfill removes its file"
                r = s.ok(event={"check": "tmpfill", "mb": 1, "path": "/proc/nope/fill"})
                eq((r["ok"], r["bytes_written"]), (False, 0), "tmpfill failure")
                assert r["error"], r
                keep = os.path.join(tmp, "keep-" + name)
                eq(s.ok(event={"check": "tmpkeep", "path": keep})["existed"], False, "tmpkeep first")
                eq(s.ok(event={"check": "tmpkeep", "path": keep})["existed"], True, "tmpkeep second")
                r = s.ok(event={"check": "ps"})
                assert r["ok"] and s.proc.p.pid in r["pids"] and r["count"] == len(r["procs"]), r["count"]
                r = s.ok(event={"check": "forkbomb", "n": 5})
                eq((r["ok"], r["requested"], r["forked"]), (True, 5, 5), "forkbomb (small)")
                host, port = s.api.address.split(":")
                r = s.ok(event={"check": "connect", "host": host, "port": int(port), "timeout": 2})
                eq(r["ok"], True, "connect to a listening port")
                r = s.ok(event={"check": "connect", "host": "127.0.0.1", "port": 1, "timeout": 2})
                eq(r["ok"], False, "connect to a closed port")
                assert r["error"].startswith("ConnectionRefusedError"), r
                r = s.ok(event={"check": "nope"})
                eq(r["ok"], False, "unknown check")
                r = s.ok(event={"check": "read"})
                eq((r["ok"], r["error"]), (False, "KeyError: 'path'"), "bad event still answers")
                eq(s.ok(event="not a dict")["ok"], False, "non-dict event")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@test
def fixture_fx_node_echo():
    with fn_session(fixture("fx-node-echo")) as s:
        a = s.ok(event={"hello": "world"}, client_context={"custom": {"c": 1}})
        b = s.ok(event={"n": 2})
        eq(a["event"], {"hello": "world"}, "event")
        eq(a["env"]["GREETING"], "hi", "env")
        eq(a["instance"], b["instance"], "warm instance")
        eq((a["invocations"], b["invocations"]), (1, 2), "counter")
        assert 0 < a["remaining_ms"] <= 30_000, a
        eq(a["context"]["client_context"], {"custom": {"c": 1}}, "client context")
        eq(a["context"]["function_name"], "fx-node-echo", "function name")


@test
def fixture_fx_cmd_echo():
    r = run_command(fixture("fx-cmd-echo"), b'{"msg": "hello"}\n')
    eq(r.returncode, 0, "exit code")
    eq(r.stdout, b'{"MSG": "HELLO"}\n', "uppercased, trailing newline kept")
    assert b"fx-cmd-echo: got" in r.stderr, r.stderr
    r = run_command(fixture("fx-cmd-echo"), b"please fail now")
    eq(r.returncode, 3, "exit code on 'fail'")
    eq(r.stdout, b"", "no output on failure")
    eq(run_command(fixture("fx-cmd-echo"), b"").returncode, 0, "empty input")


# ---------------------------------------------------------------------------------------------


def main(argv):
    selected = [t for t in TESTS if not argv[1:] or any(a in t.__name__ for a in argv[1:])]
    passed = failed = skipped = 0
    for t in selected:
        start = time.time()
        try:
            t()
        except Skip as e:
            skipped += 1
            print("SKIP %s: %s" % (t.__name__, e))
            continue
        except Exception:
            failed += 1
            print("FAIL %s (%.2fs)\n%s" % (t.__name__, time.time() - start, traceback.format_exc()))
            continue
        passed += 1
        print("ok   %s (%.2fs)" % (t.__name__, time.time() - start))
    if skipped:
        print("%d skipped" % skipped)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
