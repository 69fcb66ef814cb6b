"""prepare: a lawzhidao-format CSV (title, question, reply, is_best) -> train/dev/test JSONL.

Every row read is either kept or counted under a drop reason; the counts are printed and written
to OUT_DIR/prepare_report.json so nothing disappears silently.

Streams: memory grows with the number of distinct questions (a few 8-byte hashes per row), never with the
file's text, so a 1,000,000-row, 500 MB CSV goes through in a few hundred MB (`peak_rss_mb` in the report).
Pass 1 reads every record and decides duplicates and the best-reply policy; pass 2 reads again and writes the
kept rows into the split of their question. Outputs are written to temporary names and renamed at the end,
so an interrupted run leaves no file that looks complete.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import html
import json
import os
import random
import re
import resource
import sys
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

REQUIRED_COLUMNS = ("title", "question", "reply", "is_best")
MASK_CHARS = set("*#＊＃")
POLICIES = ("best-else-all", "best", "best-else-first", "all")   # which replies of a question are kept
MAX_RECORD_CHARS = 1 << 20     # a record still open after this much text has an unclosed quote (repaired)


class PrepareError(Exception):
    """The input cannot be read at all (missing file, missing columns, undecodable)."""


@dataclass
class Example:
    prompt: str
    reply: str
    is_best: bool

    def to_conversation(self) -> dict:
        return {"conversations": [{"role": "user", "content": self.prompt},
                                  {"role": "assistant", "content": self.reply}]}


@dataclass
class PrepareReport:
    source: str
    encoding: str
    lines_read: int = 0      # physical lines, header included
    rows_read: int = 0
    repaired_rows: int = 0   # records re-read after a quote that was never closed (see iter_records)
    is_best_policy: str = "best-else-all"
    with_context: str | None = None   # the retrieval index whose articles were put in train/dev prompts
    plain_rows: int = 0               # train/dev rows left without articles (context_plain)
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: float = 0.0


def detect_encoding(path: Path) -> str:
    """Scraped CSVs arrive as UTF-8 (with or without BOM) or GBK; GB18030 is GBK's superset. Checked by
    decoding the whole file in 1 MiB pieces (nothing kept)."""
    with path.open("rb") as f:
        if f.read(3) == b"\xef\xbb\xbf":
            return "utf-8-sig"
    for encoding in ("utf-8", "gb18030"):
        decoder = codecs.getincrementaldecoder(encoding)()
        try:
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    decoder.decode(chunk)
                decoder.decode(b"", final=True)
            return encoding
        except UnicodeDecodeError as e:
            error = e
    raise PrepareError(f"cannot decode as UTF-8 or GBK/GB18030: {error}")


TAG = re.compile(r"<\s*(br|p|div|li)\b[^>]*>|<[^>]{1,200}>", re.IGNORECASE)


def clean_text(text: str) -> str:
    """HTML tags dropped (line-breaking ones become newlines), entities decoded, runs of spaces and blank lines
    collapsed."""
    text = text.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
    if "<" in text:
        text = TAG.sub(lambda m: "\n" if m.group(1) else "", text)
    if "&" in text:
        text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"[ \t\u3000]+", lambda m: " " if " " in m.group() or "\t" in m.group() else m.group(), text)
    text = re.sub(r"[ \t\u3000]*\n[ \t]*", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def near_key(text: str) -> str:
    """What is left of a reply for near-duplicate matching: NFKC, lower case, no spaces or punctuation."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in text if c.isalnum())


def key64(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8).digest(), "little")


