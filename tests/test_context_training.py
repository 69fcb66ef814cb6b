"""Training and evaluating with retrieved articles: `prepare --with-context`, `eval --retrieval`, citation share."""
from __future__ import annotations

import json
import subprocess

from conftest import BIN, ROOT
from lawchat_server.retrieval import build_index
from lawchat_trainer.evaluate import cite_share, cited
from test_retrieval import laws_db  # noqa: F401  (the laws.db-format fixture)


def test_prepare_with_context_puts_articles_in_train_and_dev_prompts_only(laws_db, tmp_path):  # noqa: F811
    build_index(tmp_path / "idx.sqlite", laws_db)
    src = tmp_path / "in.csv"
    src.write_text("title,question,reply,is_best\n" + "".join(
        f"公司拖欠工资{i}个月怎么办,,可以申请劳动仲裁{i}。,1\n" for i in range(30)), encoding="utf-8")
    r = subprocess.run([str(BIN / "lawchat"), "prepare", str(src), str(tmp_path / "out"), "--with-context",
                        str(tmp_path / "idx.sqlite"), "--context-k", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {name: [json.loads(x)["conversations"] for x in (tmp_path / "out" / f"{name}.jsonl").read_text(
        encoding="utf-8").splitlines()] for name in ("train", "dev", "test")}
    for conv in rows["train"] + rows["dev"]:
        user = conv[0]["content"]
        assert user.startswith("参考法条：\n《劳动合同法》第三十条：") and "\n\n问题：公司拖欠工资" in user
        assert len(user.split("\n\n问题：")[0]) <= 512 + 2
    assert rows["test"] and all(conv[0]["content"].startswith("公司拖欠工资") for conv in rows["test"])
    assert json.loads((tmp_path / "out" / "prepare_report.json").read_text())["with_context"].endswith("idx.sqlite")


def test_prepare_context_plain_leaves_a_stable_share_without_articles(laws_db, tmp_path):  # noqa: F811
    """--context-plain 0.5: about half of the train/dev prompts stay plain (counted in the report), the same ones on
    every run; the test split is plain anyway."""
    build_index(tmp_path / "idx.sqlite", laws_db)
    src = tmp_path / "in.csv"
    src.write_text("title,question,reply,is_best\n" + "".join(
        f"公司拖欠工资{i}个月怎么办,,可以申请劳动仲裁{i}。,1\n" for i in range(80)), encoding="utf-8")
    plain = []
    for run in ("a", "b"):
        r = subprocess.run([str(BIN / "lawchat"), "prepare", str(src), str(tmp_path / run), "--with-context",
                            str(tmp_path / "idx.sqlite"), "--context-plain", "0.5"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        users = [json.loads(x)["conversations"][0]["content"] for name in ("train", "dev")
                 for x in (tmp_path / run / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        plain.append({u for u in users if not u.startswith("参考法条：")})
        report = json.loads((tmp_path / run / "prepare_report.json").read_text())
        assert report["plain_rows"] == len(plain[-1])
        assert 0.3 * len(users) < len(plain[-1]) < 0.7 * len(users)
        assert all(u.startswith("公司拖欠工资") for u in plain[-1])
    assert plain[0] == plain[1]


def test_eval_scores_each_model_with_and_without_retrieval(tiny_demo, laws_db, tmp_path):  # noqa: F811
    build_index(tmp_path / "idx.sqlite", laws_db)
    out = tmp_path / "eval.json"
    r = subprocess.run([str(BIN / "lawchat"), "eval", str(tiny_demo / "merged"), str(tiny_demo / "data" / "prepared"),
                        "--compare", str(tiny_demo / "base"), "--max-new-tokens", "12", "--limit", "6",
                        "--retrieval", str(tmp_path / "idx.sqlite"), "--output", str(out),
                        "--cite-questions", str(ROOT / "trainer" / "data" / "retrieval_questions.jsonl")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    names = [str(tiny_demo / "base"), str(tiny_demo / "merged")]
    assert list(report["models"]) == names + [n + " +retrieval" for n in names]
    assert "cites a governing article" in r.stdout
    everyday = report["everyday"]
    questions = (ROOT / "trainer" / "data" / "retrieval_questions.jsonl").read_text(encoding="utf-8").splitlines()
    assert list(everyday["models"]) == list(report["models"]) and len(everyday["answers"]) == len([q for q in questions
                                                                                                   if q.strip()])
    assert all(0 <= v <= 100 for v in everyday["models"].values()) and "naming a governing article" in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "eval_side_by_side.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 6 and all(len(row) == 2 + 4 for row in rows)


def test_citation_share_counts_answers_naming_a_governing_article():
    assert cited("依据《中华人民共和国劳动合同法》第三十条和《民法典》第1245条") == \
        {("劳动合同法", "第三十条"), ("民法典", "第1245条")}
    refs = ["《劳动合同法》第三十条规定：……", "《民法典》第一千二百四十五条规定：……", "没有法条"]
    hyps = ["见《劳动合同法》第三十条。", "见《民法典》第一千零四十五条。", "《刑法》第二十条"]
    assert cite_share(hyps, refs) == 50.0                 # 1 of the 2 references that cite anything
    assert cite_share(["x"], ["没有法条"]) is None


def test_demo_with_context_trains_on_the_articles_it_names(tmp_path):
    """The demo's context path (configs/demo.yaml `context:`) on the tiny config: the index step, prompts with the
    retrieved articles, everyday replies that name exactly the articles their prompt shows, eval with retrieval."""
    import yaml

    from conftest import TINY_CONFIG
    from lawchat_server.prompt import NO_ARTICLE
    from lawchat_trainer.demo import build_demo
    cfg = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    cfg["context"] = {"top_k": 2, "max_chars": 200}
    cfg["finetune"]["max_input_length"] = 256
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    build_demo(tmp_path / "demo.yaml", workdir=tmp_path / "demo")
    assert (tmp_path / "demo" / "index" / "laws.sqlite").is_file()
    rows = [json.loads(x)["conversations"] for x in
            (tmp_path / "demo" / "data" / "prepared" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(c[0]["content"].startswith("参考法条：") for c in rows)
    cited = [c for c in rows if c[1]["content"].startswith("依据《")]
    assert len(cited) >= 3
    # everyday questions whose articles do not clear the index's calibrated threshold: the prompt says none was
    # found (as the server's does) and the reply names none
    none_found = [c for c in rows if c[0]["content"].startswith(NO_ARTICLE)]
    assert len(none_found) >= 5 and not any(c[1]["content"].startswith("依据") for c in none_found)
    for user, reply in ((c[0]["content"], c[1]["content"]) for c in cited):
        names = reply[2:reply.index("：")].split("、")
        assert names and all(n in user.split("\n\n问题：")[0] for n in names)    # only articles the prompt shows
    report = json.loads((tmp_path / "demo" / "eval" / "report.json").read_text(encoding="utf-8"))
    assert any(k.endswith("+retrieval") for k in report["models"])
    assert len(report["everyday"]["models"]) == 4


def test_base_copy_practice_copies_a_quoted_article_but_answers_no_question(monkeypatch):
    """The base's copying practice quotes statutes and then repeats one in full after its heading — no question and
    no answer in the assistant's words, which the fine-tune teaches (a base that had them scored 47.55 ROUGE-L)."""
    import yaml

    from lawchat_server.prompt import CONTEXT_HEADER
    from lawchat_trainer import demo
    from lawchat_trainer.demo_corpus import find_laws_db, read_articles
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    seen = {}
    monkeypatch.setattr(demo.base_model, "make_base_model", lambda tok, texts, *a: seen.update(texts=texts) or {})
    demo.pretrain_base(cfg, None)          # what a build without a cached base runs
    copies = [t for t in seen["texts"] if t.startswith(CONTEXT_HEADER)]
    focus = read_articles(find_laws_db(), cfg["laws"])
    assert len(copies) == sum(len(a.text) <= 220 for a in focus) * cfg["context"]["pretrain_copies"] > 100
    texts = {a.heading: a.text for a in focus}
    for doc in copies:
        block, tail = doc.split("\n\n")
        heading, text = tail.split("全文：")
        assert f"{heading}：{text}" in block and texts[heading] == text          # copies the article it quotes
        assert block.count("……") == 1                                             # beside a cut distractor
        assert tail == f"{heading}全文：{text}" and not block.split(CONTEXT_HEADER)[0]  # no question, no answer
