"""`LLM`: the synchronous offline API, for scripts and notebooks (like vLLM's `LLM`).

    from aiosched import LLM, SamplingParams

    with LLM(model="/models/qwen2.5-0.5b", device="cuda") as llm:
        outs = llm.generate(["def fibonacci(n):", "import asyncio\\n"], SamplingParams(max_tokens=64))
        print(outs[0].text)
        reply = llm.chat([{"role": "user", "content": "Write a haiku"}])[0].text

It runs the same `AsyncEngine` as everything else, on an event loop of its own in a
daemon thread; each call submits to that loop and blocks the caller until the outputs
are complete. So it works from plain scripts and also where an event loop is already
running in the calling thread (Jupyter, an async test): nothing is nested in the
caller's loop (it is only blocked while the call runs). Outputs come back in the order
of the prompts. An exception or Ctrl-C during a call aborts its requests (their KV
blocks go back to the pool). `close()` (or leaving the `with` block) stops the engine
and the thread; an LLM still open at interpreter exit, or garbage-collected, is closed
then.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
import weakref
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from aiosched.chat_template import render_chat
from aiosched.config import EngineConfig
from aiosched.engine import AsyncEngine
from aiosched.outputs import RequestOutput
from aiosched.sampling_params import SamplingParams
from aiosched.tokenizer import Tokenizer

T = TypeVar("T")
Message = dict[str, Any]
Prompt = str | list[int]


class _LoopThread:
    """An event loop (uvloop when installed) running forever in a daemon thread."""

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="aiosched-llm-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for it here; a KeyboardInterrupt while waiting
        cancels it (the coroutine's own cleanup runs) before propagating."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("LLM methods cannot be called from the LLM's own event loop thread; use the AsyncEngine (llm.engine) there")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            if not fut.done():
                fut.cancel()
                try:  # let the cancellation's cleanup (aborts) finish before returning
                    fut.result(timeout=30)
                except (concurrent.futures.CancelledError, Exception):
                    pass
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=30)
            if not self.thread.is_alive():
                self.loop.close()


def _close(loop: _LoopThread, engine: AsyncEngine) -> None:
    """Stop the engine, then the loop thread (from close(), GC or interpreter exit)."""
    if loop.loop.is_closed():
        return
    if loop.thread.is_alive():
        try:
            loop.run(engine.shutdown())
        except Exception:
            pass  # an engine that died or never started has nothing left to release
    loop.stop()


def chat_prompt_ids(tokenizer: Tokenizer | None, messages: list[Message], *, add_generation_prompt: bool = True,
                    chat_template: str | None = None, chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template (or `chat_template`).

    The template writes the special tokens itself, so none are added when encoding."""
    if tokenizer is None:
        raise ValueError("messages: this model has no tokenizer (tokenizer.json), so chat is unavailable")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages: must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"messages[{i}]: needs a 'role' string and a 'content'")
    extra = dict(chat_template_kwargs or {})
    specials = {k: v for k, v in tokenizer.special_tokens.items() if k not in extra}
    text = render_chat(chat_template if chat_template is not None else tokenizer.chat_template, messages,
                       add_generation_prompt=add_generation_prompt, special_tokens=specials, **extra)
    return tokenizer.encode(text, add_special_tokens=False)


class LLM:
    """A synchronous handle on an AsyncEngine running in a thread of its own.

    `LLM(model=DIR, **engine_config)` takes every EngineConfig field as a keyword
    (`device="cuda"`, `max_num_seqs=64`, ...), or `config=` anything EngineConfig.load
    accepts (a dict, a TOML path, an EngineConfig), keywords winning. The model loads
    in the constructor."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | dict[str, Any] | str | None = None, **engine_config: Any) -> None:
        if model is not None:
            engine_config["model"] = model
        self.config = EngineConfig.load(config, **engine_config)
        self.engine = AsyncEngine(self.config)
        self._loop = _LoopThread()
        self._closer = weakref.finalize(self, _close, self._loop, self.engine)
        try:
            self._loop.run(self.engine.start())
        except BaseException:
            self._closer()
            raise
        # At interpreter exit, close before multiprocessing's own exit hook terminates the
        # (daemonic) worker processes: atexit runs hooks last-registered first, and that hook
        # was registered when the executor first imported multiprocessing, after the
        # finalizer above. (Calling a finalizer that already ran does nothing.)
        atexit.register(self._closer)

    # ---- lifecycle ----

    def close(self) -> None:
        """Stop the engine (aborting anything still running) and its thread; idempotent."""
        self._closer()

    @property
    def closed(self) -> bool:
        return not self._closer.alive

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests ----

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def default_sampling_params(self, **fields: Any) -> SamplingParams:
        """SamplingParams(**fields) over the checkpoint's generation_config.json defaults."""
        return self.engine.default_sampling_params(**fields)

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); the final outputs, in
        the prompts' order. `params`: one SamplingParams for all, one per prompt, or None
        for the checkpoint's defaults."""
        batch = _as_prompt_list(prompts)
        return self._run(self._generate_all(batch, _params_list(params, len(batch))))

    def chat(self, messages: list[Message] | Sequence[list[Message]], params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, chat_template: str | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Reply to one conversation ([{"role", "content"}, ...]) or a list of them, each
        rendered with the model's chat template; one final output per conversation."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages: must be a non-empty list of messages, or a list of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts: list[Prompt] = [chat_prompt_ids(self.engine.tokenizer, list(conv), add_generation_prompt=add_generation_prompt,
                                                 chat_template=chat_template, chat_template_kwargs=chat_template_kwargs)
                                 for conv in conversations]
        return self._run(self._generate_all(prompts, _params_list(params, len(prompts))))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.closed:
            coro.close()
            raise RuntimeError("this LLM is closed")
        return self._loop.run(coro)

    async def _generate_all(self, prompts: list[Prompt], params: list[SamplingParams | None]) -> list[RequestOutput]:
        """Submit every prompt, then wait for all; on any error or cancellation abort the
        ones submitted (a bad prompt late in the batch leaves nothing running)."""
        engine = self.engine
        streams = []
        try:
            for prompt, p in zip(prompts, params):
                streams.append(engine.generate(prompt, p))
            return list(await asyncio.gather(*[_final(s) for s in streams]))
        except BaseException:
            for s in streams:
                engine.abort(s.request_id)
            raise


async def _final(stream: Any) -> RequestOutput:
    return await stream


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts: must not be empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt of token ids
        return [list(p) if isinstance(p, tuple) else p for p in prompts]  # type: ignore[misc]
    raise ValueError(f"prompts: must be a string, a list of token ids, or a list of those, got {type(prompts).__name__}")


def _params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams | None]:
    if params is None or isinstance(params, SamplingParams):
        return [params] * n
    ps = list(params)
    if len(ps) != n:
        raise ValueError(f"params: {len(ps)} SamplingParams for {n} prompts (give one, or one per prompt)")
    return ps
