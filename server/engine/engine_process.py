"""engine_process: the engine in a process of its own, so gRPC and the engine loop do not share one GIL.

Measured before the split (H200, 256 streams): the decode step alone ran at 34,000 tok/s but the served
streams at 8,000, and py-spy showed the gRPC event loop holding the GIL ~57% of the time, detokenisation
~14%, the engine loop waiting for its turn. As in vLLM (API server / engine core), the server process keeps
gRPC, tokenising and the callers' queues; the engine process keeps the model, scheduler, KV cache and the
detokenizer, and sends each step's text deltas back in one message.

`EngineClient` has the face of `Engine` that the services use (stream, stats, encode_chat, max_len, ...).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing as mp
import signal
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ..prompt import encode_prompt
from .config import EngineConfig
from .engine import (Chunk, EngineClosed, EngineOverloaded, EngineStats, GenerationRequest, InvalidGeneration,
                     StepFailed, UnknownAdapter, _put_all, read_chunks)
from .lora import AdapterError

log = logging.getLogger("lawchat.engine")

STATS_INTERVAL_S = 0.5
ERRORS = {"EngineClosed": EngineClosed, "EngineOverloaded": EngineOverloaded, "ValueError": ValueError,
          "AdapterError": AdapterError}
ADMIN_OPS = ("load_adapter", "unload_adapter", "list_adapters")     # Engine methods the server may call


def error_to_tuple(e: BaseException) -> tuple:
    """An engine error as it crosses the pipe: (type name, message, details)."""
    if isinstance(e, UnknownAdapter):
        return ("UnknownAdapter", str(e), None)
    if isinstance(e, InvalidGeneration):
        return ("InvalidGeneration", str(e), e.field)
    if isinstance(e, StepFailed):
        return ("StepFailed", str(e), (e.step, e.isolated))
    return (type(e).__name__, str(e), None)


def error_from_tuple(name: str, message: str, details) -> BaseException:
    if name in ("InvalidGeneration", "UnknownAdapter"):
        e = InvalidGeneration(details, "") if name == "InvalidGeneration" else UnknownAdapter("")
        e.args = (message,)
        return e
    if name == "StepFailed":
        return StepFailed(message, *details)
    return ERRORS.get(name, RuntimeError)(message)


@dataclass
class RunnerInfo:
    """What AdminService reads of the runner, sent once when the engine process is ready."""
    path: str
    attention_backend: str
    graph_batch_sizes: list[int]
    block_size: int
    device: str
    dtype: str
    max_len: int


def astuple_chunk(c: Chunk) -> tuple:
    return (c.delta, c.finish_reason, c.prompt_tokens, c.completion_tokens, c.token_ids, c.queue_seconds)


# -- the engine process ---------------------------------------------------------------------------
class _PipeSink:
    """Engine output thread -> server process: one pipe message per step with every request's chunk."""

    def __init__(self, conn, engine, jobs: dict):
        self.conn, self.engine, self.jobs = conn, engine, jobs
        self.lock = threading.Lock()

    def send(self, msg) -> None:
        with self.lock:
            self.conn.send(msg)

    def deliver(self, items: list) -> None:
        out = []
        for rid, item in items:
            if isinstance(item, BaseException):
                out.append((rid, error_to_tuple(item)))
                self.jobs.pop(rid, None)
            else:   # a plain tuple pickles several times faster than the dataclass
                out.append((rid, astuple_chunk(item)))
                if item.finish_reason is not None:
                    self.jobs.pop(rid, None)
        self.send(("out", out, self.engine.stats()))


