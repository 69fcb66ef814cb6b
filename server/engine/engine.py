"""engine: the one holder of the model runner, tokenizer and KV cache; streams generations to asyncio callers.

Three parties, each on its own thread:
- callers (the gRPC event loop) submit a `GenerationRequest` through `stream()` and read `Chunk`s;
- the engine thread loops: take new sequences, drop aborted ones, `Scheduler.schedule()`, `runner.launch()`,
  then finish the previous step: append its sampled tokens, finish sequences on EOS / max tokens (continuous
  batching: every step). With `overlap` (fast path) the host prepares and launches step N+1 before waiting for
  step N's ids — the GPU never idles on Python; a sequence's token from step N is PENDING in step N+1's input
  (read on the device), and an EOS is seen one step late (the extra token is dropped);
- the output thread turns each step's token ids into text (incremental detokenizer, stop sequences) and hands
  the chunks to the callers' event loops, one callback per loop per step. A caller that reads slower than
  tokens arrive gets the queued deltas merged into one message.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import make_detokenizer
from .lora import BASE, AdapterError, AdapterSlots, read_adapter
from .sampler import SamplingParams
from .scheduler import Scheduler
from .sequence import PENDING, Sequence, Status
from .stopping import StopSequenceMatcher

log = logging.getLogger("lawchat.engine")

EOS, MAX_TOKENS, STOP_SEQUENCE = "eos", "max_tokens", "stop_sequence"


class EngineOverloaded(Exception):
    """The wait queue is full."""


class EngineClosed(Exception):
    """The engine is shutting down."""


class EngineStalled(Exception):
    """The engine made no step for the caller's stall bound while the caller waited on it (a hang). `steps`: the
    step count it stalled at (every caller stuck on the same hang reports the same)."""

    def __init__(self, message: str, steps=None):
        super().__init__(message)
        self.steps = steps


class InvalidGeneration(ValueError):
    """`Engine.submit` refused a request a step could choke on; `field` names it (INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownAdapter(InvalidGeneration):
    """The request names an adapter this server does not serve (NOT_FOUND)."""

    def __init__(self, message: str):
        super().__init__("adapter", message)


class StepFailed(Exception):
    """An engine step raised. `step` numbers the failed step (the breaker counts each once); `isolated`: the
    step was re-run without this sequence and the others went on, so the cause was this request."""

    def __init__(self, message: str, step: int = -1, isolated: bool = False):
        super().__init__(message)
        self.step, self.isolated = step, isolated


U64 = 1 << 64
I64 = 1 << 63


def fold_seed(seed: int) -> int:
    """A uint64 seed as the int64 with the same bits (the sampler hashes the bits: 2**64-1 draws as -1)."""
    return seed - U64 if seed >= I64 else seed


def check_request(request: "GenerationRequest", max_len: int, vocab_size: int) -> None:
    """Everything a step could choke on, refused before it reaches one (InvalidGeneration)."""
    ids = request.prompt_ids
    if not isinstance(ids, list) or not ids:
        raise InvalidGeneration("prompt_ids", "must be a non-empty list of token ids")
    if not all(type(t) is int for t in ids) or min(ids) < 0 or max(ids) >= vocab_size:
        raise InvalidGeneration("prompt_ids", f"token ids must be ints in [0, {vocab_size})")
    if len(ids) + 1 > max_len:
        raise InvalidGeneration("prompt_ids", f"a prompt of {len(ids)} tokens does not fit max_len {max_len}")
    n = request.max_new_tokens
    if type(n) is not int or not 1 <= n <= max_len - len(ids):
        raise InvalidGeneration("max_new_tokens", f"must be in [1, {max_len - len(ids)}] for a prompt of {len(ids)} "
                                f"tokens (max_len {max_len}), got {n!r}")
    sp = request.sampling
    if not (isinstance(sp.temperature, (int, float)) and 0.0 <= sp.temperature <= 2.0):   # NaN fails too
        raise InvalidGeneration("temperature", f"must be in [0, 2], got {sp.temperature!r}")
    if not (isinstance(sp.top_p, (int, float)) and 0.0 < sp.top_p <= 1.0):
        raise InvalidGeneration("top_p", f"must be in (0, 1], got {sp.top_p!r}")
    if type(sp.top_k) is not int or not 0 <= sp.top_k <= vocab_size:
        raise InvalidGeneration("top_k", f"must be in [0, {vocab_size}] (the vocabulary; 0 = off), got {sp.top_k!r}")
    if sp.seed is not None and (type(sp.seed) is not int or not 0 <= sp.seed < U64):
        raise InvalidGeneration("seed", f"must be in [0, 2**64-1], got {sp.seed!r}")
    stops = request.stop_sequences
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
        raise InvalidGeneration("stop_sequences", "must be a list of non-empty strings")
    if not isinstance(request.ignore_eos, bool):
        raise InvalidGeneration("ignore_eos", f"must be a bool, got {request.ignore_eos!r}")
    if request.adapter is not None and not (isinstance(request.adapter, str) and len(request.adapter) <= 64):
        raise InvalidGeneration("adapter", f"must be an adapter name of at most 64 characters, got {request.adapter!r}")


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop_sequences: list[str] = field(default_factory=list)
    ignore_eos: bool = False          # benchmarks: generate exactly max_new_tokens
    adapter: str | None = None        # a LoRA adapter's name; None: the engine's default_adapter; "base": none


@dataclass
class Chunk:
    delta: str
    finish_reason: str | None = None     # set on the last chunk only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)   # on the last chunk: every generated id (eval, tests)
    queue_seconds: float = 0.0           # on the last chunk: arrival -> first scheduled (queue time)


@dataclass
class EngineStats:
    running: int
    waiting: int
    batch_size: int                  # sequences in the last step
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int        # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int
    preemptions: int
    steps: int
    adapters: list = field(default_factory=list)   # lora.Adapter.info() of each adapter served


class _LaunchFailed(Exception):
    """runner.launch raised (the cause is chained): the loop isolates the step."""


class _Job:
    """One request inside the engine: its sequence, its text pipeline (output thread only), where chunks go."""

    def __init__(self, seq: Sequence, request: GenerationRequest, tokenizer, sink, tag=None):
        self.seq = seq
        self.sink = sink                      # .deliver([(job, Chunk | exception), ...]) once per step
        self.tag = tag                        # the caller's handle (a queue, a remote request id)
        self.detok = make_detokenizer(tokenizer)
        self.stopper = StopSequenceMatcher(request.stop_sequences)
        self.done = False


class AsyncSink:
    """Delivers to asyncio callers: one callback per step on their loop puts each chunk in its job's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def deliver(self, items: list) -> None:
        try:
            self.loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:                  # that loop is closed: its callers are gone
            pass


def _put_all(items: list) -> None:
    for queue_or_job, item in items:
        queue_or_job.put_nowait(item)


async def read_chunks(out: asyncio.Queue, progress=None, stall_seconds: float | None = None) -> AsyncIterator[Chunk]:
    """Chunks from a job's queue until the final one; exceptions are raised. A slow reader gets the queued
    deltas merged into one chunk (one gRPC message instead of many).

    The watchdog: with `stall_seconds`, a wait that long with no chunk checks `progress()` (the engine's step
    count); unchanged means the engine is hung and EngineStalled is raised. A busy engine (this request queued
    behind others) keeps stepping and the wait goes on."""
    while True:
        if stall_seconds is None:
            items = [await out.get()]
        else:
            mark = progress()
            while True:
                try:
                    async with asyncio.timeout(stall_seconds):
                        items = [await out.get()]
                    break
                except TimeoutError:
                    now = progress()
                    if now == mark:
                        raise EngineStalled(f"the engine made no step in {stall_seconds:g} s", now) from None
                    mark = now
        while not out.empty():
            items.append(out.get_nowait())
        for item in items:
            if isinstance(item, BaseException):
                raise item
        last = items[-1]
        chunk = last if len(items) == 1 else replace(last, delta="".join(c.delta for c in items))
        yield chunk
        if chunk.finish_reason is not None:
            return


class Engine:
    def __init__(self, runner, config: EngineConfig | None = None):
        self.runner = runner
        self.config = config or runner.config
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, runner.prefix_caching)
        self.adapters = AdapterSlots(runner.lora) if getattr(runner, "lora", None) is not None else None
        for name, path in self.config.adapters.items():    # before the loop runs: no queue needed
            self.adapters.register(self._read_adapter(name, path))
        self.scheduler = Scheduler(self.blocks, self.config.max_num_seqs, self.config.max_prefill_tokens,
                                   self.adapters)
        self._admin: list[tuple] = []          # (fn, future): adapter changes, run by the engine thread
        self.max_waiting = self.config.max_waiting
        self._cond = threading.Condition()
        self._inbox: list[_Job] = []
        self._jobs: dict[int, _Job] = {}
        self._outputs: queue.Queue = queue.Queue()
        self._closed = False
        self._batch_size = 0
        self._steps = 0
        self._failed_steps = 0
        self.overlap = self.config.overlap and getattr(runner, "overlap", False)
        self.timing = {"schedule": 0.0, "launch": 0.0, "wait": 0.0, "finish": 0.0}   # engine-thread s, profiling
        self._trace = open(self.config.trace, "a", buffering=1) if self.config.trace else None   # noqa: SIM115
        self._thread = threading.Thread(target=self._loop, name="lawchat-engine", daemon=True)
        self._out_thread = threading.Thread(target=self._process_outputs, name="lawchat-detok", daemon=True)

    # -- what the services read ------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.runner.tokenizer

    @property
    def device(self):
        return self.runner.device

    @property
    def dtype(self):
        return self.runner.dtype

    @property
    def max_len(self) -> int:
        return self.runner.max_len

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.runner.encode_chat(messages)

    @property
    def waiting(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    def stats(self) -> EngineStats:
        bm = self.blocks
        return EngineStats(self.running, self.waiting, self._batch_size, bm.num_used, bm.num_total,
                           bm.prefix_queries, bm.prefix_hits, self.scheduler.preemptions, self._steps,
                           self.adapters.infos() if self.adapters is not None else [])

    # -- adapters (AdminService) ---------------------------------------------------------------------
    def _read_adapter(self, name: str, path: str):
        if self.adapters is None:
            raise AdapterError("this server serves no adapters: start it with engine.max_loras > 0 (or with "
                               "--adapter NAME=DIR)")
        pool = self.adapters.pool
        return read_adapter(name, path, pool.shape, self.runner.dtype, pool.modules)

    def _in_loop(self, fn):
        """fn() on the engine thread between two steps (it owns the adapter slots); -> its result."""
        if not self._thread.is_alive():
            return fn()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            self._admin.append((fn, fut))
            self._cond.notify()
        return fut.result()

    def load_adapter(self, name: str, path: str) -> dict:
        """Read a PEFT adapter dir and serve it under name from the next request (replacing one of that name; its
        running streams finish on the old weights). Streams in flight are not paused: the file is read on the
        caller's thread, the engine thread only swaps the entry. -> its info; AdapterError when it does not fit."""
        adapter = self._read_adapter(name, path)
        self._in_loop(lambda: self.adapters.register(adapter))
        self.config.remember_adapter(name, path)
        return adapter.info()

    def unload_adapter(self, name: str) -> bool:
        """Stop serving name to new requests (running ones finish on it); -> False when it was not served."""
        if self.adapters is None:
            return False
        gone = self._in_loop(lambda: self.adapters.unregister(name)) is not None
        self.config.forget_adapter(name)
        return gone

    def list_adapters(self) -> list[dict]:
        return self.adapters.infos() if self.adapters is not None else []

    def _adapter_of(self, name: str | None):
        name = self.config.default_adapter if name is None else name
        if name is None or name == BASE:
            return None
        adapter = self.adapters.get(name) if self.adapters is not None else None
        if adapter is None:
            served = ", ".join(a["name"] for a in self.list_adapters())
            raise UnknownAdapter(f"no adapter {name!r} on this server (served: {served or 'none'}; {BASE!r} is the "
                                 "base model)")
        return adapter

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._out_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._outputs.put(None)
        if self._out_thread.is_alive():
            self._out_thread.join(timeout)

    def warmup(self) -> dict:
        """Before serving (the engine started): meet every kernel and shape class the first users would, so that
        the first burst after ready is served like a warm one. `full`: two waves of requests with random prompts
        of every length class up to max_len (chunked prefill included), the second arriving while the first
        decodes (mixed steps), greedy / temperature+top-p / top-k / seeded sampling, stop strings. The prefix
        cache's counters are reset afterwards. -> what it ran."""
        mode = self.config.warmup
        if mode == "auto":
            mode = "full" if str(self.device).startswith("cuda") else "minimal"
        if mode != "full":
            return {"warmup": mode}
        t0 = time.perf_counter()
        gemms = self._in_loop(self.runner.warm_gemms)
        rng = random.Random(0)
        longest = min(self.max_len - 9, 2 * self.config.max_prefill_tokens + 7)
        lengths = sorted({n for n in (7, 33, 128, 512, 900, 1500, longest) if n <= longest})
        burst = max(2, min(self.config.max_num_seqs, 64))
        samplings = [SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9),
                     SamplingParams(temperature=1.0, top_k=40, seed=7), SamplingParams(temperature=0.3)]
        high = max(1, min(self.runner.vocab_size, 30000))
        requests = [GenerationRequest([rng.randrange(high) for _ in range(lengths[i % len(lengths)])],
                                      samplings[i % len(samplings)], 8, ["。"] if i % 5 == 0 else [], ignore_eos=True)
                    for i in range(2 * burst)]

        async def run() -> int:
            first_token = asyncio.Event()

            async def one(req: GenerationRequest, wait: bool) -> int:
                if wait:
                    await first_token.wait()
                while True:
                    try:
                        async for _ in self.stream(req):
                            first_token.set()
                        return 1
                    except EngineOverloaded:
                        await asyncio.sleep(0.01)
            return sum(await asyncio.gather(*[one(r, i >= burst) for i, r in enumerate(requests)]))
        steps = self._steps
        served = asyncio.run(run())
        self.blocks.prefix_queries = self.blocks.prefix_hits = 0
        info = {"warmup": "full", "requests": served, "prompt_lengths": lengths,
                "steps": self._steps - steps, "seconds": round(time.perf_counter() - t0, 2), **gemms}
        log.info("warm-up: %d requests (prompts of %s tokens, 4 sampling paths, stop strings) in %d steps, %.2f s "
                 "(the projections at every row count up to %s: %s s)", info["requests"], lengths, info["steps"],
                 info["seconds"], gemms.get("gemm_row_counts", "-"), gemms.get("gemm_seconds", "-"))
        return info

    # -- caller side ---------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink, tag=None) -> _Job:
        """Queue a request (any thread); its chunks go to sink.deliver as (tag, chunk) pairs.
        Refuses what a step could choke on (InvalidGeneration): no caller is trusted to have checked."""
        check_request(request, self.max_len, self.runner.vocab_size)
        seed = fold_seed(request.sampling.seed) if request.sampling.seed is not None else random.getrandbits(63)
        seq = Sequence(request.prompt_ids, request.sampling, request.max_new_tokens, seed, request.ignore_eos,
                       self._adapter_of(request.adapter))
        job = _Job(seq, request, self.tokenizer, sink, tag)
        with self._cond:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if self.waiting >= self.max_waiting:
                raise EngineOverloaded(f"{self.waiting} requests already waiting")
            self._inbox.append(job)
            self._cond.notify()
        return job

    def abort(self, job: _Job) -> None:
        """The caller is gone (cancel, deadline): free the sequence's slot at the next step."""
        if job.seq.status is not Status.FINISHED:
            job.seq.aborted = True
            with self._cond:
                self._cond.notify()

    @property
    def alive(self) -> bool:
        return not self._closed and self._thread.is_alive()

    async def stream(self, request: GenerationRequest, stall_seconds: float | None = None) -> AsyncIterator[Chunk]:
        out: asyncio.Queue = asyncio.Queue()
        job = self.submit(request, AsyncSink(asyncio.get_running_loop()), out)
        try:
            async for chunk in read_chunks(out, lambda: self._steps, stall_seconds):
                yield chunk
        finally:
            self.abort(job)

    # -- engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        sched, tm = self.scheduler, self.timing
        in_flight = None                       # (step, handle, slots) launched and not yet finished (overlap)
        while True:
            with self._cond:
                while (not self._closed and not self._inbox and not self._admin and not sched.has_work()
                       and in_flight is None):
                    self._cond.wait()
                if self._closed:
                    break
                new, self._inbox = self._inbox, []
                admin, self._admin = self._admin, []
            for fn, fut in admin:
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)
            for job in new:
                self._jobs[job.seq.seq_id] = job
                if job.seq.adapter is not None:
                    job.seq.adapter.requests += 1
                sched.add(job.seq)
            t0 = time.perf_counter()
            self._drop_aborted()
            step = sched.schedule()
            for seq in step.preempted:
                self.runner.release(seq)
            t1 = time.perf_counter()
            try:
                launched = self._launch(step) if step else None
            except _LaunchFailed as e:
                if in_flight is not None:        # its tokens come before anything re-run now
                    self._finish(*in_flight)
                    in_flight = None
                self._isolate(step, e.__cause__)
                launched = None
            t2 = time.perf_counter()
            if in_flight is not None:
                self._finish(*in_flight)
            if launched is not None and not self.overlap:
                self._finish(*launched)
                launched = None
            t3 = time.perf_counter()
            if self._trace is not None and step:
                self._trace_step(step, t0, t1, t2, t3)
            in_flight = launched
            if not step and in_flight is None:
                time.sleep(0.001)          # everything waits for blocks held by sequences being dropped
            tm["schedule"] += t1 - t0
            tm["launch"] += t2 - t1
            tm["finish"] += t3 - t2
        if in_flight is not None:
            self._finish(*in_flight)
        with self._cond:
            inbox, self._inbox = self._inbox, []
            admin, self._admin = self._admin, []
        for _, fut in admin:
            fut.set_exception(EngineClosed("the server is shutting down"))
        self._fail(list(sched.running) + list(sched.waiting), EngineClosed("the server is shutting down"), inbox)
        if self._trace is not None:
            self._trace.close()
        log.info("engine: %d steps (overlap %s); thread time schedule %.2f s, launch %.2f s, wait for ids %.2f s, "
                 "finish (incl. wait) %.2f s", self._steps, self.overlap, *self.timing.values())

    def _trace_step(self, step, t0: float, t1: float, t2: float, t3: float) -> None:
        """One JSON line: when the step was scheduled (monotonic s), ms spent scheduling, launching and finishing
        (the finish waits for the previous step's ids, or this one's without overlap), its work, the queue."""
        ms = lambda a, b: round((b - a) * 1e3, 3)    # noqa: E731
        self._trace.write(json.dumps({
            "step": time.monotonic() - (time.perf_counter() - t0), "schedule_ms": ms(t0, t1), "launch_ms": ms(t1, t2),
            "finish_ms": ms(t2, t3), "prefill_seqs": len(step.prefill), "prefill_tokens": sum(n for _, n in step.prefill),
            "decode": len(step.decode), "waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
            **self.runner.allocator_counters()}) + "\n")

    def _launch(self, step):
        """Start the step on the runner and account for it at once: computed tokens advance, and each sampled
        sequence gets a PENDING token (its row in the step) that the next step can already decode from.
        -> (step, handle, the PENDING tokens' indices in each sampled sequence), or None if it failed."""
        self._batch_size = len(step.prefill) + len(step.decode)
        try:
            handle = self.runner.launch(step.prefill, step.decode)
        except Exception as e:    # never kill the loop: the loop finds the cause (_isolate)
            raise _LaunchFailed() from e
        return self._account(step, handle)

    def _account(self, step, handle):
        for seq, n in step.prefill:
            seq.num_computed += n
        for seq in step.decode:
            seq.num_computed += 1
        slots = []
        for row, seq in enumerate(handle.sampled):
            seq.token_ids.append(PENDING)
            seq.pending_row, seq.pending_handle = row, handle
            slots.append(len(seq) - 1)
        return step, handle, slots

    def _isolate(self, step, error: BaseException) -> None:
        """A step raised: run each of its sequences alone (KV writes of the fast path are idempotent, so a
        re-run is exact) and fail only those that fail alone; the others go on with their token. On a runner
        whose steps are not safe to re-run (the generic HF path), every sequence of the step fails."""
        self._failed_steps += 1
        failed_step = self._failed_steps
        alive = lambda s: s.status is Status.RUNNING and not s.aborted   # noqa: E731
        parts = [([(s, n)], []) for s, n in step.prefill if alive(s)] + [([], [s]) for s in step.decode if alive(s)]
        log.error("engine step failed (%d prefill, %d decode): %s: %s", len(step.prefill), len(step.decode),
                  type(error).__name__, error)
        if not getattr(self.runner, "rerunnable", False) or len(parts) <= 1:
            seqs = [s for s, _ in step.prefill if alive(s)] + [s for s in step.decode if alive(s)]
            self._fail(seqs, StepFailed(f"generation step failed ({type(error).__name__})", failed_step))
            return
        culprits = []
        for prefill, decode in parts:
            seq = prefill[0][0] if prefill else decode[0]
            try:
                launched = self._account(replace(step, prefill=prefill, decode=decode),
                                         self.runner.launch(prefill, decode))
                self._finish(*launched)
            except Exception as e:
                culprits.append(seq)
                log.error("engine step re-run: sequence %d fails alone (%s)", seq.seq_id, type(e).__name__)
        isolated = len(culprits) < len(parts)
        self._fail(culprits, StepFailed(f"generation step failed ({type(error).__name__})"
                                        + (" on this request alone; the others in its batch went on" if isolated
                                           else ""), failed_step, isolated))

    def _finish(self, step, handle, slots: list[int]) -> None:
        """Wait for a launched step's ids, put them in place of its PENDING tokens, finish sequences."""
        t0 = time.perf_counter()
        try:
            sampled, tokens = handle.result()
        except Exception as e:
            log.error("engine step failed at its sync (%d sequences): %s: %s", len(handle.sampled),
                      type(e).__name__, e)
            self._failed_steps += 1
            self._fail([s for s in handle.sampled if s.status is not Status.FINISHED],
                       StepFailed(f"generation step failed ({type(e).__name__})", self._failed_steps))
            return
        self.timing["wait"] += time.perf_counter() - t0
        self._steps += 1
        self._advance(step, handle, slots, sampled, tokens)

    def _drop_aborted(self) -> None:
        sched = self.scheduler
        for seq in [s for s in sched.running if s.aborted] + [s for s in sched.waiting if s.aborted]:
            sched.remove(seq)
            self.runner.release(seq)
            self._jobs.pop(seq.seq_id, None)

    def _advance(self, step, handle, slots: list[int], sampled: list[Sequence], tokens: list[int]) -> None:
        eos = self.runner.eos_ids
        outputs = []
        for seq, tok, idx in zip(sampled, tokens, slots):
            if seq.status is Status.FINISHED:      # dropped, or finished a step ago (overlap): token discarded
                continue
            seq.token_ids[idx] = tok
            if seq.pending_handle is handle:        # not in a later step: its last token is known now
                seq.pending_row = seq.pending_handle = None
            n_out = idx + 1 - seq.num_prompt
            finish = None
            if tok in eos and not seq.ignore_eos:
                finish = EOS
            elif n_out >= seq.max_new_tokens:
                finish = MAX_TOKENS
            job = self._jobs.get(seq.seq_id)
            if n_out == 1 and self._trace is not None:
                self._trace.write(json.dumps({"first_token": time.monotonic(), "arrival": seq.arrival,
                                              "admitted": seq.arrival + (seq.queue_seconds or 0.0),
                                              "prompt": seq.num_prompt}) + "\n")
            if finish is not None:
                seq.finish_reason = finish
                self.scheduler.remove(seq)
                self.runner.release(seq)
                self._jobs.pop(seq.seq_id, None)
            if job is not None:
                outputs.append((job, tok, finish, n_out))
        for seq in [s for s, _ in step.prefill] + step.decode:
            if seq.status is Status.RUNNING:       # every token it has computed is known now: hash full blocks
                self.blocks.register_full_blocks(seq)
        if outputs:
            self._outputs.put(outputs)

    def _fail(self, seqs: list[Sequence], error: BaseException, inbox: list[_Job] = ()) -> None:
        outputs = []
        for seq in seqs:
            if seq.status is not Status.FINISHED:
                self.scheduler.remove(seq)
            self.runner.release(seq)
            job = self._jobs.pop(seq.seq_id, None)
            if job is not None:
                outputs.append((job, error, None, 0))
        outputs += [(job, error, None, 0) for job in inbox]
        if outputs:
            self._outputs.put(outputs)

    # -- output thread ---------------------------------------------------------------------------
    def _process_outputs(self) -> None:
        while True:
            outputs = self._outputs.get()
            if outputs is None:
                return
            by_sink: dict[int, tuple[object, list]] = {}
            for job, tok, finish, n_out in outputs:
                if job.done:
                    continue
                item = self._to_chunk(job, tok, finish, n_out)
                if item is not None:
                    by_sink.setdefault(id(job.sink), (job.sink, []))[1].append((job.tag, item))
            for sink, items in by_sink.values():
                sink.deliver(items)

    @staticmethod
    def _to_chunk(job: _Job, tok, finish: str | None, n_out: int):
        """One sampled token (or an error) -> the chunk to send, or None while text is held back."""
        if isinstance(tok, BaseException):
            job.done = True
            return tok
        if finish == EOS:
            text = job.stopper.flush()
        else:
            text, stopped = job.stopper.feed(job.detok.push(tok))
            if stopped:
                finish = STOP_SEQUENCE
                job.seq.aborted = True        # the engine drops it at its next step
            elif finish == MAX_TOKENS:
                text += job.stopper.flush()
        if finish is not None:
            job.done = True
        if not text and finish is None:
            return None
        ids = job.seq.token_ids[job.seq.num_prompt:job.seq.num_prompt + n_out] if finish else []
        return Chunk(text, finish, job.seq.num_prompt, n_out, ids, (job.seq.queue_seconds or 0.0) if finish else 0.0)

def generate_batch(engine: Engine, prompts: list[list[int]], max_new_tokens: int | list[int],
                   sampling: SamplingParams = SamplingParams(), ignore_eos: bool = False) -> list[Chunk]:
    """Sync helper (eval, scripts): all prompts through the started engine at once; -> each one's merged Chunk.

    max_new_tokens: one limit for all, or one per prompt. Requests beyond the wait-queue bound are fed as
    earlier ones are admitted, so any number works.
    """
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)

    async def run() -> list[Chunk]:
        slots = asyncio.Semaphore(max(1, engine.config.max_num_seqs + engine.max_waiting // 2))

        async def one(ids: list[int], limit: int) -> Chunk:
            async with slots:
                while True:
                    try:   # a full KV cache can hold sequences back until the wait queue refuses: retry then
                        parts = [c async for c in engine.stream(GenerationRequest(ids, sampling, limit,
                                                                                  ignore_eos=ignore_eos))]
                        break
                    except EngineOverloaded:
                        await asyncio.sleep(0.05)
            last = parts[-1]
            return replace(last, delta="".join(c.delta for c in parts))
        return await asyncio.gather(*[one(p, n) for p, n in zip(prompts, limits)])
    return asyncio.run(run())
