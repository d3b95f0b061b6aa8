"""The search page's HTTP side: a Starlette app over a :class:`SearchEngine`.

Routes (all answers of ``/api/`` are JSON, errors too: ``{"error": "...", "status": N}``):

* ``GET /`` — the page (``static/index.html``; ``/static/app.js``, ``/static/style.css``).
* ``GET /api/datasets`` — search targets (datasets, evaluations with distractors) and the
  state of their index.
* ``GET /api/images?dataset=NAME|evaluation=NAME[&q=TEXT&offset=0&limit=200]`` — the target's
  images, ground-truth queries first with their boxes.
* ``GET /api/image?dataset=NAME&id=ID[&size=PX]`` — an indexed image as JPEG, by manifest id.
* ``GET|POST /api/search?dataset=NAME|evaluation=NAME&…`` — ``id=ID`` (``image_dataset=NAME``
  for a distractor, ``query=NAME`` for a ground-truth query) or an image file as the POST
  body; ``box=x1,y1,x2,y2``, ``method=ofa+r100+qe10``, ``top=20``, ``protocol=crop|paper``,
  ``filename=NAME`` (for messages).
* ``GET /api/detail?token=T&dataset=NAME&id=ID`` — a result's CAM view for the query of a
  search (``token`` from its answer).
* ``POST /api/upload?dataset=NAME|evaluation=NAME&filename=NAME`` — read an image file as a
  search would (no forward pass): ``{"width", "height"}`` of the upright image, or the error
  a search would give (the page reports a broken upload at once).
* ``GET /api/health`` — ``{"status": "ok", …}`` (200) while the configuration loads, else
  ``{"status": "error", "error": …}`` (503): for load balancers and monitors.
* ``GET /metrics`` — request counts and latencies, search times, running searches, in the
  Prometheus text format (:mod:`cw_pipeline.web.metrics`).
"""

from __future__ import annotations

import logging
import time
from importlib import metadata, resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cw_pipeline.core.jsonsafe import dumps as strict_json
from cw_pipeline.web.common import DEFAULT_TOP, Target, WebError, parse_box, upload_too_large
from cw_pipeline.web.engine import SearchEngine
from cw_pipeline.web.metrics import CONTENT_TYPE, Metrics

logger = logging.getLogger(__name__)

__all__ = ["create_app"]

STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: Nothing is loaded from anywhere but this server (images also as data:/blob: URLs).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _JSON(JSONResponse):
    """JSON without NaN/Infinity (null instead), as the CLI prints it."""

    def render(self, content: Any) -> bytes:
        return strict_json(content, sort_keys=False, default=str).encode("utf-8")


def _error(status: int, message: str) -> Response:
    return _JSON({"error": message, "status": status}, status_code=status, headers=SECURITY_HEADERS)