def run_engine_process(model_dir: str, device: str, dtype: str, trust_remote_code: bool, config: EngineConfig,
                       requests, outputs) -> None:
    from .engine import Engine
    from .model_runner import load_runner
    from .profiling import profile_from_env
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group: the server decides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        runner = load_runner(model_dir, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                             config=config)
        runner.warmup()
    except Exception as e:
        outputs.send(("error", type(e).__name__, str(e)))
        return
    engine = Engine(runner)
    engine.start()
    try:
        engine.warmup()            # before "ready": the first burst after it is served warm
    except Exception as e:
        engine.stop()
        outputs.send(("error", type(e).__name__, str(e)))
        return
    profile_from_env(engine, runner.device.type == "cuda")
    jobs: dict[int, object] = {}
    sink = _PipeSink(outputs, engine, jobs)
    sink.send(("ready", RunnerInfo(runner.path, runner.attention_backend, list(runner.graph_batch_sizes),
                                   runner.block_size, str(runner.device), str(runner.dtype).removeprefix("torch."),
                                   runner.max_len)))
    stop = threading.Event()

    def push_stats() -> None:   # so GetStatus and /metrics stay fresh while nothing streams
        while not stop.wait(STATS_INTERVAL_S):
            sink.send(("stats", engine.stats()))
    threading.Thread(target=push_stats, name="lawchat-stats", daemon=True).start()
    try:
        while True:
            msg = requests.recv()
            if msg[0] == "add":
                _, rid, request = msg
                try:
                    job = jobs[rid] = engine.submit(request, sink, rid)
                    if job.done:               # it finished before it was filed
                        jobs.pop(rid, None)
                except Exception as e:   # overloaded, closed, does not fit: the caller gets it as its answer
                    sink.deliver([(rid, e)])
            elif msg[0] == "admin":   # adapter changes read files: off this loop, replies come on the output pipe
                threading.Thread(target=_run_admin, args=(engine, sink, *msg[1:]), daemon=True).start()
            elif msg[0] == "abort":
                job = jobs.pop(msg[1], None)
                if job is not None:
                    engine.abort(job)
            elif msg[0] == "stop":
                break
    except (EOFError, OSError):   # the server process is gone
        pass
    stop.set()
    engine.stop()
    try:
        sink.send(("closed",))
    except (BrokenPipeError, OSError):
        pass


def _run_admin(engine, sink: _PipeSink, rid: int, op: str, args: tuple) -> None:
    try:
        if op not in ADMIN_OPS:
            raise ValueError(f"unknown engine admin op {op!r}")
        reply = ("reply", rid, True, getattr(engine, op)(*args))
    except Exception as e:
        reply = ("reply", rid, False, error_to_tuple(e))
    try:
        sink.send(reply)
    except (BrokenPipeError, OSError):
        pass


