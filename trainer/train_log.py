"""train_log: real (non-pad) tokens/s in the Trainer's logs, and loss / lr / grad_norm charts after training."""
from __future__ import annotations

import time
from pathlib import Path

from transformers import Trainer, TrainerCallback


def real_tokens(batch: dict) -> int:
    """Non-pad input tokens of a collated batch (a packed batch has no padding at all)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


# model types whose logits are exactly lm_head(decoder output): no final softcapping or logit scale
LABELLED_LOGITS_TYPES = ("glm", "llama", "qwen2", "mistral")


def labelled_loss(model, inputs: dict, num_items_in_batch=None):
    """The causal-LM loss with the LM head and log-softmax only at positions that predict a label (the reply):
    the same value as the model's own loss, without a (batch, tokens, vocab) logits tensor for the prompt."""
    import torch.nn.functional as F

    from lawchat_server.prompt import IGNORE_INDEX
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = inputs["labels"]
    hidden = causal.get_decoder()(**{k: v for k, v in inputs.items() if k != "labels"}).last_hidden_state
    target = labels[:, 1:]                                       # (B, T-1): position t predicts token t+1
    keep = target != IGNORE_INDEX
    logits = causal.get_output_embeddings()(hidden[:, :-1][keep])   # (N, vocab)
    loss = F.cross_entropy(logits.float(), target[keep], reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return loss / n


class CountingTrainer(Trainer):
    """Counts the real tokens of every micro-batch it trains on (in the main process, whatever the data workers).
    With `labelled_logits`, training steps compute the loss by `labelled_loss` (evaluation keeps the model's)."""

    def __init__(self, *args, labelled_logits: bool = False, **kw):
        super().__init__(*args, **kw)
        self.real_tokens = 0
        self.labelled_logits = labelled_logits
        self.add_callback(RealTokensPerSecond(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.labelled_logits and model.training and not return_outputs:
            return labelled_loss(model, inputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, *args, **kw):
        self.real_tokens += real_tokens(inputs)
        return super().training_step(model, inputs, *args, **kw)


class RealTokensPerSecond(TrainerCallback):
    """Adds `real_tokens_per_second` (all ranks together) and `real_tokens` to every log entry."""

    def __init__(self, counter):
        self.counter = counter          # has .real_tokens, reset here at each log
        self.t0 = None
        self.total = 0

    def on_step_begin(self, args, state, control, **kw):
        if self.t0 is None:
            self.t0 = time.perf_counter()
            self.counter.real_tokens = 0

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is None or self.t0 is None or "loss" not in logs:
            return
        import torch
        import torch.distributed as dist
        n = self.counter.real_tokens
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([n], device=args.device)
            dist.all_reduce(t)
            n = int(t.item())
        now = time.perf_counter()
        self.total += n
        extra = {"real_tokens": self.total, "real_tokens_per_second": round(n / (now - self.t0), 1)}
        logs.update(extra)                          # what the console / report_to loggers print
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)     # what train_report.json keeps
        self.counter.real_tokens, self.t0 = 0, now


def write_charts(log_history: list[dict], out_dir: Path) -> list[Path]:
    """loss.png (train and eval), lr.png, grad_norm.png against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        return [p[0] for p in pts], [p[1] for p in pts]

    written = []
    for name, keys, ylabel in (("loss.png", ("loss", "eval_loss"), "loss"), ("lr.png", ("learning_rate",), "learning rate"),
                               ("grad_norm.png", ("grad_norm",), "gradient norm")):
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key in keys:
            x, y = series(key)
            if x:
                ax.plot(x, y, marker="." if len(x) < 50 else None, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    return written
