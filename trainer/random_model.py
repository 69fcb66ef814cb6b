"""random_model: model dirs with random weights for benchmarks and GPU checks (no hub needed).

    python -m lawchat_trainer.random_model /tmp/glm6b --tokenizer runs/demo/merged      # ChatGLM3-6B shape, bf16

The tokenizer is the given one (the demo's byte-level BPE) grown to the model's vocabulary with single CJK
characters as added tokens, so every id the random model draws decodes to visible text.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

GLM6B = dict(vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
             num_attention_heads=32, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
             attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=8192)


def grow_tokenizer(tokenizer_dir: Path, vocab_size: int):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    need = vocab_size - len(tok)
    if need > 0:
        ranges = [(0x4E00, 0xA000), (0x3400, 0x4DC0), (0x20000, 0x2A6E0)]   # CJK ideographs, ext. A and B
        chars = [chr(c) for lo, hi in ranges for c in range(lo, hi)]
        have = set(tok.get_vocab())
        extra = [c for c in chars if c not in have][:need]
        tok.add_tokens(extra)
    return tok


def make_random_model(out: Path, tokenizer_dir: Path, shape: dict | None = None, model_type: str = "glm",
                      dtype: torch.dtype = torch.bfloat16, device: str = "cpu", seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM
    shape = dict(shape or GLM6B)
    tok = grow_tokenizer(tokenizer_dir, shape["vocab_size"])
    if model_type != "glm":
        shape.pop("partial_rotary_factor", None)
    cfg = AutoConfig.for_model(model_type, **shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_random_adapter(base: Path, out: Path, targets: list[str], r: int, seed: int = 0, scale: float = 2.0,
                        dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """A PEFT LoRA adapter of base with random A and B (PEFT's own init leaves B zero: no effect to test), B scaled by
    `scale`, saved as training saves one (adapter_config.json + adapter_model.safetensors)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, w in peft.named_parameters():
            if "lora_B" in name:
                w.mul_(scale)
    peft.save_pretrained(out)
    return Path(out)


def make_tiny_encoder(out: Path, texts: list[str], hidden: int = 32, seed: int = 0) -> Path:
    """A random one-layer BERT over the characters of `texts`, saved as an HF encoder dir (sentence-transformers loads
    it with mean pooling): texts sharing characters get nearby vectors — enough to test dense retrieval's mechanics."""
    from transformers import BertModel
    return _save_tiny_bert(BertModel, out, texts, hidden, seed)


def make_tiny_cross_encoder(out: Path, texts: list[str], hidden: int = 32, seed: int = 0) -> Path:
    """A random one-layer BERT with a one-logit head over the characters of `texts`, saved as an HF dir that
    sentence-transformers loads as a CrossEncoder: the mechanics of a second stage, not its quality."""
    from transformers import BertForSequenceClassification
    return _save_tiny_bert(BertForSequenceClassification, out, texts, hidden, seed, num_labels=1)


def _save_tiny_bert(model_class, out: Path, texts: list[str], hidden: int, seed: int, **config) -> Path:
    """A random one-layer BERT of model_class whose vocabulary is the characters of `texts`, with its tokenizer."""
    from transformers import BertConfig, BertTokenizerFast
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n",
                                   encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=False, tokenize_chinese_chars=True)
    torch.manual_seed(seed)
    model = model_class(BertConfig(vocab_size=len(chars) + 5, hidden_size=hidden, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                                   **config))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    make_random_model(args.out, args.tokenizer, device=args.device)
