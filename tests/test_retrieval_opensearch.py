"""The OpenSearch/Elasticsearch backend of the retriever interface. No OpenSearch server installs here (no Debian
or PyPI package runs one), so a loopback stand-in of its `_search` endpoint answers: documents come from
`lawchat index-export`'s NDJSON of a laws.db-format index, queries are evaluated crudely (filters exactly, text
by shared characters). What is tested is lawchat's side: the query it sends, the order it keeps, errors, config."""
from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from lawchat_client import NO_RETRY, LawchatClient, LawchatError

from conftest import BIN
from faults import InProcessServer
from lawchat_server.config import ServerConfig
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.retrieval import OpenSearchConfig, RetrievalConfig, build_index, open_retriever
from lawchat_server.retrieval_opensearch import REFERENCE_SCORE, OpenSearchRetriever
from test_retrieval import laws_db  # noqa: F401  (the laws.db-format fixture)


def matches(doc: dict, q: dict) -> float:
    """A crude evaluator of the query shapes lawchat sends (0 = no match)."""
    if "match_all" in q:
        return 1.0
    if "term" in q:
        (field, value), = q["term"].items()
        return float(doc[field] == value)
    if "terms" in q:
        (field, values), = q["terms"].items()
        return float(doc[field] in values)
    if "match" in q:
        text = q["match"]["text"]["query"]
        return float(sum(ch in doc["text"] for ch in set(text) if "\u4e00" <= ch <= "\u9fff"))
    if "match_phrase" in q:
        return float(q["match_phrase"]["text"]["query"] in doc["text"])
    if "function_score" in q:
        base = matches(doc, q["function_score"]["query"])
        boost = max([f["weight"] for f in q["function_score"]["functions"] if matches(doc, f["filter"])] or [0])
        return base + boost if base else 0.0
    b = q["bool"]
    if not all(matches(doc, f) for f in b.get("filter", [])):
        return 0.0
    should = [matches(doc, s) for s in b.get("should", [])]
    return (sum(should) if any(should) else 0.0) if should else 1.0


class StandIn(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, self.headers.get("Authorization"), body))
        scored = sorted(((matches(d, body["query"]), d) for d in self.server.docs), key=lambda x: -x[0])
        hits = [{"_score": s, "_source": d} for s, d in scored if s > 0][:body.get("size", 10)]
        out = json.dumps({"hits": {"total": {"value": len(hits)}, "hits": hits}}, ensure_ascii=False).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def cluster(laws_db, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("os")
    build_index(d / "laws.sqlite", laws_db)
    r = subprocess.run([str(BIN / "lawchat"), "index-export", str(d / "laws.sqlite"), str(d / "bulk.ndjson")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = (d / "bulk.ndjson").read_text(encoding="utf-8").splitlines()
    actions, docs = [json.loads(x) for x in lines[::2]], [json.loads(x) for x in lines[1::2]]
    assert all(a["index"]["_index"] == "lawchat-articles" for a in actions) and len(docs) == 6   # articles in force
    srv = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    srv.docs, srv.seen = docs, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_named_articles_first_then_the_expanded_query(cluster, monkeypatch):
    srv, url = cluster
    monkeypatch.setenv("LAWCHAT_OPENSEARCH_USER", "lawchat")
    monkeypatch.setenv("LAWCHAT_OPENSEARCH_PASSWORD", "s3cret")
    ret = OpenSearchRetriever(OpenSearchConfig(url=url))
    srv.seen.clear()
    hits = ret.search("请问劳动合同法第十九条和公司拖欠工资的规定", 3)
    assert (hits[0].law, hits[0].article, hits[0].score) == ("劳动合同法", "第十九条", REFERENCE_SCORE)
    assert ("劳动合同法", "第三十条") in [(h.law, h.article) for h in hits[1:]]
    assert len({(h.law, h.article) for h in hits}) == len(hits)
    (path, auth, lookup), (_, _, full) = srv.seen
    assert path == "/lawchat-articles/_search" and auth == "Basic bGF3Y2hhdDpzM2NyZXQ="     # lawchat:s3cret
    assert {"term": {"article": "第十九条"}} in lookup["query"]["bool"]["filter"]
    inner = full["query"]["function_score"]
    phrases = [s["match_phrase"]["text"]["query"] for s in inner["query"]["bool"]["should"] if "match_phrase" in s]
    assert "劳动报酬" in phrases                                  # 工资 searched in the statute's word too
    weights = {f["filter"]["term"]["law"]: f["weight"] for f in inner["functions"]}
    assert weights["民法典"] == 2.0 and 0 < weights["劳动合同法"] < 2.0      # the law-level prior


def test_served_with_citations_and_unavailable_when_the_cluster_is_down(cluster, tiny_model, tmp_path):
    srv, url = cluster
    cfg = ServerConfig(port=0, retrieval=RetrievalConfig(opensearch=OpenSearchConfig(url=url), top_k=2))
    server = InProcessServer(load_runner(tiny_model, device="cpu"), cfg)
    try:
        with LawchatClient(server.target, retry=NO_RETRY, timeout=60) as c:
            r = c.chat("公司拖欠工资三个月了，我该怎么办？", max_new_tokens=4, retrieval=True)
            assert ("劳动合同法", "第三十条") in [(x["law"], x["article"]) for x in r.citations]
            srv.docs = []
            srv.server_close()                                    # the cluster goes away
            with pytest.raises(LawchatError) as e:
                c.chat("公司拖欠工资怎么办？", max_new_tokens=4, retrieval=True)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and "retrieval" in e.value.details
            assert c.chat("试用期多久？", max_new_tokens=2).completion_tokens == 2   # plain requests still work
    finally:
        server.stop()


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="retrieval.opensearch"):
        open_retriever(RetrievalConfig(opensearch=OpenSearchConfig(url="http://127.0.0.1:9", timeout_s=0.5)))
    with pytest.raises(ValueError, match="http"):
        RetrievalConfig(opensearch=OpenSearchConfig(url="search.internal:9200")).validate()
    idx = tmp_path / "i.sqlite"
    idx.write_bytes(b"")
    with pytest.raises(ValueError, match="not both"):
        RetrievalConfig(index=str(idx), opensearch=OpenSearchConfig(url="http://x:9200")).validate()
    r = subprocess.run([str(BIN / "lawchat"), "index-export", "--mapping"], capture_output=True, text=True, timeout=60)
    props = json.loads(r.stdout)["mappings"]["properties"]
    assert props["law"]["type"] == props["article"]["type"] == "keyword" and props["text"]["type"] == "text"
