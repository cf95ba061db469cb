"""The HTTP API (FastAPI): health, readiness, admin (status, sync now, rollback, revert), metrics, and the
OpenAI-compatible serving API (``daemon.http.openai_api``).

Routes:

- ``GET /healthz``: the process answers (200 always).
- ``GET /readyz``: 200 once the model is loaded and the scheduler runs, else 503.
- ``GET /v1/admin/status``: :meth:`Service.status` plus ``last_tick``, ``next_tick`` and ``daemon``.
- ``POST /v1/admin/sync``: a tick now, through the scheduler (never overlapping a scheduled one):
  ``{"steps": [...], "head": id}``.
- ``POST /v1/admin/rollback`` ``{"version": int|null, "reason": str}``: ``{"from": id, "head": id}``.
- ``POST /v1/admin/revert`` ``{"version": int}``: ``{"steps": [...], "head": id}``.
- ``POST /v1/admin/compact``: starts compacting HEAD's history in the background (``daemon.compaction``);
  returns its state, which ``status`` shows as ``compaction`` until it ends.
- ``GET /metrics``: Prometheus text format; open on a loopback bind, else it needs the admin token.

Admin routes need ``Authorization: Bearer TOKEN`` whenever a token is configured (``[daemon] token`` or
env ``KBSYNC_TOKEN``); a token is optional on a loopback address and required on any other one.
Errors are ``{"error": {"message", "type", "code"}}`` (``code`` is the HTTP status): 404 for unknown
versions, 409 for operations the service refuses, 400 for other knowledge-base errors, 401 without a
valid token, 503 while starting or stopping, 500 for anything unexpected. Routes of the serving API
answer in OpenAI's error shape instead (``daemon.http.openai_api``). Every request body is limited to
``[serve] max_body_bytes`` (413).
"""
from __future__ import annotations

import hmac
import ipaddress
import os
from functools import partial

import anyio
import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from kb import FactNotFoundError, KBError, VersionNotFoundError

from ..config import ConfigError
from ..errors import ServiceError
from .limits import BodyLimitMiddleware, ClientSlots
from ..metrics import MetricsMiddleware
from .openai_api import OpenAIError, error_response, is_openai_path, openai_router
from ..runtime import Runtime, ShuttingDownError

log = structlog.get_logger("kbsync.api")


class RollbackBody(BaseModel):
    version: int | None = None       # None: the base model
    reason: str = ""


class RevertBody(BaseModel):
    version: int


class QueryBody(BaseModel):
    prompt: str = Field(min_length=1, max_length=8000)
    max_tokens: int = Field(default=16, ge=1, le=512)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str) -> None:
    """Refuse to serve the admin API on a non-loopback address without a token."""
    if not token and not is_loopback(host):
        raise ConfigError(f"refusing to serve the admin API on {host} without a token: set [daemon] token in the "
                          "config or the KBSYNC_TOKEN environment variable, or bind to 127.0.0.1")


