"""engine_slot: the one handle the services turn — which engine serves new requests, reload, drain.

A chat request leases the current engine for its whole life, so ReloadModel can put a new engine in the
slot while streams on the old one run to their end; the old engine stops when its last lease is returned.
The slot also counts chat requests in flight (degraded ones included) for Drain.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("lawchat.slot")


class ReloadError(Exception):
    """`code`: 'invalid' (not a model dir), 'busy' (a reload is running), 'failed' (the model did not load)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class EngineSlot:
    def __init__(self, loader: Callable[[Path], object] | None = None):
        self.loader = loader                 # model dir -> started engine (loaded and warmed up)
        self.engine = None                   # None while the first model loads
        self.model_path: Path | None = None
        self.draining = False
        self.restarting = False              # the supervisor is bringing a dead engine back (canned answers meanwhile)
        self.in_flight = 0
        self._leases: dict[int, int] = {}    # id(engine) -> requests using it
        self._retired: dict[int, object] = {}
        self._reloading = False
        self._lock = threading.Lock()
        self._changed = asyncio.Event()      # set whenever in_flight drops (Drain waits on it)

    def set(self, engine, model_path: Path) -> None:
        self.engine, self.model_path = engine, Path(model_path)

    @contextmanager
    def request(self) -> Iterator[None]:
        """A chat RPC in flight (for Drain), whether or not it reaches an engine."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._changed.set()

    @contextmanager
    def lease(self) -> Iterator[object]:
        """The current engine, kept alive until the block ends even if a reload replaces it."""
        with self._lock:
            engine = self.engine
            self._leases[id(engine)] = self._leases.get(id(engine), 0) + 1
        try:
            yield engine
        finally:
            with self._lock:
                left = self._leases[id(engine)] = self._leases[id(engine)] - 1
                retired = self._retired.pop(id(engine), None) if left == 0 else None
            if retired is not None:
                self._stop_later(retired)

    @staticmethod
    def _stop_later(engine) -> None:
        log.info("the replaced engine has no streams left: stopping it")
        threading.Thread(target=engine.stop, name="lawchat-retire", daemon=True).start()

    async def reload(self, model_path: str) -> tuple[Path, float]:
        """Load `model_path`, warm it up, then serve new requests from it; -> (previous path, seconds)."""
        path = Path(model_path)
        if not model_path or not (path / "config.json").is_file():
            raise ReloadError("invalid", f"{model_path!r} is not a model directory on the server (no config.json)")
        if self.loader is None:
            raise ReloadError("failed", "this server was started without a model loader")
        with self._lock:
            if self._reloading:
                raise ReloadError("busy", "a reload is already running")
            self._reloading = True
        t0 = time.perf_counter()
        try:
            try:
                new = await asyncio.to_thread(self.loader, path)
            except Exception as e:
                log.error("reload of %s failed; the old model keeps serving: %s: %s", path, type(e).__name__, e)
                raise ReloadError("failed", f"could not load {path}: {type(e).__name__}: {e}") from None
            with self._lock:
                old, previous = self.engine, self.model_path
                self.engine, self.model_path = new, path
                if old is not None:
                    if self._leases.get(id(old), 0) == 0:
                        self._stop_later(old)
                    else:
                        self._retired[id(old)] = old
            log.info("reloaded: now serving %s (was %s) after %.1f s", path, previous, time.perf_counter() - t0)
            return previous, time.perf_counter() - t0
        finally:
            self._reloading = False

    async def drain(self, timeout: float) -> int:
        """Stop admitting; wait until nothing is in flight or `timeout` passes; -> requests still in flight."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.in_flight > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                break
        return self.in_flight

    def stop(self) -> None:
        """Stop the current engine and any replaced one still finishing."""
        for engine in [self.engine, *self._retired.values()]:
            if engine is not None:
                engine.stop()
        self._retired.clear()