# -- the server process ---------------------------------------------------------------------------
class EngineClient:
    """Starts the engine process (loading the model there) and streams its chunks to asyncio callers."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str = "auto",
                 trust_remote_code: bool = False, config: EngineConfig | None = None, load_timeout: float = 3600):
        from transformers import AutoTokenizer
        self.config = config or EngineConfig()
        self.config.validate()
        self.max_waiting = self.config.max_waiting
        ctx = mp.get_context("spawn")          # CUDA cannot be forked
        child_requests, self._requests = ctx.Pipe(duplex=False)     # (receiving end, sending end)
        self._outputs, child_outputs = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=run_engine_process, name="lawchat-engine", daemon=True,
                                 args=(str(model_dir), device, dtype, trust_remote_code, self.config,
                                       child_requests, child_outputs))
        self._proc.start()
        child_requests.close()
        child_outputs.close()
        if not self._outputs.poll(load_timeout):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not load {model_dir} in {load_timeout:.0f} s")
        msg = self._outputs.recv()
        if msg[0] == "error":
            self._proc.join(10)
            raise error_from_tuple(msg[1], msg[2], None)
        self.runner: RunnerInfo = msg[1]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)   # dir checked
        self.device, self.dtype, self.max_len = self.runner.device, self.runner.dtype, self.runner.max_len
        self._stats = EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0)
        self._ids = itertools.count()
        self._callers: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._replies: dict[int, concurrent.futures.Future] = {}
        self._send_lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read_outputs, name="lawchat-engine-client", daemon=True)
        self._reader.start()
        log.info("engine process %d ready: %s on %s", self._proc.pid, self.runner.path, self.device)

    # -- what the services read ------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_prompt(self.tokenizer, messages)

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def running(self) -> int:
        return self._stats.running

    @property
    def waiting(self) -> int:
        return self._stats.waiting

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """The process started with the client (it had to load the model first)."""

    def stop(self, timeout: float = 30.0) -> None:
        if not self._closed:
            self._closed = True
            self._send(("stop",))
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
        self._reader.join(timeout)

    def kill(self) -> None:
        """SIGKILL the engine process (the supervisor's answer to a stall): its streams end UNAVAILABLE."""
        if self._proc.is_alive():
            self._proc.kill()

    def _send(self, msg) -> None:
        try:
            with self._send_lock:
                self._requests.send(msg)
        except (BrokenPipeError, OSError):
            raise EngineClosed("the engine process is gone") from None

    # -- adapters (AdminService): the Engine's methods, run in the engine process ------------------------
    def _admin(self, op: str, *args, timeout: float = 120.0):
        rid = next(self._ids)
        fut = self._replies[rid] = concurrent.futures.Future()
        try:
            self._send(("admin", rid, op, args))
            ok, value = fut.result(timeout)
        finally:
            self._replies.pop(rid, None)
        if not ok:
            raise error_from_tuple(*value)
        return value

    def load_adapter(self, name: str, path: str) -> dict:
        info = self._admin("load_adapter", name, str(path))
        self.config.remember_adapter(name, path)      # this process's config starts the next engine process
        self._refresh_adapters()
        return info

    def _refresh_adapters(self) -> None:
        """Stats (what the HTTP API's model list reads) show an adapter change at once, not at the next push."""
        self._stats = dataclasses.replace(self._stats, adapters=self._admin("list_adapters"))

    def unload_adapter(self, name: str) -> bool:
        gone = self._admin("unload_adapter", name)
        self.config.forget_adapter(name)
        self._refresh_adapters()
        return gone

    def list_adapters(self) -> list[dict]:
        return self._admin("list_adapters")

    # -- callers ---------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self._closed and self._proc.is_alive()

    async def stream(self, request: GenerationRequest, stall_seconds: float | None = None) -> AsyncIterator[Chunk]:
        if self._closed:
            raise EngineClosed("the server is shutting down")
        rid = next(self._ids)
        out: asyncio.Queue = asyncio.Queue()
        self._callers[rid] = (asyncio.get_running_loop(), out)
        finished = False
        try:
            self._send(("add", rid, request))
            async for chunk in read_chunks(out, lambda: self._stats.steps, stall_seconds):
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            if self._callers.pop(rid, None) is not None and not finished and not self._closed:
                try:
                    self._send(("abort", rid))
                except EngineClosed:
                    pass

    def _read_outputs(self) -> None:
        while True:
            try:
                msg = self._outputs.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "out":
                self._stats = msg[2]
                self._dispatch(msg[1])
            elif msg[0] == "stats":
                self._stats = msg[1]
            elif msg[0] == "reply":
                fut = self._replies.get(msg[1])
                if fut is not None and not fut.done():
                    fut.set_result((msg[2], msg[3]))
            elif msg[0] == "closed":
                break
        self._closed_by_us = self._closed
        self._closed = True
        gone = EngineClosed("the engine process stopped" if self._closed_by_us else
                            "the engine process died; the server restarts it")
        self._dispatch([(rid, ("EngineClosed", str(gone), None)) for rid in list(self._callers)])
        for fut in list(self._replies.values()):
            if not fut.done():
                fut.set_result((False, ("EngineClosed", str(gone), None)))

    def _dispatch(self, items: list) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, item in items:
            caller = self._callers.get(rid)
            if caller is None:                    # it left already
                continue
            item = error_from_tuple(*item) if len(item) == 3 else Chunk(*item)   # error or chunk
            by_loop.setdefault(caller[0], []).append((caller[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:
                pass

