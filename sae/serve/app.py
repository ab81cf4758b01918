"""The explorer's web application (Starlette; ``pip install -e ".[serve]"``).

    app = make_app(explorer, token=None)          # token: required on every request if given
    uvicorn.run(app, host="127.0.0.1", port=8765)

Routes (JSON in and out; an error is ``{"error": "<one line>"}`` with status 400, 401,
403, 413 or 503, and the page shows the line):

    GET  /                  the page (its JS and CSS inline: nothing is fetched elsewhere)
    GET  /api/info          the model, its SAEs and the limits
    POST /api/features      {"prompt", "top"?}: every token's strongest features per SAE
    GET  /api/card          ?sae=I&feature=F: a feature's card; while the SAE's statistics
                            are first scanned, 202 {"scanning": {"scanned", "total"}}
                            (tokens): ask again
    POST /api/generate      {"prompt", "edits", "seed", "temperature", "top_p",
                            "max_new_tokens"}: NDJSON, one line per decoding step, then
                            {"done": true}; closing the connection stops the generation
    POST /api/export        the same body: the edit set as command lines and YAML
    POST /api/search/text   {"sae", "prompt", "focus"?, "top"?}: features on a span of text
    POST /api/search/contrast  {"sae", "a", "b", "top"?}: features by contrast of two prompt lists
    POST /api/prompts       {"name", "text"}: an uploaded prompt file as a list of prompts
    POST /api/search/token  {"sae", "token", "top"?}: features that promote an output token

Safety: with a token (``analyze.py serve --host`` beyond this machine makes one), every
request must carry it, as the ``X-SAE-Token`` header or ``?token=``; POST bodies must be
JSON (``Content-Type: application/json``, so a page elsewhere cannot post here without the
browser asking first) of at most ``MAX_BODY_BYTES``; on a loopback address, requests must
name a loopback host (no DNS-rebinding). Model work goes through ``ModelWorker``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
from collections.abc import AsyncIterator
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sae.errors import ConfigError
from sae.serve.explorer import Explorer
from sae.serve.model_worker import Busy, ModelWorker

MAX_BODY_BYTES = 256 * 1024
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


def error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def page_html() -> str:
    """The explorer page with the shared card script (sae/analysis/report_assets) inline."""
    mine = resources.files("sae.serve") / "assets"
    report = resources.files("sae.analysis") / "report_assets"
    css = "\n".join(
        f.read_text(encoding="utf-8") for f in (report / "report.css", mine / "explorer.css")
    )
    js = "\n".join(
        f.read_text(encoding="utf-8") for f in (report / "card.js", mine / "explorer.js")
    )
    body = (mine / "explorer.html").read_text(encoding="utf-8")
    return body.replace("/*CSS*/", css).replace("/*JS*/", js)


async def json_body(request: Request) -> dict:
    """The request's JSON object, refused (one line) when too large, not JSON or not an object."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/json":
        raise ConfigError(f"request: Content-Type {kind or 'none'!r}; send application/json")
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise _TooLarge(int(size))
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise _TooLarge(len(raw))
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError("request: the body is not JSON") from None
    if not isinstance(body, dict):
        raise ConfigError("request: the body must be a JSON object")
    return body


class _TooLarge(ConfigError):
    def __init__(self, size: int):
        super().__init__(f"request: {size:,} bytes; at most {MAX_BODY_BYTES:,}")


