"""The GroqCloud twin: `/openai/v1/...` over the OpenLPU engine, plus /health, /metrics and the
playground at /.

Paths, request fields, response and error shapes, rate-limit headers and the streaming format
follow GroqCloud (summarised in /work/shared/reference/groqcloud-api.md). usage times are real
host seconds; simulated LPU figures, when a Program is in use, go in "x_openlpu" only.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import secrets
import socket
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from openlpu.errors import OpenLPUError
from openlpu.serve.chat_format import prompt_ids
from openlpu.serve.errors import APIError, bad_request, invalid_api_key, model_not_found, server_error
from openlpu.serve.metrics import ServeMetrics
from openlpu.serve.ratelimit import ANONYMOUS, KeyLimits, RateLimiter
from openlpu.serve.scheduler import Job, QueueFull, Scheduler
from openlpu.serve.schemas import ChatCompletionRequest, parse_chat_request

STATIC_DIR = Path(__file__).parent / "static"
API_PREFIX = "/openai/v1"
CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client went away
# a stream whose first token takes longer than this starts anyway, a comment each as long again until it comes:
# the SDKs read with a 60 s timeout and retry the whole request (a long prompt's prefill three times over)
STREAM_STARTS_AFTER_S = 5.0
LOG = logging.getLogger("openlpu.serve")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for it; only the access log and metrics see it
MAX_PORT = 65535
SEED_RANGE = 2**31  # seeds we pick when the client gives none (reported in x_groq.seed)

# (prompt_tokens, completion_tokens) -> the "x_openlpu" object of simulated LPU figures; the
# playground reads "output_tokens_per_s" from it. None (the default) leaves the field out.
SimulatedLPUHook = Callable[[int, int], dict]


@dataclass(frozen=True)
class ServeSettings:
    api_keys: dict[str, KeyLimits] = field(default_factory=dict)  # empty: the server is open
    requests_per_minute: int = 1000
    tokens_per_minute: int = 1_000_000
    requests_per_day: int | None = None  # None: a day of the requests per minute
    max_queue: int = 64  # requests waiting for a batch slot before new ones are refused
    max_body_bytes: int = 1 << 20
    queue_full_retry_after_s: int = 1
    owned_by: str = "openlpu"
    simulated_lpu: SimulatedLPUHook | None = None


def request_id() -> str:
    """GroqCloud-style request id: req_ + a lowercase ULID (ms time + 80 random bits)."""
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    return "req_" + "".join(CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


class Server:
    """Everything a request needs, built once the engine is loaded."""

    def __init__(self, engine, settings: ServeSettings):
        self.engine = engine
        self.settings = settings
        self.model_id = engine.model_name
        self.created = int(time.time())
        self.fingerprint = "fp_" + hashlib.sha256(f"openlpu|{self.model_id}".encode()).hexdigest()[:10]
        self.limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute, settings.api_keys,
                                   requests_per_day=settings.requests_per_day)
        self.scheduler = Scheduler(engine, settings.max_queue)
        self.metrics = ServeMetrics(self.scheduler)
        self.scheduler.on_step = self.metrics.observe_step

    def model_card(self, detailed: bool = False) -> dict:
        card = {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": self.settings.owned_by, "active": True,
                "context_window": self.engine.context_length, "public_apps": None}
        if detailed:
            card["max_completion_tokens"] = self.engine.context_length
        return card

    def authenticate(self, request: Request) -> str:
        keys = self.settings.api_keys
        if not keys:
            request.state.api_key = ANONYMOUS
            return ANONYMOUS
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in keys:
            raise invalid_api_key()
        request.state.api_key = key = token.strip()
        return key


class GroqCloudHeaders:
    """Pure ASGI middleware: x-request-id and the caller's x-ratelimit-* headers on every
    response, request counting, and a GroqCloud 500 body for anything that escaped a handler."""

    def __init__(self, app, fastapi_app: FastAPI):
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id()
        started = {"status": None}

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
                headers = list(message.get("headers", []))
                extra = {"x-request-id": state["request_id"]}
                server: Server | None = getattr(self.fastapi_app.state, "server", None)
                if server and "api_key" in state:
                    extra.update(server.limiter.headers(state["api_key"]))
                present = {k.lower() for k, _ in headers}
                headers += [(k.encode(), v.encode()) for k, v in extra.items() if k.encode() not in present]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            started["status"] = started["status"] or CLIENT_CLOSED_REQUEST
        except Exception as e:  # noqa: BLE001 - the server keeps serving
            LOG.exception("request %s failed", state["request_id"])
            if started["status"] is None:
                await server_error(f"Internal error: {type(e).__name__}: {e}").response()(
                    scope, receive, send_with_headers)
        server = getattr(self.fastapi_app.state, "server", None)
        if server is not None:
            route = scope.get("route")
            server.metrics.requests.labels(getattr(route, "path", "unmatched"),
                                           str(started["status"] or 500)).inc()


async def read_body(request: Request, limit_bytes: int) -> bytes:
    too_large = APIError(413, f"Request body too large: the limit is {limit_bytes} bytes.",
                         code="request_too_large")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit_bytes:
            raise too_large
    return bytes(body)


def completion_budget(req: ChatCompletionRequest, prompt_tokens: int, context: int, model: str) -> int:
    """max new tokens: the client's ask, checked against the context window (GroqCloud's 400s)."""
    asked = req.requested_max_tokens()
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if asked is not None and asked > context:
        raise bad_request(f"`{param}` must be less than or equal to `{context}`, the maximum value for "
                          f"`{param}` is less than the `context_window` for this model", param=param)
    if prompt_tokens + (asked or 1) > context:
        raise bad_request(f"Please reduce the length of the messages or completion: the prompt is "
                          f"{prompt_tokens} tokens, {asked or 1} more were asked for, and the context "
                          f"window of `{model}` is {context} tokens.",
                          param="messages", code="context_length_exceeded")
    return asked if asked is not None else context - prompt_tokens


class Completion:
    """One request's identity and the GroqCloud objects built for it."""

    def __init__(self, server: Server, req: ChatCompletionRequest, req_id: str, seed: int,
                 prompt_tokens: int, job: Job):
        self.server, self.req, self.job = server, req, job
        self.id = f"chatcmpl-{uuid.uuid4()}"
        self.req_id, self.seed, self.prompt_tokens = req_id, seed, prompt_tokens
        self.created = int(time.time())
        self.completion_tokens = 0

    def usage(self) -> dict:
        j = self.job
        return {"queue_time": j.queue_time_s, "prompt_tokens": self.prompt_tokens,
                "prompt_time": j.prompt_time_s, "completion_tokens": self.completion_tokens,
                "completion_time": j.completion_time_s,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "total_time": j.prompt_time_s + j.completion_time_s}

    def extension(self) -> dict:
        hook = self.server.settings.simulated_lpu
        return {"x_openlpu": hook(self.prompt_tokens, self.completion_tokens)} if hook else {}

    def envelope(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.server.model_id,
                "system_fingerprint": self.server.fingerprint}

    def response(self, text: str, finish_reason: str) -> dict:
        return {**self.envelope("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish_reason}],
                "usage": self.usage(), "x_groq": {"id": self.req_id, "seed": self.seed},
                **self.extension()}

    def chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> str:
        body = {**self.envelope("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                **extra}
        return f"data: {json.dumps(body)}\n\n"


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


async def next_event(server: Server, job: Job, request: Request, give_up_s: float | None = None):
    """The job's next event, or None after `give_up_s` without one; cancels the job (freeing its slot) if the
    client went away."""
    deadline = None if give_up_s is None else time.monotonic() + give_up_s
    while True:
        wait_s = DISCONNECT_POLL_S if deadline is None else min(DISCONNECT_POLL_S, max(0.0, deadline - time.monotonic()))
        try:
            event = await asyncio.wait_for(job.events.get(), wait_s)
        except asyncio.TimeoutError:
            event = None
        if await request.is_disconnected():
            server.scheduler.cancel(job)
            raise ClientGone()
        if event is not None or (deadline is not None and time.monotonic() >= deadline):
            return event


def create_app(engine, settings: ServeSettings | None = None) -> FastAPI:
    """engine: a loaded runtime Engine, or a zero-argument callable that loads one at startup."""
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = engine if hasattr(engine, "step") else engine()
        app.state.server = server = Server(loaded, settings)
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.stop()

    app = FastAPI(title="OpenLPU", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(GroqCloudHeaders, fastapi_app=app)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return exc.response()

    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            msg = f"Unknown request URL: {request.method} {request.url.path}. Please check the URL for typos."
            return APIError(404, msg, code="unknown_url").response()
        return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()  # 405: Allow

    def server_of(request: Request) -> Server:
        return request.app.state.server

    @app.api_route("/", methods=["GET", "HEAD"])
    async def playground():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/health")
    async def health(request: Request):
        s = server_of(request)
        state = {"status": "stopping" if s.scheduler.stopping else "ok", "model": s.model_id,
                 "active_sequences": s.scheduler.active_count, "queue_depth": s.scheduler.queue_depth,
                 "max_batch": s.scheduler.max_batch}
        # a load balancer drains a server that answers 503 here, while it ends its requests
        return JSONResponse(state, status_code=503 if s.scheduler.stopping else 200)

    @app.get("/metrics")
    async def metrics(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get(API_PREFIX + "/models")
    async def list_models(request: Request):
        s = server_of(request)
        s.authenticate(request)
        return {"object": "list", "data": [s.model_card()]}

    @app.get(API_PREFIX + "/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        s = server_of(request)
        s.authenticate(request)
        if model_id != s.model_id:
            raise model_not_found(model_id)
        return s.model_card(detailed=True)

    @app.post(API_PREFIX + "/chat/completions")
    async def chat_completions(request: Request):
        s = server_of(request)
        key = s.authenticate(request)
        req = await asyncio.to_thread(parse_chat_request, await read_body(request, settings.max_body_bytes))
        if req.model != s.model_id:
            raise model_not_found(req.model)
        # off the event loop (sentencepiece lets go of the GIL): a 1 MB prompt takes 0.4 s, which paused every stream
        ids = await asyncio.to_thread(prompt_ids, s.engine.tokenizer, [(m.role, m.text()) for m in req.messages])
        max_new = completion_budget(req, len(ids), s.engine.context_length, s.model_id)
        seed = req.seed if req.seed is not None else secrets.randbelow(SEED_RANGE)
        from openlpu.runtime.engine import SamplingParams

        try:
            params = SamplingParams(max_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                                    seed=seed, stop=req.stop_sequences())
        except OpenLPUError as e:  # what the engine's sampler refuses
            raise bad_request(str(e)) from None
        charged = len(ids) + (req.requested_max_tokens() or 0)
        s.limiter.take(key, charged, s.model_id)
        try:
            job = s.scheduler.submit(ids, params)
        except QueueFull:
            s.limiter.refund_request(key, charged)
            wait = settings.queue_full_retry_after_s
            raise APIError(503, f"The server is at capacity ({s.scheduler.max_queue} requests waiting). "
                                f"Please try again in {wait}s.", code="capacity_exceeded",
                           type="internal_server_error", headers={"retry-after": str(wait)}) from None
        done = Completion(s, req, request.state.request_id, seed, len(ids), job)

        def settle():
            s.limiter.settle_tokens(key, charged, len(ids) + done.completion_tokens)
            s.metrics.observe_job(job, done.completion_tokens, len(ids))

        try:  # a stream starts once its first token is near: a request refused on admission keeps its status
            first = await next_event(s, job, request, give_up_s=STREAM_STARTS_AFTER_S if req.stream else None)
        except BaseException as e:
            s.scheduler.cancel(job)
            settle()
            if isinstance(e, ClientGone):
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            raise
        if first is not None and first.error:
            settle()
            raise first.error
        if req.stream:
            return StreamingResponse(stream(s, done, first, request, settle), media_type="text/event-stream")
        parts, event = [], first
        try:
            while True:
                parts.append(event.text)
                done.completion_tokens += event.token_count
                if event.finish_reason:
                    break
                event = await next_event(s, job, request)
                if event.error:
                    raise event.error
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        finally:
            s.scheduler.cancel(job)  # a no-op when it finished; frees the slot when it did not
            settle()
        return JSONResponse(done.response("".join(parts), event.finish_reason))

    return app


async def stream(s: Server, done: Completion, first, request: Request, settle):
    """SSE chunks in GroqCloud's order: role + x_groq.id first, content deltas, then
    finish_reason + x_groq.usage, an OpenAI-style usage chunk if asked, and [DONE]."""
    event = first
    try:
        yield done.chunk({"role": "assistant", "content": ""}, x_groq={"id": done.req_id})
        while event is None:  # a long queue or prefill: a comment, which SSE clients skip, keeps the line alive
            try:
                event = await next_event(s, done.job, request, give_up_s=STREAM_STARTS_AFTER_S)
            except ClientGone:
                return
            if event is None:
                yield ": waiting for the first token\n\n"
        while True:
            if event.error:
                yield f"data: {json.dumps(event.error.body())}\n\n"
                return
            done.completion_tokens += event.token_count
            if event.text:
                yield done.chunk({"content": event.text})
            if event.finish_reason:
                break
            try:
                event = await next_event(s, done.job, request)
            except ClientGone:
                return
        yield done.chunk({}, event.finish_reason, x_groq={"id": done.req_id, "usage": done.usage(), "seed": done.seed},
                         **done.extension())
        if done.req.stream_options and done.req.stream_options.include_usage:
            yield f"data: {json.dumps({**done.envelope('chat.completion.chunk'), 'choices': [], 'usage': done.usage()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        s.scheduler.cancel(done.job)  # frees the slot at once if the client left mid-stream
        settle()


GRACEFUL_SHUTDOWN_S = 10  # after a stop signal, what a response may still take to end before it is cut


def uvicorn_server(app: FastAPI, **config):
    """uvicorn's server for `app`, which on SIGINT or SIGTERM ends every request in flight or waiting with a 503
    (a stream: an error event, then its end) rather than waiting for them: a stream may run for thousands of
    tokens, and a second signal (or a supervisor's kill) would cut it without a word."""
    import uvicorn

    class StoppingRequestsOnExit(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if (server := getattr(app.state, "server", None)) is not None:
                server.scheduler.close()
            super().handle_exit(sig, frame)

    return StoppingRequestsOnExit(uvicorn.Config(
        app, **{"log_level": "warning", "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S, **config}))


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: a free one) for the server to listen on, or the reason in words: bound
    before the model loads (a minute), a port in use or out of range is said at once (it was said after, and after
    a line saying the server was serving there)."""
    if not 0 <= port <= MAX_PORT:
        raise OpenLPUError(f"--port must be 0 to {MAX_PORT} (0: any free port), got {port}")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise OpenLPUError(f"--host {host!r} is no address of this machine ({e}); give one, as 127.0.0.1 or "
                           f"0.0.0.0") from None
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: past a closed server's
        sock.bind(address)  # lingering connections, not beside a live listener
        sock.listen()  # now: two sockets bound alike clash only once they listen (clients wait while it loads)
    except OSError as e:
        sock.close()
        remedy = ("choose another --port, or stop what listens there" if e.errno == errno.EADDRINUSE
                  else "give --host an address of this machine, as 127.0.0.1 or 0.0.0.0")
        raise OpenLPUError(f"cannot listen on {host}:{port}: {e.strerror}; {remedy}") from None
    return sock


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1"):
    """Serve `app` with uvicorn on a background thread and a free port; yields the base URL.
    (Tests and benchmarks use it; `openlpu serve` runs uvicorn in the foreground.)"""
    import threading

    sock = bound_socket(host, 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server failed to start (see the log above)")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
