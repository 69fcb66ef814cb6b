"""Retrieval quality on the labelled everyday questions (each with the articles that govern it, checked against
laws.db): recall@1 / @5 / @10, the precision of the citations an answer shows (the share of them that govern) and
latency per variant, on the tuning set and on the held-out set; then how the top citation's precision moves when it is
shown only above a score threshold. The served ranking is first calibrated on the tuning set (lawchat calibrate): its
row also shows the precision of the citations that clear the calibrated threshold and how many questions keep one.

    python scripts/eval_retrieval.py [--index runs/laws_index.sqlite] [--encoder DIR]   # builds what is missing

trainer/data/retrieval_questions.jsonl (62) is the tuning set: the term table, the law prior and the fusion were
chosen on it. retrieval_questions_heldout.jsonl (102) was never used to choose anything: its first 47 questions were
written after the term table, the other 55 before the dense retrieval was built. With --encoder the dense and
fused variants run too (the index gets the encoder's vectors first if it lacks them: minutes on a CPU); with
--reranker the served ranking re-scored by the cross-encoder too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"BM25 (jieba tokens)": {"expand": False, "prior": False, "dense": False},
            "BM25 + everyday->statute terms": {"expand": True, "prior": False, "dense": False},
            "BM25 + terms + law prior (served without an encoder)": {"expand": True, "prior": True, "dense": False}}
DENSE_VARIANTS = {"dense (question + statute words)": "dense-only",
                  "BM25 + terms + prior, fused with dense (served with an encoder)": {"expand": True, "prior": True}}
SETS = {"tuning": "retrieval_questions.jsonl", "held-out": "retrieval_questions_heldout.jsonl"}


def main() -> None:
    from lawchat_server.retrieval import Retriever, build_index, build_vectors
    from lawchat_trainer.demo_corpus import find_laws_db
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, default=Path("/tmp/lawchat_laws_index.sqlite"))
    ap.add_argument("--encoder", type=Path, default=None, help="an encoder dir: dense and fused variants too")
    ap.add_argument("--reranker", type=Path, default=None, help="a cross-encoder dir: the second stage's variant too")
    ap.add_argument("--sets", default="tuning,held-out")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes over the questions (latency quantiles)")
    ap.add_argument("--show-misses", action="store_true")
    ap.add_argument("--shown", type=int, default=None, help="citations a served answer shows (default: retrieval.top_k)")
    ap.add_argument("--precision", type=float, default=0.9, help="target precision of the calibrated threshold")
    a = ap.parse_args()
    if a.shown is None:
        from lawchat_server.retrieval import RetrievalConfig
        a.shown = RetrievalConfig().top_k
    if not a.index.is_file():
        build_index(a.index, find_laws_db())
    encoder = None
    variants = dict(VARIANTS)
    if a.encoder is not None:
        from lawchat_server.encoder import load_encoder
        encoder = load_encoder(a.encoder)
        build_vectors(a.index, encoder)                  # no-op when the index has them all
        variants.update(DENSE_VARIANTS)
    reranker = None
    if a.reranker is not None:
        from lawchat_server.encoder import Reranker
        reranker = Reranker(a.reranker)
        for kw in variants.values():
            if isinstance(kw, dict):
                kw["rerank"] = False
        variants["the served ranking, re-scored by the cross-encoder (served with a reranker)"] = {
            "expand": True, "prior": True, "rerank": True}
    ret = Retriever(a.index, encoder, reranker)
    from lawchat_server import calibration
    from lawchat_server.retrieval import trusted
    cal = calibration.calibrate(ret, calibration.read_questions(ROOT / "trainer" / "data" / SETS["tuning"]), a.shown,
                                a.precision)           # the served ranking, fitted on the tuning set only
    calibration.save(a.index, cal)
    ret = Retriever(a.index, encoder, reranker)
    print(f"calibrated on the tuning set: {cal.summary()}")
    print(f"index of {ret.meta['articles']} articles" + (f"; encoder {encoder.name} ({encoder.dim} dims)" if encoder
                                                         else ""))
    for set_name in a.sets.split(","):
        path = ROOT / "trainer" / "data" / SETS[set_name]
        items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        print(f"\n{set_name} set: {len(items)} questions ({path.name})")
        print(f"| variant | recall@1 | recall@5 | recall@10 | shown-citation precision (top {a.shown}) | at the threshold: "
              "precision, questions citing | latency p50 ms | latency p99 ms |\n|---|---|---|---|---|---|---|---|")
        sweeps = []
        for name, kw in variants.items():
            r1 = r5 = r10 = shown_right = shown = kept = kept_right = citing = 0
            times, misses, tops = [], [], []
            for it in items:
                want = {(g["law"], g["article"]) for g in it["governing"]}
                for _ in range(a.repeat):
                    t0 = time.perf_counter()
                    if kw == "dense-only":
                        rows = ret._dense(it["question"], 10)
                        key = {i: (law, art) for i, law, art in ret.con.execute(
                            f"SELECT id, law, article FROM articles WHERE id IN ({','.join('?' * len(rows))})",
                            [i for i, _ in rows])}
                        hits = [key[i] for i, _ in rows if i in key]
                    else:
                        found = ret.search(it["question"], 10, **kw)
                        hits = [(h.law, h.article) for h in found]
                    times.append((time.perf_counter() - t0) * 1e3)
                if kw != "dense-only" and found:
                    tops.append((found[0].score, hits[0] in want))
                shown += len(hits[:a.shown])
                shown_right += len(want & set(hits[:a.shown]))
                if kw != "dense-only" and found and all(h.confidence is not None for h in found):   # served ranking
                    cut = [(h.law, h.article) for h in trusted(found[:a.shown], cal.threshold)]
                    kept, kept_right, citing = kept + len(cut), kept_right + len(want & set(cut)), citing + bool(cut)
                r1 += bool(hits[:1] and hits[0] in want)
                r5 += bool(want & set(hits[:5]))
                r10 += bool(want & set(hits))
                if not want & set(hits[:5]):
                    misses.append((it["question"], hits[:2]))
            times.sort()
            n = len(items)
            at = f"{kept_right / max(1, kept):.0%} of {kept}, {citing}/{n}" if kept or citing else "-"
            print(f"| {name} | {r1 / n:.0%} | {r5 / n:.0%} | {r10 / n:.0%} | {shown_right / max(1, shown):.0%} | {at} | "
                  f"{statistics.median(times):.1f} | {times[int(0.99 * (len(times) - 1))]:.1f} |")
            if tops:
                sweeps.append((name, tops))
            if a.show_misses:
                for q, h in misses:
                    print(f"   miss: {q} -> {h}")
        print("\nshowing the top citation only when its score clears a threshold (the score as a confidence): "
              "questions that keep a citation, and the precision of those shown")
        for name, tops in sweeps:
            cuts = sorted({round(s, 4) for s, _ in tops})
            row = []
            for q in (0.0, 0.25, 0.5, 0.75, 0.9):
                t = cuts[int(q * (len(cuts) - 1))]
                kept = [ok for s, ok in tops if s >= t]
                row.append(f"score >= {t:g}: {len(kept)}/{len(tops)} keep, precision {sum(kept) / max(1, len(kept)):.0%}")
            print(f"- {name}: " + "; ".join(row))


if __name__ == "__main__":
    main()
