"""ask: answer one question with a model dir or a LoRA checkpoint, without merging (the recipe's 微调前/微调后 check).

An adapter dir (adapter_config.json: `runs/x/final`, `runs/x/checkpoint-200`) is loaded over its base with PEFT;
`compare_base` answers again with the adapter disabled — the same weights in memory, so the two answers differ
only by the adapter. Greedy decoding through HF generate, the prompt built by the one prompt module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lawchat_server.prompt import encode_prompt


@dataclass
class Answers:
    model: str
    answer: str
    base: str | None = None           # the adapter's base, when asked (compare_base)
    base_answer: str | None = None


def adapter_base(adapter_dir: Path) -> str:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model; give --base")
    return base


def load(model_or_adapter: str | Path, base: str | Path | None, device: str, trust_remote_code: bool):
    """-> (model, tokenizer, base dir or None); an adapter stays unmerged (a PeftModel)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(model_or_adapter)
    if not path.is_dir():
        raise FileNotFoundError(f"no such model or adapter directory: {path}")
    is_adapter = (path / "adapter_config.json").is_file()
    if not is_adapter and not (path / "config.json").is_file():
        raise ValueError(f"{path} is neither a model dir (config.json) nor a LoRA adapter (adapter_config.json)")
    base_dir = str(base or adapter_base(path)) if is_adapter else (str(base) if base else None)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model_dir = base_dir if is_adapter else str(path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    if is_adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(path))
    tok_dir = path if (path / "tokenizer_config.json").is_file() else Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer, base_dir if is_adapter else None


@torch.inference_mode()
def generate(model, tokenizer, question: str, max_new_tokens: int) -> str:
    ids = torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": question}])], device=model.device)
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def ask(model_or_adapter: str | Path, question: str, compare_base: bool = False, base: str | Path | None = None,
        max_new_tokens: int = 256, device: str = "cpu", trust_remote_code: bool = False) -> Answers:
    model, tokenizer, adapter_of = load(model_or_adapter, base, device, trust_remote_code)
    result = Answers(str(model_or_adapter), generate(model, tokenizer, question, max_new_tokens))
    if compare_base:
        if adapter_of is not None:
            with model.disable_adapter():
                result.base_answer = generate(model, tokenizer, question, max_new_tokens)
            result.base = adapter_of
        elif base is not None:
            base_model, base_tok, _ = load(base, None, device, trust_remote_code)
            result.base, result.base_answer = str(base), generate(base_model, base_tok, question, max_new_tokens)
        else:
            raise ValueError("--compare-base with a merged model dir needs --base BASE_DIR")
    return result
