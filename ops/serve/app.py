"""``tessera serve``: search, ingest and erasure over HTTP for the apps, and the search page for people.

Trust model. An API key belongs to the platform (its backend, or a person the platform lets use the
page) and binds every request to the key's tenant: a body that names another tenant is refused
(403), never reinterpreted. The platform authenticates its own users and states on whose behalf it
asks in ``X-Tessera-User``; Tessera then filters inside the stores to that user's conversations,
exactly as for a Kafka query job. The server keeps no session: any number of instances can stand
behind a load balancer over a shared state (PostgreSQL) and shared stores.

Errors are RFC 9457 problem details (``application/problem+json``) with a stable ``code``; every
response carries ``X-Request-Id`` (the caller's, or a new one), which the access log names too.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from indexer.images import ImageError, ImagePolicy, load
from ops.runtime.telemetry import (
    EVENTS_REJECTED, HTTP_REQUESTS, HTTP_SECONDS, record_ingest, record_result, registry,
)
from ops.serve.keys import ApiKey, KeyStore
from schemas import MESSAGE_SCHEMA, QUERY_SCHEMA, SchemaError, parse_message
from schemas.models import ID_PATTERN
from schemas.parse import loads, validate

log = logging.getLogger("tessera.serve")
PAGE = Path(__file__).resolve().parent / "page"
USER_HEADER = "X-Tessera-User"
#: Events one ``POST /v1/messages`` may carry.
MAX_EVENTS = 1_000
#: Longest side of an image thumbnail served to the page.
THUMBNAIL_PX = 320
_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True)
class Limits:
    rate_per_s: float = 20.0
    burst: int = 40
    max_body: int = 8 * 2**20


class Problem(Exception):
    """An RFC 9457 problem: HTTP ``status``, a stable ``code``, a ``detail`` for people."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None, **extra):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers, self.extra = status, code, detail, headers or {}, extra


class TokenBucket:
    """Per-key rate limit: ``burst`` requests at once, refilled at ``rate`` per second (this instance)."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when a request may go now, else the seconds until it may."""
        with self._lock:
            now = time.monotonic()
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate


