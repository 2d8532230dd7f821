"""Skiff Python runtime: a Lambda Runtime API (2018-06-01) client.

Started by the agent as `/usr/bin/python3 -u /var/runtime/python/bootstrap.py`. Loads the handler
named by `_HANDLER` (`module.function`, module may be `pkg/mod` or `pkg.mod`) from
`LAMBDA_TASK_ROOT`, then loops: next invocation -> handler(event, context) -> response or error.

Standard library only, and as few modules as possible: startup time is cold-start time. The HTTP
client is a minimal HTTP/1.1 keep-alive client over one socket (http.client alone costs ~20 ms
of imports: email, ssl, ...).
"""

import json
import os
import socket
import sys
import time

API_PREFIX = "/2018-06-01/runtime"
_BOOTSTRAP_FILE = os.path.abspath(__file__)


# --------------------------------------------------------------------------------------------
# Runtime API client


class RuntimeApiError(Exception):
    pass


class RuntimeClient:
    """HTTP/1.1 over one persistent TCP connection; reconnects once if the agent closed it."""

    def __init__(self, address):
        host, _, port = address.rpartition(":")
        if not host:
            host, port = address, "80"
        self.host = host.strip("[]")
        self.port = int(port)
        self.host_header = address.encode("latin-1")
        self.sock = None
        self.buf = b""

    def _connect(self):
        self.close()
        sock = socket.create_connection((self.host, self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.buf = b""

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def request(self, method, path, body=b"", headers=None):
        """Returns (status, {lowercase header: value}, body bytes)."""
        for attempt in (0, 1):
            fresh = self.sock is None
            if fresh:
                self._connect()
            try:
                self._send(method, path, body, headers)
                return self._read_response()
            except (ConnectionError, BrokenPipeError, EOFError) as e:
                self.close()
                # A kept-alive connection may have been closed by the server: retry once on a
                # fresh one. A failure on a fresh connection is final.
                if fresh or attempt:
                    raise RuntimeApiError("runtime API %s %s failed: %s" % (method, path, e))
        raise RuntimeApiError("unreachable")

    def _send(self, method, path, body, headers):
        head = [
            b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n"
            % (method.encode(), path.encode(), self.host_header, len(body))
        ]
        if headers:
            for k, v in headers.items():
                head.append(b"%s: %s\r\n" % (k.encode("latin-1"), str(v).encode("latin-1", "replace")))
        head.append(b"\r\n")
        self.sock.sendall(b"".join(head) + body)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed by runtime API")
        self.buf += chunk

    def _read_line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            self._fill()

    def _read_exact(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _read_response(self):
        while True:
            status_line = self._read_line()
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
                raise EOFError("bad status line %r" % status_line[:80])
            status = int(parts[1])
            headers = {}
            while True:
                line = self._read_line()
                if not line:
                    break
                k, _, v = line.partition(b":")
                headers[k.strip().lower().decode("latin-1")] = v.strip().decode("utf-8", "replace")
            if 100 <= status < 200:
                continue  # interim response (100 Continue): the real one follows
            break
        if headers.get("transfer-encoding", "").lower().endswith("chunked"):
            body = []
            while True:
                size = int(self._read_line().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self._read_line():  # trailers
                        pass
                    break
                body.append(self._read_exact(size))
                self._read_exact(2)
            body = b"".join(body)
        elif "content-length" in headers:
            body = self._read_exact(int(headers["content-length"]))
        elif status in (204, 304):
            body = b""
        else:  # no length: body runs to end of connection
            try:
                while True:
                    self._fill()
            except EOFError:
                pass
            body, self.buf = self.buf, b""
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    # Runtime API calls

    def next(self):
        # While a snapshot of the sandbox is taken the agent closes its sockets (gVisor cannot
        # save sockets it is watching) and reopens them after: wait for it, briefly backing off.
        delay, waited = 0.001, 0.0
        while True:
            try:
                status, headers, body = self.request("GET", API_PREFIX + "/invocation/next")
                break
            except (RuntimeApiError, ConnectionError) as e:
                if waited > 60:
                    raise RuntimeApiError("runtime API unreachable for 60 s: %s" % e)
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 0.01)
        if status != 200:
            raise RuntimeApiError("next invocation: HTTP %d: %r" % (status, body[:200]))
        return headers, body

    def post_response(self, request_id, body, content_type="application/json"):
        status, _, resp = self.request(
            "POST", "%s/invocation/%s/response" % (API_PREFIX, request_id), body,
            {"Content-Type": content_type},
        )
        if status >= 300:
            # e.g. 413 payload too large: report it as the invocation's error instead.
            raise RuntimeApiError("HTTP %d: %s" % (status, resp[:500].decode("utf-8", "replace")))

    def post_error(self, request_id, error, error_type_header="Unhandled"):
        self._post_error("%s/invocation/%s/error" % (API_PREFIX, request_id), error, error_type_header)

    def post_init_error(self, error):
        self._post_error(API_PREFIX + "/init/error", error, error["errorType"])

    def _post_error(self, path, error, header):
        body = json.dumps(error, default=str).encode()
        self.request("POST", path, body, {
            "Content-Type": "application/json",
            "Lambda-Runtime-Function-Error-Type": header,
        })


# --------------------------------------------------------------------------------------------
# Context


class CognitoIdentity:
    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")

    def __init__(self, data=None):
        data = data if isinstance(data, dict) else {}
        self.cognito_identity_id = data.get("cognitoIdentityId")
        self.cognito_identity_pool_id = data.get("cognitoIdentityPoolId")

    def __repr__(self):
        return "CognitoIdentity(%r, %r)" % (self.cognito_identity_id, self.cognito_identity_pool_id)


class Client:
    __slots__ = ("installation_id", "app_title", "app_version_name", "app_version_code", "app_package_name")

    def __init__(self, data):
        for name in self.__slots__:
            setattr(self, name, data.get(name))


class ClientContext:
    __slots__ = ("client", "custom", "env")

    def __init__(self, data):
        client = data.get("client")
        self.client = Client(client) if isinstance(client, dict) else client
        self.custom = data.get("custom")
        self.env = data.get("env")

    def __repr__(self):
        return "ClientContext(custom=%r, env=%r)" % (self.custom, self.env)


class LambdaContext:
    def __init__(self, request_id, deadline_ms, function_arn, client_context, identity):
        env = os.environ
        self.aws_request_id = request_id
        self.invoked_function_arn = function_arn
        self.function_name = env.get("AWS_LAMBDA_FUNCTION_NAME")
        self.function_version = env.get("AWS_LAMBDA_FUNCTION_VERSION")
        try:
            self.memory_limit_in_mb = int(env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "0"))
        except ValueError:
            self.memory_limit_in_mb = 0
        self.log_group_name = env.get("AWS_LAMBDA_LOG_GROUP_NAME")
        self.log_stream_name = env.get("AWS_LAMBDA_LOG_STREAM_NAME")
        self.identity = CognitoIdentity(identity)
        self.client_context = ClientContext(client_context) if isinstance(client_context, dict) else None
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self):
        return max(int(self._deadline_ms - time.time() * 1000), 0)

    def log(self, msg):
        sys.stdout.write(str(msg))

    def __repr__(self):
        return "LambdaContext(aws_request_id=%r, function_name=%r, function_version=%r)" % (
            self.aws_request_id, self.function_name, self.function_version)


def _parse_json_header(value):
    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Errors


def _stack_trace(tb):
    """Formatted frames of a traceback, without the bootstrap's own leading frames."""
    import traceback  # only on the error path
    frames = traceback.extract_tb(tb)
    while frames and frames[0].filename == _BOOTSTRAP_FILE:
        frames = frames[1:]
    return traceback.format_list(frames)


def _error_from_exception(exc, message=None, error_type=None):
    return {
        "errorMessage": message if message is not None else str(exc),
        "errorType": error_type or type(exc).__name__,
        "stackTrace": _stack_trace(exc.__traceback__),
    }


def _make_error(message, error_type, stack=None):
    return {"errorMessage": message, "errorType": error_type, "stackTrace": stack or []}


def _log_error(error):
    """Logs like AWS: `[ERROR] Type: message` then the traceback, as one write."""
    lines = ["[ERROR] %s: %s" % (error["errorType"], error["errorMessage"])]
    if error.get("stackTrace"):
        lines.append("Traceback (most recent call last):")
        lines.append("".join(error["stackTrace"]).rstrip("\n"))
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# Handler loading


class InitError(Exception):
    def __init__(self, error):
        super().__init__(error["errorMessage"])
        self.error = error


def load_handler(handler, task_root):
    if task_root and (not sys.path or sys.path[0] != task_root):
        if task_root in sys.path:
            sys.path.remove(task_root)
        sys.path.insert(0, task_root)
    modname, dot, fname = handler.rpartition(".")
    if not dot or not modname or not fname:
        raise InitError(_make_error(
            "Bad handler '%s': not enough values to unpack (expected 2, got 1)" % handler,
            "Runtime.MalformedHandlerName"))
    import importlib  # already loaded by the interpreter: costs nothing
    try:
        module = importlib.import_module(modname.replace("/", "."))
    except ImportError as e:
        raise InitError(_error_from_exception(
            e, "Unable to import module '%s': %s" % (modname, e), "Runtime.ImportModuleError"))
    except SyntaxError as e:
        trace = ['  File "%s" Line %s\n    %s' % (e.filename, e.lineno, (e.text or "").strip())]
        raise InitError(_make_error(
            "Syntax error in module '%s': %s" % (modname, e), "Runtime.UserCodeSyntaxError", trace))
    except Exception as e:
        raise InitError(_error_from_exception(e))
    func = getattr(module, fname, None)
    if func is None:
        raise InitError(_make_error(
            "Handler '%s' missing on module '%s'" % (fname, modname), "Runtime.HandlerNotFound"))
    if not callable(func):
        raise InitError(_make_error(
            "Handler '%s' on module '%s' is not callable" % (fname, modname), "Runtime.HandlerNotFound"))
    return func


class _RequestIdFilter:
    """Adds `aws_request_id` to log records (installed only if the function uses `logging`)."""

    request_id = None

    def filter(self, record):
        record.aws_request_id = _RequestIdFilter.request_id
        return True


def _setup_logging():
    """AWS formats root-logger records as `[LEVEL]\\ttimestamp\\trequest-id\\tmessage`. Only pay for
    it if the user's code imported `logging` itself."""
    logging = sys.modules.get("logging")
    if logging is None:
        return
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    fmt = logging.Formatter(
        "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s\n",
        "%Y-%m-%dT%H:%M:%S")
    fmt.converter = time.gmtime
    handler.setFormatter(fmt)
    handler.addFilter(_RequestIdFilter())
    root.addHandler(handler)
    level = os.environ.get("AWS_LAMBDA_LOG_LEVEL")
    if level:
        root.setLevel(level.upper())


# --------------------------------------------------------------------------------------------
# Invocation


def _json_default(o):
    # Decimal (e.g. from DynamoDB-style code) → number, like AWS's encoder.
    if type(o).__name__ == "Decimal":
        return int(o) if o == o.to_integral_value() else float(o)
    raise TypeError("Object of type %s is not JSON serializable" % type(o).__name__)


def _encode_result(result):
    """(body, content type). Everything is JSON-encoded, as on AWS (a returned str becomes a JSON
    string); bytes are an extension and are sent as they are."""
    if isinstance(result, (bytes, bytearray, memoryview)):
        return bytes(result), "application/octet-stream"
    return json.dumps(result, default=_json_default).encode("utf-8"), "application/json"


def handle_one(client, func, headers, body):
    request_id = headers.get("lambda-runtime-aws-request-id", "")
    trace_id = headers.get("lambda-runtime-trace-id")
    if trace_id:
        os.environ["_X_AMZN_TRACE_ID"] = trace_id
    else:
        os.environ.pop("_X_AMZN_TRACE_ID", None)
    try:
        deadline_ms = int(headers.get("lambda-runtime-deadline-ms") or 0)
    except ValueError:
        deadline_ms = 0
    if not deadline_ms:
        deadline_ms = int(time.time() * 1000) + 900_000
    _RequestIdFilter.request_id = request_id

    try:
        event = json.loads(body) if body.strip() else {}
    except ValueError as e:
        error = _make_error("Unable to unmarshal input: %s" % e, "Runtime.UnmarshalError")
        _log_error(error)
        client.post_error(request_id, error)
        return

    context = LambdaContext(
        request_id, deadline_ms, headers.get("lambda-runtime-invoked-function-arn"),
        _parse_json_header(headers.get("lambda-runtime-client-context")),
        _parse_json_header(headers.get("lambda-runtime-cognito-identity")),
    )
    try:
        result = func(event, context)
    except (SystemExit, KeyboardInterrupt) as e:
        # The function is ending the process: report this invocation first, then exit.
        error = _make_error("Process exited before completing request: %r" % (e,), "Runtime.ExitError")
        _log_error(error)
        try:
            client.post_error(request_id, error)
        except Exception:
            pass
        raise
    except Exception as e:
        error = _error_from_exception(e)
        _log_error(error)
        client.post_error(request_id, error)
        return

    try:
        payload, content_type = _encode_result(result)
    except Exception as e:
        error = _make_error("Unable to marshal response: %s" % e, "Runtime.MarshalError")
        _log_error(error)
        client.post_error(request_id, error)
        return
    try:
        client.post_response(request_id, payload, content_type)
    except RuntimeApiError as e:
        if client.sock is None:
            raise
        error = _make_error("Unable to post response: %s" % e, "Runtime.ResponseError")
        _log_error(error)
        client.post_error(request_id, error)


def main():
    api = os.environ.get("AWS_LAMBDA_RUNTIME_API")
    if not api:
        sys.stderr.write("bootstrap: AWS_LAMBDA_RUNTIME_API is not set\n")
        return 1
    client = RuntimeClient(api)
    task_root = os.environ.get("LAMBDA_TASK_ROOT", "/var/task")
    try:
        os.chdir(task_root)
    except OSError:
        pass
    handler = os.environ.get("_HANDLER", "")

    try:
        func = load_handler(handler, task_root)
    except InitError as e:
        _log_error(e.error)
        client.post_init_error(e.error)
        return 1
    _setup_logging()

    while True:
        headers, body = client.next()
        handle_one(client, func, headers, body)


if __name__ == "__main__":
    try:
        code = main()
    except RuntimeApiError as e:
        sys.stderr.write("bootstrap: %s\n" % e)
        code = 1
    sys.exit(code)
