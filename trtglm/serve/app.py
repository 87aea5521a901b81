"""The HTTP side of `trtglm serve`: OpenAI's completions, chat completions and models endpoints, health and
Prometheus metrics, as a FastAPI app over one Scheduler.

    request ─ Gate (API key, body size, status counts) ─ route ─ validate (protocol.py) ─ tokenize
            ─ Scheduler.submit ─ tokens from the loop thread ─ TextStream ─ JSON, or server-sent events
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..core.errors import TrtglmError
from ..runtime.sampling import Sampling
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest, Sampled, error_body
from .scheduler import QueueFull, Request as Job, Scheduler, call_listeners
from .text_stream import TextStream

MAX_BODY = 8 << 20  # bytes of one request body
_GONE = object()  # the client of a whole answer went away
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass
class Served:
    scheduler: Scheduler
    text: object  # model/tokenizer.Text
    model: str  # the name clients ask for
    backend: str  # what runs, in words
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def vocab_size(self) -> int:
        return self.scheduler.backend.vocab_size


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, kind, param, code), headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, self.status, headers=self.headers)


def create_app(served: Served) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()  # each step's tokens reach the requests in one call on this loop
        served.scheduler.deliver = lambda events: loop.call_soon_threadsafe(call_listeners, events)
        yield

    app = FastAPI(title="trtglm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Gate, served=served)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return ApiError(400, _validation_message(exc.errors())).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind).response()

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.get("/health")
    async def health():
        scheduler = served.scheduler
        if not scheduler.alive:
            return JSONResponse({"status": "error", "reason": scheduler.failure or "the generation loop is not running"},
                                503)
        return {"status": "ok", "model": served.model, "backend": served.backend, "running": len(scheduler.batch),
                "queued": scheduler.queued}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(served.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.model, "object": "model", "created": served.created,
                                            "owned_by": "trtglm", "max_model_len": served.scheduler.backend.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(served, body)
        prompts = [served.text.encode(p) if isinstance(p, str) else list(p) for p in body.prompts()]
        return await _respond(served, request, body, prompts, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(served, body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = served.text.chat(messages)
        except TrtglmError as e:
            raise ApiError(400, str(e), param="messages") from None
        except Exception as e:  # noqa: BLE001 - the template's own errors (jinja raise_exception, ...): one line
            raise ApiError(400, f"the chat template refused these messages: {str(e).splitlines()[0][:200]}",
                           param="messages") from None
        return await _respond(served, request, body, [ids], body.limit(), chat=True)

    return app


class Gate:
    """Every request: the API key (on /v1/), the body's size, and a count by endpoint and status."""

    def __init__(self, app, served: Served):
        self.app, self.served = app, served

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            refusal = self._refusal(scope["path"], headers)
            if refusal:
                return await refusal.response()(scope, receive, counted)
            await self.app(scope, receive, counted)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.served.metrics.requests.labels(endpoint, str(status["code"])).inc()

    def _refusal(self, path: str, headers: dict) -> ApiError | None:
        key = self.served.api_key
        if key and path.startswith("/v1/"):
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return ApiError(401, "a valid API key is needed: Authorization: Bearer <key>" if not token
                                else "the API key is not valid", "authentication_error", code="invalid_api_key")
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY:
            return ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB" if length.isdigit()
                            else "Content-Length is not a number")
        return None


def _check_model(served: Served, body: Sampled) -> None:
    if body.model != served.model:
        raise ApiError(400, f"model {body.model!r} is not served here; this server serves {served.model!r}",
                       param="model", code="model_not_found")


def _jobs(served: Served, body: Sampled, prompts: list[list[int]], limit: int | None, listener) -> list[Job]:
    scheduler, jobs = served.scheduler, []
    stop_ids = frozenset((set() if body.ignore_eos else set(served.text.stop_ids)) | set(body.stop_token_ids))
    for ids in prompts:
        if not ids:
            raise ApiError(400, "the prompt has no tokens", param="prompt")
        bad = [t for t in ids if t >= served.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is past the model's vocabulary of {served.vocab_size}",
                           param="prompt")
        try:
            allowed = scheduler.allowed_tokens(ids, limit)
        except TrtglmError as e:
            raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None
        for j in range(body.n):
            sampling = Sampling(body.temperature, max(0, body.top_k), body.top_p, body.repetition_penalty,
                                None if body.seed is None else body.seed + j)
            jobs.append(Job(ids, allowed, sampling, stop_ids, listener(len(jobs))))
    return jobs