class RequestContext:
    """Request id, access log and metrics for every request, as plain ASGI (no per-request task or queue)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:128]
        request_id = given or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - started
            HTTP_REQUESTS.labels(route, str(status)).inc()
            HTTP_SECONDS.labels(route).observe(elapsed)
            log.info("%s %s %s %d %.1fms key=%s", request_id, scope["method"], scope["path"], status, elapsed * 1000,
                     scope["state"].get("key_id", "-"))


def problem_response(request: Request, problem: Problem) -> JSONResponse:
    body = {"type": f"/problems/{problem.code}", "title": HTTPStatus(problem.status).phrase, "status": problem.status,
            "detail": problem.detail, "code": problem.code, "instance": request.url.path,
            "request_id": getattr(request.state, "request_id", None), **problem.extra}
    return JSONResponse(body, status_code=problem.status, headers=problem.headers, media_type="application/problem+json")


def create_app(engine, keys: KeyStore, limits: Limits = Limits(), image_policy: ImagePolicy = ImagePolicy()) -> FastAPI:
    """The HTTP API and the page over ``engine``; engine calls take turns (the stores serve one at a time)."""
    app = FastAPI(title="Tessera", version="1", docs_url=None, redoc_url=None,
                  description="Find that conversation: hybrid search over chat fragments, bound to the key's tenant.")
    app.state.ready = False
    engine_lock = threading.Lock()
    bucket = TokenBucket(limits.rate_per_s, limits.burst)

    def locked(fn, *args):
        with engine_lock:
            return fn(*args)

    app.add_middleware(RequestContext)

    @app.exception_handler(Problem)
    async def _problem(request: Request, problem: Problem):
        return problem_response(request, problem)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("request %s failed", getattr(request.state, "request_id", "-"))
        return problem_response(request, Problem(500, "internal_error", "the server failed on this request"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return problem_response(request, Problem(exc.status_code, code, str(exc.detail)))

    def authenticate(request: Request) -> ApiKey:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        key = keys.verify(presented.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise Problem(401, "unauthorized", "send a live API key as 'Authorization: Bearer <key>'",
                          {"WWW-Authenticate": 'Bearer realm="tessera"'})
        request.state.key_id = key.key_id
        wait = bucket.take(key.key_id)
        if wait > 0:
            raise Problem(429, "rate_limited", f"this key may make {limits.rate_per_s:g} requests per second",
                          {"Retry-After": str(max(1, math.ceil(wait)))})
        return key

    def user_of(request: Request) -> str:
        user = request.headers.get(USER_HEADER.lower(), "").strip()
        if not _ID.match(user):
            raise Problem(400, "missing_user", f"name the asking user in {USER_HEADER} (an identifier)")
        return user

    async def body_of(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body:
            raise Problem(413, "too_large", f"the body is {declared} bytes; the limit is {limits.max_body}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body:
                raise Problem(413, "too_large", f"the body exceeds {limits.max_body} bytes")
            chunks.append(chunk)
        try:
            return loads(b"".join(chunks))
        except SchemaError as exc:
            raise Problem(400, exc.code, str(exc)) from None

    def visible(key: ApiKey, user: str, conversation_id: str) -> None:
        """404 unless the conversation exists in the key's tenant and the user takes part (or it has no list)."""
        meta = engine.state.conversation(key.tenant_id, conversation_id)
        if meta is None or (meta.participants and user not in meta.participants):
            raise Problem(404, "not_found", f"no conversation {conversation_id!r} for this user")

    @app.post("/v1/search", summary="Find the fragments and turns that match a query",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"example": {
                  "query": "the photo of the glacier from our trip", "top_k": 5,
                  "history": [{"role": "user", "text": "where did we hike in May"}]}}}}})
    async def search(request: Request):
        """A ``tessera.query.v1`` body without ``tenant_id`` and ``user_id`` (the key and ``X-Tessera-User``
        fix them); returns a ``tessera.result.v1``. A ``clarify`` result asks a question: search again with
        the question and the chosen option appended to ``history``."""
        key = authenticate(request)
        user = user_of(request)
        data = await body_of(request)
        if data.get("tenant_id", key.tenant_id) != key.tenant_id:
            raise Problem(403, "tenant_mismatch", "this key searches its own tenant only")
        if data.get("user_id", user) != user:
            raise Problem(403, "user_mismatch", f"user_id differs from {USER_HEADER}")
        data = {"schema": QUERY_SCHEMA, "job_id": request.state.request_id, **data, "tenant_id": key.tenant_id,
                "user_id": user}
        try:
            job = validate(data, QUERY_SCHEMA)
        except SchemaError as exc:
            raise Problem(422, exc.code, str(exc), field=exc.field) from None
        result = await run_in_threadpool(locked, engine.query, job)
        record_result(result)
        if result.status == "error":
            status = 503 if result.error.code.endswith("_unavailable") else 422
            raise Problem(status, result.error.code, result.error.message)
        return JSONResponse(result.model_dump(mode="json", by_alias=True))

    @app.post("/v1/messages", summary="Index a batch of message events (for platforms without Kafka)",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"example": {
                  "events": [{"schema": MESSAGE_SCHEMA, "event_id": "e1", "conversation_id": "c1",
                              "message_id": "m1", "sender_id": "anna", "sent_at": "2026-05-01T10:00:00Z",
                              "text": "look at this glacier", "participants": ["anna", "ben"]}]}}}}})
    async def messages(request: Request):
        """``{"events": [tessera.message.v1, ...]}``; ``tenant_id`` may be left out (the key fixes it).
        Valid events are applied and indexed, each invalid one is reported by index, code and field;
        replaying a batch changes nothing."""
        key = authenticate(request)
        data = await body_of(request)
        events = data.get("events")
        if not isinstance(events, list):
            raise Problem(422, "invalid_field", "events: a list of message events is required", field="events")
        if len(events) > MAX_EVENTS:
            raise Problem(413, "too_many_events", f"{len(events)} events; at most {MAX_EVENTS} per request")
        valid, rejected = [], []
        for index, item in enumerate(events):
            try:
                if not isinstance(item, dict):
                    raise SchemaError("invalid_json", "an event is a JSON object")
                if item.get("tenant_id", key.tenant_id) != key.tenant_id:
                    raise SchemaError("tenant_mismatch", "this key writes its own tenant only", "tenant_id")
                valid.append(parse_message({**item, "tenant_id": key.tenant_id}))
            except SchemaError as exc:
                EVENTS_REJECTED.labels("http", exc.code).inc()
                rejected.append({"index": index, "code": exc.code, "field": exc.field, "detail": exc.detail})
        report = await run_in_threadpool(locked, engine.ingest, valid) if valid else None
        if report is not None:
            record_ingest(report)
        body = {"accepted": len(valid), "rejected": rejected, "report": report.__dict__ if report else None}
        return JSONResponse(body, status_code=200 if valid or not rejected else 422)

    @app.delete("/v1/conversations/{conversation_id}", summary="Erase a conversation of the key's tenant")
    async def delete_conversation(conversation_id: str, request: Request):
        key = authenticate(request)
        report = await run_in_threadpool(locked, engine.delete_conversation, key.tenant_id, conversation_id)
        return {"deleted_messages": report.deleted, "deleted_fragments": report.fragments_deleted}

    @app.delete("/v1/users/{user_id}", summary="Forget a user: erase every message they sent in the key's tenant")
    async def forget_user(user_id: str, request: Request):
        key = authenticate(request)
        report = await run_in_threadpool(locked, engine.forget_user, key.tenant_id, user_id)
        return {"deleted_messages": report.deleted, "deleted_fragments": report.fragments_deleted}

    @app.get("/v1/conversations/{conversation_id}/turns", summary="Turns of a conversation the user takes part in")
    async def turns(conversation_id: str, ids: str, request: Request):
        """The page shows a fragment's context with its matched turns; ``ids`` is a comma-separated list."""
        key = authenticate(request)
        user = user_of(request)
        wanted = [m for m in ids.split(",") if m][:200]

        def read():
            visible(key, user, conversation_id)
            return engine.state.turns_by_id(key.tenant_id, conversation_id, wanted)

        found = await run_in_threadpool(locked, read)
        return {"turns": [{"message_id": m, "sender_id": t.sender_id, "sender_name": t.sender_name,
                           "sent_at": t.sent_at.isoformat(), "text": t.text,
                           "images": [{"index": n, "caption": i.caption} for n, i in enumerate(t.images)]}
                          for m in wanted if (t := found.get(m)) is not None]}

    @app.get("/v1/conversations/{conversation_id}/messages/{message_id}/images/{index}",
             summary="A thumbnail of a message's image, fetched under the image policy")
    async def image(conversation_id: str, message_id: str, index: int, request: Request):
        key = authenticate(request)
        user = user_of(request)

        def read():
            visible(key, user, conversation_id)
            return engine.state.turns_by_id(key.tenant_id, conversation_id, [message_id]).get(message_id)

        turn = await run_in_threadpool(locked, read)
        if turn is None or not 0 <= index < len(turn.images):
            raise Problem(404, "not_found", "no such image")
        try:
            data = await run_in_threadpool(_thumbnail, turn.images[index].uri, image_policy)
        except ImageError as exc:
            raise Problem(502, f"image_{exc.code}", str(exc)) from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    @app.get("/healthz", summary="Liveness")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the models and stores are loaded")
    async def readyz():
        if not app.state.ready:
            raise Problem(503, "not_ready", "still loading the models and stores")
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/page", StaticFiles(directory=PAGE), name="page")
    return app


def _thumbnail(uri: str, policy: ImagePolicy) -> bytes:
    """The image behind ``uri`` through the same guard as indexing (SSRF, size, bombs), made small."""
    import io

    picture = load(uri, policy).image
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def warm_in_background(app: FastAPI, engine) -> threading.Thread:
    """Load models and stores after the port opens: /healthz answers at once, /readyz once loaded."""
    from ops.runtime.assemble import warm_up

    def run():
        warm_up(engine)
        app.state.ready = True

    thread = threading.Thread(target=run, name="warm-up", daemon=True)
    thread.start()
    return thread
