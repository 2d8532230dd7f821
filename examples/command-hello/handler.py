#!/usr/bin/python3
"""Reads a JSON event on stdin, writes a JSON reply on stdout, logs on stderr."""
import json
import os
import sys

raw = sys.stdin.read()
try:
    event = json.loads(raw) if raw.strip() else {}
except ValueError:
    event = {"raw": raw}
name = event.get("name", "world") if isinstance(event, dict) else "world"
print(f"command-hello: greeting {name}", file=sys.stderr)
json.dump({
    "message": f"Hello, {name}!",
    "runtime": "command",
    "function": os.environ.get("AWS_LAMBDA_FUNCTION_NAME"),
}, sys.stdout)
