"""model_runner: load an HF causal-LM dir and run prefill / decode_one_token on it (one sequence)."""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

log = logging.getLogger("lawchat.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class ModelRunner:
    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str = "auto",
                 trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"{self.model_dir} is not a model directory (no config.json)")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{self.model_dir}: the tokenizer has no chat template")
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=self.dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        cfg = self.model.config
        self.max_len = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "seq_length", 2048))
        self.eos_ids = self._eos_ids()
        # transformers 5.2x renames forward(past_key_values=) to cache=; the GPU image has 5.17
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        log.info("loaded %s on %s (%s), max_len=%d, eos=%s", self.model_dir, self.device,
                 str(self.dtype).removeprefix("torch."), self.max_len, sorted(self.eos_ids))

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.model.generation_config.eos_token_id, self.model.config.eos_token_id,
                    self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(i) for i in src)
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def warmup(self) -> None:
        """One short prefill + decode so the first request does not pay for CUDA/cuBLAS start-up."""
        logits, cache = self.prefill(self.encode_chat([{"role": "user", "content": "你好"}]))
        self.decode_one_token(int(torch.argmax(logits)), cache)

    @torch.inference_mode()
    def prefill(self, input_ids: list[int]):
        """-> (logits of the last position (vocab,), KV cache)."""
        ids = torch.tensor([input_ids], device=self.device)  # (1, T)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1], out.past_key_values

    @torch.inference_mode()
    def decode_one_token(self, token_id: int, cache) -> torch.Tensor:
        """Feed one token, extend the cache in place; -> logits (vocab,)."""
        ids = torch.tensor([[token_id]], device=self.device)  # (1, 1)
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: cache})
        return out.logits[0, -1]