def is_masked(text: str, threshold: float = 0.3) -> bool:
    """True when masking characters (*, #) make up at least `threshold` of the non-space text."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(c in MASK_CHARS for c in chars) / len(chars) >= threshold


def build_prompt(title: str, question: str) -> str:
    """User turn: the title, plus the question when it adds something."""
    if not question or question == title or question in title:
        return title
    if not title or title in question:
        return question
    return f"{title}\n{question}"


class Lines:
    """Physical lines of a text file, split on \\n only (\\u2028, \\x0c stay inside), with push-back."""

    def __init__(self, f, progress=None):
        self.f = f
        self.progress = progress if progress is not None and not progress.disable else None   # no bytes counted for nothing
        self.back: list[str] = []
        self.taken: list[str] = []     # lines handed out since the last reset
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.back:
            line = self.back.pop()
        else:
            line = self.f.readline()
            if not line:
                raise StopIteration
            self.count += 1
            if self.progress is not None:
                self.progress.update(len(line.encode("utf-8", "surrogatepass")))
            line = line.replace("\r\n", "\n")
        self.taken.append(line)
        return line


def iter_records(lines: Lines, n_fields: int, report: PrepareReport):
    """CSV records (quoted newlines kept). A quote opened and never closed makes one record swallow the lines
    after it (at most MAX_RECORD_CHARS); such a record is re-read as its first line alone, quotes taken
    literally, and parsing resumes on the next line, so one stray quote costs no other row."""
    csv.field_size_limit(MAX_RECORD_CHARS)
    while True:
        lines.taken, taken = [], []
        reader = csv.reader(lines, strict=False)
        try:
            for row in reader:
                taken, lines.taken = lines.taken, []
                if len(row) != n_fields and len(taken) > 1:
                    raise csv.Error("record spans lines and has the wrong field count")
                yield row
            return
        except csv.Error:
            taken = lines.taken if lines.taken else taken
            report.repaired_rows += 1
            yield next(csv.reader([taken[0]], quoting=csv.QUOTE_NONE))
            lines.back.extend(reversed(taken[1:]))


def read_examples(path: Path, encoding: str, report: PrepareReport | None, drops: Counter | None, progress=None):
    """(row number, Example) for every row that passes the per-row checks; drops counted when `drops` is given."""
    with path.open(encoding=encoding, newline="\n") as f:
        lines = Lines(f, progress)
        try:
            header = [h.strip().lower() for h in next(csv.reader([next(lines)]))]
        except StopIteration:
            raise PrepareError("the CSV is empty") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise PrepareError(f"missing column(s) {missing}; found {header}; expected {list(REQUIRED_COLUMNS)}")
        idx = {c: header.index(c) for c in REQUIRED_COLUMNS}
        scratch = PrepareReport("", "")
        rows = 0
        for row in iter_records(lines, len(header), report or scratch):
            if not any(cell.strip() for cell in row):
                continue  # blank line between records: not a row
            rows += 1
            drop = None
            if len(row) != len(header):
                drop = "wrong_field_count"
            else:
                title, question, reply = (clean_text(row[idx[c]]) for c in ("title", "question", "reply"))
                prompt = build_prompt(title, question)
                if not reply:
                    drop = "empty_reply"
                elif not prompt:
                    drop = "empty_prompt"
                elif is_masked(reply):
                    drop = "masked_reply"
                elif is_masked(prompt):
                    drop = "masked_prompt"
            if drop is not None:
                if drops is not None:
                    drops[drop] += 1
                continue
            yield rows, Example(prompt, reply, row[idx["is_best"]].strip() in ("1", "1.0", "true", "True"))
        if report is not None:
            report.rows_read, report.lines_read = rows, lines.count


@dataclass
class Plan:
    """What pass 1 decided: the rows that survive deduplication, and per question what the policy needs."""
    candidates: bytearray = field(default_factory=bytearray)   # 1 per row number that is not a duplicate
    has_best: set = field(default_factory=set)                  # question keys with a best reply
    first_row: dict = field(default_factory=dict)               # question key -> its first candidate row


def plan_rows(path: Path, encoding: str, report: PrepareReport, drops: Counter, progress=None) -> Plan:
    plan = Plan()
    seen: dict[int, int] = {}        # (question, near-key) -> exact key of the first such reply
    for row_no, ex in read_examples(path, encoding, report, drops, progress):
        q = key64(ex.prompt)
        near, exact = key64(ex.prompt, near_key(ex.reply)), key64(ex.prompt, ex.reply)
        if near in seen:
            drops["duplicate" if seen[near] == exact else "near_duplicate"] += 1
            continue
        seen[near] = exact
        if len(plan.candidates) <= row_no:
            plan.candidates.extend(bytes(row_no + 1 - len(plan.candidates) + 4096))
        plan.candidates[row_no] = 1
        if ex.is_best:
            plan.has_best.add(q)
        plan.first_row.setdefault(q, row_no)
    return plan


def keep_by_policy(policy: str, ex: Example, q: int, row_no: int, plan: Plan) -> bool:
    if policy == "all":
        return True
    if policy == "best":
        return ex.is_best
    if q in plan.has_best:
        return ex.is_best
    return policy == "best-else-all" or plan.first_row[q] == row_no


def split_of(questions: list[int], dev_ratio: float, test_ratio: float, seed: int) -> dict[int, str]:
    """Split by question so that replies to one question never straddle train and eval; -> dev/test keys."""
    questions = sorted(questions)
    random.Random(seed).shuffle(questions)
    n = len(questions)
    n_dev = max(1, round(n * dev_ratio)) if n >= 3 and dev_ratio > 0 else 0
    n_test = max(1, round(n * test_ratio)) if n >= 3 and test_ratio > 0 else 0
    which = {q: "dev" for q in questions[:n_dev]}
    which.update({q: "test" for q in questions[n_dev:n_dev + n_test]})
    return which


class CharTokens:
    """A stand-in tokenizer for prompt.with_context at prepare time (no model yet): one token per character."""

    @staticmethod
    def encode(text: str, add_special_tokens: bool = False) -> list[str]:
        return list(text)

    @staticmethod
    def decode(ids: list[str], skip_special_tokens: bool = True) -> str:
        return "".join(ids)


def context_prompt(prompt: str, retriever, k: int, max_chars: int) -> tuple[str, list[str]]:
    """The user turn with the k best-matching articles before the question (prompt.with_context's wording, at most
    max_chars of them) -> (that turn, the headings of the articles it shows). Only articles that clear the index's
    calibrated confidence threshold, as the server shows them; none: the turn says so (prompt.without_articles)."""
    from lawchat_server.prompt import with_context, without_articles
    from lawchat_server.retrieval import trusted
    hits = trusted(retriever.search(prompt, k), retriever.threshold(None))
    if not hits:
        return without_articles([{"role": "user", "content": prompt}])[-1]["content"], []
    content = with_context([{"role": "user", "content": prompt}], [(h.heading, h.text) for h in hits], CharTokens,
                           max_chars)[-1]["content"]
    return content, [h.heading for h in hits if h.heading in content]


def stays_plain(prompt: str, share: float) -> bool:
    """Whether a train/dev prompt stays without articles when the others get them: a stable `share` of prompts (by
    the prompt's hash), so that the model also practises answering from memory, as it must with retrieval off."""
    return share > 0 and key64("plain", prompt) % 10_000 < share * 10_000


def add_context(ex: Example, retriever, k: int, max_chars: int) -> Example:
    return Example(context_prompt(ex.prompt, retriever, k, max_chars)[0], ex.reply, ex.is_best)


def prepare(csv_path: str | Path, out_dir: str | Path, dev_ratio: float = 0.05, test_ratio: float = 0.05,
            seed: int = 42, keep_all_replies: bool = False, is_best: str = "best-else-all",
            progress: bool | None = None, with_context: str | Path | None = None, context_k: int = 3,
            context_chars: int = 512, context_plain: float = 0.0) -> PrepareReport:
    """with_context: a retrieval index; train and dev prompts get the best-matching articles before the question
    (the test split stays plain: `lawchat eval --retrieval` adds them the way the server does), except a
    `context_plain` share of them (stays_plain)."""
    from tqdm import tqdm

    csv_path, out_dir = Path(csv_path), Path(out_dir)
    if not csv_path.is_file():
        raise PrepareError(f"no such file: {csv_path}")
    policy = "all" if keep_all_replies else is_best
    if policy not in POLICIES:
        raise PrepareError(f"--is-best must be one of {list(POLICIES)}, got {policy!r}")
    encoding = detect_encoding(csv_path)
    retriever = None
    if with_context is not None:
        from lawchat_server.retrieval import Retriever
        retriever = Retriever(with_context)
    report = PrepareReport(source=str(csv_path), encoding=encoding, is_best_policy=policy,
                           with_context=str(with_context) if with_context else None)
    drops: Counter = Counter()
    size = csv_path.stat().st_size
    disable = None if progress is None else not progress     # None: a bar on a terminal only
    with tqdm(total=size, unit="B", unit_scale=True, desc="prepare 1/2 scan", disable=disable, file=sys.stderr) as bar:
        plan = plan_rows(csv_path, encoding, report, drops, bar)
    which = split_of(list(plan.first_row), dev_ratio, test_ratio, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ("train", "dev", "test")
    tmp = {name: out_dir / f".{name}.jsonl.part" for name in (*names, "prepare_report")}
    counts = dict.fromkeys(names, 0)
    try:
        files = {name: tmp[name].open("w", encoding="utf-8") for name in names}
        with tqdm(total=size, unit="B", unit_scale=True, desc="prepare 2/2 write", disable=disable,
                  file=sys.stderr) as bar:
            for row_no, ex in read_examples(csv_path, encoding, None, None, bar):
                if row_no >= len(plan.candidates) or not plan.candidates[row_no]:
                    continue
                q = key64(ex.prompt)
                if not keep_by_policy(policy, ex, q, row_no, plan):
                    drops["not_best_reply"] += 1
                    continue
                name = which.get(q, "train")
                if retriever is not None and name != "test":
                    if stays_plain(ex.prompt, context_plain):
                        report.plain_rows += 1
                    else:
                        ex = add_context(ex, retriever, context_k, context_chars)
                files[name].write(json.dumps(ex.to_conversation(), ensure_ascii=False) + "\n")
                counts[name] += 1
        for f in files.values():
            f.close()
        report.kept = sum(counts.values())
        report.dropped = dict(sorted(drops.items()))
        report.splits = counts
        report.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if not report.kept:
            raise PrepareError(f"no usable rows: {report.rows_read} read, dropped {dict(drops)}")
        assert report.kept + sum(drops.values()) == report.rows_read, "every row is kept or counted as dropped"
        tmp["prepare_report"].write_text(json.dumps(asdict(report), ensure_ascii=False, indent=2) + "\n",
                                         encoding="utf-8")
        for name in names:                       # all or nothing: the report is renamed last
            os.replace(tmp[name], out_dir / f"{name}.jsonl")
        os.replace(tmp["prepare_report"], out_dir / "prepare_report.json")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return report


def print_report(report: PrepareReport, file=sys.stderr) -> None:
    print(f"prepare: {report.source} ({report.encoding}): {report.lines_read} lines, {report.rows_read} rows read, "
          f"{report.kept} kept, {report.repaired_rows} repaired after an unclosed quote; is-best policy "
          f"{report.is_best_policy}; peak RSS {report.peak_rss_mb:.0f} MB", file=file)
    for reason, n in report.dropped.items():
        print(f"  dropped {n:>6}  {reason}", file=file)
    print("  splits: " + ", ".join(f"{k}={v}" for k, v in report.splits.items()), file=file)
