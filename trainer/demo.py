"""demo: build the offline demo legal assistant, step by step, reusing every step already built.

laws.db -> base/ (tokenizer + tiny GLM pretrained on statutes) -> data/lawzhidao_sample.csv
        -> data/prepared/*.jsonl -> lora/final (PEFT adapter) -> merged/ (what `lawchat serve` loads)
        -> eval/report.json (ROUGE/BLEU on the test split, base vs fine-tuned)
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import yaml

from . import base_model, demo_corpus
from . import evaluate as eval_
from .finetune import finetune
from .merge import merge
from .prepare import prepare, print_report

STAMP = ".lawchat_step.json"
SAMPLE_QUESTION = "劳动合同法第三十九条是怎么规定的？"


def load_demo_config(path: str | Path) -> dict:
    cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    required = {"workdir", "laws", "tokenizer_corpus", "vocab_size", "model", "pretrain", "pretrain_qa_per_article",
                "questions_per_article", "seed", "finetune"}
    missing = required - set(cfg)
    if missing:
        raise ValueError(f"{path}: missing keys {sorted(missing)}")
    return cfg


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def is_built(out: Path, key: str) -> bool:
    stamp = out / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()).get("key") == key


def mark_built(out: Path, key: str, info: dict) -> None:
    (out / STAMP).write_text(json.dumps({"key": key, **info}, ensure_ascii=False, indent=2) + "\n")


def log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def build_base(cfg: dict, out: Path) -> dict:
    db = demo_corpus.find_laws_db()
    focus = demo_corpus.read_articles(db, cfg["laws"])
    tok_articles = focus if cfg["tokenizer_corpus"] == "focus" else demo_corpus.read_articles(db)
    # forum-style Q&A with other seeds' question wording than the fine-tune set, plus the everyday Q&A
    forum = demo_corpus.forum_lines(
        demo_corpus.statute_rows(focus, cfg["pretrain_qa_per_article"], cfg["seed"] + 1) + demo_corpus.everyday_rows())
    statutes = demo_corpus.statute_lines(focus)
    log(f"base model: tokenizer on {len(tok_articles)} articles + {len(forum)} Q&A texts, pretraining on "
        f"{len(statutes)} articles of {cfg['laws']} + {len(forum)} Q&A texts")
    info = base_model.make_base_model(
        demo_corpus.statute_lines(tok_articles) + forum, statutes + forum, out, cfg["vocab_size"],
        base_model.ModelShape(**cfg["model"]), base_model.PretrainConfig(**cfg["pretrain"]))
    log(f"base model: {info}")
    return info


def build_data(cfg: dict, out: Path) -> dict:
    articles = demo_corpus.read_articles(demo_corpus.find_laws_db(), cfg["laws"])
    clean = demo_corpus.statute_rows(articles, cfg["questions_per_article"], cfg["seed"]) + demo_corpus.everyday_rows()
    csv_path = out / "lawzhidao_sample.csv"
    demo_corpus.write_lawzhidao_csv(clean + demo_corpus.messy_rows(clean), csv_path)
    report = prepare(csv_path, out / "prepared", seed=cfg["seed"])
    print_report(report)
    return {"rows": report.rows_read, "kept": report.kept, "dropped": report.dropped}


def build_adapter(cfg: dict, workdir: Path, out: Path) -> dict:
    lora_yaml = out / "lora.yaml"
    lora_yaml.write_text(yaml.safe_dump(cfg["finetune"], allow_unicode=True, sort_keys=False), encoding="utf-8")
    finetune(workdir / "data" / "prepared", workdir / "base", lora_yaml, output_dir=out)
    return {}


def build_merged(workdir: Path, out: Path) -> dict:
    merge(workdir / "lora" / "final", out, base=workdir / "base")
    return {"adapter": str(workdir / "lora" / "final"), "base": str(workdir / "base")}


def build_eval(workdir: Path, out: Path) -> dict:
    report = eval_.evaluate(workdir / "merged", workdir / "data" / "prepared", split="test", compare=workdir / "base")
    eval_.print_report(report, file=sys.stderr)
    eval_.write_report(report, out / "report.json")
    return report["models"]


def sample_answer(model_dir: Path, question: str, max_new_tokens: int = 200) -> str:
    """Greedy answer of a model dir to one question (a smoke check printed after the build)."""
    return eval_.generate_answers(model_dir, [[{"role": "user", "content": question}]], max_new_tokens, "cpu")[0]


def build_demo(config_path: str | Path, workdir: str | Path | None = None) -> Path:
    """Build (or reuse) every step; returns the merged model dir."""
    cfg = load_demo_config(config_path)
    workdir = Path(workdir or cfg["workdir"])
    everyday = demo_corpus.EVERYDAY_QA.read_text(encoding="utf-8")
    base_key = digest(cfg["laws"], cfg["tokenizer_corpus"], cfg["vocab_size"], cfg["model"], cfg["pretrain"],
                      cfg["pretrain_qa_per_article"], cfg["seed"], everyday)
    data_key = digest(cfg["laws"], cfg["questions_per_article"], cfg["seed"], everyday)
    adapter_key = digest(base_key, data_key, cfg["finetune"])
    merged_key = digest(adapter_key)
    steps = [   # (name, key of its inputs, build(out) -> info stamped beside the output)
        ("base", base_key, lambda out: build_base(cfg, out)),
        ("data", data_key, lambda out: build_data(cfg, out)),
        ("lora", adapter_key, lambda out: build_adapter(cfg, workdir, out)),
        ("merged", merged_key, lambda out: build_merged(workdir, out)),
        ("eval", merged_key, lambda out: build_eval(workdir, out)),
    ]
    t_all = time.time()
    for i, (name, key, build) in enumerate(steps, 1):
        out = workdir / name
        if is_built(out, key):
            log(f"step {i}/{len(steps)} {name}: up to date, reused ({out})")
            continue
        log(f"step {i}/{len(steps)} {name}: building ...")
        t0 = time.time()
        out.mkdir(parents=True, exist_ok=True)
        mark_built(out, key, build(out))
        log(f"step {i}/{len(steps)} {name}: done in {time.time() - t0:.0f} s")
    log(f"demo model ready in {time.time() - t_all:.0f} s: {workdir / 'merged'}")
    return workdir / "merged"
