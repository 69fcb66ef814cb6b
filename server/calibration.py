"""calibration: a citation's confidence — the chance, learnt on labelled questions, that an article the retriever
ranks is one that governs the question — and the threshold below which an answer cites nothing.

A ranking's raw scores (BM25 + prior, the fused reciprocal-rank score, a cross-encoder's logit) are not
probabilities and mean different things per variant, so each variant gets its own logistic regression (Platt
scaling with three more features) fitted on the tuning question set and stored in the index's meta table
(`calibration:<variant>`). The threshold is the lowest confidence at which the citations an answer would show
(retrieval.top_k of them) reach the target precision on that same set; when no threshold reaches it with at least
MIN_SHOWN citations left, the one with the best precision is kept and the report says the target was missed.

Own code rather than scikit-learn: a 5-weight logistic regression is 20 lines of numpy (Newton steps), and the
server would otherwise carry scikit-learn (~40 MB with scipy) for one `predict_proba`.
"""
from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MIN_SHOWN = 10                 # a threshold is judged on at least this many shown citations of the tuning set
L2 = 1.0                       # ridge on the standardised weights: a few hundred rows, five weights
POOL = 10                      # ranked candidates per question the regression learns from
GRID = [round(0.05 * i, 2) for i in range(1, 20)]     # thresholds tried: 0.05 .. 0.95
FEATURES = ("score", "score minus the top score", "log(1 + rank)", "top score minus the second (top hit only)")
# a fused ranking's hits also carry their rank in each of the two rankings it fuses (Hit.ranks): an article that BM25
# and the encoder both put first governs far more often than its fused score says (held-out, e5-small: 83% of 18
# such top hits, against 38% of all top hits)
RANK_FEATURES = ("log(1 + rank in BM25)", "log(1 + rank by the encoder)")


def features(scores: list[float], ranks: list[tuple[int, int]] | None = None) -> np.ndarray:
    """A ranking's scores, best first (and each hit's ranks in the rankings a fused one fuses) -> [n, 4 or 6]
    features of each hit (see FEATURES, RANK_FEATURES)."""
    width = len(FEATURES) + (len(RANK_FEATURES) if ranks is not None else 0)
    if not scores:
        return np.zeros((0, width))
    top, second = scores[0], scores[1] if len(scores) > 1 else scores[0]
    x = np.array([[s, s - top, math.log1p(r), (top - second) if r == 0 else 0.0] for r, s in enumerate(scores)])
    if ranks is not None:
        x = np.c_[x, np.log1p(np.array(ranks, dtype=float).reshape(len(scores), 2))]
    return x


@dataclass
class Calibration:
    variant: str                  # the ranking it was fitted on (Retriever.variant)
    mean: list[float]             # feature standardisation
    scale: list[float]
    weights: list[float]          # bias first
    threshold: float              # citations below this confidence are not shown (nor put in the prompt)
    target_precision: float
    precision: float              # of the citations shown at the threshold, on the tuning set
    cited_share: float            # share of tuning questions that keep at least one citation
    shown: int                    # citations shown at the threshold on the tuning set
    questions: int
    top_k: int                    # citations an answer shows (what precision was measured on)

    @property
    def uses_ranks(self) -> bool:
        return len(self.mean) == len(FEATURES) + len(RANK_FEATURES)

    def confidence(self, scores: list[float], ranks: list[tuple[int, int]] | None = None) -> list[float]:
        """ranks: each hit's (BM25, encoder) rank or None; needed by a calibration fitted with them (a fused ranking),
        ignored by one fitted without."""
        if not scores:
            return []
        if self.uses_ranks and (ranks is None or None in ranks):
            raise ValueError(f"the {self.variant} calibration needs each hit's ranks in the fused rankings")
        z = (features(scores, ranks if self.uses_ranks else None) - np.array(self.mean)) / np.array(self.scale)
        logit = self.weights[0] + z @ np.array(self.weights[1:])
        return [round(float(p), 4) for p in 1.0 / (1.0 + np.exp(-logit))]

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """A stored calibration, checked (ValueError/TypeError): a hand-edited row must not fail requests later."""
        cal = cls(**json.loads(text))
        numbers = [*cal.mean, *cal.scale, *cal.weights, cal.threshold]
        n = len(cal.mean)
        if n not in (len(FEATURES), len(FEATURES) + len(RANK_FEATURES)) or (len(cal.scale), len(cal.weights)) != (n, n + 1) \
                or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers) \
                or not all(x > 0 for x in cal.scale) or not 0.0 <= cal.threshold <= 1.0:
            raise ValueError("expected finite weights for the features and a threshold in [0, 1]")
        return cal

    @property
    def target_met(self) -> bool:
        return self.precision >= self.target_precision

    def summary(self) -> str:
        return (f"citation threshold {self.threshold:g} ({self.variant}): precision {self.precision:.0%} of "
                f"{self.shown} shown, {self.cited_share:.0%} of {self.questions} tuning questions cite an article"
                + ("" if self.target_met else f" (target {self.target_precision:.0%} not reached)"))


