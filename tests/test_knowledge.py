"""Knowledge added at run time (AdminService AddDocuments / DeleteDocuments, `lawchat kb`): cited by the next
request over a real in-process server, validated all or nothing, durable across a restart and a writer killed
mid-transaction."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap

import grpc
import pytest
from lawchat_client import LawchatClient, LawchatError, NO_RETRY

from conftest import BIN
from faults import InProcessServer
from lawchat_server.config import ServerConfig
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.knowledge import Document, add_documents
from lawchat_server.retrieval import REFERENCE_SCORE, RetrievalConfig, Retriever, build_index
from test_retrieval import laws_db  # noqa: F401  (the laws.db-format fixture)

LAW = "星河律所劳动用工规定"     # ends like a law name (规定): a question can name it outright
MEMO = {"id": "memo-1", "law": LAW, "article": "第一条",
        "text": "星河律所建议：被拖欠工资的员工先保留工资条和考勤截图，再向劳动监察大队投诉。"}
QUESTION = "星河律所说工资条和考勤截图要保留吗？"


@pytest.fixture(scope="module")
def runner(tiny_model):
    return load_runner(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def built_index(laws_db, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("kb") / "laws.sqlite"
    build_index(path, laws_db)
    return path


@pytest.fixture
def index(built_index, tmp_path):
    path = tmp_path / "laws.sqlite"
    shutil.copy(built_index, path)
    return path


def serve(runner, index):
    return InProcessServer(runner, ServerConfig(port=0, retrieval=RetrievalConfig(index=str(index), top_k=2)))


def citations(client: LawchatClient, question: str = QUESTION) -> list[dict]:
    stream = client.chat_stream(question, max_new_tokens=2, ignore_eos=True, retrieval=True)
    "".join(stream)
    return stream.citations


def cited(client: LawchatClient, question: str = QUESTION) -> list[tuple[str, str]]:
    return [(c["law"], c["article"]) for c in citations(client, question)]


def test_added_documents_are_cited_by_the_next_request_and_deleted_ones_are_not(runner, index):
    srv = serve(runner, index)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            before = c.status()["knowledge"]
            assert before["backend"] == "sqlite" and before["version"] == 0 and before["documents"] == 0
            assert (LAW, "第一条") not in cited(c)
            assert cited(c, "劳动合同法第三十条是怎么规定的？")[0] == ("劳动合同法", "第三十条")   # law names now cached
            r = c.add_documents([MEMO])
            assert r["added"] == 1 and r["replaced"] == 0 and r["knowledge"]["version"] == 1
            assert r["knowledge"]["articles"] == before["articles"] + 1 and r["knowledge"]["documents"] == 1
            assert cited(c)[0] == (LAW, "第一条")                     # BM25 finds it at once
            named = citations(c, "星河律所劳动用工规定第一条是怎么说的？")[0]          # exact lookup by its name
            assert (named["law"], named["article"], named["score"]) == (LAW, "第一条", REFERENCE_SCORE)
            again = c.add_documents([{**MEMO, "text": "星河律所：加班费按工资的百分之一百五十计算。"}])
            assert again["added"] == 0 and again["replaced"] == 1 and again["knowledge"]["articles"] == r["knowledge"]["articles"]
            memo = [x for x in citations(c) if x["law"] == LAW]
            assert len(memo) == 1 and "加班费" in memo[0]["snippet"] and "考勤" not in memo[0]["snippet"]  # replaced
            gone = c.delete_documents(["memo-1", "no-such-id"])
            assert gone["deleted"] == 1 and gone["not_found"] == ["no-such-id"] and gone["knowledge"]["version"] == 3
            assert (LAW, "第一条") not in cited(c, "星河律所加班费怎么算？")
            assert c.status()["knowledge"]["documents"] == 0
        searches = srv.app.metrics.registry.get_sample_value("lawchat_retrieval_seconds_count")
        assert searches == 6 and srv.app.metrics.registry.get_sample_value("lawchat_retrieval_seconds_sum") > 0
    finally:
        srv.stop()


def test_invalid_documents_are_refused_with_reasons_and_nothing_is_added(runner, index):
    srv = serve(runner, index)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            version = c.status()["knowledge"]["version"]
            bad = [MEMO, {**MEMO, "id": "memo-2", "text": "  "}, {**MEMO, "id": "memo-1"}, {**MEMO, "id": "x" * 201}]
            with pytest.raises(LawchatError) as e:
                c.add_documents(bad)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            for reason in ("document 2: text is empty", "document 3: id 'memo-1' given twice",
                           "document 4: id longer than 200 characters"):
                assert reason in e.value.details
            assert c.status()["knowledge"]["version"] == version and (LAW, "第一条") not in cited(c)
            with pytest.raises(LawchatError) as e:
                c.add_documents([])
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(LawchatError) as e:
                c.delete_documents([""])
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        srv.stop()


def test_without_an_index_adding_documents_is_failed_precondition(runner):
    srv = InProcessServer(runner, ServerConfig(port=0))
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            with pytest.raises(LawchatError) as e:
                c.add_documents([MEMO])
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "retrieval" in e.value.details
            assert "knowledge" not in c.status() or not c.status()["knowledge"]["backend"]
    finally:
        srv.stop()


def test_documents_survive_a_restart(runner, index):
    srv = serve(runner, index)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            c.add_documents([MEMO])
    finally:
        srv.stop()
    srv = serve(runner, index)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            assert c.status()["knowledge"]["version"] == 1 and cited(c)[0] == (LAW, "第一条")
    finally:
        srv.stop()


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from lawchat_server import knowledge
    from lawchat_server.knowledge import Document, add_documents
    real_bump, real_connect = knowledge._bump, knowledge._connect
    def small_cache(index):              # pages spill into the file before the commit, as a big add's do
        con = real_connect(index)
        con.execute("PRAGMA cache_size = 4")
        return con
    knowledge._connect = small_cache
    def stall(con):                      # fault injection: every row written, the transaction not yet committed
        out = real_bump(con)
        print("writing", flush=True)
        time.sleep(60)
        return out
    knowledge._bump = stall
    add_documents(sys.argv[1], [Document(f"bulk-{i}", "星河律所劳动用工规定", f"第{i}条", f"星河律所批量条目{i}" * 20)
                                for i in range(1000)])
""")


