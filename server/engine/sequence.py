"""sequence: the per-request state the scheduler, block manager and runner share."""
from __future__ import annotations

import itertools
import time
from enum import Enum

from .sampler import SamplingParams

_ids = itertools.count()
PENDING = -1          # a sampled token still on the device (overlapped steps): its value comes one step later


class Status(Enum):
    WAITING = "waiting"      # queued, or preempted and waiting to be recomputed
    RUNNING = "running"      # holds KV blocks; prefilling or decoding
    FINISHED = "finished"


class Sequence:
    def __init__(self, prompt_ids: list[int], sampling: SamplingParams, max_new_tokens: int, seed: int,
                 ignore_eos: bool = False, adapter=None):
        self.seq_id = next(_ids)
        self.token_ids = list(prompt_ids)     # prompt + output so far
        self.num_prompt = len(prompt_ids)
        self.sampling = sampling
        self.seed = seed                      # the request's seed, or one the engine drew
        self.max_new_tokens = max_new_tokens
        self.ignore_eos = ignore_eos
        self.adapter = adapter                # lora.Adapter or None (the base model)
        self.cache_salt = adapter.salt if adapter is not None else None   # prefix blocks never shared across adapters
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0                 # tokens whose K/V are in the cache
        self.hashed_blocks = 0                # leading blocks registered in the prefix cache
        self.last_hash: bytes | None = None   # digest of the last of those
        self.block_hashes: tuple[int, list[bytes]] | None = None   # (length hashed, full-block chain hashes): cache
        self.finish_reason: str | None = None
        self.aborted = False                  # set outside the engine thread (client gone, deadline, stop
                                              # sequence matched): the engine drops it at its next step
        self.preemptions = 0
        self.arrival = time.monotonic()
        self.pending_row: int | None = None   # the last token is PENDING: its row in the last launched step
        self.pending_handle = None            # ... of that step
        self.queue_seconds: float | None = None   # arrival -> first admitted to the running set

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_pending(self) -> int:
        """Tokens to feed before the next one can be sampled (1 = a decode step)."""
        return len(self.token_ids) - self.num_computed

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, tokens={len(self)}, computed={self.num_computed}, "
                f"blocks={len(self.block_table)})")
