"""Retrieval quality on the labelled everyday questions (trainer/data/retrieval_questions.jsonl: each question with
the articles that govern it, checked against laws.db): recall@1 / recall@5 and latency per variant.

    python scripts/eval_retrieval.py [--index runs/laws_index.sqlite]     # builds the index when missing
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"BM25 (jieba tokens)": {"expand": False, "prior": False},
            "BM25 + everyday->statute terms": {"expand": True, "prior": False},
            "BM25 + terms + law prior (served)": {"expand": True, "prior": True}}


def main() -> None:
    from lawchat_server.retrieval import Retriever, build_index
    from lawchat_trainer.demo_corpus import find_laws_db
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, default=Path("/tmp/lawchat_laws_index.sqlite"))
    ap.add_argument("--questions", type=Path, default=ROOT / "trainer" / "data" / "retrieval_questions.jsonl",
                    help="labelled questions; retrieval_questions_heldout.jsonl was written after the term table and "
                         "never used to tune it")
    ap.add_argument("--repeat", type=int, default=5, help="timed passes over the questions (latency quantiles)")
    ap.add_argument("--show-misses", action="store_true")
    a = ap.parse_args()
    if not a.index.is_file():
        build_index(a.index, find_laws_db())
    ret = Retriever(a.index)
    items = [json.loads(line) for line in a.questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    print(f"{len(items)} questions, index of {ret.meta['articles']} articles")
    print("| variant | recall@1 | recall@5 | latency p50 ms | latency p99 ms |\n|---|---|---|---|---|")
    for name, kw in VARIANTS.items():
        r1 = r5 = 0
        times, misses = [], []
        for it in items:
            want = {(g["law"], g["article"]) for g in it["governing"]}
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                hits = [(h.law, h.article) for h in ret.search(it["question"], 5, **kw)]
                times.append((time.perf_counter() - t0) * 1e3)
            r1 += bool(hits[:1] and hits[0] in want)
            r5 += bool(want & set(hits))
            if not want & set(hits):
                misses.append((it["question"], hits[:2]))
        times.sort()
        print(f"| {name} | {r1}/{len(items)} ({r1 / len(items):.0%}) | {r5}/{len(items)} ({r5 / len(items):.0%}) | "
              f"{statistics.median(times):.1f} | {times[int(0.99 * (len(times) - 1))]:.1f} |")
        if a.show_misses:
            for q, h in misses:
                print(f"   miss: {q} -> {h}")


if __name__ == "__main__":
    main()
