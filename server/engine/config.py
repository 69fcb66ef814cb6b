"""config: engine settings (the `engine:` section of configs/server.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field


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
    adapters: dict[str, str] = field(default_factory=dict)   # LoRA adapters served unmerged over the model:
                                            # name -> PEFT adapter dir (`lawchat serve --adapter NAME=DIR`)
    default_adapter: str | None = None      # the adapter of requests that name none (null: the base model)
    max_loras: int | None = None            # GPU slots for adapters used at once (null: 4 when adapters are
                                            # configured, else 0 = no adapters, LoadAdapter refused)
    max_lora_rank: int = 16                 # the largest rank served (sizes the slots)
    trace: str | None = None                # profiling: a JSON line per step (times, prompt tokens, decode rows) and
                                            # per request (arrival, admitted, first token), time.monotonic seconds
    lora_target_modules: list[str] | None = None   # projections adapters may adapt (q_proj, k_proj, v_proj, o_proj,
                                            # gate_proj, up_proj, gate_up_proj, down_proj): each costs slot memory
                                            # and two kernels per layer in every decode step; null = those of the
                                            # configured adapters, or all when none is configured

    def remember_adapter(self, name: str, path: str) -> None:
        """An adapter loaded at run time: a restarted or reloaded engine serves it again."""
        self.adapters[name] = str(path)

    def forget_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)
        if self.default_adapter == name:
            self.default_adapter = None

    @property
    def lora_slots(self) -> int:
        return self.max_loras if self.max_loras is not None else (4 if self.adapters else 0)

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
        if self.lora_slots < 0 or self.max_lora_rank < 1:
            raise ValueError("engine: max_loras must be >= 0 and max_lora_rank >= 1")
        if not isinstance(self.adapters, dict):
            raise ValueError("engine.adapters must map adapter names to PEFT adapter directories")
        if self.lora_target_modules is not None:
            from .lora import HF_PIECES
            bad = sorted(set(self.lora_target_modules) - set(HF_PIECES))
            if bad or not self.lora_target_modules:
                raise ValueError(f"engine.lora_target_modules: {bad or 'empty'}; choose from {', '.join(HF_PIECES)}")
        if self.adapters and self.lora_slots == 0:
            raise ValueError("engine.adapters are configured but engine.max_loras is 0")
        if self.default_adapter is not None and self.default_adapter not in self.adapters:
            raise ValueError(f"engine.default_adapter {self.default_adapter!r} is not one of engine.adapters "
                             f"({', '.join(self.adapters) or 'none'})")
        if self.attention not in ("auto", "triton", "torch"):
            raise ValueError(f"engine.attention must be auto, triton or torch, got {self.attention!r}")
