"""kernels: liger-kernel's fused Triton kernels for training (config key `liger_kernel: true`, CUDA only).

RMSNorm, SwiGLU and the linear + cross-entropy loss fused so the (tokens x 65,024) logits are never stored —
less activation memory, so a larger batch fits a card. liger-kernel ships the patches for the model types it
knows (llama, qwen2, glm4 ...); transformers' native `glm` (a converted ChatGLM3) has GLM-4's MLP and norms,
so it gets GLM-4's patches module by module here.
"""
from __future__ import annotations

import importlib.util
from types import MethodType


def liger_available() -> bool:
    import torch
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def apply_liger(model) -> str:
    """Patch a loaded (not yet PEFT-wrapped) causal LM in place; -> what was done, for the log."""
    import torch
    if not torch.cuda.is_available():
        raise ValueError("liger_kernel: true needs a CUDA device (its kernels are Triton)")
    try:
        from liger_kernel.transformers import monkey_patch as mp
    except ImportError:
        raise ImportError("liger_kernel: true needs the liger-kernel package: pip install 'lawchat[train-gpu]'") from None
    model_type = model.config.model_type
    if model_type == "glm":
        from liger_kernel.transformers.model.glm4 import lce_forward
        from liger_kernel.transformers.swiglu import LigerPhi3SwiGLUMLP
        model.forward = MethodType(lce_forward, model)
        base = model.model
        mp._patch_rms_norm_module(base.norm, in_place=False)
        for layer in base.layers:
            mp._patch_swiglu_module(layer.mlp, LigerPhi3SwiGLUMLP)
            mp._patch_rms_norm_module(layer.input_layernorm, in_place=False)
            mp._patch_rms_norm_module(layer.post_attention_layernorm, in_place=False)
        return "glm: fused linear+cross-entropy, RMSNorm, SwiGLU (GLM-4's patches)"
    if model_type not in mp.MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"liger_kernel: no liger patches for model_type {model_type!r}")
    mp._apply_liger_kernel_to_instance(model=model)
    return f"{model_type}: liger-kernel's own patches"
