"""merge: fold a PEFT LoRA adapter into its base model -> a standalone HF model dir (safetensors + tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path


class MergeError(Exception):
    """Missing adapter or base model: reported with exit code 2."""


def resolve_base(adapter_dir: Path, base: str | Path | None) -> Path:
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise MergeError(f"{adapter_dir} is not a PEFT adapter dir (no adapter_config.json)")
    if base is None:
        base = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise MergeError(f"{cfg_path} names no base model; pass --base")
    base = Path(base)
    if not (base / "config.json").is_file():
        raise MergeError(f"base model dir {base} not found (moved? pass --base)")
    return base


def merge(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None,
          trust_remote_code: bool = False) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base_dir = resolve_base(adapter_dir, base)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    tokenizer_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_src, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        raise MergeError(f"the tokenizer in {tokenizer_src} has no chat template; the server needs one")
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
