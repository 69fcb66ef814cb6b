"""supervisor: keeps an engine serving — restarts a dead one with backoff, kills a stalled engine process,
and gives up (the server exits non-zero for its orchestrator to restart) when restarts keep failing.

Checked once per health poll by the app's watcher:
- dead: the slot's engine is not alive (its process was killed, crashed, ran out of memory). Streams on it
  have ended UNAVAILABLE ("the engine process stopped"); new requests get the canned answer while
  `slot.restarting` is set; the model is loaded again through the slot's loader (as ReloadModel does), after
  `backoff_seconds`, doubling up to `backoff_max_seconds` while attempts fail.
- stalled: the engine has work but made no step for `stall_seconds`. An engine in a process of its own is
  killed (then restarted as dead); an in-process engine cannot be, so liveness fails and the orchestrator
  restarts the whole server.
- giving up: more than `max_restarts` restarts within `window_seconds`, or a stalled in-process engine:
  `on_give_up` runs (health liveness NOT_SERVING, the server stops and exits 3).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .engine_slot import EngineSlot, ReloadError

log = logging.getLogger("lawchat.supervisor")


@dataclass
class RestartConfig:
    max_restarts: int = 5              # engine restarts allowed within window_seconds; one more and the server exits 3
    window_seconds: float = 600.0
    backoff_seconds: float = 1.0       # wait before the first restart attempt; doubles after each failed one
    backoff_max_seconds: float = 30.0

    def validate(self) -> None:
        if self.max_restarts < 0 or not self.window_seconds > 0:
            raise ValueError("restart.max_restarts must be >= 0 and restart.window_seconds > 0")
        if not 0 <= self.backoff_seconds <= self.backoff_max_seconds:
            raise ValueError("restart: need 0 <= backoff_seconds <= backoff_max_seconds")


class Supervisor:
    def __init__(self, slot: EngineSlot, config: RestartConfig, stall_seconds: float, on_give_up,
                 clock=time.monotonic):
        config.validate()
        self.slot, self.config, self.stall_seconds = slot, config, stall_seconds
        self.on_give_up = on_give_up          # async callable(reason)
        self.clock = clock
        self.stalled = False
        self.gave_up = ""                     # why, once given up
        self.restarts: list[float] = []       # start times of restarts within the window
        self._task: asyncio.Task | None = None
        self._engine_id = None
        self._steps = -1
        self._since = clock()

    @property
    def busy(self) -> bool:
        """A restart is under way."""
        return self._task is not None and not self._task.done()

    def check(self, stopping: bool) -> None:
        """One look at the engine (from the event loop): start a restart, kill a stalled process, give up."""
        engine = self.slot.engine
        if engine is None or stopping or self.gave_up or self.busy:
            return
        if not getattr(engine, "alive", True):
            self._task = asyncio.create_task(self._restart())
            return
        self._watch_steps(engine)

    def _watch_steps(self, engine) -> None:
        st, now = engine.stats(), self.clock()
        if id(engine) != self._engine_id or st.steps != self._steps or st.running + st.waiting == 0:
            self._engine_id, self._steps, self._since, self.stalled = id(engine), st.steps, now, False
            return
        if now - self._since <= self.stall_seconds or self.stalled:
            return
        self.stalled = True
        if hasattr(engine, "kill"):
            log.error("the engine made no step in %.0f s with %d sequences waiting on it: killing its process to "
                      "restart it", now - self._since, st.running + st.waiting)
            engine.kill()
        else:
            self._task = asyncio.create_task(self._give_up(f"the in-process engine made no step in "
                                                           f"{now - self._since:.0f} s"))

    async def _restart(self) -> None:
        slot, cfg = self.slot, self.config
        slot.restarting = True
        wait = cfg.backoff_seconds
        try:
            while True:
                now = self.clock()
                self.restarts = [t for t in self.restarts if now - t < cfg.window_seconds]
                if len(self.restarts) >= cfg.max_restarts:
                    await self._give_up(f"{len(self.restarts)} engine restarts in {cfg.window_seconds:.0f} s")
                    return
                self.restarts.append(now)
                log.error("the engine is gone: restarting it in %.1f s (restart %d of at most %d in %.0f s)",
                          wait, len(self.restarts), cfg.max_restarts, cfg.window_seconds)
                await asyncio.sleep(wait)
                try:
                    await slot.reload(str(slot.model_path))
                except ReloadError as e:
                    log.error("engine restart failed: %s", e)
                    wait = min(cfg.backoff_max_seconds, max(wait * 2, 0.1))
                    continue
                log.info("engine restarted: serving %s again", slot.model_path)
                self.stalled = False
                return
        finally:
            slot.restarting = False

    async def _give_up(self, reason: str) -> None:
        self.gave_up = reason
        log.critical("giving up on the engine (%s): the server stops so that its orchestrator restarts it", reason)
        await self.on_give_up(reason)
