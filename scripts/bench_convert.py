"""Peak memory of `lawchat convert` on a full-size ChatGLM3-6B checkpoint (random fp16 weights, THUDM's layout:
7 `pytorch_model-0000N-of-00007.bin` shards + index, config.json, a SentencePiece tokenizer.model trained here).

    python scripts/bench_convert.py --workdir /tmp/bench-convert      # needs ~26 GB of disk, no GPU

Prints the checkpoint size, the conversion's wall time and its peak RSS (the converter process alone).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

CFG = dict(model_type="chatglm", num_layers=28, hidden_size=4096, ffn_hidden_size=13696, kv_channels=128,
           num_attention_heads=32, multi_query_attention=True, multi_query_group_num=2, layernorm_epsilon=1e-5,
           seq_length=8192, add_qkv_bias=True, add_bias_linear=False, rmsnorm=True, post_layer_norm=True,
           apply_residual_connection_post_layernorm=False, original_rope=True, padded_vocab_size=65024,
           torch_dtype="float16", architectures=["ChatGLMModel"], _name_or_path="THUDM/chatglm3-6b")


def tokenizer_model(d: Path) -> bytes:
    import sentencepiece as spm
    root = Path(__file__).resolve().parent.parent
    text = (root / "trainer" / "data" / "everyday_qa.csv").read_text(encoding="utf-8")
    (d / "corpus.txt").write_text(text + "\nThe employer shall pay wages in full and on time. 123\n" * 3,
                                  encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=900,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    return (d / "sp.model").read_bytes()


def layer_tensors(i: int | None, g: torch.Generator) -> dict[str, torch.Tensor]:
    c = CFG
    h, hd, nh, ng, ffn = c["hidden_size"], c["kv_channels"], c["num_attention_heads"], c["multi_query_group_num"], \
        c["ffn_hidden_size"]
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).half()     # noqa: E731
    if i is None:
        return {"transformer.embedding.word_embeddings.weight": r(c["padded_vocab_size"], h),
                "transformer.rotary_pos_emb.inv_freq": torch.ones(hd // 4).half(),
                "transformer.encoder.final_layernorm.weight": torch.ones(h).half(),
                "transformer.output_layer.weight": r(c["padded_vocab_size"], h)}
    p = f"transformer.encoder.layers.{i}."
    return {p + "input_layernorm.weight": torch.ones(h).half(), p + "post_attention_layernorm.weight": torch.ones(h).half(),
            p + "self_attention.query_key_value.weight": r((nh + 2 * ng) * hd, h),
            p + "self_attention.query_key_value.bias": r((nh + 2 * ng) * hd),
            p + "self_attention.dense.weight": r(h, nh * hd),
            p + "mlp.dense_h_to_4h.weight": r(2 * ffn, h), p + "mlp.dense_4h_to_h.weight": r(h, ffn)}


def write_checkpoint(d: Path) -> int:
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    groups = [[None]] + [list(range(i, min(i + 5, 28))) for i in range(0, 28, 5)]   # 7 shards, like THUDM's
    weight_map, total = {}, 0
    for n, layers in enumerate(groups, 1):
        name = f"pytorch_model-{n:05d}-of-{len(groups):05d}.bin"
        shard = {}
        for i in layers:
            shard.update(layer_tensors(i, g))
        torch.save(shard, d / name)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update({k: name for k in shard})
        del shard
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(CFG))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-convert"))
    a = ap.parse_args()
    src, dst = a.workdir / "chatglm3-6b", a.workdir / "glm"
    if not (src / "config.json").is_file():
        a.workdir.mkdir(parents=True, exist_ok=True)
        sp = tokenizer_model(a.workdir)
        t0 = time.time()
        total = write_checkpoint(src)
        (src / "tokenizer.model").write_bytes(sp)
        print(f"wrote {total / 1e9:.2f} GB of fp16 shards in {time.time() - t0:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in src.glob("*.bin"))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "lawchat_cli.main", "convert", str(src), str(dst)],
                       capture_output=True, text=True)
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20     # KiB -> GiB
    if r.returncode != 0:
        sys.exit(f"convert failed:\n{r.stderr[-2000:]}")
    out = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"| checkpoint | shards | converted | wall s | peak RSS GiB |\n|---|---|---|---|---|\n"
          f"| {size / 1e9:.2f} GB | {len(list(src.glob('*.bin')))} | {out / 1e9:.2f} GB safetensors | {wall:.0f} | "
          f"{peak:.2f} |")


if __name__ == "__main__":
    main()
