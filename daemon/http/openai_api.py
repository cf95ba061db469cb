"""The OpenAI-compatible serving API: completions and chat completions of the edited model at HEAD.

Routes (included by :func:`daemon.http.api.create_app`):

- ``POST /v1/completions``: ``prompt`` (a string or a list of strings), streaming or not.
- ``POST /v1/chat/completions``: ``messages``, rendered with the tokenizer's chat template (a tokenizer
  without one gets ``"role: content\\n"`` per message, then ``"assistant:"``).
- ``GET /v1/models``, ``GET /v1/models/{id}``: the one served model, with HEAD's version.

Sampling: ``max_tokens`` (``max_completion_tokens`` for chat), ``temperature`` (0 = greedy), ``top_p``,
``stop`` (cut from the text; finish_reason ``stop``), ``seed`` (reproducible sampling; choice j uses
seed + j), ``n``; ``stream`` sends server-sent events ending with ``data: [DONE]``. Every response and
every chunk carries ``system_fingerprint``: the version that produced it, ``"v3"`` or ``"base"``.
Other OpenAI fields are accepted and ignored. Nothing in a request names a file or a path.

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed JSON, invalid
UTF-8, wrong types and values over the ``[serve]`` limits, 404 ``model_not_found``, 413 for a body over
``[serve] max_body_bytes``, 429 over ``[serve] max_concurrent_per_client``, 503 while not ready.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from kb.records import version_label

from ..batcher import Job
from editor.decoding import DONE, TEXT, Continuation, Sampling
from .limits import ClientSlots
from ..runtime import Runtime

MAX_CHOICES = 16                 # prompts x n per request at most
ERROR = "error"                  # the event a request gets when its batch fails


class OpenAIError(Exception):
    """An error answered in OpenAI's shape (``type`` defaults to the one for ``status``)."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") and not path.startswith("/v1/admin/")


