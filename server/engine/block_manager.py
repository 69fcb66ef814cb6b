"""block_manager: the paged KV cache's bookkeeping: fixed-size blocks, block tables, prefix caching.

Block 0 is never handed out: padded rows of a captured decode batch write their K/V there. A full block is
registered under a hash chained over every token before it, so a later prompt with the same prefix (a system
prompt, a repeated conversation) reuses the block instead of recomputing it. The hash is keyed BLAKE2b (a
secret key per process) over the parent block's digest and the block's token ids: Python's `hash()` of a tuple
can be made to collide, and a collision would hand one user's cached prefix to another (vLLM's
CVE-2025-25183). Blocks a running sequence is still computing are known by their hash too (`inflight`): a
newcomer whose next uncached block is among them waits a step and then takes it from the cache, instead of
computing the same prefix again beside it (a burst of requests with one system prompt computes it once).
A sequence on a LoRA adapter salts its chain with the adapter's load id: the same tokens under
another adapter (or another load of it) have other K/V and never share blocks. Freed blocks keep their hash
and content until they are handed out again (least recently freed first), so a prefix survives its request.
"""
from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict

from .sequence import Sequence

_KEY = os.urandom(32)      # per process: block digests are never shared outside it


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(prev: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """The block's key: keyed BLAKE2b over the parent's digest and the ids (int64 each), 16 bytes."""
    return hashlib.blake2b((prev or b"") + array("q", token_ids).tobytes(), digest_size=16, key=_KEY).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.by_hash: dict[bytes, int] = {}
        self.prefix_caching = enable_prefix_caching
        self.prefix_queries = 0     # prompt tokens looked up
        self.prefix_hits = 0        # of those, found in the cache
        self.inflight: dict[bytes, int] = {}   # hash of a full block a running sequence is computing -> its seq_id
        self.deferrals = 0          # newcomers that waited a step for a block being computed

    # -- capacity --------------------------------------------------------------------------------
    @property
    def num_total(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_total - self.num_free

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks seq needs to hold its first num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # -- allocation ------------------------------------------------------------------------------
    def _take_free(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.by_hash.get(block.hash) == block_id:
            del self.by_hash[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block

    def block_hashes(self, seq: Sequence) -> list[bytes]:
        """Chain hashes of seq's full blocks that admission may look up (all but a last token), cached on seq."""
        limit = (len(seq) - 1) // self.block_size
        cached = seq.block_hashes
        if cached is None or cached[0] != len(seq):
            bs, prev, hashes = self.block_size, seq.cache_salt, []
            for i in range(limit):
                prev = chain_hash(prev, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
                hashes.append(prev)
            cached = seq.block_hashes = (len(seq), hashes)
        return cached[1]

    def match_prefix(self, seq: Sequence) -> int:
        """Admission: share cached blocks of seq's leading full blocks; -> tokens found.

        At least the last token is left to compute, since its logits are needed to sample.
        """
        if not self.prefix_caching or seq.block_table:
            return 0
        bs, prev, hits = self.block_size, seq.cache_salt, 0
        hashes = self.block_hashes(seq)
        for i, h in enumerate(hashes):
            ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block_id = self.by_hash.get(h)
            if block_id is None or self.blocks[block_id].token_ids != ids:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free.pop(block_id)
            block.ref_count += 1
            seq.block_table.append(block_id)
            prev, hits = h, hits + bs
        seq.hashed_blocks, seq.last_hash = hits // bs, prev if hits else None
        seq.num_computed = hits
        return hits

    def next_block_inflight(self, seq: Sequence) -> bool:
        """After match_prefix: is seq's first uncached block being computed by a running sequence right now?"""
        if not self.prefix_caching:
            return False
        hashes = self.block_hashes(seq)
        i = seq.num_computed // self.block_size
        return i < len(hashes) and hashes[i] in self.inflight

    def mark_inflight(self, seq: Sequence) -> None:
        """seq was admitted: the full blocks it will compute are in flight until registered (or it is released)."""
        if self.prefix_caching:
            for h in self.block_hashes(seq)[seq.num_computed // self.block_size:]:
                self.inflight.setdefault(h, seq.seq_id)

    def _clear_inflight(self, seq: Sequence) -> None:
        if self.inflight and seq.block_hashes is not None:
            for h in seq.block_hashes[1]:
                if self.inflight.get(h) == seq.seq_id:
                    del self.inflight[h]

    def record_admission(self, seq: Sequence) -> None:
        """Count a first admission's prompt tokens and how many of them the prefix cache had."""
        if seq.preemptions == 0:
            self.prefix_queries += seq.num_prompt
            self.prefix_hits += min(seq.num_computed, seq.num_prompt)

    def can_allocate(self, n_blocks: int) -> bool:
        return n_blocks <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to hold num_tokens tokens (the caller checked can_allocate)."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_free().block_id)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: give each newly full, computed block of seq its prefix hash."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        known = seq.block_hashes[1] if seq.block_hashes is not None else []    # hashed at admission
        for i in range(seq.hashed_blocks, seq.num_computed // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                h = known[i] if i < len(known) else chain_hash(seq.last_hash if i else seq.cache_salt, ids)
                block.hash, block.token_ids = h, ids
                self.by_hash.setdefault(block.hash, block.block_id)
            seq.last_hash = block.hash
            seq.hashed_blocks = i + 1

    def release(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody uses go back to the free list (hash kept for reuse)."""
        self._clear_inflight(seq)
        for block_id in reversed(seq.block_table):   # tail first: it is evicted before the shared head
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed = seq.hashed_blocks = 0
        seq.last_hash = None