async def _respond(served: Served, request: Request, body: Sampled, prompts: list[list[int]], limit: int | None,
                   chat: bool):
    events = asyncio.Queue()

    def listener(index: int):  # called on this event loop
        return lambda token, finish: events.put_nowait((index, token, finish))

    jobs = _jobs(served, body, prompts, limit, listener)
    if not served.scheduler.alive:
        raise ApiError(503, f"the generation loop is not running ({served.scheduler.failure})", "server_error")
    try:
        served.scheduler.submit(jobs)
    except QueueFull as e:
        raise ApiError(429, str(e), "rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
    served.metrics.prompt.inc(sum(len(j.ids) for j in jobs))
    run = _Run(served, request, body, jobs, events, chat)
    if body.stream:
        return StreamingResponse(run.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await run.whole())


class _Run:
    """One HTTP request's jobs (n per prompt): their tokens to text, as it comes or at the end."""

    def __init__(self, served: Served, request: Request, body: Sampled, jobs: list[Job], events: asyncio.Queue,
                 chat: bool):
        self.served, self.request, self.body, self.jobs, self.events, self.chat = served, request, body, jobs, events, chat
        self.texts = [TextStream(served.text.decode, body.stop or []) for _ in jobs]
        self.finish: list[str | None] = [None] * len(jobs)
        self.tokens = [0] * len(jobs)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    async def _pieces(self):
        """(choice, whether a token came, its new text, finish or None) as tokens arrive; every job is cancelled
        if the client leaves."""
        # a stream is cancelled by Starlette when its client goes away; a whole answer watches for it
        watcher = None if self.body.stream else asyncio.create_task(self._watch())
        try:
            while None in self.finish:
                event = await self.events.get()
                if event is _GONE:
                    return
                index, token, finish = event
                if self.finish[index] is not None:
                    continue  # the step after a stop string
                if finish and finish.startswith("error: "):
                    raise ApiError(500, f"generation failed: {finish[7:]}", "server_error")
                piece, stream = "", self.texts[index]
                if token is not None:
                    self.tokens[index] += 1
                    piece = stream.add(token)
                    if stream.stopped:
                        finish = "stop"
                        self.served.scheduler.cancel(self.jobs[index])
                if finish:
                    piece += stream.finish()
                    self.finish[index] = finish
                yield index, token is not None, piece, finish
        finally:
            if watcher is not None:
                watcher.cancel()
            unfinished = [job for job, f in zip(self.jobs, self.finish) if f is None]
            if unfinished:
                self.served.metrics.cancelled.inc()
            for job in unfinished:
                self.served.scheduler.cancel(job)

    async def _watch(self) -> None:
        while not await self.request.is_disconnected():
            await asyncio.sleep(0.5)
        self.events.put_nowait(_GONE)

    def _usage(self) -> dict:
        prompt = sum(len(j.ids) for j in self.jobs[::self.body.n])
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def whole(self) -> dict:
        async for _ in self._pieces():
            pass
        if None in self.finish:  # the client went away; nobody reads this
            return {}
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t.text}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(self.texts, self.finish))]
        else:
            choices = [{"index": i, "text": t.text, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(self.texts, self.finish))]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.served.model, "choices": choices, "usage": self._usage()}

    def _chunk(self, choices: list[dict], **extra) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.served.model, "choices": choices, **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    def _choice(self, index: int, piece: str | None, finish: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": piece} if piece is not None else {})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": piece or "", "logprobs": None, "finish_reason": finish}

    async def stream(self):
        if self.chat:
            yield self._chunk([self._choice(i, "", None, role=True) for i in range(len(self.jobs))])
        try:
            async for index, token, piece, finish in self._pieces():
                if token or piece:  # a chunk per token: its text may be empty while held back
                    yield self._chunk([self._choice(index, piece, None)])
                if finish:
                    yield self._chunk([self._choice(index, None if self.chat else "", finish)])
        except ApiError as e:
            yield f"data: {json.dumps(e.body)}\n\n"
        if None not in self.finish and self.body.stream_options and self.body.stream_options.include_usage:
            yield self._chunk([], usage=self._usage())
        yield "data: [DONE]\n\n"


_TYPE_TAG = re.compile(r"[\[\]()\-,]|^(str|int|float|bool|list|dict|none|json-or-python|function-after)$")


def _validation_message(errors) -> str:
    """pydantic's first complaint about a request body as one line: the field, and what is wrong."""
    if not errors:
        return "the request is not valid"
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"malformed JSON in the request body: {(e.get('ctx') or {}).get('error', e.get('msg'))}"
    loc = [str(p) for p in e.get("loc", ())[1:] if isinstance(p, int) or not _TYPE_TAG.search(str(p))]
    message = str(e.get("msg", "not valid")).removeprefix("Value error, ")
    if e.get("type") == "missing" and not loc:
        message = "the request body must be a JSON object"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{'.'.join(loc)}: " if loc else "") + message + more
