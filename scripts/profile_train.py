"""profile_train: where a LoRA training step's time goes on the GPU (torch.profiler over a few Trainer steps).

    python scripts/profile_train.py --tokenizer <model dir> --profiles 1,14 [--model /tmp/glm6b]

Runs `finetune()` in-process on a bench_train.py profile (same model and data), profiles steps after a warm-up,
and prints per step: wall time, summed kernel time (one stream, so kernel time / wall = how busy the GPU is), and
kernel time by kind (GEMM, attention, Triton, elementwise) with the top kernels. Before that it checks the
varlen attention kernel (trainer/attention.py) on the GPU against SDPA one example at a time, forward and backward.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_train import PROFILES, make_data, write_config
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

# first match wins: attention kernels also name cutlass/sm90 types, PyTorch's own elementwise ones end in _kernel
KINDS = (("attention", ("flash", "fmha", "sdpa", "attention")),
         ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_")),
         ("elementwise", ("at::native", "elementwise", "vectorized", "reduce", "copy")))


def kind_of(name: str) -> str:
    """attention | gemm | elementwise (PyTorch's) | triton (liger's and other Triton kernels: plain names)."""
    low = name.lower()
    hit = next((k for k, keys in KINDS if any(x in low for x in keys)), None)
    if hit:
        return hit
    return "triton" if "::" not in name and "<" not in name else "other"


class ProfileSteps(TrainerCallback):
    def __init__(self, warm: int, active: int):
        self.warm, self.active, self.prof, self.t0 = warm, active, None, 0.0

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warm and self.prof is None:
            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.prof is not None and state.global_step == self.warm + self.active:
            torch.cuda.synchronize()
            wall = (time.perf_counter() - self.t0) / self.active
            self.prof.__exit__(None, None, None)
            report(self.prof, wall, self.active)


def report(prof, wall: float, steps: int) -> None:
    by_name, by_kind, n = defaultdict(float), defaultdict(float), defaultdict(int)
    for e in prof.key_averages():
        if e.device_time_total <= 0:
            continue
        by_name[e.key] += e.device_time_total / steps / 1e3
        n[e.key] += e.count // steps
        by_kind[kind_of(e.key)] += e.device_time_total / steps / 1e3
    gpu = sum(by_kind.values())
    print(f"per step: wall {wall * 1e3:.1f} ms, kernels {gpu:.1f} ms ({gpu / wall / 1e3:.0%} busy), "
          f"{sum(n.values())} kernel launches", flush=True)
    print("| kind | ms/step | share |\n|---|---|---|")
    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.1f} | {v / gpu:.0%} |")
    print("| kernel | calls/step | ms/step |\n|---|---|---|")
    for name, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:18]:
        print(f"| {name[:90]} | {n[name]} | {v:.2f} |")


def check_varlen() -> None:
    """Flash varlen (bf16) vs SDPA per example (fp32): outputs and input gradients, GLM-6B heads."""
    from types import SimpleNamespace

    from lawchat_trainer.attention import varlen_attention
    g = torch.Generator(device="cuda").manual_seed(0)
    lens = [37, 230, 5, 411, 120]
    t, cu = sum(lens), torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 32, t, 128, device="cuda", generator=g)
    k, v = (torch.randn(1, 2, t, 128, device="cuda", generator=g) for _ in range(2))
    mod = SimpleNamespace(training=True)
    outs, grads = [], []
    for dev_dtype, on_cpu in ((torch.bfloat16, False), (torch.float32, True)):
        xs = [x.detach().to("cpu" if on_cpu else "cuda", dev_dtype).requires_grad_() for x in (q, k, v)]
        out, _ = varlen_attention(mod, *xs, scaling=128 ** -0.5, cu_seq_lens_q=cu.to(xs[0].device),
                                  max_length_q=max(lens))
        out.float().pow(2).sum().backward()
        outs.append(out.float().cpu())
        grads.append([x.grad.float().cpu() for x in xs])
    err = lambda a, b: ((a - b).norm() / b.norm()).item()   # noqa: E731
    print(f"varlen flash (bf16) vs SDPA per example (fp32): out rel err {err(outs[0], outs[1]):.2e}; grads q/k/v "
          + " / ".join(f"{err(a, b):.2e}" for a, b in zip(*grads)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=Path("/tmp/bench-train/glm6b"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/profile-train"))
    ap.add_argument("--profiles", default="1")
    ap.add_argument("--warm", type=int, default=6)
    ap.add_argument("--active", type=int, default=4)
    a = ap.parse_args()
    import lawchat_trainer.train_log as train_log
    from lawchat_trainer.finetune import finetune
    from lawchat_trainer.random_model import make_random_model
    check_varlen()
    if not (a.model / "config.json").is_file():
        make_random_model(a.model, a.tokenizer, device="cuda")
        torch.cuda.empty_cache()
    a.workdir.mkdir(parents=True, exist_ok=True)
    make_data(a.workdir / "data", a.model, 1000)
    base_init = train_log.CountingTrainer.__init__
    for i in a.profiles.split(","):
        name = list(PROFILES)[int(i)]
        print(f"\n## {name} — {torch.cuda.get_device_name()}", flush=True)
        config, slug = write_config(name, a.workdir, a.warm + a.active + 1)

        def init(self, *args, **kw):
            base_init(self, *args, **kw)
            self.add_callback(ProfileSteps(a.warm, a.active))
        train_log.CountingTrainer.__init__ = init
        finetune(a.workdir / "data", a.model, config, output_dir=a.workdir / slug)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
