"""knowledge: add and delete documents in a running server's retrieval index (AdminService AddDocuments /
DeleteDocuments, `lawchat kb`).

A user's own articles, firm memos or FAQs go into the same SQLite index as the statutes (`lawchat index`): one
transaction per request writes the article row, its FTS5 row, its vector (when the index has vectors: the
encoder embeds the documents before the write lock), its id in `documents` and a new `kb_version`, so a
request is searchable by the next query once it returns, survives a restart, and a crash mid-write (kill -9) leaves
the index as it was before the request (SQLite's rollback journal). Rows are validated before anything is written:
one bad row refuses the whole request, with a reason per row.
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MAX_DOCUMENTS = 1000          # per request
MAX_TEXT_CHARS = 20000        # per document
MAX_NAME_CHARS = 200          # id, law (the collection or title shown in a citation) and article (its section)

DOCUMENTS_TABLE = """CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY, article_id INTEGER NOT NULL, added_at TEXT NOT NULL)"""


class InvalidDocuments(ValueError):
    """Rows refused before anything was written; `reasons` has one line per bad row."""

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons[:20]) + (f"; ... {len(reasons) - 20} more" if len(reasons) > 20 else ""))
        self.reasons = reasons


@dataclass
class Document:
    id: str          # the caller's key (delete by it; adding an id again replaces the document)
    law: str         # e.g. 某律所劳动争议备忘录: cited as 《law》article
    article: str     # e.g. 第三条, 问答7
    text: str


@dataclass
class Change:
    added: int = 0
    replaced: int = 0
    deleted: int = 0
    not_found: tuple[str, ...] = ()
    version: int = 0
    articles: int = 0


def validate(docs: list[Document]) -> list[Document]:
    """-> the documents, stripped; raises InvalidDocuments naming every bad row (1-based)."""
    if not docs:
        raise InvalidDocuments(["no documents"])
    if len(docs) > MAX_DOCUMENTS:
        raise InvalidDocuments([f"{len(docs)} documents: at most {MAX_DOCUMENTS} per request"])
    reasons, seen, out = [], set(), []
    for row, d in enumerate(docs, 1):
        d = Document(d.id.strip(), d.law.strip(), d.article.strip(), d.text.strip())
        bad = [f"{name} is empty" for name in ("id", "law", "article", "text") if not getattr(d, name)]
        bad += [f"{name} longer than {MAX_NAME_CHARS} characters" for name in ("id", "law", "article")
                if len(getattr(d, name)) > MAX_NAME_CHARS]
        if len(d.text) > MAX_TEXT_CHARS:
            bad.append(f"text longer than {MAX_TEXT_CHARS} characters")
        if any("\x00" in getattr(d, name) for name in ("id", "law", "article", "text")):
            bad.append("contains a NUL character")
        if d.id and d.id in seen:
            bad.append(f"id {d.id!r} given twice")
        seen.add(d.id)
        reasons += [f"document {row}: {b}" for b in bad]
        out.append(d)
    if reasons:
        raise InvalidDocuments(reasons)
    return out


def read_jsonl(path: str | Path) -> list[Document]:
    """A JSONL file of {"id", "law", "article", "text"} objects; raises InvalidDocuments naming bad lines."""
    docs, reasons = [], []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            docs.append(Document(*(str(item[k]) for k in ("id", "law", "article", "text"))))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            reasons.append(f"line {lineno}: expected a JSON object with id, law, article, text ({type(e).__name__}: {e})")
    if reasons:
        raise InvalidDocuments(reasons)
    return docs


def _connect(index: Path) -> sqlite3.Connection:
    if not index.is_file():
        raise FileNotFoundError(f"no retrieval index at {index}; build one with `lawchat index`")
    con = sqlite3.connect(index, timeout=30, isolation_level=None)
    con.execute("PRAGMA synchronous = FULL")        # a returned request is on disk
    con.execute(DOCUMENTS_TABLE)
    return con


@contextmanager
def _write(index: str | Path) -> Iterator[sqlite3.Connection]:
    """One write transaction on the index: committed when the block ends, rolled back if it raises."""
    con = _connect(Path(index))
    try:
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    finally:
        con.close()


def _bump(con: sqlite3.Connection) -> tuple[int, int]:
    version = int(json.loads((con.execute("SELECT value FROM meta WHERE key = 'kb_version'").fetchone() or ["0"])[0]))
    articles = con.execute("SELECT COUNT(*) FROM articles").fetchone()[0]
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [("kb_version", json.dumps(version + 1)), ("articles", json.dumps(articles))])
    return version + 1, articles


def _remove(con: sqlite3.Connection, doc_id: str) -> bool:
    row = con.execute("SELECT article_id FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
    if row is None:
        return False
    con.execute("DELETE FROM articles WHERE id = ?", row)
    con.execute("DELETE FROM articles_fts WHERE rowid = ?", row)
    if _has_vectors(con):
        con.execute("DELETE FROM vectors WHERE id = ?", row)
    con.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
    return True


def _has_vectors(con: sqlite3.Connection) -> bool:
    return con.execute("SELECT 1 FROM sqlite_master WHERE name = 'vectors'").fetchone() is not None


def index_encoder(index: str | Path) -> dict | None:
    """The encoder whose vectors the index holds ({name, dim, fingerprint}), or None (BM25 only)."""
    con = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'encoder'").fetchone()
    finally:
        con.close()
    return json.loads(row[0]) if row else None


def add_documents(index: str | Path, docs: list[Document], encoder=None) -> Change:
    """Validate, then write every document in one transaction (an existing id is replaced). An index with vectors
    needs `encoder`, the one that made them (the server's retrieval.encoder; `lawchat kb add --encoder`)."""
    from .encoder import check_encoder_meta, to_blob
    from .retrieval import doc_text, index_tokens
    docs = validate(docs)
    rows = [(d, index_tokens(d.law), index_tokens(d.text)) for d in docs]     # jieba before the write lock
    vecs = None
    made_by = index_encoder(index)
    if made_by is not None:
        if encoder is None:
            raise InvalidDocuments([f"this index holds vectors of encoder {made_by.get('name')!r}: documents must be "
                                    "embedded by it (the server's retrieval.encoder, or `lawchat kb add --encoder DIR`)"])
        check_encoder_meta({"encoder": made_by}, encoder, str(index))
        vecs = encoder.encode([doc_text(d.law, d.text) for d in docs])                 # before the write lock too
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with _write(index) as con:
        change = Change()
        for n, (d, law_tokens, tokens) in enumerate(rows):
            change.replaced += _remove(con, d.id)
            cur = con.execute("INSERT INTO articles (law, article, text, source) VALUES (?, ?, ?, ?)",
                              (d.law, d.article, d.text, "kb"))
            con.execute("INSERT INTO articles_fts (rowid, law_tokens, tokens) VALUES (?, ?, ?)",
                        (cur.lastrowid, law_tokens, tokens))
            if vecs is not None:
                con.execute("INSERT INTO vectors VALUES (?, ?)", (cur.lastrowid, to_blob(vecs[n])))
            con.execute("INSERT INTO documents VALUES (?, ?, ?)", (d.id, cur.lastrowid, now))
        change.added = len(rows) - change.replaced
        change.version, change.articles = _bump(con)
    return change


def delete_documents(index: str | Path, ids: list[str]) -> Change:
    """Delete documents added by id (statutes from `lawchat index` have none); unknown ids are reported."""
    ids = [i.strip() for i in ids]
    if not ids or not all(ids):
        raise InvalidDocuments(["give one or more non-empty ids"])
    if len(ids) > MAX_DOCUMENTS:
        raise InvalidDocuments([f"{len(ids)} ids: at most {MAX_DOCUMENTS} per request"])
    with _write(index) as con:
        missing = tuple(i for i in dict.fromkeys(ids) if not _remove(con, i))
        change = Change(deleted=len(set(ids)) - len(missing), not_found=missing)
        change.version, change.articles = _bump(con)
    return change


def status(con: sqlite3.Connection) -> tuple[int, int, int]:
    """-> (kb_version, articles, documents added at run time) of an open index connection."""
    meta = dict(con.execute("SELECT key, value FROM meta WHERE key IN ('kb_version', 'articles')").fetchall())
    has_docs = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'documents'").fetchone()
    docs = con.execute("SELECT COUNT(*) FROM documents").fetchone()[0] if has_docs else 0
    return int(json.loads(meta.get("kb_version", "0"))), int(json.loads(meta.get("articles", "0"))), docs
