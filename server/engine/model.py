"""model: lawchat's own decoder for GLM (ChatGLM3's shape) and the Llama/Qwen2 family, on a paged KV cache.

gpt-fast style: plain tensors, fused QKV and gate/up projections, rotary tables precomputed. Weights are
taken from a loaded HF model (`from_hf`), so the merged model dir stays the one artifact format. Token
batches are flat (T tokens of any number of sequences); attention reads and writes the paged cache through
`attention.py`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionMetadata, attend, write_kv

log = logging.getLogger("lawchat.engine")

FAST_MODEL_TYPES = ("glm", "llama", "qwen2", "mistral")


@dataclass
class ModelShape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rotary_dim: int
    interleaved_rotary: bool       # GLM rotates (x0, x1) pairs; Llama/Qwen2 rotate the two halves


def supports_fast_path(config) -> bool:
    if config.model_type not in FAST_MODEL_TYPES:
        return False
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type in ("dynamic", "longrope"):   # these change with the sequence length: keep HF's code
        return False
    return (getattr(config, "hidden_act", "silu") == "silu" and not getattr(config, "mlp_bias", False)
            and not getattr(config, "use_sliding_window", False))


class Layer:
    def __init__(self, hf_layer):
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.input_norm = hf_layer.input_layernorm.weight.data
        self.post_norm = hf_layer.post_attention_layernorm.weight.data
        self.qkv_w = torch.cat([attn.q_proj.weight.data, attn.k_proj.weight.data, attn.v_proj.weight.data])
        biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        self.qkv_b = torch.cat([b.data for b in biases]) if biases[0] is not None else None
        self.o_w = attn.o_proj.weight.data
        self.o_b = attn.o_proj.bias.data if attn.o_proj.bias is not None else None
        if hasattr(mlp, "gate_up_proj"):     # GLM: already fused as [gate; up]
            self.gate_up_w = mlp.gate_up_proj.weight.data
        else:
            self.gate_up_w = torch.cat([mlp.gate_proj.weight.data, mlp.up_proj.weight.data])
        self.down_w = mlp.down_proj.weight.data


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """-> (RMSNorm(residual + x), residual + x); the first layer passes residual None."""
    residual = x if residual is None else residual + x
    return rms_norm(residual, weight, eps), residual


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """x: (T, heads, head_dim); cos/sin: (T, rotary_dim/2) in x's dtype."""
    rd = shape.rotary_dim
    rot, rest = x[..., :rd], x[..., rd:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if shape.interleaved_rotary:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    else:
        x0, x1 = rot[..., : rd // 2], rot[..., rd // 2:]
        out = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class FastModel:
    """Forward over a flat token batch; the KV cache is (layers, 2, blocks, block_size, kv_heads, head_dim)."""

    def __init__(self, hf_model):
        cfg = hf_model.config
        inner = hf_model.model
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv_freq = inner.rotary_emb.inv_freq.float()
        self.attention_scaling = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        self.shape = ModelShape(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
            rms_eps=cfg.rms_norm_eps, rotary_dim=2 * inv_freq.numel(),
            interleaved_rotary=cfg.model_type == "glm")
        self.embed = inner.embed_tokens.weight.data
        self.final_norm = inner.norm.weight.data
        self.lm_head = hf_model.lm_head.weight.data
        self.layers = []
        for hf_layer in inner.layers:      # fuse layer by layer, dropping HF's copies as we go
            self.layers.append(Layer(hf_layer))
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(hf_layer.self_attn, name, None)
            if not hasattr(hf_layer.mlp, "gate_up_proj"):
                hf_layer.mlp.gate_proj = hf_layer.mlp.up_proj = None
        self.inv_freq = inv_freq
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.cos = self.sin = None
        self.fused = None                  # triton_ops on CUDA (set by the runner), else the torch ops below

    def build_rotary(self, max_len: int) -> None:
        t = torch.arange(max_len, device=self.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(self.device))          # (max_len, rotary_dim/2)
        self.cos = (freqs.cos() * self.attention_scaling).to(self.dtype)
        self.sin = (freqs.sin() * self.attention_scaling).to(self.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, logits_indices: torch.Tensor | None = None, lora=None) -> torch.Tensor:
        """input_ids, positions: (T,); -> logits (N, vocab) float32 for rows logits_indices (all rows if None).
        lora: a `lora.LoraBatch` (each row's adapter, added after each projection) or None."""
        s = self.shape
        ops = self.fused if self.fused is not None and input_ids.is_cuda else None
        norm = ops.add_rms_norm if ops else add_rms_norm
        x = F.embedding(input_ids, self.embed)                          # (T, hidden)
        residual = None
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        if ops is None:
            cos, sin = self.cos[positions], self.sin[positions]         # (T, rotary_dim/2)
        for i, layer in enumerate(self.layers):
            h, residual = norm(x, residual, layer.input_norm, s.rms_eps)
            qkv = F.linear(h, layer.qkv_w, layer.qkv_b)                 # (T, q + 2 kv)
            if lora is not None:
                lora.add(i, "qkv", h, qkv)
            if ops:   # rotary in place, K/V into the cache, one kernel
                ops.rotary_write_kv(qkv, positions, self.cos, self.sin, kv_cache[i], meta.slot_mapping,
                                    s.num_heads, s.num_kv_heads, s.head_dim, s.rotary_dim, s.interleaved_rotary)
                q, k, v = (t.view(-1, n, s.head_dim) for t, n in zip(qkv.split([q_size, kv_size, kv_size], dim=-1),
                                                                      (s.num_heads, s.num_kv_heads, s.num_kv_heads)))
            else:
                q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
                q = apply_rotary(q.view(-1, s.num_heads, s.head_dim), cos, sin, s)
                k = apply_rotary(k.view(-1, s.num_kv_heads, s.head_dim), cos, sin, s)
                v = v.view(-1, s.num_kv_heads, s.head_dim)
                write_kv(kv_cache[i], k, v, meta.slot_mapping)
            attn = attend(q, k, v, kv_cache[i], meta)                   # (T, heads, head_dim)
            attn = attn.reshape(-1, q_size)
            x = F.linear(attn, layer.o_w, layer.o_b)
            if lora is not None:
                lora.add(i, "o", attn, x)
            h, residual = norm(x, residual, layer.post_norm, s.rms_eps)
            gate_up = F.linear(h, layer.gate_up_w)
            if lora is not None:
                lora.add(i, "gate_up", h, gate_up)
            act = ops.silu_mul(gate_up) if ops else silu_mul(gate_up)
            x = F.linear(act, layer.down_w)
            if lora is not None:
                lora.add(i, "down", act, x)
        if logits_indices is not None:
            x, residual = x[logits_indices], residual[logits_indices]
        x, _ = norm(x, residual, self.final_norm, s.rms_eps)
        return F.linear(x, self.lm_head).float()
