"""eval: greedy answers on a prepared split, scored as the seed does (jieba tokens, ROUGE-1/2/L F×100, BLEU-4).

Works for any number of examples (the seed crashed below 50); `--compare BASE` scores a second model on
the same questions so the fine-tune's effect is one table.
"""
from __future__ import annotations

import json
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
    return Scores(len(references), *(round(100 * totals[k] / n, 2) for k in ("rouge-1", "rouge-2", "rouge-l", "bleu")))


def generate_answers(model_dir: Path, prompts: list[list[dict]], max_new_tokens: int, device: str,
                     trust_remote_code: bool = False) -> list[str]:
    """Greedy answers through the serving engine (batched): eval scores exactly what `lawchat serve` answers."""
    from lawchat_server.engine.engine import Engine, generate_batch
    from lawchat_server.engine.model_runner import load_runner

    runner = load_runner(model_dir, device=device, trust_remote_code=trust_remote_code)
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
             trust_remote_code: bool = False) -> dict:
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no split file {path}; run `lawchat prepare` first")
    convs = load_conversations(path)[:limit]
    if not convs:
        raise ValueError(f"{path} has no examples")
    prompts, refs = [c[:-1] for c in convs], [c[-1]["content"] for c in convs]
    report = {"split": str(path), "models": {}}
    for model in [m for m in (compare, model_dir) if m is not None]:
        hyps = generate_answers(Path(model), prompts, max_new_tokens, device, trust_remote_code)
        report["models"][str(model)] = asdict(score(hyps, refs))
    return report


def print_report(report: dict, file=sys.stdout) -> None:
    print(f"eval on {report['split']}", file=file)
    print("| model | examples | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU-4 |\n|---|---|---|---|---|---|", file=file)
    for name, s in report["models"].items():
        print(f"| {name} | {s['examples']} | {s['rouge_1']} | {s['rouge_2']} | {s['rouge_l']} | {s['bleu_4']} |",
              file=file)


def write_report(report: dict, out: Path) -> None:
    out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
