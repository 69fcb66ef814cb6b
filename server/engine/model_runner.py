"""model_runner: load a merged model dir and run one engine step (prefill chunks + a decode batch) on it.

`load_runner` picks the path: `FastRunner` (lawchat's own GLM/Llama/Qwen2 decoder on a paged KV cache, the
decode step captured in CUDA graphs per batch-size bucket) or `HFRunner` (any other causal LM through HF
modules, one sequence at a time). Both expose `launch(prefill, decode) -> StepHandle` and `execute()` (launch and
wait), with one host sync per step: the sampled ids that streaming needs. The fast path's launch returns before
the GPU is done (the ids are copied to pinned memory behind the step), and a decode row whose last token is
still PENDING reads it from the previous step's sampled ids on the device — so the engine can prepare step N+1
while step N runs.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..prompt import check_template, encode_prompt
from .attention import AttentionMetadata, PrefillBatch
from .config import EngineConfig
from .lora import LoraBatch, LoraPool, LoraShape, segments_of, served_modules
from .model import FastModel, supports_fast_path
from .sampler import SamplingBatch, SamplingParams, sample
from .sequence import Sequence


class StepHandle:
    """One launched step: `result()` waits for its sampled ids -> (sampled sequences, token ids)."""

    def __init__(self, sampled: list[Sequence], tokens: torch.Tensor | None = None):
        self.sampled = sampled
        self.event = None
        if tokens is None:
            self.host = None
        elif tokens.is_cuda:   # copy behind the step; only this copy is waited for, not later steps
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tokens

    def result(self) -> tuple[list[Sequence], list[int]]:
        if self.host is None:
            return [], []
        if self.event is not None:
            self.event.synchronize()
        return self.sampled, self.host.tolist()

log = logging.getLogger("lawchat.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BGMV_PREFILL_ROWS = 256    # a step with up to this many prompt rows adds their adapters with the BGMV kernels too
                           # (one launch per projection instead of several small matmuls per prompt chunk)
ROW_MULTIPLE = 32       # CUDA: a mixed step's rows are padded to a multiple of this (scratch rows after its decode
                        # rows), so its GEMMs meet only the row counts warm_gemms ran before serving
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_runner(model_dir: str | Path, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False,
                config: EngineConfig | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = config or EngineConfig()
    config.validate()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model directory (no config.json)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    check_template(tokenizer, str(model_dir))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt, trust_remote_code=trust_remote_code).to(dev).eval()
    if config.fast_path and supports_fast_path(hf.config):
        return FastRunner(model_dir, hf, tokenizer, dev, config)
    log.warning("%s: model_type %r is not on the fast path (glm, llama, qwen2, mistral): generic HF path, "
                "one sequence at a time, no CUDA graphs or prefix caching", model_dir, hf.config.model_type)
    return HFRunner(model_dir, hf, tokenizer, dev, config)


class BaseRunner:
    """What both paths share: tokenizer, stop ids, limits, the batched sampler's inputs."""

    def __init__(self, model_dir: Path, hf_config, generation_config, tokenizer, device: torch.device,
                 dtype: torch.dtype, config: EngineConfig):
        self.model_dir, self.tokenizer, self.device, self.dtype, self.config = model_dir, tokenizer, device, dtype, config
        self.max_len = int(getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "seq_length", 2048))
        if config.max_model_len is not None:
            self.max_len = min(self.max_len, config.max_model_len)
        self.eos_ids = self._eos_ids(hf_config, generation_config, tokenizer)
        self.vocab_size = hf_config.vocab_size
        self.block_size = config.block_size
        self.num_blocks = 0
        self.prefix_caching = False
        self.attention_backend = "hf"
        self.graph_batch_sizes: list[int] = []
        self.overlap = False            # launch() may return before the step is done (fast path only)
        self.rerunnable = False         # a failed step may be launched again, in parts (the engine isolates it)
        self.lora: LoraPool | None = None   # the adapter pool (fast path, engine.max_loras > 0)

    def execute(self, prefill: list[tuple[Sequence, int]], decode: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """launch() and wait for the sampled ids."""
        return self.launch(prefill, decode).result()

    @staticmethod
    def _eos_ids(hf_config, generation_config, tokenizer) -> frozenset[int]:
        ids: set[int] = set()
        for src in (getattr(generation_config, "eos_token_id", None), hf_config.eos_token_id, tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(i) for i in src)
        return frozenset(ids)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_prompt(self.tokenizer, messages)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host -> device without a stream sync: a pageable-memory copy would wait for the steps already queued
        (and so undo the overlap); a pinned one is asynchronous."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        temps = [s.sampling.temperature for s in seqs]
        all_greedy = all(t == 0.0 for t in temps)
        if all_greedy:
            empty = torch.empty(0, device=self.device)
            return SamplingBatch(empty, empty, empty, empty, empty, True, False)
        top_p = [s.sampling.top_p for s in seqs]
        top_k = [s.sampling.top_k for s in seqs]
        ints = torch.tensor([top_k, [s.seed for s in seqs], [s.num_output for s in seqs]], dtype=torch.int64)
        floats = torch.tensor([temps, top_p], dtype=torch.float32)
        ints, floats = self.to_device(ints), self.to_device(floats)
        any_filter = any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p)
        return SamplingBatch(floats[0], floats[1], ints[0], ints[1], ints[2], False, any_filter)

    def release(self, seq: Sequence) -> None:
        """seq left the running set (finished, cancelled, preempted)."""

    def allocator_counters(self) -> dict[str, int]:
        """For the step trace: the CUDA caching allocator's running counts of cudaMalloc calls and of retries
        (a failed cudaMalloc frees every cached block, which waits for the whole device first)."""
        if self.device.type != "cuda":
            return {}
        st = torch.cuda.memory_stats(self.device)
        return {"cuda_mallocs": st.get("num_device_alloc", 0), "alloc_retries": st.get("num_alloc_retries", 0)}

    def warm_gemms(self) -> dict:
        """The fast path runs its GEMM shapes before serving (FastRunner.warm_gemms); nothing here."""
        return {}

    def warmup(self) -> None:
        """A short greedy generation so the first request pays no start-up cost (kernels, allocator)."""
        seq = Sequence(self.encode_chat([{"role": "user", "content": "你好"}]), SamplingParams(), 2, seed=0)
        seq.block_table = list(range(1, 1 + -(-(len(seq) + 2) // self.block_size)))
        _, toks = self.execute([(seq, len(seq))], [])
        seq.num_computed = len(seq)
        seq.token_ids.append(toks[0])
        self.execute([], [seq])
        self.release(seq)


class FastRunner(BaseRunner):
    path = "fast"

    def __init__(self, model_dir: Path, hf, tokenizer, device: torch.device, config: EngineConfig):
        super().__init__(model_dir, hf.config, hf.generation_config, tokenizer, device, hf.dtype, config)
        self.rerunnable = True     # a step only writes K/V at its own slots: running it again writes the same
        self.model = FastModel(hf)
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
        s = self.model.shape
        self.prefix_caching = config.enable_prefix_caching
        self.overlap = config.overlap
        self.last_tokens: torch.Tensor | None = None    # the last launched step's sampled ids, on the device
        self.row_multiple = ROW_MULTIPLE if device.type == "cuda" else 1
        self.attention_backend = ("triton" if device.type == "cuda" else "torch") if config.attention == "auto" \
            else config.attention
        if self.attention_backend == "triton" and device.type != "cuda":
            raise ValueError("engine.attention: triton needs a CUDA device")
        if device.type == "cuda" and config.fused_ops:
            from . import triton_ops
            self.model.fused = triton_ops
        if config.lora_slots:             # adapter slots (engine.max_loras), before the KV cache takes the rest
            shape = LoraShape(s.num_layers, s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                              self.model.layers[0].gate_up_w.shape[0] // 2, config.max_lora_rank)
            self.lora = LoraPool(shape, config.lora_slots, self.dtype, device, served_modules(config))
            log.info("LoRA pool: %d slots of rank %d on %s (%.2f GiB)", config.lora_slots, config.max_lora_rank,
                     ",".join(self.lora.modules), self.lora.nbytes / 2**30)
        bytes_per_token = s.num_layers * 2 * s.num_kv_heads * s.head_dim * torch.finfo(self.dtype).bits // 8
        self.num_blocks = self._num_blocks(bytes_per_token)
        self.kv_cache = torch.zeros(s.num_layers, 2, self.num_blocks, self.block_size, s.num_kv_heads, s.head_dim,
                                    dtype=self.dtype, device=device)
        self.max_len = min(self.max_len, (self.num_blocks - 1) * self.block_size)
        self.max_blocks_per_seq = -(-self.max_len // self.block_size)
        self.model.build_rotary(self.max_len)
        log.info("fast path: KV cache %d blocks x %d tokens (%.2f GiB), max_len %d, attention %s, fused ops %s",
                 self.num_blocks, self.block_size, self.kv_cache.numel() * self.kv_cache.element_size() / 2**30,
                 self.max_len, self.attention_backend, self.model.fused is not None)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if device.type == "cuda" and config.cuda_graphs and self.attention_backend == "triton":
            self._capture_graphs()
        if self.attention_backend == "triton":
            self._compile_decode_kernels()

    def _num_blocks(self, bytes_per_token: int) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        useful = cfg.max_num_seqs * self.max_len // self.block_size + 1   # more than this is never used
        if self.device.type != "cuda":
            return min(useful, cfg.cpu_kv_cache_tokens // self.block_size)
        free, total = torch.cuda.mem_get_info(self.device)
        # room for activations, logits and sampler buffers of the largest step
        reserve = 2 * 2**30 + cfg.max_num_seqs * self.vocab_size * 4 * 8
        budget = total * cfg.gpu_memory_fraction - (total - free) - reserve
        n = int(budget // (bytes_per_token * self.block_size))
        if n < 2:
            raise ValueError(f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free of "
                             f"{total / 2**30:.1f}); raise engine.gpu_memory_fraction or use a smaller model")
        return min(n, useful)

    @torch.inference_mode()
    def warm_gemms(self) -> dict:
        """The projections at every row count a mixed step can give them (multiples of row_multiple up to
        max_prefill_tokens + max_num_seqs) and the LM head at every count of sampled rows, once, before serving.
        cuBLAS meets a new row count with a first call of ~3 ms on the host, and some first calls wait for all
        the work queued on the GPU: a mixed step of 8,192 prompt rows + n decode rows stalled its launch
        160-340 ms until the steps before it had finished (H100, the engine alone, 128 x 900-token prompts: TTFT
        p50 1,536 ms in a shape's first round, 1,362 ms in its second; with this, 1,348 in the first). Eager
        module loading (CUDA_MODULE_LOADING=EAGER) did not remove those first-call costs. ~1 s on an H100.
        -> what it ran."""
        if self.device.type != "cuda":
            return {}
        t0 = time.perf_counter()
        most = self.config.max_prefill_tokens + self.config.max_num_seqs     # the most rows a step has, padded
        rows = -(-most // self.row_multiple) * self.row_multiple
        layer, s = self.model.layers[0], self.model.shape
        projections = [(layer.qkv_w, layer.qkv_b), (layer.o_w, layer.o_b), (layer.gate_up_w, None),
                       (layer.down_w, None)]
        inputs = {}
        for w, b in projections:                       # as forward calls them: F.linear, bias or none
            x = inputs.setdefault(w.shape[1], torch.zeros(rows, w.shape[1], dtype=self.dtype, device=self.device))
            for m in range(self.row_multiple, rows + 1, self.row_multiple):
                F.linear(x[:m], w, b)
        x = inputs[s.hidden_size]
        for m in range(1, self.config.max_num_seqs + 1):   # logits: one row per sampled sequence
            F.linear(x[:m], self.model.lm_head)
        torch.cuda.synchronize(self.device)
        return {"gemm_row_counts": rows, "gemm_seconds": round(time.perf_counter() - t0, 2)}

    # -- steps -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, prefill: list[tuple[Sequence, int]], decode: list[Sequence]) -> StepHandle:
        """One forward pass for the whole step: prefill chunks and decode rows together (a decode-only step may
        replay a CUDA graph)."""
        if prefill:
            logits, sampled = self._mixed(prefill, decode)
        elif decode:
            logits, sampled = self._decode(decode), decode
        else:
            return StepHandle([])
        if not sampled:       # only chunks that do not finish their prompt: nothing to sample
            return StepHandle([])
        tokens = sample(logits, self.sampling_batch(sampled))
        self.last_tokens = tokens
        return StepHandle(sampled, tokens)       # its result() is the one host sync of the step

    def _pending_ids(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows of seqs whose last token is PENDING, their rows in the last step's ids), on the device."""
        rows = [(i, s.pending_row) for i, s in enumerate(seqs) if s.pending_row is not None]
        if not rows:
            return None
        idx = self.to_device(torch.tensor(rows, dtype=torch.int64).T.contiguous())
        return idx[0], idx[1]

    def _fill_pending(self, ids: torch.Tensor, pending) -> None:
        """Input ids of PENDING rows <- the last step's sampled ids, on the device (no host sync)."""
        if pending is not None:
            ids.index_copy_(0, pending[0], self.last_tokens.index_select(0, pending[1]))

    def _slots(self, seq: Sequence, n: int) -> np.ndarray:
        """Cache slots of positions [0, n) of seq, on the host."""
        bs = self.block_size
        pos = np.arange(n)
        return np.asarray(seq.block_table[: -(-n // bs)], dtype=np.int64)[pos // bs] * bs + pos % bs

    def _decode_rows(self, seqs: list[Sequence], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Host inputs of one decode row per sequence, then `pad` scratch rows (token 0 at position 0 in block 0,
        as a graph's padded rows) -> ((4, B + pad) int64: ids, positions, slots, context lengths; (B + pad, W)
        int32 block tables). A decoding sequence holds exactly ceil(len / block_size) blocks; shorter rows are
        padded with block 0. Built in numpy: torch.tensor of Python lists took ~2x as long (0.55 vs 0.30 ms at
        256 rows on 2 CPU cores), on the host path of every step."""
        bs = self.block_size
        ctx = [len(s) for s in seqs] + [1] * pad
        slots = [s.block_table[(c - 1) // bs] * bs + (c - 1) % bs for s, c in zip(seqs, ctx)] + [0] * pad
        host = np.array([[s.token_ids[-1] for s in seqs] + [0] * pad, ctx, slots, ctx], dtype=np.int64)
        host[1] -= 1
        tables = np.zeros((len(seqs) + pad, max((len(s.block_table) for s in seqs), default=1)), dtype=np.int32)
        for row, s in zip(tables, seqs):
            row[:len(s.block_table)] = s.block_table
        return torch.from_numpy(host), torch.from_numpy(tables)

    def _mixed(self, chunks: list[tuple[Sequence, int]], decode: list[Sequence]) -> tuple[torch.Tensor, list[Sequence]]:
        """Prefill chunks (rows first) and decode rows (one per sequence, after them) in one forward pass. A chunk's
        ids, positions and cache slots are built in numpy (per-token Python took 2.2 ms of host time for 9 x 900
        prompt rows on 2 CPU cores, numpy 0.3 ms)."""
        parts: list[np.ndarray] = []                       # (3, n) per chunk: ids, positions, slots
        n_rows = 0
        rows: list[int] = []
        sampled: list[Sequence] = []
        bounds: list[tuple[int, int, int, int]] = []       # (q_start, q_len, k_start, k_len) per chunk
        any_context = any(seq.num_computed for seq, _ in chunks)
        kv_parts: list[np.ndarray] = []                    # only when some chunk continues cached context
        k_total = 0
        for seq, n in chunks:
            start = seq.num_computed
            bounds.append((n_rows, n, k_total, start + n))
            k_total += start + n
            n_rows += n
            context = self._slots(seq, start + n)         # the chunk's slots are its tail
            if any_context:
                kv_parts.append(context)
            parts.append(np.stack([np.asarray(seq.token_ids[start:start + n], dtype=np.int64),
                                   np.arange(start, start + n), context[start:]]))
            if start + n == len(seq):
                rows.append(n_rows - 1)
                sampled.append(seq)
        n_prefill = n_rows
        cu = self.to_device(torch.tensor([[b[0] for b in bounds] + [n_prefill], [b[2] for b in bounds] + [k_total]],
                                         dtype=torch.int32))
        kv_slots = self.to_device(torch.from_numpy(np.concatenate(kv_parts))) if any_context else None
        pb = PrefillBatch(cu[0], cu[1], max(b[1] for b in bounds), max(b[3] for b in bounds), kv_slots, bounds)
        host = torch.from_numpy(np.concatenate(parts, axis=1))
        tables = ctx_lens = None
        pad = -(n_prefill + len(decode)) % self.row_multiple
        if decode or pad:
            dec, tables = self._decode_rows(decode, pad)
            rows += range(n_prefill, n_prefill + len(decode))
            host = torch.cat([host, dec[:3]], dim=1)
            tables, ctx_lens = self.to_device(tables), self.to_device(dec[3].to(torch.int32))
        host = self.to_device(host)
        if decode:
            self._fill_pending(host[0, n_prefill:], self._pending_ids(decode))
        meta = AttentionMetadata(slot_mapping=host[2], prefill=pb, num_prefill_tokens=n_prefill, block_tables=tables,
                                 context_lens=ctx_lens, use_triton=self.attention_backend == "triton",
                                 num_splits=self._splits(len(decode) + pad) if decode or pad else 1)
        logits = self.model.forward(host[0], host[1], self.kv_cache, meta,
                                    self.to_device(torch.tensor(rows, dtype=torch.int64)),
                                    self._lora_batch(chunks, decode, n_prefill, pad))
        return logits, sampled + decode

    def _lora_batch(self, chunks: list[tuple[Sequence, int]], decode: list[Sequence], n_prefill: int, pad: int = 0):
        """The rows' adapter slots: prefill chunks as torch segments; decode rows (and `pad` scratch rows after
        them, no adapter) through the Triton kernels on CUDA (segments elsewhere). None when no row of the step
        uses an adapter."""
        if self.lora is None or not any(s.adapter for s, _ in chunks) and not any(s.adapter for s in decode):
            return None
        if self.device.type == "cuda" and n_prefill <= BGMV_PREFILL_ROWS:   # few prompt rows: all rows by the kernels
            slots = [s.adapter.slot if s.adapter is not None else -1 for s, n in chunks for _ in range(n)]
            rows = self.to_device(torch.tensor(slots + self._slots_of(decode) + [-1] * pad, dtype=torch.int32))
            return LoraBatch(self.lora, [], rows, 0)
        segs, start = [], 0
        for seq, n in chunks:
            if seq.adapter is not None:
                segs.append((start, start + n, seq.adapter.slot, frozenset(seq.adapter.weights)))
            start += n
        rows = None
        if (decode or pad) and self.device.type == "cuda":
            rows = self.to_device(torch.tensor(self._slots_of(decode) + [-1] * pad, dtype=torch.int32))
        elif decode:
            segs += segments_of(self._slots_of(decode), [s.adapter for s in decode], n_prefill)
        return LoraBatch(self.lora, segs, rows, n_prefill)

    @staticmethod
    def _slots_of(seqs: list[Sequence]) -> list[int]:
        return [s.adapter.slot if s.adapter is not None else -1 for s in seqs]

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        b = len(seqs)
        host, tables = self._decode_rows(seqs)
        bucket = next((g for g in self.graph_batch_sizes if g >= b), None)
        pending = self._pending_ids(seqs)
        if bucket is None:   # eager: CPU, or a batch above the largest graph
            host, tables = self.to_device(host), self.to_device(tables)
            self._fill_pending(host[0], pending)
            meta = AttentionMetadata(slot_mapping=host[2], block_tables=tables,
                                     context_lens=host[3].to(torch.int32), use_triton=self.attention_backend == "triton",
                                     num_splits=self._splits(b))
            return self.model.forward(host[0], host[1], self.kv_cache, meta, lora=self._lora_batch([], seqs, 0))
        self._fill_graph_inputs(host, tables, b, bucket)
        if self.lora is not None:      # the captured graphs add each row's adapter: its slot, -1 for none
            self.g_lora[:b].copy_(self.to_device(torch.tensor(self._slots_of(seqs), dtype=torch.int32)))
            self.g_lora[b:bucket].fill_(-1)
        self._fill_pending(self.g_ids, pending)
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:b]

    # -- CUDA graphs -----------------------------------------------------------------------------
    def _splits(self, batch: int) -> int:
        """Context partitions for the decode kernel: enough programs to fill the card at small batches."""
        if self.device.type != "cuda":
            return 1
        want = max(1, (2 * self.num_sms) // (batch * self.model.shape.num_kv_heads))
        return min(16, 1 << (want.bit_length() - 1))

    def _compile_decode_kernels(self) -> None:
        """Compile the decode kernel for every context split a step can pick (a constexpr: one variant each), so
        that no mixed step of a first burst pays a Triton compile (measured: ~0.2 s each, 2.8x the warm TTFT)."""
        from .triton_attention import paged_decode
        s = self.model.shape
        q = torch.zeros(1, s.num_heads, s.head_dim, dtype=self.dtype, device=self.device)
        tables = torch.zeros(1, 1, dtype=torch.int32, device=self.device)
        lens = torch.ones(1, dtype=torch.int32, device=self.device)
        for splits in sorted({self._splits(b) for b in range(1, self.config.max_num_seqs + 1)}):
            paged_decode(q, self.kv_cache[0], tables, lens, splits)

    def _fill_graph_inputs(self, host: torch.Tensor, tables: torch.Tensor, b: int, bucket: int) -> None:
        dev_host = self.to_device(host)
        self.g_ids[:b].copy_(dev_host[0])
        self.g_pos[:b].copy_(dev_host[1])
        self.g_slots[:b].copy_(dev_host[2])
        self.g_ctx[:b].copy_(dev_host[3])
        self.g_tables[:b, :tables.shape[1]].copy_(self.to_device(tables))
        if bucket > b:   # padded rows: one token in the scratch block 0
            self.g_ids[b:bucket].zero_()
            self.g_pos[b:bucket].zero_()
            self.g_slots[b:bucket].zero_()
            self.g_ctx[b:bucket].fill_(1)

    def _capture_graphs(self) -> None:
        t0 = time.perf_counter()
        sizes = [g for g in GRAPH_BUCKETS if g <= self.config.max_num_seqs]
        if sizes[-1] < self.config.max_num_seqs:
            sizes.append(self.config.max_num_seqs)
        n, dev = sizes[-1], self.device
        self.g_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.g_pos = torch.zeros(n, dtype=torch.int64, device=dev)
        self.g_slots = torch.zeros(n, dtype=torch.int64, device=dev)
        self.g_ctx = torch.ones(n, dtype=torch.int32, device=dev)
        self.g_tables = torch.zeros(n, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.g_lora = torch.full((n,), -1, dtype=torch.int32, device=dev)
        pool = None
        with torch.inference_mode():
            for b in reversed(sizes):
                meta = AttentionMetadata(slot_mapping=self.g_slots[:b], block_tables=self.g_tables[:b],
                                         context_lens=self.g_ctx[:b], use_triton=True, num_splits=self._splits(b))
                lora = LoraBatch(self.lora, rows=self.g_lora[:b]) if self.lora is not None else None
                self.model.forward(self.g_ids[:b], self.g_pos[:b], self.kv_cache, meta, lora=lora)   # compile kernels
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.model.forward(self.g_ids[:b], self.g_pos[:b], self.kv_cache, meta, lora=lora)
                pool = graph.pool()
                self.graphs[b] = (graph, out)
        self.graph_batch_sizes = sizes
        log.info("captured decode CUDA graphs for batch sizes %s in %.1f s", sizes, time.perf_counter() - t0)


class HFRunner(BaseRunner):
    """Any causal LM through its HF modules: a DynamicCache per sequence, one sequence at a time."""

    path = "generic"

    def __init__(self, model_dir: Path, hf, tokenizer, device: torch.device, config: EngineConfig):
        super().__init__(model_dir, hf.config, hf.generation_config, tokenizer, device, hf.dtype, config)
        if config.lora_slots:
            raise ValueError(f"LoRA adapters are served unmerged on the fast path only (glm, llama, qwen2, mistral); "
                             f"{model_dir} runs on the generic path: merge them with `lawchat merge` instead")
        self.model = hf
        self.num_blocks = config.num_kv_blocks or (config.cpu_kv_cache_tokens // self.block_size)
        self.max_len = min(self.max_len, (self.num_blocks - 1) * self.block_size)   # the scheduler's accounting
        self.caches: dict[int, object] = {}

    def release(self, seq: Sequence) -> None:
        self.caches.pop(seq.seq_id, None)

    def _forward(self, seq: Sequence, ids: list[int]) -> torch.Tensor:
        from transformers import DynamicCache
        cache = self.caches.setdefault(seq.seq_id, DynamicCache())
        out = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def launch(self, prefill: list[tuple[Sequence, int]], decode: list[Sequence]) -> StepHandle:
        sampled, logits = [], []
        for seq, n in prefill:
            lg = self._forward(seq, seq.token_ids[seq.num_computed:seq.num_computed + n])
            if seq.num_computed + n == len(seq):
                sampled.append(seq)
                logits.append(lg)
        for seq in decode:
            sampled.append(seq)
            logits.append(self._forward(seq, [seq.last_token]))
        if not sampled:
            return StepHandle([])
        return StepHandle(sampled, sample(torch.stack(logits), self.sampling_batch(sampled)))

