"""lora: LoRA adapters served unmerged over one base model, chosen per request.

A PEFT adapter directory (adapter_config.json + adapter_model.safetensors, what `lawchat train` writes) is read
into the engine's fused layout: q/k/v become pieces of the fused QKV projection, gate/up of the fused gate_up
one. Each fused module m gets P_m rank blocks of `max_lora_rank` columns (qkv 3, gate_up 2, o and down 1), so
for one adapter A_m is (layers, P_m*R, in) and B_m (layers, out, P_m*R) — block-diagonal, the LoRA scale folded
in. A bounded pool of GPU slots holds the adapters of the running sequences (least recently used evicted, the
host copy kept); each row of a step names its slot, and y += (x A[slot]^T) B[slot]^T is added after the base
projection: a torch matmul per row segment for prefill chunks (and everything on CPU), the Triton BGMV kernels
(`triton_lora.py`, one program per row, in the spirit of Punica) for decode rows on CUDA — inside the captured
CUDA graphs, whose input is the slot of each row.

An adapter is refused, with the reason, when it does not fit the base (layer count, a module's shape), targets a
module lawchat does not serve unmerged (embeddings, lm_head, modules_to_save), uses DoRA / biases /
per-module alphas, or its rank exceeds `engine.max_lora_rank`.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODULES = ("qkv", "o", "gate_up", "down")
PIECES = {"qkv": 3, "o": 1, "gate_up": 2, "down": 1}
# HF module name -> (fused module, piece); GLM's gate_up_proj is already fused: one piece over both halves
HF_PIECES = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
             "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "gate_up_proj": ("gate_up", 0),
             "down_proj": ("down", 0)}
KEY_RE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BASE = "base"          # the reserved name that asks for no adapter
_uids = itertools.count(1)


class AdapterError(ValueError):
    """The adapter cannot be served over this model; the message says why."""


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an adapter, or None."""
    if not NAME_RE.match(name or "") or name == BASE:
        return f"adapter name {(name or '')[:80]!r}: use 1-64 letters, digits, '.', '_' or '-' (not {BASE!r})"
    return None


@dataclass
class LoraShape:
    """The fused projections' sizes of the served model, and the pool's rank block."""
    num_layers: int
    hidden: int
    q: int                 # query width (heads * head_dim)
    kv: int                # key (= value) width
    inter: int             # MLP intermediate size
    rank: int              # max_lora_rank: columns per piece

    def in_features(self, module: str) -> int:
        return {"qkv": self.hidden, "o": self.q, "gate_up": self.hidden, "down": self.inter}[module]

    def out_features(self, module: str) -> int:
        return {"qkv": self.q + 2 * self.kv, "o": self.hidden, "gate_up": 2 * self.inter, "down": self.hidden}[module]

    def piece_rows(self, hf_name: str) -> tuple[int, int]:
        """Output rows [start, end) of the fused module that an HF projection covers."""
        q, kv, i = self.q, self.kv, self.inter
        return {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv), "o_proj": (0, self.hidden),
                "gate_proj": (0, i), "up_proj": (i, 2 * i), "gate_up_proj": (0, 2 * i),
                "down_proj": (0, self.hidden)}[hf_name]


@dataclass
class Adapter:
    name: str
    path: str
    uid: int                                   # a new one per load: the prefix cache is salted with it
    rank: int                                  # the largest rank of its modules
    targets: list[str]                         # HF module names it adapts
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]   # fused module -> (A (L, P*R, in), B (L, out, P*R)), host
    requests: int = 0                          # requests that asked for it
    running: int = 0                           # sequences holding its slot now
    slot: int | None = None                    # its GPU slot, while it has one

    @property
    def salt(self) -> bytes:
        return b"lora" + self.uid.to_bytes(8, "little")

    def info(self) -> dict:
        return {"name": self.name, "path": self.path, "rank": self.rank, "target_modules": list(self.targets),
                "on_device": self.slot is not None, "requests": self.requests, "running": self.running}


def served_modules(config) -> tuple[str, ...]:
    """The fused modules the pool serves: engine.lora_target_modules, else the configured adapters' targets (their
    adapter_config.json), else all. Fixed at start: the captured graphs hold one pair of kernels per module."""
    names = config.lora_target_modules
    if names is None and config.adapters:
        names = []
        for path in config.adapters.values():
            try:
                targets = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))["target_modules"]
            except (OSError, ValueError, KeyError):
                return MODULES                 # read_adapter reports what is wrong with it
            if not isinstance(targets, list):  # a regex: any projection may match
                return MODULES
            names += [t.rsplit(".", 1)[-1] for t in targets]
    if names is None:
        return MODULES
    fused = {HF_PIECES[n][0] for n in names if n in HF_PIECES}
    return tuple(m for m in MODULES if m in fused) or MODULES


