"""The FastAPI app: OpenAI-compatible chat and text completions over a loaded ``krasis.LLM``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .anthropic_api import install_anthropic_routes
from .api_errors import APIError, error_body, install_error_handlers
from .chat_turn import TurnOutput, openai_tool_policy, render_prompt
from .detokenize import Detokenizer
from .generation import Generator, QueueFullError, SamplingParams
from .pipeline import GenerationFailed, TextRun
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, TimingRequest
from .streaming import DONE, ChatChunks, ResponseIds, TextChunks, chat_response, sse, text_response

RETRY_AFTER = {"Retry-After": "1"}


class ServerState:
    """The model being served; ``llm`` is None while it loads (requests then get 503)."""

    def __init__(self, model_name: str | None, max_queue: int):
        self.model_name = model_name
        self.max_queue = max_queue
        self.llm = None
        self.generator: Generator | None = None
        self.started = int(time.time())
        self.on_shutdown: list = []  # callables run when the server stops

    def attach(self, llm, model_name: str | None = None) -> None:
        self.model_name = model_name or self.model_name or llm.model_path.name
        self.generator = Generator(llm, self.max_queue)
        self.llm = llm


def create_app(llm=None, model_name: str | None = None, max_queue: int = 64) -> FastAPI:
    """The server app. With ``llm`` None it answers 503 until ``app.state.krasis.attach(llm)`` is called (the
    model loads while the port is already open). ``model_name`` (default: the model directory's name) is the id
    clients send as ``model``; ``max_queue`` requests may wait or run at once, more get 503."""
    state = ServerState(model_name, max_queue)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if state.generator is not None:
            state.generator.shutdown()
        for callback in state.on_shutdown:
            callback()

    app = FastAPI(title="Krasis", description="OpenAI-compatible server for Krasis", docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.krasis = state
    install_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"

    if llm is not None:
        state.attach(llm, model_name)

    def ready_generator(model: str) -> Generator:
        if state.generator is None:
            raise APIError(503, "the model is still loading; retry in a moment", code="model_loading",
                           headers=RETRY_AFTER)
        if model != state.model_name:
            raise APIError(404, f"model '{model}' is not served here; this server serves '{state.model_name}' "
                                "(GET /v1/models lists it)", param="model", code="model_not_found")
        return state.generator

    @app.get("/health")
    async def health():
        if state.llm is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers=RETRY_AFTER)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(state.generator), media_type="text/plain; version=0.0.4")

    @app.post("/v1/timing")
    async def set_timing(req: TimingRequest):
        generator = ready_generator(state.model_name)
        generator.timing_enabled = req.enabled
        if not req.enabled:
            generator.last_timing = None
        return {"enabled": generator.timing_enabled, "last": generator.last_timing}

    @app.get("/v1/timing")
    async def get_timing():
        generator = ready_generator(state.model_name)
        return {"enabled": generator.timing_enabled, "last": generator.last_timing}

    @app.get("/v1/models")
    async def models():
        data = [] if state.model_name is None else [
            {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "krasis",
             **({"max_model_len": state.llm.max_context} if state.llm is not None else {})}]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        generator = ready_generator(req.model)
        llm = generator.llm
        _check_sampling(req)
        if not req.messages:
            raise APIError(400, "'messages' is empty; send at least one message", param="messages")
        policy = openai_tool_policy(req.tools, req.tool_choice, req.parallel_tool_calls)
        prompt = render_prompt(llm, [m.for_template() for m in req.messages], policy, req.chat_template_kwargs,
                               "messages")
        max_tokens = _max_tokens(req.max_completion_tokens or req.max_tokens, len(prompt.ids), llm.max_context)
        run = _start(generator, prompt.ids, req, max_tokens)
        await _unless_client_leaves(run.check_prompt(), run, request)
        ids = ResponseIds(state.model_name)
        output = TurnOutput(run, prompt, policy)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse_response(_chat_events(output, ids, include_usage))
        events = await _unless_client_leaves(_collect_events(output), run, request)
        content = "".join(v for k, v in events if k == "content")
        reasoning = "".join(v for k, v in events if k == "reasoning")
        message: dict = {"role": "assistant", "content": content}
        if output.calls:
            message["content"] = content or None
            message["tool_calls"] = [call.to_openai() for call in output.calls]
        if reasoning:
            message["reasoning_content"] = reasoning
        return chat_response(ids, message, output.finish_reason, run.usage)

    install_anthropic_routes(app, state, ready_generator)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        generator = ready_generator(req.model)
        llm = generator.llm
        _check_sampling(req)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"'prompt' holds {len(prompt)} prompts; send one per request", param="prompt")
            prompt = prompt[0]
        prompt_ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise APIError(400, "'prompt' is empty; give some text or token ids", param="prompt")
        max_tokens = _max_tokens(req.max_tokens, len(prompt_ids), llm.max_context)
        # echo: the answer starts with the prompt, as given (text) or decoded (token ids)
        echoed = "" if not req.echo else prompt if isinstance(prompt, str) else llm.tokenizer.decode(prompt_ids)
        run = _start(generator, prompt_ids, req, max_tokens)
        await _unless_client_leaves(run.check_prompt(), run, request)
        ids = ResponseIds(state.model_name, prefix="cmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse_response(_text_events(run, ids, include_usage, echoed))
        text = await _unless_client_leaves(_collect(run), run, request)
        return text_response(ids, echoed + text, run.finish_reason, run.usage)

    return app


def _prometheus(generator: Generator | None) -> str:
    stats = generator.stats if generator is not None else None
    rows = [
        ("krasis_ready", "gauge", "1 when the model is loaded", int(generator is not None)),
        ("krasis_queue_depth", "gauge", "requests waiting or running", generator.active if generator else 0),
        ("krasis_requests_total", "counter", "generations started", stats.requests if stats else 0),
        ("krasis_prompt_tokens_total", "counter", "prompt tokens of started generations",
         stats.prompt_tokens if stats else 0),
        ("krasis_cached_prompt_tokens_total", "counter", "prompt tokens served from the kept KV cache",
         stats.cached_tokens if stats else 0),
        ("krasis_prefill_seconds_total", "counter", "time from start to the first new token",
         stats.prefill_seconds if stats else 0.0),
        ("krasis_generated_tokens_total", "counter", "new tokens generated", stats.generated_tokens if stats else 0),
        ("krasis_decode_seconds_total", "counter", "time spent generating tokens after the first",
         stats.decode_seconds if stats else 0.0),
        ("krasis_routed_expert_calls_total", "counter", "GPU engine: routed-expert calls in decode",
         stats.routed_calls if stats else 0),
        ("krasis_routed_expert_calls_hot_cache_total", "counter",
         "GPU engine: routed-expert calls in decode served from the VRAM hot-expert cache",
         stats.routed_calls_hot_cache if stats else 0),
        ("krasis_routed_expert_calls_streamed_total", "counter",
         "GPU engine: routed-expert calls in decode copied to the GPU that step (the rest ran on the CPU)",
         stats.routed_calls_streamed if stats else 0),
        ("krasis_prefetched_experts_total", "counter",
         "GPU engine: experts copied to VRAM ahead of the MoE layer whose router was predicted to pick them",
         stats.prefetched_experts if stats else 0),
        ("krasis_routed_expert_calls_prefetched_total", "counter",
         "GPU engine: routed-expert calls in decode served by a prefetched expert",
         stats.routed_calls_prefetched if stats else 0),
    ]
    if stats is not None and stats.last_hot_cache_share is not None:
        rows.append(("krasis_last_request_hot_cache_share", "gauge",
                     "share of the last request's routed-expert calls served from the hot-expert cache",
                     stats.last_hot_cache_share))
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def _check_sampling(req: SamplingFields) -> None:
    if req.n != 1:
        raise APIError(400, f"'n' is {req.n}; this server returns one choice per request (n = 1)", param="n")


def _max_tokens(asked: int | None, prompt_tokens: int, context: int) -> int:
    if prompt_tokens >= context:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens but the model's context is {context} tokens; "
                            "shorten the conversation", param="messages", code="context_length_exceeded")
    if asked is None:
        return context - prompt_tokens
    if prompt_tokens + asked > context:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens and max_tokens asks for {asked} more, but the "
                            f"model's context is {context} tokens; shorten the prompt or lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")
    return asked


def _start(generator: Generator, prompt_ids: list[int], req: SamplingFields, max_tokens: int) -> TextRun:
    llm = generator.llm
    params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                            top_k=max(req.top_k, 0), seed=req.seed, min_p=req.min_p,
                            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)
    try:
        stream = generator.start(prompt_ids, params)
    except QueueFullError as e:
        raise APIError(503, f"the server is busy ({e}); retry shortly", code="queue_full",
                       headers=RETRY_AFTER) from e
    return TextRun(stream, Detokenizer(llm.tokenizer, llm.eos_token_ids), req.stop_list(), llm.eos_token_ids,
                   max_tokens, len(prompt_ids))


async def _collect_events(output: TurnOutput) -> list[tuple[str, object]]:
    try:
        return [event async for event in output.events()]
    except GenerationFailed as e:
        raise APIError(500, f"generation failed: {e}", code="generation_failed") from e


async def _collect(run: TextRun) -> str:
    try:
        return "".join([piece async for piece in run.deltas()])
    except GenerationFailed as e:
        raise APIError(500, f"generation failed: {e}", code="generation_failed") from e


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _unless_client_leaves(work, run: TextRun, request: Request, poll_seconds: float = 0.25):
    """Await ``work``; if the client disconnects first (while queued, or during a non-streaming generation),
    cancel the generation and raise ClientGone."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_seconds)
            if done:
                return task.result()
            if await request.is_disconnected():
                run.stream.cancel()
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_events(output: TurnOutput, ids: ResponseIds, include_usage: bool) -> AsyncIterator[str]:
    run = output.run
    chunks = ChatChunks(ids, include_usage)
    try:
        yield chunks.delta({"role": "assistant", "content": ""})
        n_calls = 0
        try:
            async for kind, value in output.events():
                if kind == "reasoning":
                    yield chunks.delta({"reasoning_content": value})
                elif kind == "content":
                    yield chunks.delta({"content": value})
                else:
                    for delta in value.openai_deltas(n_calls):
                        yield chunks.delta({"tool_calls": [delta]})
                    n_calls += 1
        except GenerationFailed as e:
            yield sse(error_body(500, f"generation failed: {e}", code="generation_failed"))
            yield DONE
            return
        yield chunks.delta({}, output.finish_reason)
        if include_usage:
            yield chunks.usage(run.usage)
        yield DONE
    finally:
        run.stream.cancel()


async def _text_events(run: TextRun, ids: ResponseIds, include_usage: bool, echoed: str = "") -> AsyncIterator[str]:
    chunks = TextChunks(ids, include_usage)
    try:
        if echoed:
            yield chunks.text(echoed)
        try:
            async for piece in run.deltas():
                yield chunks.text(piece)
        except GenerationFailed as e:
            yield sse(error_body(500, f"generation failed: {e}", code="generation_failed"))
            yield DONE
            return
        yield chunks.text("", run.finish_reason)
        if include_usage:
            yield chunks.usage(run.usage)
        yield DONE
    finally:
        run.stream.cancel()
