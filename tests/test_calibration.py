"""Citations users can trust: confidences calibrated on the labelled tuning questions (`lawchat calibrate`), a
threshold below which an answer cites nothing and says so (gRPC, SDK, OpenAI API), and what the prompt says then."""
from __future__ import annotations

import json
import subprocess

import pytest
from lawchat_client import LawchatClient, NO_RETRY

from conftest import BIN, ROOT
from faults import InProcessServer
from lawchat_server import calibration
from lawchat_server.config import ServerConfig
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.prompt import NO_ARTICLE, encode_prompt, without_articles
from lawchat_server.retrieval import RetrievalConfig, Retriever, build_index, trusted
from test_retrieval import laws_db  # noqa: F401  (the laws.db-format fixture)

TUNING = ROOT / "trainer" / "data" / "retrieval_questions.jsonl"
HELDOUT = ROOT / "trainer" / "data" / "retrieval_questions_heldout.jsonl"
STRONG = "公司拖欠工资三个月了，我该怎么办？"       # the small index's 第三十条 matches it well
WEAK = "醉酒的猫咪抓伤了邻居怎么办？"               # only weak matches


def test_fit_finds_the_lowest_threshold_that_reaches_the_target():
    # three tiers of 40 questions by top score: 95%, 75% and 10% of their top hits govern; lower hits never do
    tiers = [(12.0, lambda q: q % 20 != 0), (8.0, lambda q: q % 4 != 0), (4.0, lambda q: q % 10 == 0)]
    rankings = [[(top - r, r == 0 and governs(q)) for r in range(5)] for top, governs in tiers for q in range(40)]
    cal = calibration.fit("bm25", rankings, top_k=3, target_precision=0.8)
    conf = cal.confidence([12.0, 11.0, 10.0])
    assert conf[0] > conf[1] > conf[2] and all(0 < c < 1 for c in conf)
    assert cal.target_met and cal.precision == pytest.approx(68 / 80, abs=1e-4)   # the top two tiers, not the best one alone
    assert cal.cited_share == pytest.approx(80 / 120, abs=1e-4)
    lower = [t for t in calibration.GRID if t < cal.threshold]
    shown, right, _ = calibration.shown_at([cal.confidence([s for s, _ in r]) for r in rankings],
                                           [[ok for _, ok in r] for r in rankings], lower[-1], 3)
    assert right / shown < 0.8                       # the threshold is the lowest that reaches it
    missed = calibration.fit("bm25", rankings, top_k=3, target_precision=0.99)
    assert not missed.target_met and "not reached" in missed.summary() and missed.precision == pytest.approx(0.95, abs=1e-4)


