"""eval: greedy answers on a prepared split, scored as the seed does (jieba tokens, ROUGE-1/2/L F×100, BLEU-4).

Works for any number of examples (the seed crashed below 50); `--compare BASE` scores a second model on
the same questions so the fine-tune's effect is one table.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .finetune import load_conversations


@dataclass
class Scores:
    examples: int
    rouge_1: float
    rouge_2: float
    rouge_l: float
    bleu_4: float
    cites_governing: float | None = None   # % of answers naming an article their reference names (None: no refs cite)


CITE = re.compile(r"《([^》]{1,40})》\s*(第[零〇一二三四五六七八九十百千\d]+条)")


def cited(text: str) -> set[tuple[str, str]]:
    """(law, 第…条) pairs named in a text as 《law》第…条; the law without 中华人民共和国."""
    return {(law.removeprefix("中华人民共和国"), no) for law, no in CITE.findall(text)}


def cite_share(hypotheses: list[str], references: list[str]) -> float | None:
    pairs = [(cited(h), cited(r)) for h, r in zip(hypotheses, references)]
    scored = [bool(h & r) for h, r in pairs if r]
    return round(100 * sum(scored) / len(scored), 2) if scored else None


def load_cite_questions(path: str | Path) -> list[dict]:
    """JSONL of {"question", "governing": [{"law", "article"}, ...]} (trainer/data/retrieval_questions.jsonl's format)."""
    items = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items or not all(it.get("question") and it.get("governing") for it in items):
        raise ValueError(f"{path}: expected lines of {{question, governing: [{{law, article}}]}}")
    return items


def governing_share(answers: list[str], items: list[dict]) -> float:
    """% of answers that name (《law》第…条) at least one of their question's governing articles."""
    hits = [bool(cited(a) & {(g["law"], g["article"]) for g in it["governing"]}) for a, it in zip(answers, items)]
    return round(100 * sum(hits) / len(hits), 2)


def score(hypotheses: list[str], references: list[str]) -> Scores:
    """Mean per-example ROUGE F and BLEU-4 (nltk, smoothing method3) over jieba tokens, ×100."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(60)
    rouge, smooth = Rouge(), SmoothingFunction().method3
    totals = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu": 0.0}
    for hyp, ref in zip(hypotheses, references, strict=True):
        h = [t for t in jieba.cut(hyp) if t.strip()]
        r = [t for t in jieba.cut(ref) if t.strip()]
        if h and r:   # rouge-chinese raises on an empty side; an empty answer scores 0
            s = rouge.get_scores(" ".join(h), " ".join(r))[0]
            for k in ("rouge-1", "rouge-2", "rouge-l"):
                totals[k] += s[k]["f"]
            totals["bleu"] += sentence_bleu([r], h, smoothing_function=smooth)
    n = max(1, len(references))
    return Scores(len(references), *(round(100 * totals[k] / n, 2) for k in ("rouge-1", "rouge-2", "rouge-l", "bleu")),
                  cite_share(hypotheses, references))


def generate_answers(model_dir: Path, prompts: list[list[dict]], max_new_tokens: int, device: str,
                     trust_remote_code: bool = False, contexts: list[list[tuple[str, str]]] | None = None,
                     max_context_tokens: int = 512) -> list[str]:
    """Greedy answers through the serving engine (batched): eval scores exactly what `lawchat serve` answers.
    contexts: per prompt, retrieved (heading, text) articles put in the prompt as the server does (none: none
    cleared the index's confidence threshold)."""
    from lawchat_server.engine.engine import Engine, generate_batch
    from lawchat_server.engine.model_runner import load_runner
    from lawchat_server.prompt import with_context, without_articles

    runner = load_runner(model_dir, device=device, trust_remote_code=trust_remote_code)
    if contexts is not None:     # at most half the model's length goes to articles, so the question still fits
        budget = min(max_context_tokens, runner.max_len // 2)   # no article retrieval trusts: the prompt says so
        prompts = [with_context(p, c, runner.tokenizer, budget) if c else without_articles(p)
                   for p, c in zip(prompts, contexts)]
    engine = Engine(runner)
    engine.start()
    try:
        ids = [runner.encode_chat(messages) for messages in prompts]
        limits = [max(1, min(max_new_tokens, runner.max_len - len(i))) for i in ids]   # the engine rejects prompts
        chunks = generate_batch(engine, ids, limits)                                     # that do not fit at all
    finally:
        engine.stop()
    return [c.delta for c in chunks]


def evaluate(model_dir: str | Path, data_dir: str | Path, split: str = "test", compare: str | Path | None = None,
             max_new_tokens: int = 256, limit: int | None = None, device: str = "cpu",
             trust_remote_code: bool = False, retrieval: str | Path | None = None, retrieval_k: int = 3,
             cite_questions: str | Path | None = None, max_context_tokens: int = 512) -> dict:
    """retrieval: a `lawchat index` file; every model is then scored without and with the articles in the prompt.
    cite_questions: labelled everyday questions; each model (and mode) also answers them, scored by the share of
    answers that name one of the question's governing articles."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no split file {path}; run `lawchat prepare` first")
    convs = load_conversations(path)[:limit]
    if not convs:
        raise ValueError(f"{path} has no examples")
    prompts, refs = [c[:-1] for c in convs], [c[-1]["content"] for c in convs]
    report = {"split": str(path), "models": {}, "compare": str(compare) if compare is not None else None,
              "answers": [{"question": p[-1]["content"], "reference": r} for p, r in zip(prompts, refs)]}
    everyday = load_cite_questions(cite_questions) if cite_questions is not None else []
    questions = [[{"role": "user", "content": it["question"]}] for it in everyday]
    n = len(prompts)
    runs = [(str(m), None) for m in (compare, model_dir) if m is not None]
    if retrieval is not None:
        from lawchat_server.retrieval import Retriever, trusted
        ret = Retriever(retrieval)
        contexts = [[(h.heading, h.text) for h in trusted(ret.search(p[-1]["content"], retrieval_k), ret.threshold(None))]
                    for p in prompts + questions]
        runs += [(f"{m} +retrieval", contexts) for m, _ in list(runs)]
    if everyday:
        report["everyday"] = {"questions": str(cite_questions), "models": {},
                              "answers": [{"question": it["question"], "governing": it["governing"]} for it in everyday]}
    for name, ctx in runs:
        model = Path(name.removesuffix(" +retrieval"))
        hyps = generate_answers(model, prompts + questions, max_new_tokens, device, trust_remote_code, contexts=ctx,
                                max_context_tokens=max_context_tokens)
        report["models"][name] = asdict(score(hyps[:n], refs))
        for row, h in zip(report["answers"], hyps[:n]):
            row[name] = h
        if everyday:
            report["everyday"]["models"][name] = governing_share(hyps[n:], everyday)
            for row, h in zip(report["everyday"]["answers"], hyps[n:]):
                row[name] = h
    return report


def print_report(report: dict, file=sys.stdout) -> None:
    print(f"eval on {report['split']}", file=file)
    print("| model | examples | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU-4 | cites a governing article % |\n"
          "|---|---|---|---|---|---|---|", file=file)
    for name, s in report["models"].items():
        cites = "-" if s.get("cites_governing") is None else s["cites_governing"]
        print(f"| {name} | {s['examples']} | {s['rouge_1']} | {s['rouge_2']} | {s['rouge_l']} | {s['bleu_4']} | {cites} |",
              file=file)
    if report.get("everyday"):
        e = report["everyday"]
        print(f"\n{len(e['answers'])} everyday questions ({e['questions']}): answers naming a governing article", file=file)
        for name, share in e["models"].items():
            print(f"| {name} | {share}% |", file=file)


def write_report(report: dict, out: Path) -> list[Path]:
    """out (JSON scores + answers), out_side_by_side.jsonl (question, reference, 微调前 / 微调后 answers) and
    out_scores.png (a bar chart per metric and model); -> the paths written."""
    out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    side = out.with_name(out.stem + "_side_by_side.jsonl")
    names = list(report["models"])
    label = {n: n for n in names}
    if report.get("compare") and len(names) == 2:     # the seed's wording: before / after fine-tuning
        label = {names[0]: "微调前", names[1]: "微调后"}
    with side.open("w", encoding="utf-8") as f:
        for row in report["answers"]:
            item = {"question": row["question"], "reference": row["reference"],
                    **{label[n]: row.get(n, "") for n in names}}
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    chart = out.with_name(out.stem + "_scores.png")
    write_score_chart(report, chart, label)
    return [out, side, chart]


def write_score_chart(report: dict, path: Path, label: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [("rouge_1", "ROUGE-1"), ("rouge_2", "ROUGE-2"), ("rouge_l", "ROUGE-L"), ("bleu_4", "BLEU-4")]
    names = list(report["models"])
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=100)
    for i, name in enumerate(names):
        xs = [m + (i - (len(names) - 1) / 2) * width for m in range(len(metrics))]
        vals = [report["models"][name][k] for k, _ in metrics]
        role = {"微调前": "before fine-tuning", "微调后": "after fine-tuning"}.get(label[name])   # no CJK font assumed
        bars = ax.bar(xs, vals, width, label=f"{Path(name).name} ({role})" if role else Path(name).name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(metrics)), [t for _, t in metrics])
    ax.set_ylabel("score (x100)")
    ax.set_title(f"{report['models'][names[-1]]['examples']} examples of {Path(report['split']).name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