def error_response(status: int, message: str, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = type or ("server_error" if status >= 500 else "rate_limit_error" if status == 429
                    else "authentication_error" if status == 401 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


# ----- request bodies ------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampled(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionBody(_Sampled):
    prompt: str | list[str]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatBody(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ----- the routes ----------------------------------------------------------------------------------
def openai_router(runtime: Runtime, slots: ClientSlots) -> APIRouter:
    """The serving routes; ``slots`` counts each client's requests in flight."""
    router = APIRouter()
    serve = runtime.cfg.serve
    name = model_name(runtime.cfg)
    tokenizer = _PromptEncoder(runtime)

    def model_card() -> dict:
        head = runtime.service.ledger.head()
        version = head.id if head else None
        return {"id": name, "object": "model", "created": int(runtime.started_at or 0), "owned_by": "kbsync",
                "kbsync_version": version, "system_fingerprint": version_label(version)}

    @router.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model_id:path}")
    def model(model_id: str) -> dict:
        if model_id != name:
            raise _unknown_model(model_id, name)
        return model_card()

    @router.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise OpenAIError(400, "'prompt' is an empty list", param="prompt")
        return await complete(request, body, prompts, chat=False, max_tokens=body.max_tokens or 16)

    @router.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        return await complete(request, body, [body.messages], chat=True,
                              max_tokens=body.max_completion_tokens or body.max_tokens or serve.max_output_tokens)

    async def complete(request: Request, body: _Sampled, prompts: list, chat: bool, max_tokens: int):
        if not runtime.is_ready:
            raise OpenAIError(503, "the model is not ready (loading, degraded or stopping); retry shortly, "
                                   "GET /readyz tells when", code="not_ready")
        if body.model != name:
            raise _unknown_model(body.model, name)
        if max_tokens > serve.max_output_tokens:
            raise OpenAIError(400, f"max_tokens is {max_tokens}, above this server's limit of "
                                   f"{serve.max_output_tokens} ([serve] max_output_tokens)", param="max_tokens")
        n = body.n or 1
        if len(prompts) * n > MAX_CHOICES:
            raise OpenAIError(400, f"{len(prompts)} prompts x n={n} choices is more than {MAX_CHOICES}", param="n")
        sampling = _sampling(body, max_tokens)
        ids = await anyio.to_thread.run_sync(tokenizer.encode, prompts, chat, max_tokens)
        client = request.client.host if request.client else "unknown"
        if not slots.acquire(client):
            raise OpenAIError(429, f"too many requests in flight from {client}: at most "
                                   f"{serve.max_concurrent_per_client} ([serve] max_concurrent_per_client)",
                              code="concurrency_limit_exceeded")
        call = _Call(runtime, ids, n, sampling, release=lambda: slots.release(client))
        try:
            version = await call.start()
            runtime.metrics.prompt_tokens.inc(sum(len(p) for p in ids))
            head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                    "model": name, "system_fingerprint": version_label(version)}
            if body.stream:
                usage = body.stream_options is not None and body.stream_options.include_usage
                owner, call = call, None                        # the stream owns it now (and closes it)
                return StreamingResponse(owner.stream(head, chat, usage), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                         background=BackgroundTask(owner.close))
            return await call.result(head, chat)
        finally:
            if call is not None:
                call.close()

    return router


def model_name(cfg) -> str:
    """The served model's id: ``[serve] model_name``, else one derived from ``[model] source``."""
    if cfg.serve.model_name:
        return cfg.serve.model_name
    source = cfg.model.source
    if source == "embedded":
        return "smollm2-135m-instruct"
    path = Path(source)
    return (path.parent.name if path.suffix == ".safetensors" else path.stem if path.suffix == ".gguf"
            else path.name).lower() or "model"


def _unknown_model(given: str, name: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{given}' does not exist; this server serves '{name}' (GET /v1/models)",
                       param="model", code="model_not_found")


def _sampling(body: _Sampled, max_tokens: int) -> Sampling:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise OpenAIError(400, "'stop' takes at most 4 sequences", param="stop")
    return Sampling(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, stop=tuple(s for s in stop if s),
                    seed=secrets.randbits(63) if body.seed is None else body.seed)


class _PromptEncoder:
    """The request threads' prompt checks and tokenisation, with the served model's tokenizer (shared: no
    kbsync code changes its settings, so no copy is needed)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    @property
    def _tok(self):
        return self.runtime.service.live.em.tokenizer

    def encode(self, prompts: list, chat: bool, max_tokens: int) -> list[list[int]]:
        serve, out = self.runtime.cfg.serve, []
        for prompt in prompts:
            text = self._chat_text(prompt) if chat else prompt
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise OpenAIError(400, "the prompt is not valid UTF-8 (it holds a lone surrogate)",
                                  param="messages" if chat else "prompt") from None
            ids = self._tok(text, add_special_tokens=not (chat and self._tok.chat_template))["input_ids"]
            if not ids:
                raise OpenAIError(400, "the prompt is empty", param="messages" if chat else "prompt")
            if len(ids) > serve.max_prompt_tokens:
                raise OpenAIError(400, f"the prompt has {len(ids)} tokens, more than this server's limit of "
                                       f"{serve.max_prompt_tokens} ([serve] max_prompt_tokens)",
                                  param="messages" if chat else "prompt", code="context_length_exceeded")
            context = _context_length(self.runtime.service.live.em.model.config)
            if context is not None and len(ids) + max_tokens > context:
                raise OpenAIError(400, f"{len(ids)} prompt tokens plus max_tokens {max_tokens} exceed the model's "
                                       f"context of {context} tokens", param="max_tokens",
                                  code="context_length_exceeded")
            out.append(ids)
        return out

    def _chat_text(self, messages: list[ChatMessage]) -> str:
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": _content(m)} for m in messages]
        if not self._tok.chat_template:
            return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
        try:
            return self._tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except Exception as exc:             # the template refuses this conversation (jinja2 errors)
            raise OpenAIError(400, f"the chat template refuses these messages: {exc}", param="messages") from None


def _content(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return "".join(part.text for part in message.content)


def _context_length(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class _Call:
    """One request in the batcher: its rows' events arrive from the batcher thread on an asyncio queue."""

    def __init__(self, runtime: Runtime, prompts: list[list[int]], n: int, sampling: Sampling, release):
        self.runtime, self._release = runtime, release
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = sum(len(p) for p in prompts)
        rows = [Continuation(ids, replace(sampling, seed=sampling.seed + j), self._put, index=i * n + j,
                    cancelled=lambda: self.job.cancelled)
                for i, ids in enumerate(prompts) for j in range(n)]
        self.job = Job(rows, on_start=lambda v: self._put(("start", v)), on_error=lambda e: self._put((ERROR, e)))

    def _put(self, event: tuple) -> None:                  # called from the batcher thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:                               # the event loop is closed: nobody is waiting
            self.job.cancelled = True

    async def start(self) -> int | None:
        """Queue the job; the version it is decoded at, once its batch starts."""
        self.runtime.serve(self.job)
        kind, value = await self.events.get()
        if kind == ERROR:
            raise value
        return value

    def close(self) -> None:
        self.job.cancelled = True
        if self._release is not None:
            self._release, release = None, self._release
            release()

    async def _rows(self):
        """(kind, index, payload...) events until every row is done; raises a batch failure."""
        left = len(self.job.rows)
        while left:
            event = await self.events.get()
            if event[0] == ERROR:
                raise event[1]
            if event[0] == DONE:
                left -= 1
                self.runtime.metrics.completion_tokens.inc(event[3])
            yield event

    async def result(self, head: dict, chat: bool) -> dict:
        texts = {r.index: "" for r in self.job.rows}
        finish, tokens = {}, 0
        async for event in self._rows():
            if event[0] == TEXT:
                texts[event[1]] += event[2]
            else:
                finish[event[1]] = event[2]
                tokens += event[3]
        choices = [{"index": i, **({"message": {"role": "assistant", "content": texts[i]}} if chat
                                   else {"text": texts[i]}), "logprobs": None, "finish_reason": finish[i]}
                   for i in sorted(texts)]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": _usage(self.prompt_tokens, tokens)}

    async def stream(self, head: dict, chat: bool, include_usage: bool):
        obj, tokens = ("chat.completion.chunk" if chat else "text_completion"), 0

        def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {} if text is None
                         else {"content": text})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({**head, "object": obj, "choices": [choice]})

        try:
            if chat:
                for row in self.job.rows:
                    yield chunk(row.index, None, role=True)
            async for event in self._rows():
                if event[0] == TEXT:
                    yield chunk(event[1], event[2])
                else:
                    tokens += event[3]
                    yield chunk(event[1], None, finish=event[2])
            if include_usage:
                yield _sse({**head, "object": obj, "choices": [], "usage": _usage(self.prompt_tokens, tokens)})
            yield "data: [DONE]\n\n"
        except Exception as exc:                           # the batch failed mid-way: say so in the stream
            yield _sse({"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error",
                                  "param": None, "code": None}})
        finally:
            self.close()


def _sse(doc: dict) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