class _Api:
    """The route handlers over one explorer and its model worker (module docstring)."""

    def __init__(self, explorer: Explorer, worker: ModelWorker):
        self.explorer, self.worker, self.html = explorer, worker, page_html()

    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.html, headers={"Content-Security-Policy": CSP})

    async def info(self, request: Request) -> Response:
        ended = dict(self.worker.ended)
        return JSONResponse({**self.explorer.info(), "jobs": self.worker.jobs, "ended": ended})

    async def features(self, request: Request) -> Response:
        body = await json_body(request)
        top = body.get("top", 5)
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= 50:
            raise ConfigError(f"top: {top!r} must be a whole number in 1..50")
        self.explorer.prompt_ids(body.get("prompt"))  # a bad prompt fails before it queues
        found = await self.worker.call(lambda: self.explorer.prompt_features(body["prompt"], top))
        return JSONResponse(found)

    async def card(self, request: Request) -> Response:
        q = request.query_params
        sae = self.explorer.sae_index(_int_param(q.get("sae", "0"), "sae"))
        feature = self.explorer.feature(sae, _int_param(q.get("feature"), "feature"))
        if not self.explorer.has_stats(sae):
            # The first card of an SAE scans its data: model work, one batch per worker step,
            # shared by every tab that asks meanwhile; the page polls while it runs.
            scan = self.explorer.scan(sae)
            if not scan.started:
                self.worker.background(scan.steps)
                scan.started = True
            if not self.explorer.has_stats(sae):
                return JSONResponse({"scanning": scan.progress()}, status_code=202)
        return JSONResponse(await run_in_threadpool(self.explorer.card, sae, feature))

    async def generate(self, request: Request) -> Response:
        steps = self.explorer.generation(await json_body(request))  # checked here, run later
        return StreamingResponse(self._lines(steps), media_type="application/x-ndjson")

    async def _lines(self, steps) -> AsyncIterator[str]:
        try:
            async for step in self.worker.stream(lambda: steps):
                yield json.dumps(step) + "\n"
        except Exception as e:  # the response has started: the error is its last line
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            yield json.dumps({"error": message}) + "\n"
            return
        yield json.dumps({"done": True}) + "\n"

    async def search(self, request: Request) -> Response:
        kind = request.path_params["kind"]
        body = await json_body(request)
        run = {
            "text": self.explorer.search_text,
            "contrast": self.explorer.search_contrast,
            "token": self.explorer.search_token,
        }.get(kind)
        if run is None:
            raise ConfigError(f"search: {kind!r} is not a search; use text, contrast or token")
        return JSONResponse(await self.worker.call(lambda: run(body)))

    async def upload(self, request: Request) -> Response:
        return JSONResponse(self.explorer.upload(await json_body(request)))

    async def export(self, request: Request) -> Response:
        return JSONResponse(self.explorer.export(await json_body(request)))


def make_app(explorer: Explorer, token: str | None = None, loopback: bool = True) -> Starlette:
    """The application over ``explorer`` (module docstring). loopback: bound to this machine
    only, so the Host header must name it."""
    worker = ModelWorker()
    api = _Api(explorer, worker)
    routes = [
        Route("/", api.index),
        Route("/api/info", api.info),
        Route("/api/features", api.features, methods=["POST"]),
        Route("/api/card", api.card),
        Route("/api/generate", api.generate, methods=["POST"]),
        Route("/api/export", api.export, methods=["POST"]),
        Route("/api/prompts", api.upload, methods=["POST"]),
        Route("/api/search/{kind:str}", api.search, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(_Guard, token=token, loopback=loopback)
    return app


# The page needs its own inline script and style, and talks only to this server.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)


def _int_param(value: str | None, name: str) -> int:
    if value is None or not value.lstrip("-").isdigit():
        raise ConfigError(f"{name}: {value!r} is not a whole number")
    return int(value)


def host_name(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8765" -> "[::1]")."""
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0]


class _Guard:
    """ASGI middleware: the token and host checks, and every ConfigError as a JSON line."""

    def __init__(self, app, token: str | None, loopback: bool):
        self.app, self.token, self.loopback = app, token, loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refusal = self.refusal(request)
        if refusal is not None:
            return await refusal(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        except Busy as e:
            await error(str(e), 503)(scope, receive, send)
        except _TooLarge as e:
            await error(str(e), 413)(scope, receive, send)
        except ConfigError as e:
            await error(str(e))(scope, receive, send)

    def refusal(self, request: Request) -> Response | None:
        host = host_name(request.headers.get("host", ""))
        if self.loopback and host not in LOOPBACK_HOSTS:
            return error(f"host {host!r} refused: this server answers only for localhost", 403)
        if self.token is None:
            return None
        given = request.headers.get("x-sae-token") or request.query_params.get("token") or ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return error("this server needs its token: open the URL it printed at start", 401)
        return None
