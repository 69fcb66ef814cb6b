"""`lawchat prepare` on real CSV files: messy rows are kept or counted, never silently lost."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lawchat_trainer.prepare import prepare

BIN = Path(sys.executable).parent

MESSY_CSV = (
    "title,question,reply,is_best\n"
    "劳动合同到期不续签有补偿吗,,\"有。劳动合同期满终止的，\n用人单位一般应当支付经济补偿。\",1\n"   # newline inside a quoted field
    "劳动合同到期不续签有补偿吗,,\"有。劳动合同期满终止的，\n用人单位一般应当支付经济补偿。\",1\n"   # exact duplicate
    "试用期多长,劳动合同一年的试用期多长,不得超过二个月。,1\n"                                    # question adds detail
    "试用期多长,劳动合同一年的试用期多长,看公司规定。,0\n"                                        # not the best reply
    "押金不退怎么办,押金不退怎么办,可以协商，也可以起诉。,0\n"                                      # question == title
    "工资被扣了,,,0\n"                                                                           # empty reply
    "这样合法吗,,**** *** ***,0\n"                                                               # masked reply
    ",,只有回答没有问题,1\n"                                                                      # empty prompt
    "多了一列,,回答,1,多余\n"                                                                      # wrong field count
    "被辞退了,\"公司说我严重违纪，\"\"证据\"\"是考勤\",要求公司出示证据，违法解除可主张赔偿金。,1\n"  # quotes inside
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def all_examples(out: Path) -> list[dict]:
    return [ex for name in ("train", "dev", "test") for ex in read_jsonl(out / f"{name}.jsonl")]


def test_messy_csv_every_row_kept_or_counted(tmp_path):
    src = tmp_path / "lawzhidao.csv"
    src.write_text(MESSY_CSV, encoding="utf-8")
    report = prepare(src, tmp_path / "out")

    assert report.rows_read == 10
    assert report.lines_read == 13        # header + 10 rows + 2 newlines inside quoted fields
    assert report.dropped == {"duplicate": 1, "not_best_reply": 1, "empty_reply": 1, "masked_reply": 1,
                              "empty_prompt": 1, "wrong_field_count": 1}
    assert report.kept == 4
    saved = json.loads((tmp_path / "out" / "prepare_report.json").read_text(encoding="utf-8"))
    assert saved["kept"] + sum(saved["dropped"].values()) == saved["rows_read"]

    examples = all_examples(tmp_path / "out")
    by_prompt = {ex["conversations"][0]["content"]: ex["conversations"][1]["content"] for ex in examples}
    assert by_prompt["劳动合同到期不续签有补偿吗"] == "有。劳动合同期满终止的，\n用人单位一般应当支付经济补偿。"
    assert by_prompt["劳动合同一年的试用期多长"] == "不得超过二个月。"       # question contains the title
    assert by_prompt["押金不退怎么办"] == "可以协商，也可以起诉。"
    assert by_prompt["被辞退了\n公司说我严重违纪，\"证据\"是考勤"].startswith("要求公司")
    for ex in examples:
        assert [t["role"] for t in ex["conversations"]] == ["user", "assistant"]


def test_unclosed_quote_costs_no_other_row(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("title,question,reply,is_best\n"
                   "离职证明不给开怎么办,\"公司拖着不给,可以向劳动行政部门投诉。,1\n"     # quote never closed
                   "加班费怎么算,,不低于工资的百分之一百五十。,1\n"
                   "押金不退怎么办,,\"可以协商，\n也可以起诉。\",1\n"                  # a real quoted newline
                   "年假有几天,,\"工作满一年不满十年的，年休假五天,1\n"                  # unclosed in the last-but-one field
                   "工伤怎么认定,,向社会保险行政部门申请。,1\n"
                   "分页符\x0c和\u2028行分隔符,,照常保留。,1\r\n", encoding="utf-8")
    report = prepare(src, tmp_path / "out")
    assert report.rows_read == 6 and report.repaired_rows == 2 and report.lines_read == 8
    assert report.kept == 6 and report.dropped == {}
    by_prompt = {ex["conversations"][0]["content"]: ex["conversations"][1]["content"]
                 for ex in all_examples(tmp_path / "out")}
    assert by_prompt["离职证明不给开怎么办\n\"公司拖着不给"] == "可以向劳动行政部门投诉。"
    assert by_prompt["押金不退怎么办"] == "可以协商，\n也可以起诉。"
    assert by_prompt["年假有几天"] == "\"工作满一年不满十年的，年休假五天"
    assert {"加班费怎么算", "工伤怎么认定"} <= set(by_prompt)
    assert by_prompt["分页符\x0c和\u2028行分隔符"] == "照常保留。"


@pytest.mark.parametrize("encoding", ["gbk", "utf-8-sig"])
def test_gbk_and_bom_inputs_decode(tmp_path, encoding):
    src = tmp_path / "in.csv"
    src.write_bytes(MESSY_CSV.encode(encoding))
    report = prepare(src, tmp_path / "out")
    assert report.encoding == {"gbk": "gb18030", "utf-8-sig": "utf-8-sig"}[encoding]
    assert report.kept == 4
    prompts = {ex["conversations"][0]["content"] for ex in all_examples(tmp_path / "out")}
    assert "押金不退怎么办" in prompts


def test_split_keeps_replies_of_one_question_together(tmp_path):
    rows = ["title,question,reply,is_best"]
    for i in range(60):
        rows += [f"问题{i},,回答{i}甲,0", f"问题{i},,回答{i}乙,0"]   # two replies each, no best one
    src = tmp_path / "in.csv"
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = prepare(src, tmp_path / "out", dev_ratio=0.1, test_ratio=0.1)
    assert report.kept == 120 and report.dropped == {}
    assert report.splits == {"train": 96, "dev": 12, "test": 12}
    prompts = {name: {ex["conversations"][0]["content"] for ex in read_jsonl(tmp_path / "out" / f"{name}.jsonl")}
               for name in ("train", "dev", "test")}
    assert not prompts["train"] & prompts["dev"] and not prompts["train"] & prompts["test"]


def test_cli_exit_codes(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("title,reply\n问,答\n", encoding="utf-8")
    r = subprocess.run([str(BIN / "lawchat"), "prepare", str(bad), str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "missing column(s) ['question', 'is_best']" in r.stderr

    r = subprocess.run([str(BIN / "lawchat"), "prepare", str(tmp_path / "nope.csv"), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr

    good = tmp_path / "good.csv"
    good.write_text(MESSY_CSV, encoding="utf-8")
    r = subprocess.run([str(BIN / "lawchat"), "prepare", str(good), str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "13 lines, 10 rows read, 4 kept, 0 repaired" in r.stderr and "masked_reply" in r.stderr


def test_html_entities_and_whitespace_are_cleaned_and_near_duplicates_counted(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text(
        "title,question,reply,is_best\n"
        "加班费怎么算,,<p>工作日加班&nbsp;支付150%</p><br/>休息日  200%，法定节假日300%。,0\n"
        "加班费怎么算,,\"工作日加班 支付150% 休息日 200% , 法定节假日300%\",0\n"   # the same words: near duplicate
        "加班费怎么算,,\"<div>另一个回答</div>\",0\n"
        "试用期多长,,不超过&lt;六个月&gt;。   \t ,1\n", encoding="utf-8")
    report = prepare(src, tmp_path / "out", dev_ratio=0, test_ratio=0)
    assert report.dropped == {"near_duplicate": 1} and report.kept == 3
    replies = [ex["conversations"][1]["content"] for ex in all_examples(tmp_path / "out")]
    assert replies == ["工作日加班 支付150%\n休息日 200%，法定节假日300%。", "另一个回答", "不超过<六个月>。"]


@pytest.mark.parametrize("policy,kept", [
    ("best-else-all", ["A1", "B1", "B2"]),      # A has a best reply: only it; B has none: all
    ("best", ["A1"]),
    ("best-else-first", ["A1", "B1"]),
    ("all", ["A0", "A1", "B1", "B2"]),
])
def test_is_best_policies(tmp_path, policy, kept):
    src = tmp_path / "in.csv"
    src.write_text("title,question,reply,is_best\n问A,,A0,0\n问B,,B1,0\n问A,,A1,1\n问B,,B2,0\n", encoding="utf-8")
    r = subprocess.run([str(BIN / "lawchat"), "prepare", str(src), str(tmp_path / "out"), "--is-best", policy,
                        "--dev-ratio", "0", "--test-ratio", "0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = sorted(ex["conversations"][1]["content"] for ex in all_examples(tmp_path / "out"))
    assert got == kept
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["kept"] + report["dropped"].get("not_best_reply", 0) == 4 and report["is_best_policy"] == policy


def test_an_interrupted_run_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    import lawchat_trainer.prepare as prep
    src = tmp_path / "in.csv"
    src.write_text("title,question,reply,is_best\n" + "".join(f"问{i},,答{i},1\n" for i in range(50)),
                   encoding="utf-8")
    out = tmp_path / "out"
    old = prepare(src, out, dev_ratio=0, test_ratio=0)             # a finished earlier run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"train.jsonl", "dev.jsonl", "test.jsonl", "prepare_report.json"}
    assert "答49" in before["train.jsonl"].decode()
    real, calls = prep.json.dumps, []

    def dumps_then_interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(prep.json, "dumps", dumps_then_interrupt)
    src.write_text("title,question,reply,is_best\n" + "".join(f"新问{i},,新答{i},1\n" for i in range(50)),
                   encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, dev_ratio=0, test_ratio=0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # the earlier outputs, whole; no .part left
    assert old.kept == 50


def test_a_generated_lawzhidao_file_streams_through_with_every_row_accounted(tmp_path):
    src = tmp_path / "big.csv"
    r = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "scripts" / "make_lawzhidao_csv.py"),
                        str(src), "--rows", "20000"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = prepare(src, tmp_path / "out")
    assert report.rows_read == 20000
    assert report.kept + sum(report.dropped.values()) == 20000
    assert {"duplicate", "near_duplicate", "masked_reply", "empty_reply", "not_best_reply"} <= set(report.dropped)
    assert sum(report.splits.values()) == report.kept and report.peak_rss_mb > 0
    texts = [ex["conversations"][1]["content"] for ex in all_examples(tmp_path / "out")]
    assert len(texts) == report.kept
    assert not any("<p>" in t or "&nbsp;" in t or "\n\n\n" in t for t in texts)
