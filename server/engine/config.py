"""config: engine settings (the `engine:` section of configs/server.yaml)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    max_num_seqs: int = 256                 # sequences decoded together (the largest CUDA-graph batch)
    max_prefill_tokens: int = 8192          # prompt tokens computed per step: bounds a long prompt's stall
    max_waiting: int = 64                   # queued requests beyond this get RESOURCE_EXHAUSTED
    block_size: int = 16                    # tokens per KV-cache block (also the prefix-cache granularity)
    gpu_memory_fraction: float = 0.90       # CUDA: share of the card's memory the process may fill (KV included)
    cpu_kv_cache_tokens: int = 32768        # CPU: KV-cache size in tokens
    num_kv_blocks: int | None = None        # fixed number of KV blocks (overrides the two above)
    max_model_len: int | None = None        # cap on prompt + answer tokens (null = the model's own limit)
    enable_prefix_caching: bool = True      # share blocks of identical prompt prefixes
    cuda_graphs: bool = True                # CUDA: capture the decode step per batch-size bucket
    attention: str = "auto"                 # auto (Triton on CUDA, else torch), triton, torch
    fused_ops: bool = True                  # CUDA: Triton kernels for add+RMSNorm, rotary+KV write, SiLU*up
    separate_process: bool = True           # `lawchat serve`: the engine in its own process, gRPC in this one
    fast_path: bool = True                  # false: always run the model through HF modules (generic path)
    overlap: bool = True                    # fast path: prepare and launch step N+1 while step N runs on the GPU
                                            # (the sampled ids stay on the device as the next inputs; an EOS is
                                            # seen one step late, its extra token dropped)
    warmup: str = "auto"                    # before serving: full (a burst through the engine: prefill chunk sizes,
                                            # mixed steps, every sampling path, stop strings), minimal (one short
                                            # greedy request), auto (full on CUDA, minimal elsewhere)

    def validate(self) -> None:
        if self.max_num_seqs < 1 or self.max_prefill_tokens < 1 or self.max_waiting < 0:
            raise ValueError("engine: max_num_seqs and max_prefill_tokens must be >= 1, max_waiting >= 0")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"engine.block_size must be a power of two >= 16, got {self.block_size}")
        if not 0.1 <= self.gpu_memory_fraction <= 0.99:
            raise ValueError(f"engine.gpu_memory_fraction must be in [0.1, 0.99], got {self.gpu_memory_fraction}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"engine.max_model_len must be >= 2 or null, got {self.max_model_len}")
        if self.warmup not in ("auto", "full", "minimal"):
            raise ValueError(f"engine.warmup must be auto, full or minimal, got {self.warmup!r}")
        if self.attention not in ("auto", "triton", "torch"):
            raise ValueError(f"engine.attention must be auto, triton or torch, got {self.attention!r}")
