"""prepare → train → merge as the demo runs it (tiny sizes), plus label masking, resume and reuse."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_CONFIG
from lawchat_trainer.demo import build_demo
from lawchat_server.prompt import IGNORE_INDEX, encode_training_example
from lawchat_trainer.finetune import finetune

BIN = Path(sys.executable).parent


def test_labels_mask_the_prompt_and_learn_reply_and_eos(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    conv = [{"role": "user", "content": "试用期多长？"}, {"role": "assistant", "content": "不得超过六个月。"}]
    row, p_trunc, r_trunc = encode_training_example(tok, conv, max_input_length=64, max_output_length=64)
    prompt = tok.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=False)
    n_prompt = len(tok.encode(prompt, add_special_tokens=False))
    assert prompt.endswith("<|assistant|>\n")
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    learned = row["labels"][n_prompt:]
    assert learned[-1] == tok.eos_token_id
    assert tok.decode(learned[:-1]) == "不得超过六个月。"
    assert row["input_ids"][n_prompt:] == learned
    assert not p_trunc and not r_trunc

    row, p_trunc, r_trunc = encode_training_example(tok, conv, max_input_length=4, max_output_length=3)
    assert p_trunc and r_trunc
    assert row["labels"].count(IGNORE_INDEX) == 4 and row["labels"][-1] == tok.eos_token_id and len(row["labels"]) == 7


def test_demo_artifacts_and_merge_equals_adapter(tiny_demo):
    adapter, merged, base = tiny_demo / "lora" / "final", tiny_demo / "merged", tiny_demo / "base"
    report = json.loads((tiny_demo / "eval" / "report.json").read_text(encoding="utf-8"))
    assert set(report["models"]) == {str(base), str(merged)}
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (merged / "model.safetensors").is_file()
    assert "chat_template" in (merged / "tokenizer_config.json").read_text(encoding="utf-8") or \
        (merged / "chat_template.jinja").is_file()
    report = json.loads((tiny_demo / "lora" / "train_report.json").read_text())
    assert report["global_step"] == 12 and report["train"]["examples"] > 100
    assert any("eval_loss" in h for h in report["log_history"])

    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    with torch.inference_mode():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)        # the fine-tune changed the model


def test_resume_continues_from_the_last_checkpoint(tiny_demo, tmp_path):
    out = tmp_path / "lora"
    shutil.copytree(tiny_demo / "lora", out)
    cfg = yaml.safe_load((out / "lora.yaml").read_text(encoding="utf-8"))
    cfg["training_args"]["max_steps"] = 18
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    finetune(tiny_demo / "data" / "prepared", tiny_demo / "base", tmp_path / "lora.yaml", output_dir=out, resume=True)
    report = json.loads((out / "train_report.json").read_text())
    assert report["global_step"] == 18
    losses = {h["step"]: h["loss"] for h in report["log_history"] if "loss" in h}
    first = {h["step"]: h["loss"] for h in json.loads((tiny_demo / "lora" / "train_report.json").read_text())
             ["log_history"] if "loss" in h}
    assert set(first) == {4, 8, 12} and 16 in losses
    # steps 1-12 were not re-run: a fresh run with max_steps=18 decays the LR differently and logs other losses
    assert all(losses[s] == first[s] for s in first)


def test_second_build_reuses_every_step(tiny_demo, capsys):
    before = (tiny_demo / "merged" / "model.safetensors").stat().st_mtime_ns
    build_demo(TINY_CONFIG, workdir=tiny_demo)
    err = capsys.readouterr().err
    assert err.count("up to date, reused") == 5
    assert (tiny_demo / "merged" / "model.safetensors").stat().st_mtime_ns == before


def test_cli_errors_exit_2(tmp_path, tiny_demo):
    r = subprocess.run([str(BIN / "lawchat"), "train", str(tmp_path / "nodata"), str(tiny_demo / "base"),
                        str(TINY_CONFIG)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown keys" in r.stderr     # a demo config is not a lora config
    cfg = tmp_path / "lora.yaml"
    cfg.write_text("max_input_length: 64\n")
    r = subprocess.run([str(BIN / "lawchat"), "train", str(tmp_path / "nodata"), str(tiny_demo / "base"), str(cfg)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no training file" in r.stderr
    r = subprocess.run([str(BIN / "lawchat"), "merge", str(tiny_demo / "base"), str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a PEFT adapter dir" in r.stderr


def test_scores_identical_disjoint_and_empty():
    from lawchat_trainer.evaluate import score
    same = score(["劳动者有下列情形之一的，用人单位可以解除劳动合同。"], ["劳动者有下列情形之一的，用人单位可以解除劳动合同。"])
    assert (same.rouge_1, same.rouge_2, same.rouge_l, same.bleu_4) == (100.0, 100.0, 100.0, 100.0)
    none = score(["苹果香蕉"], ["劳动合同"])
    assert none.rouge_1 == 0.0 and none.bleu_4 < 5
    empty = score(["", "劳动合同解除"], ["劳动合同解除", "劳动合同解除"])   # an empty answer scores 0, no crash
    assert empty.examples == 2 and 49 < empty.rouge_1 < 51


def test_eval_cli_on_a_tiny_split(tiny_demo, tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run([str(BIN / "lawchat"), "eval", str(tiny_demo / "merged"), str(tiny_demo / "data" / "prepared"),
                        "--compare", str(tiny_demo / "base"), "--max-new-tokens", "16", "--output", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert list(report["models"]) == [str(tiny_demo / "base"), str(tiny_demo / "merged")]
    n_test = len((tiny_demo / "data" / "prepared" / "test.jsonl").read_text(encoding="utf-8").splitlines())
    for s in report["models"].values():
        assert s["examples"] == n_test < 50 and all(0 <= s[k] <= 100 for k in ("rouge_1", "rouge_l", "bleu_4"))
    assert "| ROUGE-1 |" in r.stdout
    # the side-by-side file: each question with the reference and both models' answers, as the report scored them
    rows = [json.loads(line) for line in (tmp_path / "eval_side_by_side.jsonl").read_text(encoding="utf-8").splitlines()]
    test_rows = [json.loads(line)["conversations"] for line in
                 (tiny_demo / "data" / "prepared" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["question"] for r in rows] == [c[-2]["content"] for c in test_rows]
    assert [r["reference"] for r in rows] == [c[-1]["content"] for c in test_rows]
    assert set(rows[0]) == {"question", "reference", "微调前", "微调后"}
    assert [r["微调后"] for r in rows] == [a[str(tiny_demo / "merged")] for a in report["answers"]]
    assert any(r["微调前"] != r["微调后"] for r in rows)
    png = (tmp_path / "eval_scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_the_pretrained_base_is_cached_outside_the_checkout_and_reused(tiny_demo, tmp_path, monkeypatch):
    """The first build pretrains and caches the base under $LAWCHAT_CACHE_DIR (bf16, its recipe key); the next build
    of the same recipe copies it (fp32 of those bf16 weights, the same tokenizer) instead of pretraining; another
    recipe, or base_cache: false, pretrains."""
    import shutil

    from safetensors.torch import load_file

    from lawchat_trainer import demo
    cfg = demo.load_demo_config(TINY_CONFIG)
    monkeypatch.setenv("LAWCHAT_CACHE_DIR", str(tmp_path / "cache"))
    pretrained = []

    def pretrain(cfg, out):                        # the tiny demo's base stands in for a pretraining run
        pretrained.append(out)
        for f in (tiny_demo / "base").iterdir():
            if f.is_file() and f.name != demo.STAMP:
                shutil.copy2(f, out / f.name)
        return {"params": 1}
    monkeypatch.setattr(demo, "pretrain_base", pretrain)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    assert demo.build_base(cfg, first) == {"params": 1} and len(pretrained) == 1
    cached = demo.base_cache(demo.base_key(cfg))
    assert cached.parent.parent == tmp_path / "cache" and (cached / demo.CACHE_STAMP).is_file()
    assert demo.build_base(cfg, second)["cached"] == str(cached) and len(pretrained) == 1
    got, ref = load_file(second / "model.safetensors"), load_file(tiny_demo / "base" / "model.safetensors")
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], ref[k].to(torch.bfloat16).float(), atol=0, rtol=0)
    assert (second / "tokenizer.json").read_bytes() == (tiny_demo / "base" / "tokenizer.json").read_bytes()
    other = {**cfg, "pretrain": {**cfg["pretrain"], "steps": cfg["pretrain"]["steps"] + 1}}
    demo.build_base(other, tmp_path)
    demo.build_base({**cfg, "base_cache": False}, tmp_path)
    assert len(pretrained) == 3 and not [p for p in (tmp_path / "cache" / "demo_base").iterdir() if p.name[0] == "."]


def test_pretraining_batches_need_no_padding_mask_nor_logits_on_padding():
    """base_model.pretrain passes no attention mask: make_batch pads on the right, so under causal attention every
    real token sees only real tokens and the loss equals the masked one (per row too)."""
    from lawchat_trainer import base_model as bm
    texts = ["劳动合同法第三十九条规定：劳动者在试用期间被证明不符合录用条件的，用人单位可以解除劳动合同。",
             "第十九条 劳动合同期限三个月以上不满一年的，试用期不得超过一个月。", "问：试用期多长？答：不得超过六个月。"]
    tok = bm.train_tokenizer(texts * 4, 400)
    torch.manual_seed(0)
    model = bm.build_model(tok, bm.ModelShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                              num_key_value_heads=1, head_dim=32, intermediate_size=128)).eval()
    docs = bm.encode_documents(tok, texts, 64)
    assert len({len(d) for d in docs}) == 3                       # rows of three lengths: two carry padding
    ids, labels = bm.make_batch(docs, tok.pad_token_id)
    with torch.no_grad():
        plain = model(input_ids=ids, labels=labels)
        masked = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels)
        for row, d in enumerate(docs):                            # each row's real logits match the row alone
            alone = model(input_ids=torch.tensor([d])).logits[0]
            torch.testing.assert_close(plain.logits[row, :len(d)], alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(plain.loss, masked.loss, atol=1e-5, rtol=1e-5)
    from lawchat_trainer.train_log import labelled_loss      # what pretrain computes: the LM head on labels only
    with torch.no_grad():
        torch.testing.assert_close(labelled_loss(model, {"input_ids": ids, "labels": labels}), masked.loss,
                                   atol=1e-5, rtol=1e-5)


KEEP_FREED = """
import sys, torch
from lawchat_trainer import base_model as bm
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
kept = bm.keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.ones(64 << 20)                     # 64 M floats: 256 MB, touched
before = rss()
del x
print(int(kept), before - rss())
"""


def test_pretraining_keeps_freed_memory_for_the_next_step():
    """A step's ~100 MB logits are freed and allocated again every step: with keep_freed_memory glibc keeps the
    pages (no zero-filling them again); without it they go back to the OS at once."""
    import subprocess
    import sys
    out = {mode: subprocess.run([sys.executable, "-c", KEEP_FREED, mode], capture_output=True, text=True,
                                timeout=120) for mode in ("keep", "plain")}
    assert all(r.returncode == 0 for r in out.values()), {m: r.stderr for m, r in out.items()}
    kept, returned = (tuple(map(int, out[m].stdout.split())) for m in ("keep", "plain"))
    assert kept[0] == 1 and kept[1] < 16 << 20          # the freed 256 MB stay with the process
    assert returned[1] > 200 << 20                       # glibc's default hands them back
