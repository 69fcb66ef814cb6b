"""bm25: the index's FTS5 postings held in numpy, scored exactly as FTS5's bm25() scores them — without FTS5's
per-row cost.

FTS5 runs its bm25() function once for every row a query matches (~1.3 µs a row here): an everyday question whose
words occur in 11,000 of the 24,000 articles costs 15 ms that way. The same sums over numpy arrays of the query
terms' postings cost well under a millisecond. The postings are read from FTS5 itself (fts5vocab over its own
tokens: ~0.3 s for laws.db's 1.7 M term instances), so the tokens, the counts, the document lengths and therefore
every score are FTS5's own; the formula is FTS5's (k1 1.2, b 0.75, its IDF, the column weights summed per term, the
length over every column), in FTS5's order of additions, so the scores are equal to the last bit and the ranking
is the same (ties by rowid).

A query term that the unicode61 tokenizer could split into several tokens (a phrase) is not looked up here:
`score` returns None and the caller asks FTS5. Written here rather than taken from a BM25 library (bm25s,
tantivy): those tokenize and weigh in their own ways, and the served ranking, its calibration and its tests are
FTS5's.
"""
from __future__ import annotations

import math
import re
import sqlite3
from dataclasses import dataclass

import numpy as np

K1, B = 1.2, 0.75                  # FTS5's bm25() constants (fts5_aux.c)
MIN_IDF = 1e-6                     # FTS5's floor for a term in more than half the rows
# one unicode61 token for sure: ASCII lower-case letters and digits, CJK ideographs (no case, no diacritics)
SINGLE_TOKEN = re.compile(r"[0-9a-z\u3400-\u4dbf\u4e00-\u9fff]+")


@dataclass
class Postings:
    """Every (term, row) pair of an FTS5 table: the column-weighted count of the term in the row."""
    terms: dict[str, int]          # term -> its index
    starts: np.ndarray             # (n_terms + 1,) int64: term i's postings are [starts[i], starts[i + 1])
    rows: np.ndarray               # (n_postings,) int64 rowid, ascending within a term
    freq: np.ndarray               # (n_postings,) float64: sum over the term's instances in the row of its column's weight
    length: np.ndarray             # (max rowid + 1,) float64: tokens in the row over every column (0: no such row)
    n_rows: int
    avgdl: float

    def score(self, terms: list[str], limit: int) -> list[tuple[int, float]] | None:
        """The FTS5 OR-query of these terms -> (rowid, bm25) of the best `limit` rows, best first; bm25 as FTS5's
        bm25() returns it (negative, lower is better). None: a term is a phrase for FTS5 (ask FTS5)."""
        parts_rows, parts_score = [], []
        for term in dict.fromkeys(terms):
            t = term.lower() if term.isascii() else term
            if not SINGLE_TOKEN.fullmatch(t):
                return None
            i = self.terms.get(t)
            if i is None:                  # a token no row has: it adds to no score
                continue
            rows = self.rows[self.starts[i]:self.starts[i + 1]]
            f = self.freq[self.starts[i]:self.starts[i + 1]]
            idf = math.log((0.5 + self.n_rows - len(rows)) / (0.5 + len(rows)))     # libm's log, as SQLite's
            idf = idf if idf > 0.0 else MIN_IDF
            parts_rows.append(rows)
            parts_score.append(idf * ((f * (K1 + 1.0)) / (f + K1 * (1 - B + B * self.length[rows] / self.avgdl))))
        if not parts_rows:
            return []
        rows = np.concatenate(parts_rows)
        total = np.bincount(rows, weights=np.concatenate(parts_score), minlength=len(self.length))  # in term order
        hit = np.flatnonzero(total)        # every matched row scores > 0 (IDF >= MIN_IDF, counts >= 1)
        s = total[hit]
        if len(hit) > limit:
            keep = np.argpartition(-s, limit - 1)[:limit]
            cut = s[keep].min()             # rows tied with the last one kept: the lowest rowids, as below
            keep = np.flatnonzero(s >= cut)
            hit, s = hit[keep], s[keep]
        order = np.lexsort((hit, -s))[:limit]
        return [(int(hit[j]), -float(s[j])) for j in order]


@dataclass
class Instances:
    """An FTS5 table's term instances as read from SQLite (`read_instances`), before `build_postings` counts them."""
    terms: list[tuple[str, int]]   # (term, instances of it), in term order
    keys: str                      # every instance as rowid * n_cols + column, comma-separated, in term, rowid order
    n_cols: int
    n_rows: int


def read_instances(con: sqlite3.Connection, table: str) -> Instances:
    """The SQL half of loading the postings (~0.3 s for laws.db): run it inside the caller's read transaction, so
    that its statements see one snapshot and a writer waits no longer than they take (any connection, read-only
    too: the vocabulary tables are temporary)."""
    names = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
    col_index = "CASE col " + " ".join(f"WHEN '{c}' THEN {i}" for i, c in enumerate(names)) + " END"   # col: a name
    con.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{table}_instances USING fts5vocab(main, {table}, instance)")
    con.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{table}_terms USING fts5vocab(main, {table}, row)")
    terms = con.execute(f"SELECT term, cnt FROM temp.{table}_terms").fetchall()
    keys = con.execute(f"SELECT group_concat(doc * {len(names)} + {col_index}) FROM temp.{table}_instances").fetchone()[0]
    n_rows = con.execute(f"SELECT COUNT(*) FROM {table}_docsize").fetchone()[0]
    return Instances(terms, keys or "", len(names), n_rows)


def build_postings(raw: Instances, weights: tuple[float, ...]) -> Postings:
    """The numpy half: the instances counted per (term, row) with the columns' weights (no database held)."""
    if len(weights) != raw.n_cols:
        raise ValueError(f"the table has {raw.n_cols} columns, {len(weights)} weights given")
    keys = np.array(raw.keys.split(","), dtype=np.int64) if raw.keys else np.zeros(0, dtype=np.int64)
    counts = np.array([c for _, c in raw.terms], dtype=np.int64)
    if int(counts.sum()) != len(keys):
        raise RuntimeError("the term counts and the instances disagree (read outside one transaction?)")
    term_of = np.repeat(np.arange(len(raw.terms)), counts)         # (n_instances,)
    rows, cols = keys // raw.n_cols, keys % raw.n_cols
    new = np.ones(len(keys), dtype=bool)                           # the first instance of each (term, row)
    new[1:] = (term_of[1:] != term_of[:-1]) | (rows[1:] != rows[:-1])
    first = np.flatnonzero(new)
    freq = np.add.reduceat(np.asarray(weights, dtype=np.float64)[cols], first) if len(first) else np.zeros(0)
    starts = np.searchsorted(first, np.concatenate([[0], np.cumsum(counts)]))
    length = np.bincount(rows, minlength=int(rows.max()) + 1 if len(rows) else 1).astype(np.float64)
    return Postings({t: i for i, (t, _) in enumerate(raw.terms)}, starts, rows[first], freq, length, raw.n_rows,
                    float(len(keys)) / max(raw.n_rows, 1))


def load_postings(con: sqlite3.Connection, table: str, weights: tuple[float, ...]) -> Postings:
    """Both halves, for a file no one writes meanwhile (or inside the caller's transaction)."""
    return build_postings(read_instances(con, table), weights)