def _int(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise WebError(400, f"{name} must be an integer, got {value!r}") from None


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading all of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise WebError(413, upload_too_large(int(declared), limit))
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise WebError(413, upload_too_large(len(data), limit) + " (at least)")
    return bytes(data)


class _Handlers:
    """The route handlers over one engine (and the page's static files, read once)."""

    def __init__(self, engine: SearchEngine) -> None:
        self.engine = engine
        self.static = {
            name: resources.files("cw_pipeline.web").joinpath("static", name).read_bytes()
            for name in STATIC_TYPES
        }

    def page(self, name: str) -> Response:
        return Response(self.static[name], media_type=STATIC_TYPES[name], headers=SECURITY_HEADERS)

    async def index(self, request: Request) -> Response:
        return self.page("index.html")

    async def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.static or name == "index.html":
            raise WebError(404, f"no static file {name!r}")
        return self.page(name)

    def target(self, request: Request) -> Target:
        q = request.query_params
        return self.engine.target(q.get("dataset"), q.get("evaluation"))

    async def datasets(self, request: Request) -> Response:
        return _JSON(await run_in_threadpool(self.engine.targets), headers=SECURITY_HEADERS)

    async def images(self, request: Request) -> Response:
        t = await run_in_threadpool(self.target, request)
        offset, limit = _int(request, "offset", 0), _int(request, "limit", 200)
        text = request.query_params.get("q", "")
        out = await run_in_threadpool(self.engine.images, t, offset, limit, text)
        return _JSON(out, headers=SECURITY_HEADERS)

    async def image(self, request: Request) -> Response:
        q = request.query_params
        dataset, image_id = q.get("dataset"), q.get("id")
        if not dataset or image_id is None:
            raise WebError(400, "give dataset=NAME and id=ID")
        size = _int(request, "size", 1024)
        data = await run_in_threadpool(self.engine.image_bytes, dataset, image_id, size)
        headers = {**SECURITY_HEADERS, "Cache-Control": "private, max-age=60"}
        return Response(data, media_type="image/jpeg", headers=headers)

    async def search(self, request: Request) -> Response:
        q = request.query_params
        t = await run_in_threadpool(self.target, request)
        upload = None
        if request.method == "POST":
            upload = await _body(request, self.engine.max_upload_bytes)
            if not upload and q.get("id") is None:
                raise WebError(400, "the POST body is empty: send an image file, or id=ID")
            if q.get("id") is not None:
                if upload:
                    raise WebError(400, "give either id=ID or an image in the body, not both")
                upload = None
        kwargs = {
            "method": q.get("method") or "ofa",
            "top": _int(request, "top", DEFAULT_TOP),
            "box": parse_box(q.get("box")),
            "protocol": q.get("protocol") or None,
            "image_id": q.get("id"),
            "image_dataset": q.get("image_dataset") or None,
            "query_name": q.get("query") or None,
            "upload": upload,
            "upload_name": (q.get("filename") or "upload")[:200],
        }
        out = await run_in_threadpool(lambda: self.engine.answer_search(t, **kwargs))
        return _JSON(out, headers=SECURITY_HEADERS)

    async def check_upload(self, request: Request) -> Response:
        t = await run_in_threadpool(self.target, request)
        data = await _body(request, self.engine.max_upload_bytes)
        name = (request.query_params.get("filename") or "upload")[:200]
        out = await run_in_threadpool(self.engine.check_upload, t, data, name)
        return _JSON(out, headers=SECURITY_HEADERS)

    async def health(self, request: Request) -> Response:
        def check() -> dict[str, Any]:
            engine = self.engine
            config = engine.config()
            return {
                "status": "ok",
                "version": _version(),
                "datasets": len(config.datasets),
                "disabled_datasets": len(config.disabled_datasets),
                "searches_running": engine.searches_running,
                "max_searches": engine.max_searches,
                "uptime_seconds": round(time.time() - engine.started, 1),
            }

        try:
            out = await run_in_threadpool(check)
        except WebError as exc:
            error = self.engine.public(exc.message)
            return _JSON({"status": "error", "error": error}, status_code=503,
                         headers=SECURITY_HEADERS)  # fmt: skip
        return _JSON(out, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    async def metrics(self, request: Request) -> Response:
        data = await run_in_threadpool(self.engine.metrics.text)
        return Response(data, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    async def detail(self, request: Request) -> Response:
        q = request.query_params
        token, dataset, image_id = q.get("token"), q.get("dataset"), q.get("id")
        if not token or not dataset or image_id is None:
            raise WebError(400, "give token=T (from a search), dataset=NAME and id=ID")
        out = await run_in_threadpool(self.engine.detail, token, dataset, image_id)
        return _JSON(out, headers=SECURITY_HEADERS)


def _error_handlers(engine: SearchEngine) -> dict[Any, Any]:
    """JSON errors, their messages without the server's absolute paths (:meth:`public`)."""

    async def web_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, WebError)
        return _error(exc.status, engine.public(exc.message))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return _error(404, f"no such page: {request.url.path}")
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}")
        return _error(exc.status_code, str(exc.detail))

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("error on %s %s", request.method, request.url.path)
        text = engine.public(f"internal error ({type(exc).__name__}: {exc}); see the server log")
        return _error(500, text)

    return {WebError: web_error, HTTPException: http_error, Exception: server_error}


def _version() -> str:
    try:
        return metadata.version("cw_pipeline")
    except metadata.PackageNotFoundError:  # a checkout that is not installed
        return "unknown"


class _Measured:
    """ASGI middleware: counts and times every HTTP request by route (the route's path,
    ``other`` for any other path, so the labels stay few)."""

    def __init__(self, app: ASGIApp, routes: list[Route], metrics: Metrics) -> None:
        self.app, self.routes, self.metrics = app, routes, metrics

    def _endpoint(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return route.path
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - t0
            self.metrics.request(self._endpoint(scope), scope["method"], status, seconds)


def create_app(engine: SearchEngine) -> Starlette:
    """The search page and its JSON API over ``engine``."""
    h = _Handlers(engine)
    routes = [
        Route("/", h.index),
        Route("/static/{name}", h.static_file),
        Route("/api/datasets", h.datasets),
        Route("/api/images", h.images),
        Route("/api/image", h.image),
        Route("/api/search", h.search, methods=["GET", "POST"]),
        Route("/api/detail", h.detail),
        Route("/api/upload", h.check_upload, methods=["POST"]),
        Route("/api/health", h.health),
        Route("/metrics", h.metrics),
    ]
    app = Starlette(
        debug=False,
        routes=routes,
        exception_handlers=_error_handlers(engine),
    )
    app.add_middleware(_Measured, routes=routes, metrics=engine.metrics)
    return app
