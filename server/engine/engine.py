"""engine: one worker thread generates queued requests in turn and streams chunks to asyncio callers.

This is the walking-skeleton engine: one sequence at a time through HF modules with a dynamic KV
cache. The fast engine (static KV, CUDA graphs, continuous batching) replaces model_runner and adds
a scheduler; the `stream` interface stays.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer
from .sampler import SamplingParams, make_generator, sample
from .stopping import StopSequenceMatcher

log = logging.getLogger("lawchat.engine")

EOS, MAX_TOKENS, STOP_SEQUENCE = "eos", "max_tokens", "stop_sequence"


class EngineOverloaded(Exception):
    """The wait queue is full."""


class EngineClosed(Exception):
    """The engine is shutting down."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop_sequences: list[str] = field(default_factory=list)


@dataclass
class Chunk:
    delta: str
    finish_reason: str | None = None     # set on the last chunk only
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Engine:
    def __init__(self, runner, max_waiting: int = 64):
        self.runner = runner
        self.max_waiting = max_waiting
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="lawchat-engine", daemon=True)

    # -- status ---------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    # -- caller side (event loop) ---------------------------------------------------------------
    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        job = _Job(request, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if self._waiting >= self.max_waiting:
                raise EngineOverloaded(f"{self._waiting} requests already waiting")
            self._waiting += 1
        self._queue.put(job)
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled = True   # client gone, deadline, or done: the worker stops at the next token

    # -- worker side (engine thread) ------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                if job.cancelled:
                    continue
                self._running += 1
            try:
                self._generate(job)
            except Exception as e:  # never kill the worker: the request gets the error, others go on
                log.exception("generation failed")
                job.emit(e)
            finally:
                with self._lock:
                    self._running -= 1

    def _generate(self, job: _Job) -> None:
        req, runner = job.request, self.runner
        n_prompt = len(req.prompt_ids)
        detok = IncrementalDetokenizer(runner.tokenizer)
        stopper = StopSequenceMatcher(req.stop_sequences)
        generator = make_generator(req.sampling, runner.device)

        logits, cache = runner.prefill(req.prompt_ids)
        n_new = 0
        while True:
            if job.cancelled:
                return
            token = sample(logits, req.sampling, generator)
            n_new += 1
            if token in runner.eos_ids:
                job.emit(Chunk(stopper.flush(), EOS, n_prompt, n_new))
                return
            text, stopped = stopper.feed(detok.push(token))
            if stopped:
                job.emit(Chunk(text, STOP_SEQUENCE, n_prompt, n_new))
                return
            if n_new >= req.max_new_tokens:
                job.emit(Chunk(text + stopper.flush(), MAX_TOKENS, n_prompt, n_new))
                return
            if text:
                job.emit(Chunk(text, None, n_prompt, n_new))
            logits = runner.decode_one_token(token, cache)
