"""The chat page's server: one page, and one endpoint that streams a chat model's answer.

    GET  /           the page (tanggpt/chat_page.html): plain HTML and JavaScript, nothing fetched from outside
    GET  /api/info   the model, its limits, and the requests the page's task switch builds
    POST /api/chat   {"messages": [...], "max_new_tokens": N, "temperature": T} -> the answer, streamed

The answer comes as server-sent events (text/event-stream), one per token, so the page
shows the poem as it is written: `data: {"token": "春"}`; a `note` event first if the
conversation outgrew the block and its oldest exchanges were forgotten; a `done` event
last, with whether the answer stopped by itself and its marks (form, rhyme, tones), as the
galleries mark poems. The conversation is the client's: each request carries it whole
(the system prompt, then the turns, the user's last), so the server keeps no state
between requests and any number of conversations can go on at once.

Safe by default, since a page can be reached by anything on the machine:
- every bad request is one 4xx with a one-line reason, never a crash: a body over
  max_request_bytes (413), malformed JSON or fields (400), roles out of order (400, the
  template's own check, data/chat.py), a max_new_tokens past the server's (400), more than
  max_concurrent generations at once (429);
- the model's output is sent as text for the page to show as text (textContent), never as HTML;
- a client that goes away mid-answer stops its generation at the next token, and frees its place;
- which checkpoint is served is the command line's choice (chat.py --ckpt), never a request's.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from data.chat import ChatError, check_conversation, fit_history, render_ids, reserved_for_answer
from data.forms import FORMS, clauses
from data.tokenizer import END, Tokenizer
from model import GPT
from tanggpt.device import Runtime
from tanggpt.prosody import prosody_marks

PAGE = Path(__file__).with_name("chat_page.html")


@dataclass
class ServerLimits:
    max_new_tokens: int = 200  # the most a request may ask for (and what it gets if it asks nothing)
    max_concurrent: int = 2  # generations at once; more get 429
    max_request_bytes: int = 16_384  # a request body's size; more get 413
    temperature: float = 0.8  # a request that does not say
    top_k: int | None = None


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class ChatService:
    """A chat model and what answering with it takes: the conversation checked and fitted to
    the block, the answer generated token by token in a worker thread, a place among
    max_concurrent taken for the while."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, runtime: Runtime, limits: ServerLimits, seed: int = 1337,
                 describe: str = ""):
        self.model, self.tokenizer, self.runtime, self.limits = model, tokenizer, runtime, limits
        self.describe = describe
        self.stop_ids = [tokenizer.special_ids[END], tokenizer.eot_id]
        self.active = 0  # generations running (changed on the event loop only)
        self.requests = 0
        self.seed = seed
        self.lock = threading.Lock()  # one forward pass at a time: the model is shared by the threads

    def check(self, body: object) -> tuple[list[dict], int, float]:
        """The request's conversation, max_new_tokens and temperature, or BadRequest(400)."""
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object with messages")
        unknown = set(body) - {"messages", "max_new_tokens", "temperature"}
        if unknown:
            raise BadRequest(400, f"unknown field {sorted(unknown)[0]!r}; give messages, max_new_tokens, temperature")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise BadRequest(400, "messages must be a list of {role, content} objects")
        try:
            check_conversation(messages, "messages")
        except ChatError as e:
            raise BadRequest(400, str(e)) from None
        if messages[-1]["role"] != "user":
            raise BadRequest(400, f"messages: the model answers the user, but the last message is the "
                                  f"{messages[-1]['role']}'s")
        most = self.limits.max_new_tokens
        max_new_tokens = body.get("max_new_tokens", most)
        if type(max_new_tokens) is not int or not 1 <= max_new_tokens <= most:
            raise BadRequest(400, f"max_new_tokens must be a whole number from 1 to {most}, got {max_new_tokens!r}")
        temperature = body.get("temperature", self.limits.temperature)
        if type(temperature) not in (int, float) or not 0 <= temperature <= 2:
            raise BadRequest(400, f"temperature must be a number from 0 to 2, got {temperature!r}")
        return messages, max_new_tokens, float(temperature)

    def prompt(self, messages: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
        """The prompt's ids, and how many exchanges were forgotten to leave the answer its room
        in the block (data/chat.reserved_for_answer)."""
        block_size = self.model.config.block_size
        room = reserved_for_answer(block_size, max_new_tokens)
        try:
            kept, dropped = fit_history(self.tokenizer, messages, block_size - room)
        except ChatError as e:
            raise BadRequest(400, str(e)) from None
        return render_ids(self.tokenizer, kept, add_generation_prompt=True), dropped

    def tokens(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Iterator[int]:
        """The answer's ids, one at a time (the stop id not included), generated in the caller's thread."""
        generator = torch.Generator(device=self.runtime.device).manual_seed(seed)
        stream = self.model.generate_stream([ids], max_new_tokens, temperature=temperature, top_k=self.limits.top_k,
                                            stop_ids=self.stop_ids, generator=generator)
        for step in stream:
            token = int(step[0])
            if token < 0 or token in self.stop_ids:
                return
            yield token

    def take_place(self) -> Callable[[], None]:
        """Count one more generation running; the function returned frees its place, once."""
        self.active += 1
        freed = False

        def free() -> None:
            nonlocal freed
            if not freed:
                freed, self.active = True, self.active - 1

        return free

    async def answer(self, ids: list[int], max_new_tokens: int, temperature: float, dropped: int,
                     free: Callable[[], None]) -> AsyncIterator[str]:
        """The answer as server-sent events. Each token is computed in a worker thread (the
        event loop stays free for other clients); if the client goes away, the response is
        cancelled at its next await, the generator is closed, and its place is freed."""
        self.requests += 1
        tokens = self.tokens(ids, max_new_tokens, temperature, self.seed + self.requests)
        pieces: list[int] = []
        shown = ""
        try:
            if dropped:
                note = (f"the conversation outgrew the model's {self.model.config.block_size} tokens: the oldest "
                        f"{dropped} exchange{'s' * (dropped > 1)} forgotten")
                yield event("note", {"note": note})
            while True:
                token = await anyio.to_thread.run_sync(self._next, tokens)
                if token is None:
                    break
                pieces.append(token)
                text = self.tokenizer.decode(pieces)
                if not text.endswith("\ufffd"):  # a character split over byte tokens waits for its end
                    yield event("message", {"token": text[len(shown):]})
                    shown = text
            text = self.tokenizer.decode(pieces)
            stopped = len(pieces) < max_new_tokens
            yield event("done", {"text": text, "stopped": stopped, "marks": answer_marks(text)})
        finally:
            tokens.close()
            free()

    def _next(self, tokens: Iterator[int]) -> int | None:
        # Autocast is per thread, and each token may be computed in another worker thread:
        # it is entered around each step, not once around the generator.
        with self.lock, self.runtime.autocast():
            return next(tokens, None)


def answer_marks(text: str) -> str:
    """An answer's marks on the page: a poem's form, rhyme and tones, as the galleries mark
    poems (prosody.prosody_marks); nothing for an answer of one clause, a title or a form's name."""
    return prosody_marks(text) if len(clauses(text)) > 1 else ""


def event(name: str, data: dict) -> str:
    """One server-sent event; the data is JSON, so a newline in the text cannot end the event."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def page_requests() -> dict:
    """What the page's task switch asks, in each task's first training phrasing (the same
    request text data/conversations.py trains on: the instruction, a line break, the input)."""
    from data.tasks import task_instruction

    return {"poem": task_instruction("poem"), "acrostic": task_instruction("acrostic"),
            "form": {form: task_instruction("form", form=form) for form in FORMS}}


def make_app(service: ChatService) -> FastAPI:
    """The page and its endpoint around one ChatService."""
    app = FastAPI(title="唐诗 GPT chat", docs_url=None, redoc_url=None, openapi_url=None)
    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                                                        "script-src 'unsafe-inline'"})

    @app.get("/api/info")
    async def info() -> dict:
        limits = service.limits
        return {"model": service.describe, "block_size": service.model.config.block_size,
                "max_new_tokens": limits.max_new_tokens, "temperature": limits.temperature,
                "requests": page_requests()}

    @app.post("/api/chat")
    async def chat(request: Request):
        try:
            size = int(request.headers.get("content-length") or 0)
            if size > service.limits.max_request_bytes:
                raise BadRequest(413, f"the request is {size} bytes; at most {service.limits.max_request_bytes}")
            raw = await read_at_most(request, service.limits.max_request_bytes)
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise BadRequest(400, "the body is not JSON") from None
            messages, max_new_tokens, temperature = service.check(body)
            ids, dropped = service.prompt(messages, max_new_tokens)
            if service.active >= service.limits.max_concurrent:
                raise BadRequest(429, f"{service.active} answers are being written, the most this server writes at "
                                      "once; try again in a moment")
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        # The place is freed when the answer's stream ends, however it ends; and, should the
        # client vanish before the stream even starts, when the unstarted stream is collected.
        free = service.take_place()
        stream = service.answer(ids, max_new_tokens, temperature, dropped, free)
        weakref.finalize(stream, free)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def read_at_most(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (a chunked body has no length to check first)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"the request is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
