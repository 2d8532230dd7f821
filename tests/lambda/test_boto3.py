"""The Lambda Invoke API of a running Skiff, driven by real boto3.

Run by the Rust e2e test `lambda_invoke_api_with_boto3`, which starts `skiff serve` with an
API key, deploys the fixtures and sets:
  SKIFF_ENDPOINT  http://127.0.0.1:PORT
  SKIFF_KEY       the API key (used as the AWS access key id)
Deployed: fx-echo (revisions 1 and 2, alias `stable` -> 1), fx-error, fx-sleep (timeout 1s),
fx-busy (fx-sleep with scale.max 1, timeout 5s).
"""
import base64
import json
import os
import threading
import time
import unittest
import urllib.request

import boto3
import botocore.config
import botocore.exceptions

ENDPOINT = os.environ["SKIFF_ENDPOINT"]
KEY = os.environ["SKIFF_KEY"]


def client(access_key=KEY, retries=0):
    return boto3.client(
        "lambda",
        endpoint_url=ENDPOINT,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key="not-checked",
        config=botocore.config.Config(
            retries={"max_attempts": retries, "mode": "standard"},
            read_timeout=60,
        ),
    )


LAMBDA = client()


def invoke(**kw):
    r = LAMBDA.invoke(**kw)
    body = r["Payload"].read()
    return r, (json.loads(body) if body else None)