def fit_logistic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (mean, scale, weights with the bias first) of an L2-regularised logistic regression (Newton steps)."""
    mean, scale = x.mean(0), x.std(0) + 1e-9
    z = np.c_[np.ones(len(x)), (x - mean) / scale]
    ridge = L2 * np.diag(np.r_[0.0, np.ones(z.shape[1] - 1)])
    w = np.zeros(z.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        step = np.linalg.solve((z * (p * (1 - p))[:, None]).T @ z + ridge, z.T @ (p - y) + ridge @ w)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return mean, scale, w


def shown_at(confidences: list[list[float]], labels: list[list[bool]], threshold: float,
             top_k: int) -> tuple[int, int, int]:
    """-> (citations shown, of them governing, questions citing any) when each answer shows its top_k candidates
    whose confidence clears the threshold."""
    shown = right = cited = 0
    for conf, lab in zip(confidences, labels):
        keep = [ok for c, ok in zip(conf[:top_k], lab[:top_k]) if c >= threshold]
        shown, right, cited = shown + len(keep), right + sum(keep), cited + bool(keep)
    return shown, right, cited


def _ranks(ranking: list[tuple]) -> list[tuple[int, int]] | None:
    return [c[2] for c in ranking] if ranking and len(ranking[0]) > 2 and ranking[0][2] is not None else None


def fit(variant: str, rankings: list[list[tuple]], top_k: int, target_precision: float) -> Calibration:
    """rankings: per tuning question, its ranked candidates as (score, governs?) or, from a fused ranking,
    (score, governs?, (rank in BM25, rank by the encoder)) -> the fitted Calibration."""
    rows = [(features([c[0] for c in r], _ranks(r)), [c[1] for c in r]) for r in rankings if r]
    x = np.concatenate([f for f, _ in rows])
    y = np.array([ok for _, lab in rows for ok in lab], dtype=float)
    if y.min() == y.max():
        raise ValueError("calibration needs tuning questions whose candidates include governing and other articles")
    mean, scale, w = fit_logistic(x, y)
    cal = Calibration(variant, mean.tolist(), scale.tolist(), w.tolist(), 0.0, target_precision, 0.0, 0.0, 0,
                      len(rankings), top_k)
    conf = [cal.confidence([c[0] for c in r], _ranks(r)) for r in rankings]
    labels = [[c[1] for c in r] for r in rankings]
    best = None
    for t in GRID:
        shown, right, cited = shown_at(conf, labels, t, top_k)
        if shown < MIN_SHOWN:
            break
        precision = right / shown
        if best is None or precision > best[1] + 1e-9:
            best = (t, precision, shown, cited)
        if precision >= target_precision:
            best = (t, precision, shown, cited)
            break
    if best is None:
        raise ValueError(f"calibration: fewer than {MIN_SHOWN} citations shown even at the lowest threshold")
    cal.threshold, cal.precision, cal.shown, cal.cited_share = best[0], round(best[1], 4), best[2], round(
        best[3] / len(rankings), 4)
    return cal


def read_questions(path: str | Path) -> list[dict]:
    """JSONL of {"question": ..., "governing": [{"law", "article"}, ...]} (trainer/data/retrieval_questions.jsonl)."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        governing = item.get("governing") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not governing \
                or not isinstance(governing, list) or not all(isinstance(g, dict) and isinstance(g.get("law"), str)
                                                              and isinstance(g.get("article"), str) for g in governing):
            raise ValueError(f"{path}:{n}: expected {{question, governing: [{{law, article}}]}}")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no labelled questions")
    return items


def calibrate(retriever, questions: list[dict], top_k: int, target_precision: float = 0.9) -> Calibration:
    """Fit the retriever's variant on the labelled questions (their named articles aside: those are exact)."""
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"the target precision must be in (0, 1], got {target_precision}")
    if not 1 <= top_k <= POOL:
        raise ValueError(f"top_k must be in [1, {POOL}], got {top_k}")
    rankings = []
    for item in questions:
        want = {(g["law"], g["article"]) for g in item["governing"]}
        ranked = retriever.ranked(item["question"], POOL)
        rankings.append([(h.score, (h.law, h.article) in want, h.ranks) for h in ranked])
    return fit(retriever.variant, rankings, top_k, target_precision)


def save(index: str | Path, cal: Calibration) -> None:
    con = sqlite3.connect(index)
    try:
        with con:
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        (f"calibration:{cal.variant}", json.dumps(asdict(cal), ensure_ascii=False)))
    finally:
        con.close()
