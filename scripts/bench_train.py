"""LoRA training throughput on a GPU: the seed's recipe (baseline, same run) against lawchat's shipped profiles.

A ChatGLM3-6B-shaped GlmForCausalLM with random bf16 weights (trainer/random_model.py) and synthetic
conversations whose lengths follow lawzhidao's mix (70-580 tokens, prompt ~15-25 %). Each profile runs
`lawchat train` in its own process (clean peak-memory figures) for --steps steps; tokens/s is the mean of the
logged real (non-pad) tokens/s after the first log. MFU = tokens/s x 4 x frozen params / the card's bf16 dense
peak: LoRA's backward computes activation gradients (2 N) but no frozen-weight gradients; attention FLOPs
(~1 % at these lengths) and recomputation under gradient checkpointing are not counted.

    python scripts/bench_train.py --tokenizer runs/demo/merged --workdir /tmp/bench-train [--world-sizes 1,2]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}

# name -> (base config, overrides of the top level, overrides of training_args); 0 is the baseline, 1 and 2 the
# shipped profiles (bench_train --world-sizes runs 1 under torchrun)
SEED = {"batching": "padded", "attention": "sdpa", "liger_kernel": False}
OLD = {"batching": "grouped", "attention": "sdpa"}           # lora.yaml before packing + varlen attention
PROFILES = {
    "seed recipe (fp32, ckpt, batch 4, padded, sdpa)": (
        "lora.yaml", SEED, {"bf16": False, "gradient_checkpointing": True, "per_device_train_batch_size": 4}),
    "lora.yaml as shipped": ("lora.yaml", {}, {}),
    "lora-24gb.yaml as shipped": ("lora-24gb.yaml", {}, {}),
    "lora.yaml, grouped, sdpa, batch 16 (last shipped)": ("lora.yaml", OLD, {"per_device_train_batch_size": 16}),
    "lora.yaml, grouped, batch 16": ("lora.yaml", {"batching": "grouped"}, {"per_device_train_batch_size": 16}),
    "lora.yaml, batch 16": ("lora.yaml", {}, {"per_device_train_batch_size": 16}),
    "lora.yaml, batch 48": ("lora.yaml", {}, {"per_device_train_batch_size": 48}),
    "lora.yaml, lora_dropout 0": ("lora.yaml", {"peft_config": "dropout0"}, {}),
    "lora.yaml, liger off": ("lora.yaml", {"liger_kernel": False}, {}),
    "lora-24gb.yaml, grouped, sdpa (last shipped)": ("lora-24gb.yaml", {**OLD, "liger_kernel": False}, {}),
    "lora-24gb.yaml, batch 24": ("lora-24gb.yaml", {}, {"per_device_train_batch_size": 24}),
    "lora.yaml, grouped, batch 32": ("lora.yaml", {"batching": "grouped"}, {}),
    "qlora.yaml as shipped": ("qlora.yaml", {}, {}),
    "qlora.yaml, liger off": ("qlora.yaml", {"liger_kernel": False}, {}),
    "qlora.yaml, batch 32": ("qlora.yaml", {}, {"per_device_train_batch_size": 32}),
}


def make_data(out: Path, tokenizer_dir: Path, n: int, seed: int = 0) -> dict:
    """train.jsonl of one-turn conversations; -> token length stats under the model's chat template."""
    from transformers import AutoTokenizer

    from lawchat_server.prompt import encode_training_example
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(seed)
    chars = [chr(c) for c in range(0x4E00, 0x9FA5) if len(tok.encode(chr(c), add_special_tokens=False)) == 1][:3000]
    assert len(chars) >= 100, "the tokenizer has too few single-token CJK characters for exact lengths"
    rows, lengths = [], []
    for _ in range(n):
        total = int(rng.triangular(70, 580, 220))          # lawzhidao-like: most near 200, a long tail to 580
        q = max(8, int(total * rng.uniform(0.15, 0.25)))
        conv = [{"role": "user", "content": "".join(rng.choices(chars, k=q))},
                {"role": "assistant", "content": "".join(rng.choices(chars, k=max(8, total - q - 8)))}]
        row, _, _ = encode_training_example(tok, conv, 256, 512)
        lengths.append(len(row["input_ids"]))
        rows.append(json.dumps({"conversations": conv}, ensure_ascii=False))
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    lengths.sort()
    return {"examples": n, "min": lengths[0], "median": lengths[n // 2], "mean": sum(lengths) / n, "max": lengths[-1]}


def write_config(name: str, work: Path, steps: int, world: int = 1) -> tuple[Path, str]:
    """The profile's config file for `lawchat train`; -> (path, slug)."""
    base, top, targs = PROFILES[name]
    cfg = yaml.safe_load((ROOT / "configs" / base).read_text(encoding="utf-8"))
    if top.get("peft_config") == "dropout0":
        top = {k: v for k, v in top.items() if k != "peft_config"}
        cfg["peft_config"]["lora_dropout"] = 0.0
    cfg.update(top)
    cfg["data_config"].update(val_file=None, test_file=None)
    cfg["training_args"].update(targs, max_steps=steps, logging_steps=5, save_strategy="no", eval_strategy="no",
                                disable_tqdm=True, log_level="warning", report_to="none")
    slug = f"p{list(PROFILES).index(name)}_w{world}"
    path = work / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path, slug


def run_profile(name: str, model: Path, data: Path, work: Path, steps: int, world: int) -> dict:
    config, slug = write_config(name, work, steps, world)
    out = work / slug
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
                if world > 1 else [sys.executable])
    cmd = [*launcher, "-m", "lawchat_trainer.cli", "train", str(data), str(model), str(config),
           "--output-dir", str(out)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if world == 1:       # one process on one GPU (several visible GPUs would make the Trainer use DataParallel)
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": r.stderr[-1500:]}
    rep = json.loads((out / "train_report.json").read_text())
    rates = [h["real_tokens_per_second"] for h in rep["log_history"] if "real_tokens_per_second" in h][1:]
    return {"tokens_per_s": sum(rates) / len(rates), "peak_gb": rep["peak_memory_gb"], "world": world,
            "loss": rep["train_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="a model dir whose tokenizer + chat template to use")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-train"))
    ap.add_argument("--model", type=Path, default=None, help="an existing model dir (default: make the random 6B)")
    ap.add_argument("--profiles", default=",".join(str(i) for i in range(len(PROFILES))))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--world-sizes", default="1", help="e.g. 1,2: the throughput profile under torchrun on N GPUs")
    a = ap.parse_args()
    import torch

    from lawchat_trainer.random_model import make_random_model
    a.workdir.mkdir(parents=True, exist_ok=True)
    model = a.model or a.workdir / "glm6b"
    if not (model / "config.json").is_file():
        make_random_model(model, a.tokenizer, device="cuda")
        torch.cuda.empty_cache()
    stats = make_data(a.workdir / "data", model, a.examples)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (a dry run)"
    peak = next((v for k, v in PEAK_BF16.items() if k in card), None)
    n_params = 6.24e9   # ChatGLM3-6B shape
    names = list(PROFILES)
    print(f"{card}, torch {torch.__version__}; data: {stats}; {a.steps} steps per profile", flush=True)
    print("| profile | GPUs | real tokens/s | vs seed | peak GB | MFU |\n|---|---|---|---|---|---|", flush=True)
    seed_rate = None
    todo = [(names[int(i)], 1) for i in a.profiles.split(",")]
    todo += [(names[1], int(w)) for w in a.world_sizes.split(",") if int(w) > 1]     # the shipped lora.yaml
    for name, world in todo:
        r = run_profile(name, model, a.workdir / "data", a.workdir, a.steps, world)
        if "error" in r:
            print(f"| {name} | {world} | failed: {r['error'][-300:]!r} | | | |", flush=True)
            continue
        seed_rate = seed_rate or (r["tokens_per_s"] if name == names[0] else None)
        mfu = r["tokens_per_s"] * 4 * n_params / (peak * world) if peak else float("nan")
        ratio = f"{r['tokens_per_s'] / seed_rate:.2f}x" if seed_rate else "-"
        print(f"| {name} | {world} | {r['tokens_per_s']:,.0f} | {ratio} | {r['peak_gb']} | {mfu:.1%} |", flush=True)


if __name__ == "__main__":
    main()