class InvokeApi(unittest.TestCase):
    def test_request_response_by_name_and_qualifiers(self):
        r, out = invoke(FunctionName="fx-echo", Payload=json.dumps({"n": 1}))
        self.assertEqual(r["StatusCode"], 200)
        self.assertEqual(r["ExecutedVersion"], "2")
        self.assertNotIn("FunctionError", r)
        self.assertEqual(out["event"], {"n": 1})
        self.assertTrue(
            out["context"]["invoked_function_arn"].endswith(":function:fx-echo"), out
        )
        cases = [
            (dict(FunctionName="fx-echo:1"), "1", ":fx-echo:1"),
            (dict(FunctionName="fx-echo", Qualifier="stable"), "1", ":fx-echo:stable"),
            (dict(FunctionName="fx-echo", Qualifier="$LATEST"), "2", ":fx-echo:$LATEST"),
            (dict(FunctionName="arn:aws:lambda:us-east-1:000000000000:function:fx-echo:stable"), "1", ":stable"),
            (dict(FunctionName="000000000000:function:fx-echo"), "2", ":function:fx-echo"),
        ]
        for kw, version, arn_suffix in cases:
            r, out = invoke(Payload=b"{}", **kw)
            self.assertEqual(r["ExecutedVersion"], version, kw)
            self.assertTrue(
                out["context"]["invoked_function_arn"].endswith(arn_suffix), (kw, out)
            )
        # boto3 sends `:` percent-encoded in the path; a raw mismatch is a 400.
        with self.assertRaises(botocore.exceptions.ClientError) as cm:
            invoke(FunctionName="fx-echo:1", Qualifier="2")
        self.assertEqual(cm.exception.response["Error"]["Code"], "InvalidParameterValueException")

    def test_function_error_is_200_with_function_error_header(self):
        r, out = invoke(FunctionName="fx-error", Payload=b"{}")
        self.assertEqual(r["StatusCode"], 200)
        self.assertEqual(r["FunctionError"], "Unhandled")
        self.assertEqual(out["errorType"], "ValueError")
        self.assertIn("boom: bad input", out["errorMessage"])
        self.assertIsInstance(out["stackTrace"], list)

    def test_log_tail_with_report(self):
        # fx-echo:1 has not run yet in this suite's server before this test? It may have:
        # use a marker line to find this invocation's own log.
        marker = "tail-marker-%d" % time.time_ns()
        r, out = invoke(
            FunctionName="fx-echo", Qualifier="1", LogType="Tail",
            Payload=json.dumps({"log": marker}),
        )
        log = base64.b64decode(r["LogResult"]).decode()
        self.assertIn(marker, log)
        self.assertTrue(log.startswith("START RequestId: "), log)
        lines = log.rstrip("\n").split("\n")
        report = lines[-1]
        self.assertTrue(report.startswith("REPORT RequestId: "), log)
        for field in ("Duration: ", "Billed Duration: ", "Memory Size: 128 MB", "Max Memory Used: "):
            self.assertIn(field, report)
        used = int(report.split("Max Memory Used: ")[1].split(" MB")[0])
        self.assertTrue(0 < used <= 128, report)
        request_id = r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
        self.assertIn(request_id, report)
        self.assertEqual(out["context"]["aws_request_id"], request_id)
        # Only the last 4 KB come back.
        r, _ = invoke(FunctionName="fx-echo", LogType="Tail", Payload=json.dumps({"log": "x" * 10000}))
        self.assertLessEqual(len(base64.b64decode(r["LogResult"])), 4096)
        # Without LogType there is no LogResult.
        r, _ = invoke(FunctionName="fx-echo", Payload=b"{}")
        self.assertNotIn("LogResult", r)

    def test_cold_start_report_has_init_duration(self):
        r, _ = invoke(FunctionName="fx-cold", LogType="Tail", Payload=b"{}")
        report = base64.b64decode(r["LogResult"]).decode().rstrip("\n").split("\n")[-1]
        self.assertIn("Init Duration: ", report)
        r, _ = invoke(FunctionName="fx-cold", LogType="Tail", Payload=b"{}")
        report = base64.b64decode(r["LogResult"]).decode().rstrip("\n").split("\n")[-1]
        self.assertNotIn("Init Duration: ", report)

    def test_client_context_reaches_the_function(self):
        cc = {"custom": {"k": "v"}, "env": {"platform": "test"}, "client": {}}
        r, out = invoke(
            FunctionName="fx-echo",
            ClientContext=base64.b64encode(json.dumps(cc).encode()).decode(),
            Payload=b"{}",
        )
        self.assertEqual(out["context"]["client_context"], {"custom": {"k": "v"}, "env": {"platform": "test"}})

    def test_dry_run_and_event(self):
        r = LAMBDA.invoke(FunctionName="fx-echo", InvocationType="DryRun")
        self.assertEqual(r["StatusCode"], 204)
        r = LAMBDA.invoke(FunctionName="fx-echo", InvocationType="Event", Payload=b'{"async": true}')
        self.assertEqual(r["StatusCode"], 202)
        # The accepted event runs soon after (Skiff's own API tells its state).
        event_id = r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
        deadline = time.monotonic() + 20
        state = None
        while time.monotonic() < deadline:
            req = urllib.request.Request(
                f"{ENDPOINT}/v1/functions/fx-echo/events/{event_id}",
                headers={"Authorization": f"Bearer {KEY}"},
            )
            state = json.load(urllib.request.urlopen(req))["state"]
            if state == "done":
                break
            time.sleep(0.1)
        self.assertEqual(state, "done")
        with self.assertRaises(LAMBDA.exceptions.ResourceNotFoundException):
            LAMBDA.invoke(FunctionName="nope", InvocationType="DryRun")

    def test_service_errors(self):
        with self.assertRaises(LAMBDA.exceptions.ResourceNotFoundException) as cm:
            invoke(FunctionName="no-such-function", Payload=b"{}")
        self.assertIn("Function not found", str(cm.exception))
        self.assertEqual(cm.exception.response["ResponseMetadata"]["HTTPStatusCode"], 404)
        with self.assertRaises(LAMBDA.exceptions.ResourceNotFoundException):
            invoke(FunctionName="fx-echo", Qualifier="no-such-alias", Payload=b"{}")
        with self.assertRaises(LAMBDA.exceptions.InvalidRequestContentException) as cm:
            invoke(FunctionName="fx-echo", Payload=b"not json")
        self.assertEqual(cm.exception.response["ResponseMetadata"]["HTTPStatusCode"], 400)
        with self.assertRaises(LAMBDA.exceptions.RequestTooLargeException) as cm:
            invoke(FunctionName="fx-echo", Payload=json.dumps({"x": "a" * (7 << 20)}))
        self.assertEqual(cm.exception.response["ResponseMetadata"]["HTTPStatusCode"], 413)
        with self.assertRaises(LAMBDA.exceptions.RequestTooLargeException):
            LAMBDA.invoke(FunctionName="fx-echo", InvocationType="Event",
                          Payload=json.dumps({"x": "a" * (1100 << 10)}))

    def test_get_and_list_functions(self):
        cfg = LAMBDA.get_function(FunctionName="fx-echo")["Configuration"]
        self.assertEqual(cfg["FunctionName"], "fx-echo")
        self.assertEqual(cfg["Version"], "2")
        self.assertEqual(cfg["Handler"], "main.handler")
        self.assertEqual(cfg["MemorySize"], 128)
        self.assertEqual(cfg["Environment"]["Variables"], {"GREETING": "hi"})
        self.assertEqual(len(base64.b64decode(cfg["CodeSha256"])), 32)
        cfg = LAMBDA.get_function_configuration(FunctionName="fx-echo", Qualifier="stable")
        self.assertEqual(cfg["Version"], "1")
        self.assertTrue(cfg["FunctionArn"].endswith(":function:fx-echo:stable"), cfg)
        names = {f["FunctionName"] for f in LAMBDA.list_functions()["Functions"]}
        self.assertTrue({"fx-echo", "fx-error", "fx-sleep"} <= names, names)
        with self.assertRaises(LAMBDA.exceptions.ResourceNotFoundException):
            LAMBDA.get_function(FunctionName="no-such-function")

    def test_unknown_access_key_is_rejected(self):
        bad = client(access_key="sk_not_a_key")
        with self.assertRaises(botocore.exceptions.ClientError) as cm:
            bad.invoke(FunctionName="fx-echo", Payload=b"{}")
        err = cm.exception.response
        self.assertEqual(err["Error"]["Code"], "UnrecognizedClientException")
        self.assertEqual(err["ResponseMetadata"]["HTTPStatusCode"], 403)

    def test_timeout_is_an_unhandled_function_error(self):
        t0 = time.monotonic()
        r, out = invoke(FunctionName="fx-sleep", Payload=json.dumps({"seconds": 5}))
        self.assertLess(time.monotonic() - t0, 3)
        self.assertEqual(r["StatusCode"], 200)
        self.assertEqual(r["FunctionError"], "Unhandled")
        self.assertEqual(out["errorType"], "Sandbox.Timedout")
        self.assertIn("Task timed out after 1.00 seconds", out["errorMessage"])

    def test_concurrency_limit_is_too_many_requests(self):
        # fx-busy allows one instance with one invocation at a time.
        results = []
        first = threading.Thread(
            target=lambda: results.append(invoke(FunctionName="fx-busy", Payload=json.dumps({"seconds": 2}))[1])
        )
        first.start()
        time.sleep(1.0)
        with self.assertRaises(LAMBDA.exceptions.TooManyRequestsException) as cm:
            invoke(FunctionName="fx-busy", Payload=json.dumps({"seconds": 0}))
        self.assertEqual(cm.exception.response["ResponseMetadata"]["HTTPStatusCode"], 429)
        first.join()
        self.assertEqual(results, [{"slept": 2}])


if __name__ == "__main__":
    unittest.main(verbosity=2)
