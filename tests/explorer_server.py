"""The explorer's app served by uvicorn on a free local port in a background thread, for the
API and browser tests, and a small JSON client for it."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request

import uvicorn


@contextlib.contextmanager
def served(app):
    """Yield the base URL ("http://127.0.0.1:PORT") while ``app`` is served."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the explorer server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def call(url: str, body=None, headers: dict | None = None, raw: bytes | None = None):
    """(status, decoded JSON or text) of a GET (no body) or a JSON POST."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    h = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers={**h, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def read_card(url: str, sae: int, feature: int) -> tuple[int, dict]:
    """(status, JSON) of a feature's card, asked again while the first scan runs (202)."""
    deadline = time.monotonic() + 120
    while True:
        status, got = call(url + f"/api/card?sae={sae}&feature={feature}")
        if status != 202 or time.monotonic() > deadline:
            return status, got
        time.sleep(0.05)


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line]
