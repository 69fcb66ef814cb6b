"""A tiny GLM-architecture base model, made offline: BPE tokenizer + GlmForCausalLM pretrained on text.

The result is a normal HF model directory (config, safetensors, tokenizer with a chat template), so
everything downstream (train, merge, serve) treats it exactly like a real ChatGLM-family checkpoint.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

from .train_log import labelled_loss

EOS = "<|endoftext|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# GLM-style turns: "<|user|>\n问题<|assistant|>\n回答<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}" + EOS + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class ModelShape:
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 688
    max_position_embeddings: int = 1024


@dataclass
class PretrainConfig:
    steps: int = 240
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    precision: str = "fp32"      # fp32 | bf16 (autocast, fp32 weights) | auto: bf16 where the CPU has native bf16 matmuls


def native_bf16() -> bool:
    """True where bf16 matmuls run natively on this CPU (AVX512-BF16 / AMX: ~3.5x fp32's rate on 2 Zen 4 cores)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(precision: str) -> bool:
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and native_bf16())


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text round-trips, and rare characters really do span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, *ROLE_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=ROLE_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast, shape: ModelShape) -> GlmForCausalLM:
    """ChatGLM3's architecture (partial interleaved rotary, QKV bias, GQA, RMSNorm) at toy size."""
    user_id = tokenizer.convert_tokens_to_ids("<|user|>")
    config = GlmConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim, partial_rotary_factor=0.5,
        attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=shape.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id, user_id], bos_token_id=None,
        tie_word_embeddings=False,
    )
    return GlmForCausalLM(config)


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: list[str], max_len: int) -> list[list[int]]:
    """One sample per document (an article), EOS-terminated, cut at max_len tokens."""
    return [(tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id])[:max_len] for t in texts]


def make_batch(docs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids (B, T) right-padded, labels (B, T) with -100 on padding."""
    width = max(len(d) for d in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(docs), width), -100, dtype=torch.long)
    for row, d in enumerate(docs):
        ids[row, :len(d)] = torch.tensor(d)
        labels[row, :len(d)] = torch.tensor(d)
    return ids, labels


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def epoch_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of documents of similar length (little padding), in random order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] + rng.random() * 16)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for the next step instead of returning it to the OS. A step's logits, their
    log-softmax and its gradient are fresh tensors of ~100 MB each, which glibc maps and unmaps every step, so the
    kernel zero-fills their pages again each time (profile: `fill_` ~7% of a step). Process-wide; -> False where the
    C library is not glibc (nothing changed). Demo steps 0.81 -> 0.75 s on 2 CPU cores (A/B, 3-4 runs each)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def pretrain(model: GlmForCausalLM, docs: list[list[int]], pad_id: int, cfg: PretrainConfig) -> list[float]:
    """Next-token prediction, one article per sample: each article starts a sequence, so the model learns
    to recall an article from its heading (《劳动合同法》第三十九条) rather than from its neighbours."""
    keep_freed_memory()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    bf16 = use_bf16(cfg.precision)
    losses: list[float] = []
    batches: list[list[int]] = []
    bar = tqdm(range(cfg.steps), desc="pretrain", unit="step", mininterval=2.0)
    for step in bar:
        if not batches:
            batches = epoch_batches([len(d) for d in docs], cfg.batch_size, rng)
        input_ids, labels = make_batch([docs[i] for i in batches.pop()], pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            # no mask: rows are right-padded, so under causal attention a real token sees only real tokens (the
            # same loss as with the padding mask to 1e-5; 11% faster a step on 2 CPU cores: no 4-D mask). The LM
            # head and log-softmax only where a label is (the batches are ~18% padding; log-softmax and its
            # backward were ~19% of a step): the model's loss to 1e-6, the demo's steps 0.83 -> 0.77 s on 2 CPU cores
            loss = labelled_loss(model, {"input_ids": input_ids, "labels": labels})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def make_base_model(texts_for_tokenizer: list[str], pretrain_texts: list[str], out_dir: str | Path,
                    vocab_size: int, shape: ModelShape, cfg: PretrainConfig) -> dict:
    """Train the tokenizer and the model, save both as one HF model dir; returns a small summary."""
    t0 = time.time()
    tokenizer = train_tokenizer(texts_for_tokenizer, vocab_size)
    torch.manual_seed(cfg.seed)
    model = build_model(tokenizer, shape)
    docs = encode_documents(tokenizer, pretrain_texts, cfg.seq_len)
    losses = pretrain(model, docs, tokenizer.pad_token_id, cfg)
    out_dir = Path(out_dir)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"params": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
            "pretrain_tokens": sum(map(len, docs)), "first_loss": losses[0], "last_loss": losses[-1],
            "seconds": round(time.time() - t0, 1)}
