"""Fault injection for in-process servers: a model runner that is slow, raises, or hangs, around the real one."""
from __future__ import annotations

import threading
import time

from lawchat_server.app import ThreadedServer
from lawchat_server.config import ServerConfig
from lawchat_server.engine.config import EngineConfig
from lawchat_server.engine.engine import Engine


class FaultyRunner:
    """The real runner, with a delay per engine step and, by `mode`: 'ok', 'raise' (every step fails),
    'hang' (a step blocks until `release()` or the mode changes). `fail_steps` fails that many steps first."""

    def __init__(self, runner, delay: float = 0.0, fail_steps: int = 0):
        self.inner, self.delay, self.fail_steps = runner, delay, fail_steps
        self.mode = "ok"
        self.decoded = 0
        self.calls = 0
        self._unhang = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode != "hang":
            self._unhang.set()
        else:
            self._unhang.clear()

    def launch(self, prefill, decode):
        """The engine's entry point (a step; with overlap its ids are waited for later)."""
        self.calls += 1
        if self.fail_steps > 0:
            self.fail_steps -= 1
            raise RuntimeError("CUDA out of memory (injected)")
        if self.mode == "raise":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        if self.mode == "hang":
            self._unhang.wait(60)
            if self.mode == "raise":
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        time.sleep(self.delay)
        self.decoded += len(decode)
        return self.inner.launch(prefill, decode)


def InProcessServer(runner, cfg: ServerConfig | None = None, loader=None, clock=time.monotonic,
                    **engine_cfg) -> ThreadedServer:
    cfg = cfg or ServerConfig(port=0)
    return ThreadedServer(Engine(runner, EngineConfig(**engine_cfg)), cfg, "tiny", loader=loader, clock=clock)


class Clock:
    """A monotonic clock that tests step by hand."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class PoisonRunner(FaultyRunner):
    """The real runner, except that any step holding a sequence whose prompt contains `poison` (a token id)
    raises, as a kernel would on a bad input: the engine must pin it on that sequence alone."""

    def __init__(self, runner, poison: int, **kw):
        super().__init__(runner, **kw)
        self.poison = poison
        self.failed = 0

    def launch(self, prefill, decode):
        seqs = [s for s, _ in prefill] + list(decode)
        if any(self.poison in s.token_ids[:s.num_prompt] for s in seqs):
            self.failed += 1
            raise RuntimeError("index out of range in self (injected)")
        return super().launch(prefill, decode)


def engine_of(srv: ThreadedServer):
    return srv.app.slot.engine


def count(srv: ThreadedServer, method: str, code: str) -> float:
    return srv.app.metrics.requests.labels(method, code)._value.get()


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
