"""merge: fold a PEFT LoRA adapter into its base model -> a standalone HF model dir (safetensors + tokenizer).

The merge runs in float32 (W + B·A·scale without bf16 rounding) and the result is cast to the base's dtype,
or to --dtype. Before saving, the merged model's logits are compared with base + adapter (unmerged, float32)
on a few prompts: a merge that changed what the model computes fails loudly instead of shipping.

A QLoRA adapter (trained over the base quantised to 4 bits; `lawchat_quantization.json` beside it) is folded into
the full-precision base, as the QLoRA paper does: the gate above holds as for LoRA. The merged model is not the
model that was trained — that one saw NF4-rounded base weights — so where CUDA and bitsandbytes are present the
merged model is also compared with the quantised base + adapter and the difference is reported (top-1 agreement,
max logit difference relative to the logit scale), not gated: it is the quantisation's error, not the merge's.
"""
from __future__ import annotations

import json
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
CHECK_TOLERANCE = 1e-3          # max |merged - unmerged| logit difference, relative to the logits' max magnitude


class MergeError(Exception):
    """Missing or mismatched adapter or base model, or a failed merge check: reported with exit code 2."""


def resolve_base(adapter_dir: Path, base: str | Path | None) -> Path:
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise MergeError(f"{adapter_dir} is not a PEFT adapter dir (no adapter_config.json)")
    recorded = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if base is None and not recorded:
        raise MergeError(f"{cfg_path} names no base model; pass --base")
    base = Path(base if base is not None else recorded)
    if not (base / "config.json").is_file():
        raise MergeError(f"base model dir {base} not found (moved? pass --base)")
    recorded = Path(recorded or "")
    if recorded != base and (recorded / "config.json").is_file():   # --base given and the training base still there
        keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        a, b = (json.loads((d / "config.json").read_text(encoding="utf-8")) for d in (recorded, base))
        diff = {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}
        if diff:
            raise MergeError(f"the adapter was trained on {recorded}, whose config differs from {base}: {diff}")
    return base


def check_prompts(tokenizer, vocab_size: int) -> list[list[int]]:
    """Two chat prompts through the template, and a random id sequence (covers tokens no prompt has)."""
    import torch

    from lawchat_server.prompt import encode_prompt
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}])
               for q in ("劳动合同法第三十九条是怎么规定的？", "公司拖欠工资三个月了，我该怎么办？")]
    g = torch.Generator().manual_seed(0)
    prompts.append(torch.randint(0, vocab_size, (48,), generator=g).tolist())
    return prompts


def check_adapter_loaded(peft_model, adapter_dir: Path, base_dir: Path) -> None:
    """Every tensor of the adapter file is in the model with its shape and values: PEFT may skip tensors whose
    shapes do not fit (another base model), which would make the merge a silent no-op."""
    import torch
    from safetensors import safe_open
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return                                  # an old .bin adapter: the logits check still runs
    params = dict(peft_model.named_parameters())
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight",
                                                                                  ".lora_B.default.weight")
            want = f.get_tensor(key)
            got = params.get(name)
            if got is None or got.shape != want.shape or not torch.equal(got.detach().to(want.dtype).cpu(), want):
                shape = tuple(got.shape) if got is not None else "missing"
                raise MergeError(f"the adapter in {adapter_dir} does not fit the base model {base_dir}: {key} is "
                                 f"{tuple(want.shape)} in the adapter but {shape} in the model (trained on another "
                                 "base?)")


def logits_of(model, prompts: list[list[int]]):
    import torch
    with torch.no_grad():
        return [model(input_ids=torch.tensor([p]), use_cache=False).logits[0].float() for p in prompts]


def merge(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None,
          trust_remote_code: bool = False, dtype: str = "auto") -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise MergeError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base_dir = resolve_base(adapter_dir, base)
    tokenizer_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_src, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        raise MergeError(f"the tokenizer in {tokenizer_src} has no chat template; the server needs one")
    base_cfg = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    out_dtype = getattr(torch, dtype) if dtype != "auto" else (getattr(base_cfg, "dtype", None) or torch.float32)
    if isinstance(out_dtype, str):
        out_dtype = getattr(torch, out_dtype)

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as e:   # size mismatch, target modules missing
        raise MergeError(f"the adapter in {adapter_dir} does not fit the base model {base_dir} "
                         f"({base_cfg.model_type}, hidden {getattr(base_cfg, 'hidden_size', '?')}): was it trained on "
                         f"another base? {type(e).__name__}: {str(e)[:300]}") from None
    check_adapter_loaded(peft_model, adapter_dir, base_dir)
    peft_model.eval()
    prompts = check_prompts(tokenizer, base_cfg.vocab_size)
    want = logits_of(peft_model, prompts)                 # base + adapter, unmerged, float32
    merged = peft_model.merge_and_unload()
    got = logits_of(merged, prompts)
    scale = max(float(w.abs().max()) for w in want)
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
    if not diff <= CHECK_TOLERANCE * max(scale, 1.0):
        raise MergeError(f"merge check failed: merged logits differ from base + adapter by {diff:.3g} "
                         f"(logit scale {scale:.3g}); nothing was written")
    quantized = compare_quantized(adapter_dir, base_dir, merged, prompts, trust_remote_code)
    merged = merged.to(out_dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "merge_report.json").write_text(json.dumps({
        "adapter": str(adapter_dir), "base": str(base_dir), "dtype": str(out_dtype).removeprefix("torch."),
        "check_prompts": len(prompts), "max_logit_diff_fp32": diff, "logit_scale": scale,
        "tolerance": CHECK_TOLERANCE, **({"quantized_base": quantized} if quantized else {})}, indent=2) + "\n",
        encoding="utf-8")
    return out_dir


def compare_quantized(adapter_dir: Path, base_dir: Path, merged, prompts: list[list[int]],
                      trust_remote_code: bool) -> dict | None:
    """A QLoRA adapter: the merged model vs the quantised base + adapter it was trained as (None for plain LoRA)."""
    import importlib.util

    import torch
    qfile = adapter_dir / "lawchat_quantization.json"
    if not qfile.is_file():
        return None
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        return {"compared": False, "why": "needs CUDA and bitsandbytes"}
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .finetune import quantization_config
    q = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization_config(json.loads(
        qfile.read_text(encoding="utf-8"))), dtype=torch.bfloat16, device_map={"": 0},
        trust_remote_code=trust_remote_code)
    q = PeftModel.from_pretrained(q, adapter_dir).eval()
    dev = next(q.parameters()).device
    with torch.no_grad():
        trained = [q(input_ids=torch.tensor([p], device=dev), use_cache=False).logits[0].float().cpu() for p in prompts]
    del q
    torch.cuda.empty_cache()
    ours = logits_of(merged, prompts)
    scale = max(float(t.abs().max()) for t in trained)
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, trained))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ours, trained))
    total = sum(len(p) for p in prompts)
    report = {"compared": True, "top1_agreement": round(agree / total, 4), "max_logit_diff_relative": diff / scale}
    print(f"merge: QLoRA adapter folded into the full-precision base; vs the 4-bit base + adapter it was trained as: "
          f"top-1 agreement {agree}/{total}, max logit difference {diff / scale:.1%} of the logit scale "
          "(the base's quantisation error, reported, not gated)")
    return report