def test_a_writer_killed_mid_add_leaves_the_index_as_it_was(runner, index):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(index)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert os.path.exists(str(index) + "-journal")          # mid-transaction: a hot journal on disk
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    ret = Retriever(index)                                        # opening it rolls the cut-short write back
    assert ret.knowledge_status()[0] == 0 and ret.knowledge_status()[2] == 0
    assert LAW not in ret.laws
    assert sqlite3.connect(index).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    add_documents(index, [Document(**MEMO)])                      # and the index takes writes again
    srv = serve(runner, index)
    try:
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            assert cited(c)[0] == (LAW, "第一条") and c.status()["knowledge"]["version"] == 1
    finally:
        srv.stop()


def test_kb_cli_adds_through_a_running_server_and_refuses_bad_files(runner, index, tmp_path):
    good, bad = tmp_path / "memo.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps(MEMO, ensure_ascii=False) + "\n", encoding="utf-8")
    bad.write_text(json.dumps(MEMO, ensure_ascii=False) + "\n{not json\n" +
                   json.dumps({**MEMO, "id": "m2", "law": ""}, ensure_ascii=False) + "\n", encoding="utf-8")
    srv = serve(runner, index)
    try:
        kb = [str(BIN / "lawchat"), "kb"]
        r = subprocess.run(kb + ["add", str(bad), "--server", srv.target], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "line 2" in r.stderr and "nothing written" in r.stderr
        r = subprocess.run(kb + ["add", str(good), "--server", srv.target], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["added"] == 1
        with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
            assert cited(c)[0] == (LAW, "第一条")
        r = subprocess.run(kb + ["delete", "memo-1", "--server", srv.target], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and json.loads(r.stdout)["deleted"] == 1
        r = subprocess.run(kb + ["add", str(good)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--server" in r.stderr
        r = subprocess.run(kb + ["delete", "memo-1", "--server", "127.0.0.1:1", "--timeout", "2"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1 and "UNAVAILABLE" in r.stderr and "Traceback" not in r.stderr
    finally:
        srv.stop()


def test_the_readme_kb_commands_run(runner, index, tmp_path):
    from conftest import ROOT
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"\*\*Knowledge added at run time\.\*\*.*?```bash\n(.*?)```", readme, re.S).group(1)
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert lines[0].startswith("echo ") and [ln.split()[2] for ln in lines[1:]] == ["add", "delete", "add"]
    srv = serve(runner, index)
    try:
        for ln in lines:
            cmd = ln.replace("localhost:50051", srv.target).replace("runs/laws_index.sqlite", str(tmp_path / "own.sqlite"))
            cmd = cmd.replace(".venv/bin/", str(BIN) + "/")
            if "--index" in cmd:
                shutil.copy(index, tmp_path / "own.sqlite")
            r = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (cmd, r.stderr)
            if " add " in cmd and "--server" in cmd:
                with LawchatClient(srv.target, timeout=60, retry=NO_RETRY) as c:
                    assert cited(c, "被拖欠工资要保留工资条和考勤截图吗？")[0] == ("星河律所劳动备忘录", "第一条")
        assert Retriever(tmp_path / "own.sqlite").knowledge_status()[2] == 1
    finally:
        srv.stop()


def test_documents_at_their_limits_while_streams_run_beside_them(runner, index):
    """Every field at its boundary (and one past it), a request past the transport's cap, while ordinary retrieval
    streams run: the limits hold exactly and no stream is hurt."""
    from concurrent.futures import ThreadPoolExecutor

    from lawchat_server.knowledge import MAX_DOCUMENTS, MAX_NAME_CHARS, MAX_TEXT_CHARS
    srv = serve(runner, index)
    try:
        def stream(i: int) -> str:
            with LawchatClient(srv.target, timeout=120, retry=NO_RETRY) as c:
                s = c.chat_stream(f"公司拖欠工资{i}个月怎么办？", max_new_tokens=16, ignore_eos=True, retrieval=True)
                "".join(s)
                return s.finish_reason

        with ThreadPoolExecutor(4) as pool, LawchatClient(srv.target, timeout=120, retry=NO_RETRY) as c:
            streams = [pool.submit(stream, i) for i in range(8)]
            edge = {"id": "i" * MAX_NAME_CHARS, "law": "律" * MAX_NAME_CHARS, "article": "条" * MAX_NAME_CHARS,
                    "text": "工资" * (MAX_TEXT_CHARS // 2)}
            assert c.add_documents([edge])["added"] == 1
            for field, value in (("id", "i" * (MAX_NAME_CHARS + 1)), ("text", "x" * (MAX_TEXT_CHARS + 1)),
                                 ("law", "律\x00所")):
                with pytest.raises(LawchatError) as e:
                    c.add_documents([{**edge, field: value}])
                assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "document 1" in e.value.details
            many = [{"id": f"faq-{i}", "law": LAW, "article": f"问答{i}", "text": f"问答{i}"} for i in range(MAX_DOCUMENTS)]
            assert c.add_documents(many)["added"] == MAX_DOCUMENTS
            with pytest.raises(LawchatError) as e:
                c.add_documents(many + [{**many[0], "id": "one-more"}])
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and f"at most {MAX_DOCUMENTS}" in e.value.details
            huge = [{**edge, "id": f"huge-{i}", "text": "字" * MAX_TEXT_CHARS} for i in range(200)]    # ~12 MB
            with pytest.raises(LawchatError) as e:
                c.add_documents(huge)
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(LawchatError) as e:
                c.delete_documents([f"faq-{i}" for i in range(MAX_DOCUMENTS + 1)])
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and f"at most {MAX_DOCUMENTS}" in e.value.details
            assert c.status()["knowledge"]["documents"] == 1 + MAX_DOCUMENTS
            assert [f.result() for f in streams] == ["max_tokens"] * 8
    finally:
        srv.stop()
