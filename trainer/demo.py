"""demo: build the offline demo legal assistant, step by step, reusing every step already built.

laws.db -> base/ (tokenizer + tiny GLM pretrained on statutes, the stand-in for downloading ChatGLM3-6B; kept in
        the base cache outside the checkout, so later clones reuse it) -> data/lawzhidao_sample.csv
        -> data/prepared/*.jsonl -> lora/final (PEFT adapter) -> merged/ (what `lawchat serve` loads)
        -> eval/report.json (ROUGE/BLEU on the test split, base vs fine-tuned)
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import yaml

from lawchat_server import calibration, legal_terms, retrieval
from lawchat_server.retrieval import RetrievalConfig

from . import base_model, demo_corpus
from . import evaluate as eval_
from .finetune import finetune
from .merge import merge
from .prepare import prepare, print_report

CALIBRATION_QUESTIONS = "retrieval_questions.jsonl"    # labelled everyday questions the citation threshold is fit on
RETRIEVAL_CODE = (Path(legal_terms.__file__), Path(retrieval.__file__),     # what the retrieved context depends on
                  Path(calibration.__file__), Path(__file__).parent / "data" / CALIBRATION_QUESTIONS)

STAMP = ".lawchat_step.json"
BASE_RECIPE = 2                # bump when build_base's pretraining mix changes in code (2: copy practice without Q&A)
INDEX_FILE = "laws.sqlite"      # runs/demo/index/laws.sqlite: every article in force, for context and citations
CITE_QUESTIONS = Path(__file__).parent / "data" / "retrieval_questions.jsonl"
CACHE_ENV = "LAWCHAT_CACHE_DIR"   # where pretrained demo bases are kept (default ~/.cache/lawchat), one dir per recipe
CACHE_STAMP = "lawchat_base.json"
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


def base_key(cfg: dict) -> str:
    """What the base model depends on: the pretraining recipe in code and in the config, the corpus choices."""
    everyday = demo_corpus.EVERYDAY_QA.read_text(encoding="utf-8")
    ctx = {k: v for k, v in cfg["context"].items() if k != "plain_share"} if cfg.get("context") else None  # the
    return digest(BASE_RECIPE, cfg["laws"], cfg["tokenizer_corpus"], cfg["vocab_size"], cfg["model"],  # fine-tune's
                  cfg["pretrain"], cfg["pretrain_qa_per_article"], cfg["seed"], everyday, ctx)


def base_cache(key: str) -> Path:
    """The cached base of this recipe: $LAWCHAT_CACHE_DIR (or ~/.cache/lawchat)/demo_base/<key> — outside the
    checkout (no weights in git), shared by every clone on the machine, copyable to an air-gapped one."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lawchat")
    return root / "demo_base" / key


def copy_base(src: Path, out: Path) -> dict:
    """A cached (bf16) base into out/ as the fp32 model the pretraining would have written, tokenizer included."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    for f in src.iterdir():
        if f.name not in ("model.safetensors", CACHE_STAMP):
            shutil.copy2(f, out / f.name)
    weights = {k: v.to(torch.float32) for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    info = json.loads((src / CACHE_STAMP).read_text(encoding="utf-8"))
    return {"cached": str(src), **info.get("pretrain", {})}


def cache_base(src: Path, key: str, info: dict, dest: Path) -> int:
    """Write a pretrained base dir into dest as bf16 safetensors + its recipe key; written beside dest and renamed
    (a build cut short or another clone caching the same recipe leaves no half copy); -> bytes written."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    tmp = dest.parent / f".{dest.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", STAMP):
            shutil.copy2(f, tmp / f.name)
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / CACHE_STAMP).write_text(json.dumps(
        {"key": key, "weights": "bfloat16 (copied to fp32 by lawchat demo)", "pretrain": info},
        ensure_ascii=False, indent=2) + "\n")
    size = sum(f.stat().st_size for f in tmp.iterdir())
    shutil.rmtree(dest, ignore_errors=True)          # an older, unstamped copy
    try:
        tmp.rename(dest)
    except OSError:                                  # another build cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return size