def test_a_fused_calibration_learns_from_the_two_rankings_agreeing():
    # fused scores alike for every question; the top hit governs in 19 of 20 questions where BM25 and the encoder
    # both ranked it first, and in 1 of 5 otherwise: only the ranks tell them apart
    rankings = []
    for q in range(200):
        agree = q % 2 == 0
        governs = (q // 2) % 20 != 0 if agree else q % 5 == 1
        rankings.append([(30.0 - r, r == 0 and governs, (0, 0) if agree and r == 0 else (r + 1, r + 3))
                         for r in range(5)])
    cal = calibration.fit("fused:x", rankings, top_k=3, target_precision=0.9)
    assert cal.uses_ranks and len(cal.weights) == len(calibration.FEATURES) + len(calibration.RANK_FEATURES) + 1
    both_first, apart = cal.confidence([30.0, 29.0], [(0, 0), (2, 4)])[0], cal.confidence([30.0, 29.0], [(1, 3), (2, 4)])[0]
    assert both_first > cal.threshold > apart
    assert cal.target_met and cal.cited_share == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(ValueError, match="needs each hit's ranks"):
        cal.confidence([30.0, 29.0])
    restored = calibration.Calibration.from_json(json.dumps(calibration.asdict(cal)))
    assert restored.confidence([30.0, 29.0], [(0, 0), (2, 4)])[0] == both_first
    scores_only = calibration.fit("fused:x", [[c[:2] for c in r] for r in rankings], top_k=3, target_precision=0.9)
    assert not scores_only.uses_ranks and not scores_only.target_met     # the scores alone cannot reach it


def test_calibrated_threshold_raises_held_out_citation_precision(real_index, tmp_path):
    """Fitted on the tuning set of the real statute index, judged on the held-out set it never saw."""
    import shutil
    index = tmp_path / "laws.sqlite"
    shutil.copy(real_index.path, index)                  # all current law; calibrate writes into its copy
    out = subprocess.run([str(BIN / "lawchat"), "calibrate", str(index), str(TUNING)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "citation threshold" in out.stderr
    ret = Retriever(index)
    cal = ret.calibration
    assert cal.variant == "bm25" and cal.questions == 92 and 0 < cal.threshold < 1
    shown_all = right_all = shown_cut = right_cut = 0
    for item in calibration.read_questions(HELDOUT):
        want = {(g["law"], g["article"]) for g in item["governing"]}
        hits = ret.search(item["question"], 3)
        assert all(h.confidence is not None for h in hits)
        kept = trusted(hits, ret.threshold(None))
        shown_all, right_all = shown_all + len(hits), right_all + sum((h.law, h.article) in want for h in hits)
        shown_cut, right_cut = shown_cut + len(kept), right_cut + sum((h.law, h.article) in want for h in kept)
    assert shown_cut >= 5 and right_cut / shown_cut > 2 * right_all / shown_all
    named = ret.search("劳动合同法第三十九条是怎么规定的？", 3)[0]
    assert (named.article, named.confidence) == ("第三十九条", 1.0)          # an article the question names
    bad = tmp_path / "bad.jsonl"
    for text, want in [('{"question": "x"}\n', "bad.jsonl:1"), ('{"question": "x", "governing": [{"law": 1}]}', "bad.jsonl:1"),
                       ("\n{oops\n", "bad.jsonl:2: not JSON"), ("\n", "no labelled questions")]:
        bad.write_text(text, encoding="utf-8")
        out = subprocess.run([str(BIN / "lawchat"), "calibrate", str(index), str(bad)], capture_output=True, text=True)
        assert out.returncode == 2 and want in out.stderr, out.stderr
    for flags, want in [(["--precision", "nan"], "target precision"), (["--top-k", "0"], "top_k")]:
        out = subprocess.run([str(BIN / "lawchat"), "calibrate", str(index), str(TUNING), *flags], capture_output=True,
                             text=True)
        assert out.returncode == 2 and want in out.stderr, out.stderr


@pytest.fixture(scope="module")
def calibrated_index(laws_db, tmp_path_factory):  # noqa: F811
    """The small index with a calibration whose threshold lies between the strong and the weak question's top score
    (confidence = sigmoid(w * (score - midpoint))): what the mechanics need, whatever BM25's scale."""
    path = tmp_path_factory.mktemp("cal") / "laws.sqlite"
    build_index(path, laws_db)
    ret = Retriever(path)
    strong, weak = ret.ranked(STRONG, 3)[0].score, ret.ranked(WEAK, 3)[0].score
    assert strong > weak
    w = 8 / (strong - weak)
    cal = calibration.Calibration("bm25", [0.0] * 4, [1.0] * 4, [-w * (strong + weak) / 2, w, 0.0, 0.0, 0.0], 0.5,
                                  0.9, 0.9, 0.5, 10, 20, 3)
    calibration.save(path, cal)
    return path


@pytest.fixture(scope="module")
def runner(tiny_model):
    return load_runner(tiny_model, device="cpu")


def test_answers_cite_only_articles_above_the_threshold_and_say_when_none(runner, calibrated_index):
    import openai

    from lawchat_server.openai_api import HttpConfig
    srv = InProcessServer(runner, ServerConfig(port=0, retrieval=RetrievalConfig(index=str(calibrated_index), top_k=2),
                                               http=HttpConfig(port=0, served_model_name="m")))
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            strong = c.chat(STRONG, max_new_tokens=2, ignore_eos=True, retrieval=True)
            assert strong.citations and not strong.no_governing_article
            assert strong.citations[0]["article"] == "第三十条" and strong.citations[0]["confidence"] > 0.5
            assert all(x["confidence"] >= 0.5 for x in strong.citations)
            weak = c.chat_stream(WEAK, max_new_tokens=2, ignore_eos=True, retrieval=True)
            "".join(weak)
            assert weak.citations == [] and weak.no_governing_article
            # the prompt says so: the user turn carries NO_ARTICLE before the question
            noted = encode_prompt(runner.tokenizer, without_articles([{"role": "user", "content": WEAK}]))
            assert NO_ARTICLE in runner.tokenizer.decode(noted) and weak.prompt_tokens == len(noted)
            plain = c.chat(WEAK, max_new_tokens=2, ignore_eos=True)
            assert not plain.no_governing_article and plain.prompt_tokens < weak.prompt_tokens
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.app.http.port}/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": WEAK}], max_tokens=2,
                                           extra_body={"retrieval": {"enabled": True}})
        assert r.lawchat == {"degraded": False, "citations": [], "no_governing_article": True}
        out = subprocess.run([str(BIN / "lawchat-client"), "--target", srv.target, "chat", WEAK, "--cite",
                              "--max-new-tokens", "2", "--no-stream"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "未找到可以确定适用于此问题的法条" in out.stdout
        metrics = srv.app.metrics.no_article._value.get()
        assert metrics >= 2
    finally:
        srv.stop()
    # min_confidence 0 shows every article again
    srv = InProcessServer(runner, ServerConfig(port=0, retrieval=RetrievalConfig(index=str(calibrated_index), top_k=2,
                                                                                 min_confidence=0.0)))
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            weak = c.chat(WEAK, max_new_tokens=2, ignore_eos=True, retrieval=True)
            assert weak.citations and not weak.no_governing_article
            assert all(x["confidence"] < 0.5 for x in weak.citations)
    finally:
        srv.stop()


def test_min_confidence_is_checked():
    with pytest.raises(ValueError, match="min_confidence"):
        RetrievalConfig(min_confidence=1.5).validate()
    with pytest.raises(ValueError, match="min_confidence"):
        RetrievalConfig(min_confidence=float("nan")).validate()


def test_an_uncalibrated_index_shows_every_citation_without_confidence(runner, laws_db, tmp_path):  # noqa: F811
    build_index(tmp_path / "laws.sqlite", laws_db)
    ret = Retriever(tmp_path / "laws.sqlite")
    assert ret.calibration is None and ret.threshold(None) is None
    hits = ret.search(WEAK, 2)
    assert hits and trusted(hits, None) == hits and all(h.confidence is None for h in hits)
    assert json.loads(json.dumps([h.confidence for h in hits])) == [None] * len(hits)


def test_an_unreadable_calibration_stops_the_server_at_start_and_calibrate_repairs_it(laws_db, tmp_path):  # noqa: F811
    import sqlite3
    index = tmp_path / "laws.sqlite"
    build_index(index, laws_db)
    with sqlite3.connect(index) as con:
        con.execute("INSERT OR REPLACE INTO meta VALUES ('calibration:bm25', ?)",
                    (json.dumps({**calibration.asdict(calibration.Calibration(
                        "bm25", [0.0] * 4, [1.0] * 4, [0.0] * 5, 0.5, 0.9, 0.9, 0.5, 10, 20, 3)), "threshold": 7}),))
    with pytest.raises(ValueError, match="calibration is unreadable"):
        Retriever(index)
    with sqlite3.connect(index) as con:     # well formed, but fitted on fused ranks that a BM25 ranking has not
        con.execute("INSERT OR REPLACE INTO meta VALUES ('calibration:bm25', ?)",
                    (json.dumps(calibration.asdict(calibration.Calibration(
                        "bm25", [0.0] * 6, [1.0] * 6, [0.0] * 7, 0.5, 0.9, 0.9, 0.5, 10, 20, 3))),))
    with pytest.raises(ValueError, match="calibration is unreadable .*fused ranks"):
        Retriever(index)
    out = subprocess.run([str(BIN / "lawchat"), "serve", "--model", "none", "--retrieval-index", str(index)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "calibration is unreadable" in out.stderr
    labelled = tmp_path / "q.jsonl"
    labelled.write_text("".join(json.dumps({"question": q, "governing": [{"law": "劳动合同法", "article": a}]},
                                           ensure_ascii=False) + "\n" for q, a in [(STRONG, "第三十条"),
                                           ("试用期最长多久", "第十九条"), ("工资怎么发", "第三十条")] * 8), encoding="utf-8")
    out = subprocess.run([str(BIN / "lawchat"), "calibrate", str(index), str(labelled), "--top-k", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 0 <= Retriever(index).calibration.threshold <= 1
