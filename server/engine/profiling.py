"""profiling: a torch.profiler window over an engine's next decode steps — GPU busy time against wall time.

A step that takes longer than its kernels is host-bound (or waits on a sync). Used by scripts/profile_engine.py (the
engine alone) and, with LAWCHAT_PROFILE_STEPS set, by the engine process of a real server (what the engine does when
served: `LAWCHAT_PROFILE_STEPS=30@256 lawchat serve ...` logs one window once 256 sequences run).
"""
from __future__ import annotations

import logging
import os
import threading
import time

PROFILE_ENV = "LAWCHAT_PROFILE_STEPS"     # "N" or "N@R": one window of N steps once R sequences run (default 1)
SETTLE_S = 0.05                           # the profiler's start, before a window's clock runs
MAX_PROFILE_STEPS = 1000                  # the profiler keeps every kernel of the window in memory (~350 a 6B decode step)

log = logging.getLogger("lawchat.engine")


def busy_and_gaps(spans: list[tuple[float, float]]) -> tuple[float, float, list[float]]:
    """Kernel (start, end) µs intervals -> (busy µs as their union, span µs, the gaps between them)."""
    spans = sorted(spans)
    if not spans:
        return 0.0, 0.0, []
    busy, gaps = 0.0, []
    cur_s, cur_e = spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy, spans[-1][1] - spans[0][0], gaps


def profile_steps(engine, steps: int, cuda: bool) -> str:
    """Profile the engine's next `steps` steps (blocks until they ran) -> a summary: wall time a step, the share of
    the window's kernel span the GPU was busy, the gaps between kernels, the kernels by GPU time. CUDA kernels only:
    on CPU the steps are counted and nothing is recorded (the profiler, started off the engine thread, sees no CPU
    ops of it and crashed recording them).

    Wall time a step is the engine's own step count over the window's clock time. The kernels recorded are not
    those of exactly these steps (the profiler needs a while to start recording, and steps run ahead of the GPU):
    divide their busy time by the steps counted and a step looks shorter than it is. So the GPU's share is taken
    from the kernels alone (busy over their span), and a step's GPU time is that share of its wall time."""
    if not cuda:
        s0 = engine._steps
        _wait_steps(engine, s0 + steps)
        return f"profiler window: {engine._steps - s0} steps, no kernels recorded (the window records CUDA kernels)"
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        time.sleep(SETTLE_S)                       # recording has begun before the clock starts
        s0, t0 = engine._steps, time.perf_counter()
        _wait_steps(engine, s0 + steps)
        n, wall = max(1, engine._steps - s0), time.perf_counter() - t0
    busy, span, gaps = busy_and_gaps([(e.time_range.start, e.time_range.end) for e in prof.events()
                                      if e.device_type.name == "CUDA"])
    if not span:
        return f"profiler window: {n} steps, no kernels recorded"
    big = [g for g in gaps if g > 50]
    share = busy / span
    return (f"profiler window: {n} steps in {wall * 1e3:.1f} ms = {wall / n * 1e3:.2f} ms a step; GPU busy {share:.0%} "
            f"of the kernels' span ({span / 1e3:.1f} ms) = {share * wall / n * 1e3:.2f} ms a step; gaps > 50 us: "
            f"{len(big)}, their sum {sum(big) / 1e3:.2f} ms; largest {[round(g) for g in sorted(gaps)[-5:]]} us\n"
            + prof.key_averages().table(sort_by="device_time_total", row_limit=14, max_name_column_width=60))


def _wait_steps(engine, until: int) -> None:
    while engine._steps < until and engine.alive:
        time.sleep(0.002)


def profile_from_env(engine, cuda: bool) -> None:
    """With LAWCHAT_PROFILE_STEPS=N[@R]: log one profile window of N steps once R sequences run (a thread)."""
    spec = os.environ.get(PROFILE_ENV)
    if not spec:
        return
    n, _, r = spec.partition("@")
    try:
        steps, running = int(n), int(r or 1)
    except ValueError:
        steps = running = 0
    if not 1 <= steps <= MAX_PROFILE_STEPS or running < 1:
        log.warning("%s=%r: not N or N@R with 1 <= N <= %d and R >= 1; no profile window", PROFILE_ENV, spec,
                    MAX_PROFILE_STEPS)
        return
    if running > engine.config.max_num_seqs:
        log.warning("%s=%r: the engine runs at most %d sequences (engine.max_num_seqs); no profile window", PROFILE_ENV,
                    spec, engine.config.max_num_seqs)
        return

    def watch() -> None:
        while engine.alive and engine.running < running:
            time.sleep(0.01)
        if engine.alive:
            now = engine.running
            log.info("%s=%s (%d sequences running): %s", PROFILE_ENV, spec, now, profile_steps(engine, steps, cuda))
    threading.Thread(target=watch, name="lawchat-profile", daemon=True).start()