def read_adapter(name: str, path: str | Path, shape: LoraShape, dtype: torch.dtype,
                 modules: tuple[str, ...] = MODULES) -> Adapter:
    """A PEFT LoRA dir -> an Adapter in the fused layout (host memory, pinned when CUDA is there), or AdapterError.
    `modules`: the fused projections this server serves adapters on."""
    if name_problem(name):
        raise AdapterError(name_problem(name))
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"{cfg_file} is not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file} is not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are served unmerged")
    for key, bad, why in (("use_dora", True, "DoRA"), ("bias", ("all", "lora_only"), "trained biases"),
                          ("fan_in_fan_out", True, "fan_in_fan_out weights")):
        value = cfg.get(key)
        if value == bad or (isinstance(bad, tuple) and value in bad):
            raise AdapterError(f"{path}: {why} ({key}={value!r}) cannot be served unmerged; merge it with `lawchat merge`")
    if cfg.get("alpha_pattern") or cfg.get("modules_to_save"):
        raise AdapterError(f"{path}: alpha_pattern / modules_to_save cannot be served unmerged; merge it with "
                           "`lawchat merge`")
    _check_ranks(path, shape.rank)       # before the weights are read: a huge adapter is refused from its header
    try:
        tensors = _read_tensors(path)
    except AdapterError:
        raise
    except Exception as e:               # a corrupt .bin, an unreadable file
        raise AdapterError(f"{path}: the adapter weights are not readable ({type(e).__name__}: {e})") from None
    alpha, rslora = float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False))
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = KEY_RE.search(key)
        if m is None or m.group(2) not in HF_PIECES:
            raise AdapterError(f"{path}: weight {key!r} is not a LoRA of a projection lawchat serves unmerged "
                               f"({', '.join(HF_PIECES)}); merge it with `lawchat merge`")
        found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    if not found:
        raise AdapterError(f"{path}: no LoRA weights in the adapter file")
    R = shape.rank
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank, targets = 0, sorted({hf for _, hf in found})
    for (layer, hf), ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: layer {layer} {hf} has lora_{''.join(ab)} only")
        if layer >= shape.num_layers:
            raise AdapterError(f"{path}: adapts layer {layer}, this model has {shape.num_layers} layers: it was "
                               "trained on another base")
        module, piece = HF_PIECES[hf]
        if module not in modules:
            served = ", ".join(n for n, (m, _) in HF_PIECES.items() if m in modules)
            raise AdapterError(f"{path}: adapts {hf}; this server serves adapters on {served} only (engine."
                               f"lora_target_modules, fixed at start); restart it with {hf} listed there")
        a, b = ab["A"].float(), ab["B"].float()
        r = a.shape[0]
        start, end = shape.piece_rows(hf)
        if a.shape[1] != shape.in_features(module) or b.shape != (end - start, r):
            raise AdapterError(f"{path}: layer {layer} {hf} is A {tuple(a.shape)} B {tuple(b.shape)}; this model's "
                               f"{hf} maps {shape.in_features(module)} -> {end - start}: it was trained on another base")
        _check_rank(path, r, R)
        rank = max(rank, r)
        if module not in weights:
            p = PIECES[module] * R
            weights[module] = (torch.zeros(shape.num_layers, p, shape.in_features(module)),
                               torch.zeros(shape.num_layers, shape.out_features(module), p))
        A, B = weights[module]
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        A[layer, piece * R: piece * R + r] = a
        B[layer, start:end, piece * R: piece * R + r] = b * scale
    pin = torch.cuda.is_available()
    weights = {m: tuple(w.to(dtype).pin_memory() if pin else w.to(dtype) for w in ab) for m, ab in weights.items()}
    return Adapter(name, str(path), next(_uids), rank, targets, weights)


def _check_rank(path: Path, r: int, max_rank: int) -> None:
    if r > max_rank:
        raise AdapterError(f"{path}: rank {r} is above engine.max_lora_rank {max_rank}; raise it (it sizes the GPU pool)")


def _check_ranks(path: Path, max_rank: int) -> None:
    """The safetensors header's lora_A shapes against max_rank (nothing is loaded; .bin files are checked after)."""
    st = path / "adapter_model.safetensors"
    if not st.is_file():
        return
    from safetensors import safe_open
    try:
        with safe_open(str(st), "pt") as f:
            for key in f.keys():
                if key.endswith("lora_A.weight"):
                    _check_rank(path, f.get_slice(key).get_shape()[0], max_rank)
    except AdapterError:
        raise
    except Exception as e:              # safetensors' own error for a cut or corrupt file
        raise AdapterError(f"{path}: adapter_model.safetensors is not readable ({type(e).__name__}: {e})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file
        return load_file(str(st))
    if binf.is_file():
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise AdapterError(f"{path}: no adapter_model.safetensors (or .bin)")


class LoraPool:
    """The GPU (or CPU) side: per served module, A (layers, slots, P*R, in) and B (layers, slots, out, P*R)."""

    def __init__(self, shape: LoraShape, slots: int, dtype: torch.dtype, device: torch.device,
                 modules: tuple[str, ...] = MODULES):
        self.shape, self.slots, self.modules = shape, slots, modules
        self.A, self.B = {}, {}
        for m in modules:
            p = PIECES[m] * shape.rank
            self.A[m] = torch.zeros(shape.num_layers, slots, p, shape.in_features(m), dtype=dtype, device=device)
            self.B[m] = torch.zeros(shape.num_layers, slots, shape.out_features(m), p, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.A, self.B) for t in d.values())

    def write(self, slot: int, adapter: Adapter) -> None:
        """Copy adapter into slot (stream-ordered: steps launched before it read the old weights)."""
        for m in self.modules:
            if m in adapter.weights:
                a, b = adapter.weights[m]
                self.A[m][:, slot].copy_(a, non_blocking=True)
                self.B[m][:, slot].copy_(b, non_blocking=True)
            else:
                self.A[m][:, slot].zero_()
                self.B[m][:, slot].zero_()