def build_base(cfg: dict, out: Path) -> dict:
    """The recipe's cached base when there is one (base_cache: true), else pretrained here and then cached."""
    if not cfg.get("base_cache", True):
        return pretrain_base(cfg, out)
    key = base_key(cfg)
    cached = base_cache(key)
    if (cached / CACHE_STAMP).is_file():
        log(f"base model: the base pretrained from this recipe earlier, cached in {cached}")
        return copy_base(cached, out)
    info = pretrain_base(cfg, out)
    size = cache_base(out, key, info, cached)
    log(f"base model: cached in {cached} ({size / 1e6:.1f} MB) for later builds and clones")
    return info


def pretrain_base(cfg: dict, out: Path) -> dict:
    db = demo_corpus.find_laws_db()
    focus = demo_corpus.read_articles(db, cfg["laws"])
    tok_articles = focus if cfg["tokenizer_corpus"] == "focus" else demo_corpus.read_articles(db)
    if isinstance(cfg["tokenizer_corpus"], int):      # an even sample of every law: the BPE trains in a fraction
        tok_articles = tok_articles[::max(1, len(tok_articles) // cfg["tokenizer_corpus"])] + focus
    # forum-style Q&A with other seeds' question wording than the fine-tune set, plus the everyday Q&A
    forum = demo_corpus.forum_lines(
        demo_corpus.statute_rows(focus, cfg["pretrain_qa_per_article"], cfg["seed"] + 1) + demo_corpus.everyday_rows())
    statutes = demo_corpus.statute_lines(focus)
    if cfg.get("context"):    # the base also learns to copy a quoted article (the fine-tune shows it them)
        forum += demo_corpus.context_lines(focus, cfg["context"].get("pretrain_copies", 1), cfg["seed"] + 2)
    log(f"base model: tokenizer on {len(tok_articles)} articles + {len(forum)} Q&A texts, pretraining on "
        f"{len(statutes)} articles of {cfg['laws']} + {len(forum)} Q&A texts")
    info = base_model.make_base_model(
        demo_corpus.statute_lines(tok_articles) + forum, statutes + forum, out, cfg["vocab_size"],
        base_model.ModelShape(**cfg["model"]), base_model.PretrainConfig(**cfg["pretrain"]))
    log(f"base model: {info}")
    return info


def build_index(out: Path) -> dict:
    """The statute index, calibrated on the labelled tuning questions (citations below the threshold not shown)."""
    from lawchat_server.retrieval import Retriever, build_index as build
    meta = build(out / INDEX_FILE, demo_corpus.find_laws_db())
    log(f"retrieval index: {meta['articles']} articles in {meta['build_seconds']} s")
    cal = calibration.calibrate(Retriever(out / INDEX_FILE), calibration.read_questions(
        Path(__file__).parent / "data" / CALIBRATION_QUESTIONS), RetrievalConfig().top_k)
    calibration.save(out / INDEX_FILE, cal)
    log(f"retrieval index: {cal.summary()}")
    return {"articles": meta["articles"], "citation_threshold": cal.threshold, "citation_precision": cal.precision}


def cite_context(rows: list[dict], index: Path, ctx: dict) -> list[dict]:
    """Everyday replies start by naming the articles their prompt's context shows ("依据《…》第…条：…"), so the
    model learns to answer from the articles it is given and to say which (the statute replies already do)."""
    from lawchat_server.retrieval import Retriever

    from .prepare import build_prompt, clean_text, context_prompt, stays_plain
    ret = Retriever(index)
    out = []
    for row in rows:
        prompt = build_prompt(clean_text(row["title"]), clean_text(row["question"]))
        if stays_plain(prompt, ctx.get("plain_share", 0.0)):    # no articles in its prompt: none to name
            out.append(row)
            continue
        _, headings = context_prompt(prompt, ret, ctx["top_k"], ctx["max_chars"])
        out.append({**row, "reply": f"依据{'、'.join(headings)}：{row['reply']}"} if headings else row)
    return out


def build_data(cfg: dict, workdir: Path, out: Path) -> dict:
    articles = demo_corpus.read_articles(demo_corpus.find_laws_db(), cfg["laws"])
    ctx = cfg.get("context")
    index = workdir / "index" / INDEX_FILE
    everyday = demo_corpus.everyday_rows()
    if ctx:
        everyday = cite_context(everyday, index, ctx)
    clean = demo_corpus.statute_rows(articles, cfg["questions_per_article"], cfg["seed"]) + everyday
    csv_path = out / "lawzhidao_sample.csv"
    demo_corpus.write_lawzhidao_csv(clean + demo_corpus.messy_rows(clean), csv_path)
    kw = dict(with_context=index, context_k=ctx["top_k"], context_chars=ctx["max_chars"],
              context_plain=ctx.get("plain_share", 0.0)) if ctx else {}
    report = prepare(csv_path, out / "prepared", seed=cfg["seed"], **kw)
    print_report(report)
    return {"rows": report.rows_read, "kept": report.kept, "dropped": report.dropped, "context": ctx}


def build_adapter(cfg: dict, workdir: Path, out: Path) -> dict:
    lora_yaml = out / "lora.yaml"
    lora_yaml.write_text(yaml.safe_dump(cfg["finetune"], allow_unicode=True, sort_keys=False), encoding="utf-8")
    finetune(workdir / "data" / "prepared", workdir / "base", lora_yaml, output_dir=out)
    return {}


def build_merged(workdir: Path, out: Path) -> dict:
    merge(workdir / "lora" / "final", out, base=workdir / "base")
    return {"adapter": str(workdir / "lora" / "final"), "base": str(workdir / "base")}


def build_eval(cfg: dict, workdir: Path, out: Path) -> dict:
    ctx = cfg.get("context")
    kw = dict(retrieval=workdir / "index" / INDEX_FILE, retrieval_k=ctx["top_k"], cite_questions=CITE_QUESTIONS,
              max_context_tokens=ctx["max_chars"]) if ctx else {}
    report = eval_.evaluate(workdir / "merged", workdir / "data" / "prepared", split="test", compare=workdir / "base",
                            **kw)
    eval_.print_report(report, file=sys.stderr)
    eval_.write_report(report, out / "report.json")
    return report["models"]


def sample_answer(model_dir: Path, question: str, max_new_tokens: int = 200) -> str:
    """Greedy answer of a model dir to one question (a smoke check printed after the build)."""
    return eval_.generate_answers(model_dir, [[{"role": "user", "content": question}]], max_new_tokens, "cpu")[0]


def build_demo(config_path: str | Path, workdir: str | Path | None = None, with_eval: bool = True) -> Path:
    """Build (or reuse) every step; returns the merged model dir. `with_eval=False` stops at what serving needs
    (`make serve`: the first answer does not wait for the eval; `lawchat demo` later adds it)."""
    cfg = load_demo_config(config_path)
    workdir = Path(workdir or cfg["workdir"])
    everyday = demo_corpus.EVERYDAY_QA.read_text(encoding="utf-8")
    base = base_key(cfg)
    index_key = digest(retrieval.SCHEMA_VERSION, [p.read_text(encoding="utf-8") for p in RETRIEVAL_CODE])
    data_key = digest(cfg["laws"], cfg["questions_per_article"], cfg["seed"], everyday, cfg.get("context"),
                      index_key if cfg.get("context") else None)
    adapter_key = digest(base, data_key, cfg["finetune"])
    merged_key = digest(adapter_key)
    steps = [   # (name, key of its inputs, build(out) -> info stamped beside the output)
        ("base", base, lambda out: build_base(cfg, out)),
        ("data", data_key, lambda out: build_data(cfg, workdir, out)),
        ("lora", adapter_key, lambda out: build_adapter(cfg, workdir, out)),
        ("merged", merged_key, lambda out: build_merged(workdir, out)),
        ("eval", digest(merged_key, cfg.get("context")), lambda out: build_eval(cfg, workdir, out)),
    ]
    if cfg.get("context"):       # the retrieval index the context comes from, built before the data
        steps.insert(1, ("index", index_key, build_index))
    if not with_eval:
        steps = [s for s in steps if s[0] != "eval"]
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
