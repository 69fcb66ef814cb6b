"""The in-memory BM25 (server/bm25.py) against FTS5's own bm25(): the same rows with the same scores, to the last
bit, on generated tables (hypothesis: column weights, repeated terms, folded case, deletions, ties) and on all
current law with the labelled questions; FTS5 answers a phrase, and while the postings catch up after
AddDocuments / DeleteDocuments."""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lawchat_server.bm25 import load_postings
from lawchat_server.retrieval import COLUMN_WEIGHTS, Retriever, build_index, fts_query

DATA = Path(__file__).resolve().parent.parent / "trainer" / "data"
# a small vocabulary, so that terms repeat, occur in most rows (FTS5's IDF floor) and rows tie; ASCII in two cases
VOCAB = ["合同", "劳动", "工资", "赔偿", "法", "第三条", "x1", "Abc", "abc", "ABC", "2024", "租赁"]


def fts5_best(con: sqlite3.Connection, terms: list[str], limit: int) -> list[tuple[int, float]]:
    """FTS5's own ranking of the OR-query, ties by rowid."""
    weights = ", ".join(map(str, COLUMN_WEIGHTS))
    return con.execute(f"SELECT rowid, bm25(articles_fts, {weights}) AS s FROM articles_fts WHERE articles_fts "
                       "MATCH ? ORDER BY s, rowid LIMIT ?", (fts_query([(t, 1.0) for t in terms]), limit)).fetchall()


words = st.lists(st.sampled_from(VOCAB), max_size=12).map(" ".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(words, words), min_size=1, max_size=40),
       deleted=st.sets(st.integers(1, 40), max_size=10),
       queries=st.lists(st.lists(st.sampled_from(VOCAB + ["不在", "zzz"]), min_size=1, max_size=6), min_size=1,
                        max_size=5),
       limit=st.sampled_from([1, 3, 50]))
def test_scores_equal_fts5s_on_generated_tables(rows, deleted, queries, limit):
    con = sqlite3.connect(":memory:")
    con.execute("CREATE VIRTUAL TABLE articles_fts USING fts5(law_tokens, tokens, tokenize = 'unicode61')")
    con.executemany("INSERT INTO articles_fts (rowid, law_tokens, tokens) VALUES (?, ?, ?)",
                    [(i, law, text) for i, (law, text) in enumerate(rows, 1)])
    con.executemany("DELETE FROM articles_fts WHERE rowid = ?", [(i,) for i in deleted])
    postings = load_postings(con, "articles_fts", COLUMN_WEIGHTS)
    for terms in queries:
        assert postings.score(terms, limit) == fts5_best(con, terms, limit), terms


def test_scores_equal_fts5s_on_all_current_law_for_the_labelled_questions(real_index):
    ret = real_index             # all current law (conftest, built once a session)
    postings, version = ret._postings
    assert version == ret.version() and len(postings.terms) > 10000
    questions = [json.loads(x)["question"] for name in ("retrieval_questions.jsonl", "retrieval_questions_heldout.jsonl")
                 for x in (DATA / name).read_text(encoding="utf-8").splitlines() if x]
    compared = 0
    for q in questions:
        for expand in (False, True):
            terms = [t for t, _ in ret.query_terms(q, expand)]
            if terms:
                assert postings.score(terms, 50) == fts5_best(ret.con, terms, 50), q
                compared += 1
    assert compared > 300
    # a term FTS5 splits into a phrase is FTS5's to score: the retriever asks it
    assert postings.score(["劳动 合同"], 5) is None and postings.score(["3.5"], 5) is None
    assert ret._bm25([("劳动 合同", 1.0)], 5) == fts5_best(ret.con, ["劳动 合同"], 5) != []


@pytest.fixture
def small_index(tmp_path):
    from test_retrieval import ARTICLES
    db = tmp_path / "laws.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE articles (id INTEGER PRIMARY KEY, law_id TEXT, law_name TEXT, status TEXT, "
                "article_no TEXT, article_text TEXT)")
    con.executemany("INSERT INTO articles (id, law_id, law_name, status, article_no, article_text) VALUES (?,?,?,?,?,?)",
                    [(i, law, law, status, no, text) for i, (law, no, status, text) in enumerate(ARTICLES, 1)])
    con.commit()
    con.close()
    build_index(tmp_path / "idx.sqlite", db)
    return tmp_path / "idx.sqlite"


def wait_for_postings(ret: Retriever) -> None:
    """Until the postings hold the index's version (requests start the re-read: one is sent while they lag)."""
    deadline = time.monotonic() + 30
    while ret._postings[1] != ret.version():
        assert time.monotonic() < deadline, "the postings were not re-read after the change"
        ret.search("年终奖", 1)
        time.sleep(0.05)


def test_an_added_document_is_found_by_the_next_search_and_after_the_postings_catch_up(small_index):
    from lawchat_server.knowledge import Document, add_documents, delete_documents
    ret = Retriever(small_index)
    question = "年终奖什么时候发放？"
    assert "本所备忘录" not in {h.law for h in ret.search(question, 3, prior=False)}
    add_documents(small_index, [Document("m1", "本所备忘录", "第1条", "年终奖 的 发放 以 劳动合同 约定 为准。")])
    first = [(h.law, h.article, h.score) for h in ret.search(question, 3, prior=False)]   # FTS5, while re-read
    assert first[0][:2] == ("本所备忘录", "第1条")
    wait_for_postings(ret)
    assert [(h.law, h.article, h.score) for h in ret.search(question, 3, prior=False)] == first   # from memory
    delete_documents(small_index, ["m1"])
    assert "本所备忘录" not in {h.law for h in ret.search(question, 3, prior=False)}
    wait_for_postings(ret)
    assert "本所备忘录" not in {h.law for h in ret.search(question, 3, prior=False)}



def test_a_slow_postings_build_keeps_no_lock_on_the_index(small_index, monkeypatch):
    """The postings are counted after the read transaction ends: a writer (AddDocuments) and the requests queued
    behind it never wait for the numpy half (fault injection: a build that takes 4 s)."""
    import threading

    import lawchat_server.bm25 as bm25
    from lawchat_server.knowledge import Document, add_documents
    ret = Retriever(small_index)
    building, real = threading.Event(), bm25.build_postings

    def slow_build(raw, weights):
        building.set()
        time.sleep(4)
        return real(raw, weights)
    monkeypatch.setattr(bm25, "build_postings", slow_build)
    add_documents(small_index, [Document("m1", "本所备忘录", "第1条", "年终奖 按 约定 发放")])
    assert ret.search("年终奖什么时候发放？", 3, prior=False)[0].law == "本所备忘录"     # FTS5, and a re-read begins
    assert building.wait(10)
    t0 = time.monotonic()
    add_documents(small_index, [Document("m2", "本所备忘录", "第2条", "加班费 按 约定 发放")])
    assert "第2条" in {h.article for h in ret.search("加班费怎么发放？", 3, prior=False)}
    assert time.monotonic() - t0 < 2
    wait_for_postings(ret)