def create_app(runtime: Runtime) -> FastAPI:
    """The HTTP API over ``runtime`` (raises ConfigError for a non-loopback host without a token)."""
    token = runtime.token
    check_bind(runtime.host, token)
    app = FastAPI(title="kbsync API", version="1")
    app.state.runtime = runtime
    admin = [Depends(_bearer(token))]
    app.state.slots = ClientSlots(runtime.cfg.serve.max_concurrent_per_client)
    app.include_router(openai_router(runtime, app.state.slots))
    app.add_middleware(BodyLimitMiddleware, max_bytes=runtime.cfg.serve.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics)            # outermost: sees every status

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = runtime.is_ready
        return JSONResponse({"ready": ready, "model_loaded": runtime.service.model_loaded,
                             "degraded": runtime.service.degraded,
                             "scheduler_running": runtime.scheduler.running}, status_code=200 if ready else 503)

    @app.get("/metrics", dependencies=[] if is_loopback(runtime.host) else admin)
    def metrics() -> Response:
        return Response(runtime.metrics.render(runtime.service), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/admin/status", dependencies=admin)
    def status() -> dict:
        return runtime.status()

    @app.post("/v1/admin/sync", dependencies=admin)
    async def sync() -> dict:
        return await _in_thread(runtime.sync_now)

    @app.post("/v1/admin/rollback", dependencies=admin)
    async def rollback(body: RollbackBody) -> dict:
        return await _in_thread(partial(runtime.rollback, body.version, actor="api", reason=body.reason))

    @app.post("/v1/admin/revert", dependencies=admin)
    async def revert(body: RevertBody) -> dict:
        return await _in_thread(partial(runtime.revert, body.version, actor="api"))

    @app.post("/v1/admin/compact", dependencies=admin)
    async def compact() -> dict:
        return await _in_thread(partial(runtime.compact, actor="api"))

    @app.post("/v1/admin/query", dependencies=admin)
    async def query(body: QueryBody) -> dict:
        texts, version = await _in_thread(partial(runtime.query, [body.prompt], body.max_tokens))
        return {"text": texts[0], "version": version}

    _install_error_handlers(app)
    return app


async def _in_thread(fn):
    """Model work runs in a worker thread; a shutdown that cancels the request abandons (not joins) it."""
    return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)


def _bearer(token: str):
    scheme = HTTPBearer(auto_error=False)

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        if not token:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "a valid bearer token is required: send 'Authorization: Bearer <token>' "
                                     "with the [daemon] token or KBSYNC_TOKEN", headers={"WWW-Authenticate": "Bearer"})
    return check


_KINDS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "invalid_request",
          409: "conflict", 422: "invalid_request", 503: "unavailable"}


def _error(request: Request, status: int, message: str, headers: dict | None = None, **openai) -> JSONResponse:
    """The admin shape ``{"error": {"message", "type", "code": status}}``, or OpenAI's on its routes."""
    if is_openai_path(request.url.path):
        return error_response(status, message, headers=headers, **openai)
    kind = _KINDS.get(status, "internal_error" if status >= 500 else "invalid_request")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


def _param(errors: list[dict]) -> str | None:
    """The field the validation errors have in common ("messages.0.role"), without union branch tags."""
    locs = [e["loc"][1:] if e["loc"][:1] == ("body",) else e["loc"] for e in errors]
    common = []
    for parts in zip(*locs):
        if len(set(parts)) > 1:
            break
        common.append(str(parts[0]))
    return ".".join(common) or None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if isinstance(exc.__cause__, UnicodeDecodeError):
            message = f"the request body is not valid UTF-8: {exc.__cause__}"
        return _error(request, exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        if not is_openai_path(request.url.path):
            return _error(request, 422, f"invalid request: {problems}")
        if any(e["type"] == "json_invalid" for e in errors):     # OpenAI answers 400 for all of these
            return _error(request, 400, "the request body is not valid JSON: "
                          + "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in errors))
        return _error(request, 400, f"invalid request: {problems}", param=_param(errors))

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(ServiceError)
    async def refused(request: Request, exc: ServiceError) -> JSONResponse:
        if is_openai_path(request.url.path):                    # HEAD cannot be restored: not ready
            return _error(request, 503, str(exc), code="not_ready")
        return _error(request, 404 if isinstance(exc.__context__, VersionNotFoundError) else 409, str(exc))

    @app.exception_handler(KBError)
    async def kb_error(request: Request, exc: KBError) -> JSONResponse:
        return _error(request, 404 if isinstance(exc, (VersionNotFoundError, FactNotFoundError)) else 400,
                      str(exc))

    @app.exception_handler(ShuttingDownError)
    async def stopping(request: Request, exc: ShuttingDownError) -> JSONResponse:
        return _error(request, 503, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("api.error", path=request.url.path, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        return _error(request, 500, f"{type(exc).__name__}: {exc}")
