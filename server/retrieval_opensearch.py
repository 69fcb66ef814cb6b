"""retrieval_opensearch: the retriever interface (`search`, `referenced`) over an existing OpenSearch or
Elasticsearch cluster, for firms that already run one (`retrieval.opensearch.url` in configs/server.yaml).

The cluster holds one document per article: {law, article, text, source} with `law` and `article` as keyword
fields and `text` analysed for Chinese (MAPPING: the smartcn plugin; ik_max_word works the same way). Load it
from a `lawchat index` file with `lawchat index-export runs/laws.sqlite articles.ndjson` and the bulk API. A query
is the same as the embedded retriever's: articles the question names first (exact term lookup), then a full-text
match of the question plus the everyday -> statute terms, with the law-level prior as a per-law boost.
HTTP through urllib: no client library to install on an air-gapped server.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import urllib.request
from .retrieval import REFERENCE_SCORE, Hit, OpenSearchConfig, RetrievalUnavailable, named_articles, named_first

MAPPING = {
    "settings": {"analysis": {"analyzer": {"zh": {"type": "smartcn"}}}},
    "mappings": {"properties": {
        "law": {"type": "keyword"},               # short name: 劳动合同法
        "article": {"type": "keyword"},           # 第三十九条
        "text": {"type": "text", "analyzer": "zh"},
        "source": {"type": "keyword"},            # laws.db or the user's corpus file
    }},
}


class OpenSearchRetriever:
    def __init__(self, config: OpenSearchConfig):
        self.config = config
        self.base = config.url.rstrip("/") + "/" + config.index
        self.meta = {"backend": "opensearch", "url": config.url, "index": config.index}
        user, password = os.environ.get(config.user_env), os.environ.get(config.password_env)
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() if user else None

    def _search(self, body: dict) -> list[dict]:
        req = urllib.request.Request(self.base + "/_search", data=json.dumps(body, ensure_ascii=False).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        if self.auth:
            req.add_header("Authorization", self.auth)
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
                return json.load(resp)["hits"]["hits"]
        except (OSError, http.client.HTTPException, KeyError, ValueError) as e:   # refused, reset, timeout, bad JSON
            raise RetrievalUnavailable(f"OpenSearch query to {self.base} failed: {e}") from None

    def check(self) -> None:
        """At start: the index answers a query (a clear error now rather than at the first request)."""
        self._search({"size": 0, "query": {"match_all": {}}})

    def referenced(self, question: str) -> list[Hit]:
        hits: list[Hit] = []
        for laws, article in named_articles(question):
            found = self._search({"size": 1, "query": {"bool": {"filter": [
                {"terms": {"law": laws}}, {"term": {"article": article}}]}}})
            for h in found:
                s = h["_source"]
                if all((x.law, x.article) != (s["law"], s["article"]) for x in hits):
                    hits.append(Hit(s["law"], s["article"], REFERENCE_SCORE, s["text"]))
        return hits

    def query(self, question: str, k: int, expand: bool = True, prior: bool = True) -> dict:
        from .legal_terms import LAW_PRIOR, PRIOR_WEIGHT, expand_terms
        should: list[dict] = [{"match": {"text": {"query": question}}}]
        if expand:
            should += [{"match_phrase": {"text": {"query": term, "boost": 1.0}}} for term, _ in expand_terms(question)]
        body: dict = {"size": k, "query": {"bool": {"should": should, "minimum_should_match": 1}}}
        if prior:
            top = max(LAW_PRIOR.values())
            body["query"] = {"function_score": {"query": body["query"], "boost_mode": "sum", "score_mode": "max",
                                                "functions": [{"filter": {"term": {"law": law}},
                                                               "weight": round(PRIOR_WEIGHT * n / top, 3)}
                                                              for law, n in LAW_PRIOR.items()]}}
        return body

    def threshold(self, configured: float | None) -> float | None:
        """No calibration lives in a cluster: every citation is shown (RetrievalConfig refuses a min_confidence)."""
        return None

    def search(self, question: str, k: int = 5, expand: bool = True, prior: bool = True) -> list[Hit]:
        named = self.referenced(question)
        for h in named:
            h.confidence = 1.0
        if len(named) >= k:
            return named[:k]
        found = self._search(self.query(question, k + len(named), expand, prior))
        ranked = [Hit(h["_source"]["law"], h["_source"]["article"], round(float(h["_score"]), 4), h["_source"]["text"])
                  for h in found]
        return named_first(named, ranked, k)


def export_bulk(index_path, out_path, index_name: str = "lawchat-articles") -> int:
    """A `lawchat index` file -> NDJSON for the bulk API (`curl -XPOST URL/_bulk --data-binary @FILE`); -> docs."""
    import sqlite3
    con = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True)
    n = 0
    with open(out_path, "w", encoding="utf-8") as f:
        for i, law, article, text, source in con.execute("SELECT id, law, article, text, source FROM articles"):
            f.write(json.dumps({"index": {"_index": index_name, "_id": str(i)}}) + "\n")
            f.write(json.dumps({"law": law, "article": article, "text": text, "source": source},
                               ensure_ascii=False) + "\n")
            n += 1
    return n
