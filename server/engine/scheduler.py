"""scheduler: decide each step's work — a decode token for every running sequence, plus prompt chunks.

Continuous batching: sequences join and leave at every step. Each step decodes one token for every running
sequence whose prompt is done, and spends up to `max_prefill_tokens` on prompts (running ones mid-prompt
first, then newcomers in arrival order), so a long prompt is computed in chunks and never stalls the others
for more than one chunk. When the KV cache is full, the newest running sequence is preempted: its blocks are
freed and it goes back to the head of the queue, to be recomputed (prompt + what it generated so far).
A sequence on a LoRA adapter holds one of the adapter slots while it runs; a newcomer whose adapter finds every
slot held by running sequences waits (first come, first served), like one that finds the KV cache full.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class Step:
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)   # (sequence, tokens to compute)
    decode: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_prefill_tokens: int, adapters=None):
        self.blocks = blocks
        self.adapters = adapters               # lora.AdapterSlots, or None (no adapters served)
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # in admission order: the newest is preempted first
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take seq out (finished or cancelled) and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._release_adapter(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED

    def _release_adapter(self, seq: Sequence) -> None:
        if self.adapters is not None:
            self.adapters.release(seq.adapter)

    def _preempt(self, seq: Sequence, step: Step) -> None:
        self.running.remove(seq)
        self._release_adapter(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        step.preempted.append(seq)

    def _make_room(self, seq: Sequence, n_blocks: int, step: Step, scheduled: set[int]) -> bool:
        """Preempt the newest running sequences not yet scheduled until n_blocks are free."""
        while not self.blocks.can_allocate(n_blocks):
            victim = next((s for s in reversed(self.running) if s is not seq and s.seq_id not in scheduled), None)
            if victim is None:
                return False
            self._preempt(victim, step)
        return True

    def schedule(self) -> Step:
        step = Step()
        scheduled: set[int] = set()
        bm = self.blocks
        # 1. one decode token for each sequence whose prompt is computed
        for seq in [s for s in self.running if s.num_pending == 1]:
            if seq.status is not Status.RUNNING:      # preempted by an earlier sequence of this loop
                continue
            if seq.num_output >= seq.max_new_tokens:  # its last token is in flight (overlap): it finishes with it
                continue
            if not self._make_room(seq, bm.blocks_needed(seq, len(seq)), step, scheduled):
                self._preempt(seq, step)
                continue
            bm.allocate(seq, len(seq))
            step.decode.append(seq)
            scheduled.add(seq.seq_id)
        # 2. prompt chunks: running sequences mid-prompt first
        budget = self.max_prefill_tokens
        for seq in [s for s in self.running if s.num_pending > 1]:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue
            n = self._fit(seq, min(seq.num_pending, budget))
            if n == 0 and self._make_room(seq, 1, step, scheduled):
                n = self._fit(seq, min(seq.num_pending, budget))
            if n == 0:
                continue
            bm.allocate(seq, seq.num_computed + n)
            step.prefill.append((seq, n))
            scheduled.add(seq.seq_id)
            budget -= n
        # 3. newcomers, in arrival order, while the budget, the batch and the cache allow; a watermark of free
        #    blocks is kept for the running sequences' next tokens (else a newcomer is preempted at once)
        watermark = max(1, bm.num_total // 100) if self.running else 0
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.pending_row is not None:           # preempted with a token still in flight: next step
                break
            if self.adapters is not None and not self.adapters.acquire(seq.adapter):
                break                                 # every adapter slot is in use: wait for one
            bm.match_prefix(seq)
            if bm.next_block_inflight(seq):           # a running sequence is computing this prefix: take it from
                bm.release(seq)                       # the cache next step instead of computing it twice
                self._release_adapter(seq)
                bm.deferrals += 1
                break
            n = self._fit(seq, min(seq.num_pending, budget), reserve=watermark)
            if n == 0:
                bm.release(seq)
                self._release_adapter(seq)
                break
            self.waiting.popleft()
            bm.record_admission(seq)
            bm.mark_inflight(seq)
            bm.allocate(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            if seq.queue_seconds is None:
                seq.queue_seconds = time.monotonic() - seq.arrival
            self.running.append(seq)
            step.prefill.append((seq, n))
            scheduled.add(seq.seq_id)
            budget -= n
        return step

    def _fit(self, seq: Sequence, want: int, reserve: int = 0) -> int:
        """How many of seq's next `want` tokens fit in its blocks plus the free ones (less `reserve` blocks)."""
        free = max(0, self.blocks.num_free - reserve)
        room = (len(seq.block_table) + free) * self.blocks.block_size - seq.num_computed
        return max(0, min(want, room))