@dataclass
class LoraBatch:
    """Which slot each row of a step uses. `segments`: (start, end, slot, modules) row ranges done with torch
    matmuls; `rows`: the slot of each row from `offset` on (-1: no adapter) for the Triton kernels, or None."""
    pool: LoraPool
    segments: list[tuple[int, int, int, frozenset]] = field(default_factory=list)
    rows: torch.Tensor | None = None
    offset: int = 0

    def add(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y (T, out) += the rows' adapter deltas of x (T, in), in place."""
        if module not in self.pool.A:          # no adapter may adapt it: nothing to add, no kernel in the graphs
            return
        A, B = self.pool.A[module][layer], self.pool.B[module][layer]       # (S, P*R, in), (S, out, P*R)
        for start, end, slot, modules in self.segments:
            if module in modules:
                y[start:end] += (x[start:end] @ A[slot].T) @ B[slot].T
        if self.rows is not None:
            from .triton_lora import bgmv
            bgmv(x[self.offset:], A, B, self.rows, y[self.offset:])


def segments_of(slots: list[int], adapters: list[Adapter | None], start: int = 0) -> list[tuple]:
    """Runs of consecutive rows with the same slot -> (start, end, slot, modules); rows without an adapter skipped."""
    out: list[tuple] = []
    for i, (slot, ad) in enumerate(zip(slots, adapters)):
        if ad is None:
            continue
        if out and out[-1][2] == slot and out[-1][1] == start + i:
            out[-1] = (out[-1][0], start + i + 1, slot, out[-1][3])
        else:
            out.append((start + i, start + i + 1, slot, frozenset(ad.weights)))
    return out


class AdapterSlots:
    """The engine's adapters: names -> Adapter, and which adapter holds each GPU slot (LRU among unused ones).
    Engine thread only (registrations reach it through the engine's admin queue)."""

    def __init__(self, pool: LoraPool | None):
        self.pool = pool
        self.by_name: dict[str, Adapter] = {}
        self.holder: list[Adapter | None] = [None] * (pool.slots if pool else 0)
        self.idle: OrderedDict[int, None] = OrderedDict((i, None) for i in range(len(self.holder)))  # LRU first
        self.lock = threading.Lock()          # guards by_name for readers on other threads

    def get(self, name: str) -> Adapter | None:
        with self.lock:
            return self.by_name.get(name)

    def register(self, adapter: Adapter) -> Adapter | None:
        """Serve adapter under its name; -> the one it replaces (its running sequences finish on it)."""
        with self.lock:
            old = self.by_name.get(adapter.name)
            self.by_name[adapter.name] = adapter
        if old is not None:
            self._forget(old)
        return old

    def unregister(self, name: str) -> Adapter | None:
        with self.lock:
            old = self.by_name.pop(name, None)
        if old is not None:
            self._forget(old)
        return old

    def _forget(self, adapter: Adapter) -> None:
        """No new request reaches adapter: free its slot now if no sequence uses it (else when the last leaves)."""
        if adapter.slot is not None and adapter.running == 0:
            self.holder[adapter.slot] = None
            self.idle.move_to_end(adapter.slot, last=False)      # a free slot is taken first
            adapter.slot = None

    def acquire(self, adapter: Adapter | None) -> bool:
        """A sequence on adapter is admitted: give the adapter a slot (loading it) unless it has one; False when
        every slot is held by running sequences (the sequence waits)."""
        if adapter is None:
            return True
        if adapter.slot is None:
            if not self.idle:
                return False
            slot, _ = self.idle.popitem(last=False)
            prev = self.holder[slot]
            if prev is not None:
                prev.slot = None
            self.holder[slot], adapter.slot = adapter, slot
            self.pool.write(slot, adapter)
        elif adapter.running == 0:
            self.idle.pop(adapter.slot, None)
        adapter.running += 1
        return True

    def release(self, adapter: Adapter | None) -> None:
        if adapter is None or adapter.running == 0:
            return
        adapter.running -= 1
        if adapter.running == 0:
            self.idle[adapter.slot] = None                       # most recently used: evicted last
            if self.get(adapter.name) is not adapter:            # unloaded or replaced meanwhile
                self._forget(adapter)

    def infos(self) -> list[dict]:
        with self.lock:
            return [a.info() for a in self.by_name.values()]
