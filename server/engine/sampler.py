"""sampler: pick next tokens for a batch on the device (greedy, temperature, top-k, top-p, per-request seed).

Randomness is counter-based: the Gumbel noise of a token is a hash of (request seed, output index, token id),
so a seeded request draws the same tokens whatever else shares its batch, after a preemption too, and
no per-request generator object has to live on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = no limit
    seed: int | None = None         # None: the engine draws one


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """seeds, steps: (N,) int64 -> (N, vocab) float32 standard Gumbel noise, a pure function of its inputs."""
    row = _hash32(_hash32(seeds & MASK32) ^ _hash32((seeds >> 32) & MASK32) ^ ((steps * 0x9E3779B1) & MASK32))
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _hash32(row[:, None] ^ _hash32(ids)[None, :])                   # (N, vocab)
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))                    # (0, 1)
    return -torch.log(-torch.log(u))


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits: (N, V) already divided by temperature; top_k (N,) int (0 = off), top_p (N,) float."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= (probs.cumsum(-1) - probs) > top_p[:, None]                  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@dataclass
class SamplingBatch:
    """Per-row parameters of one step, as device tensors (built by the engine from its sequences)."""
    temperature: torch.Tensor       # (N,) float32
    top_p: torch.Tensor             # (N,) float32
    top_k: torch.Tensor             # (N,) int64
    seed: torch.Tensor              # (N,) int64
    step: torch.Tensor              # (N,) int64: index of the token being drawn in the request's output
    all_greedy: bool
    any_filter: bool


def sample(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """logits: (N, V) float32 -> (N,) int64 token ids, on the same device (no host sync)."""
    greedy = logits.argmax(dim=-1)
    if b.all_greedy:
        return greedy
    temp = b.temperature.clamp_min(1e-5)[:, None]
    scaled = logits / temp
    if b.any_filter:
        scaled = filter_top_k_top_p(scaled, b.top_k, b.top_p)
    drawn = (scaled + gumbel_noise(b.seed, b.step, logits.shape[-1])).argmax(dim=-1)
    return torch.where(b.temperature > 0, drawn, greedy)
