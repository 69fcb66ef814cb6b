"""prepare: a lawzhidao-format CSV (title, question, reply, is_best) -> train/dev/test JSONL.

Every row read is either kept or counted under a drop reason; the counts are printed and written
to OUT_DIR/prepare_report.json so nothing disappears silently.
"""
from __future__ import annotations

import csv
import json
import random
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

REQUIRED_COLUMNS = ("title", "question", "reply", "is_best")
MASK_CHARS = set("*#＊＃")


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
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)


def decode_bytes(raw: bytes) -> tuple[str, str]:
    """Scraped CSVs arrive as UTF-8 (with or without BOM) or GBK; GB18030 is GBK's superset."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return raw[3:].decode("utf-8"), "utf-8-sig"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("gb18030"), "gb18030"
    except UnicodeDecodeError as e:
        raise PrepareError(f"cannot decode as UTF-8 or GBK/GB18030: {e}") from e


def clean_text(text: str) -> str:
    text = text.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\u3000]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


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


def iter_records(lines: list[str], n_fields: int, report: PrepareReport):
    """CSV records from physical lines (quoted newlines kept). A quote opened and never closed makes one
    record swallow the lines after it; such a record is re-read as its first line alone, quotes taken
    literally, and parsing resumes on the next line, so one stray quote costs no other row."""
    pos = 0
    while pos < len(lines):
        reader = csv.reader(iter(lines[pos:]), strict=False)
        start = 0
        for row in reader:
            end = reader.line_num
            if len(row) != n_fields and end - start > 1:
                report.repaired_rows += 1
                yield next(csv.reader([lines[pos + start]], quoting=csv.QUOTE_NONE))
                pos += start + 1
                break
            yield row
            start = end
        else:
            return


def read_rows(text: str, report: PrepareReport, drops: Counter) -> list[Example]:
    # split on \n only: str.splitlines would also cut at \u2028, \x0c ... that scraped text carries
    lines = [line + "\n" for line in text.replace("\r\n", "\n").split("\n")]
    if text.endswith("\n"):
        lines.pop()
    report.lines_read = len(lines)
    try:
        header = [h.strip().lower() for h in next(csv.reader(lines[:1]))]
    except StopIteration:
        raise PrepareError("the CSV is empty") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise PrepareError(f"missing column(s) {missing}; found {header}; expected {list(REQUIRED_COLUMNS)}")
    idx = {c: header.index(c) for c in REQUIRED_COLUMNS}

    examples = []
    for row in iter_records(lines[1:], len(header), report):
        if not any(cell.strip() for cell in row):
            continue  # blank line between records: not a row
        report.rows_read += 1
        if len(row) != len(header):
            drops["wrong_field_count"] += 1
            continue
        title, question, reply = (clean_text(row[idx[c]]) for c in ("title", "question", "reply"))
        prompt = build_prompt(title, question)
        if not reply:
            drops["empty_reply"] += 1
        elif not prompt:
            drops["empty_prompt"] += 1
        elif is_masked(reply):
            drops["masked_reply"] += 1
        elif is_masked(prompt):
            drops["masked_prompt"] += 1
        else:
            examples.append(Example(prompt, reply, row[idx["is_best"]].strip() in ("1", "1.0", "true", "True")))
    return examples


def select_examples(examples: list[Example], drops: Counter, keep_all_replies: bool) -> list[Example]:
    """Drop exact duplicates; for a prompt that has a best reply, drop its other replies."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for ex in examples:
        if (ex.prompt, ex.reply) in seen:
            drops["duplicate"] += 1
            continue
        seen.add((ex.prompt, ex.reply))
        unique.append(ex)
    if keep_all_replies:
        return unique
    has_best = {ex.prompt for ex in unique if ex.is_best}
    kept = []
    for ex in unique:
        if ex.prompt in has_best and not ex.is_best:
            drops["not_best_reply"] += 1
        else:
            kept.append(ex)
    return kept


def split_examples(examples: list[Example], dev_ratio: float, test_ratio: float,
                   seed: int) -> dict[str, list[Example]]:
    """Split by prompt so that replies to one question never straddle train and eval."""
    prompts = sorted({ex.prompt for ex in examples})
    random.Random(seed).shuffle(prompts)
    n = len(prompts)
    n_dev = max(1, round(n * dev_ratio)) if n >= 3 and dev_ratio > 0 else 0
    n_test = max(1, round(n * test_ratio)) if n >= 3 and test_ratio > 0 else 0
    which = {p: "dev" for p in prompts[:n_dev]}
    which.update({p: "test" for p in prompts[n_dev:n_dev + n_test]})
    splits: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
    for ex in examples:
        splits[which.get(ex.prompt, "train")].append(ex)
    return splits


def write_jsonl(path: Path, examples: list[Example]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_conversation(), ensure_ascii=False) + "\n")


def prepare(csv_path: str | Path, out_dir: str | Path, dev_ratio: float = 0.05, test_ratio: float = 0.05,
            seed: int = 42, keep_all_replies: bool = False) -> PrepareReport:
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    if not csv_path.is_file():
        raise PrepareError(f"no such file: {csv_path}")
    text, encoding = decode_bytes(csv_path.read_bytes())
    report = PrepareReport(source=str(csv_path), encoding=encoding)
    drops: Counter = Counter()
    examples = select_examples(read_rows(text, report, drops), drops, keep_all_replies)
    if not examples:
        report.dropped = dict(drops)
        raise PrepareError(f"no usable rows: {report.rows_read} read, dropped {dict(drops)}")
    splits = split_examples(examples, dev_ratio, test_ratio, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", part)
    report.kept = len(examples)
    report.dropped = dict(sorted(drops.items()))
    report.splits = {name: len(part) for name, part in splits.items()}
    assert report.kept + sum(drops.values()) == report.rows_read, "every row is kept or counted as dropped"
    (out_dir / "prepare_report.json").write_text(json.dumps(asdict(report), ensure_ascii=False, indent=2) + "\n",
                                                 encoding="utf-8")
    return report


def print_report(report: PrepareReport, file=sys.stderr) -> None:
    print(f"prepare: {report.source} ({report.encoding}): {report.lines_read} lines, {report.rows_read} rows read, "
          f"{report.kept} kept, {report.repaired_rows} repaired after an unclosed quote", file=file)
    for reason, n in report.dropped.items():
        print(f"  dropped {n:>6}  {reason}", file=file)
    print("  splits: " + ", ".join(f"{k}={v}" for k, v in report.splits.items()), file=file)
