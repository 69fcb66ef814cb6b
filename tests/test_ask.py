"""`lawchat ask`: a LoRA checkpoint answers unmerged exactly as its merged model does, with its base's answer beside
it (the adapter disabled in place), on the tiny demo built by the real pipeline."""
from __future__ import annotations

import json
import subprocess

from conftest import BIN

QUESTION = "劳动合同法第三十九条是怎么规定的？"


def test_an_adapter_unmerged_answers_as_its_merged_model_and_its_base_beside_it(tiny_demo):
    from lawchat_trainer.ask import ask, generate, load
    r = ask(tiny_demo / "lora" / "final", QUESTION, compare_base=True, max_new_tokens=24)
    merged, merged_tok, _ = load(tiny_demo / "merged", None, "cpu", False)
    base, base_tok, _ = load(tiny_demo / "base", None, "cpu", False)
    assert r.answer == generate(merged, merged_tok, QUESTION, 24)               # unmerged == merged, greedy
    assert r.base == str(tiny_demo / "base") and r.base_answer == generate(base, base_tok, QUESTION, 24)
    assert r.answer != r.base_answer                                             # the adapter is really applied


def test_ask_cli_takes_a_checkpoint_and_refuses_what_it_cannot_load(tiny_demo, tmp_path):
    ckpt = sorted((tiny_demo / "lora").glob("checkpoint-*"))[0]
    r = subprocess.run([str(BIN / "lawchat"), "ask", str(ckpt), QUESTION, "--compare-base", "--max-new-tokens", "8",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == str(ckpt) and out["base"] == str(tiny_demo / "base") and out["base_answer"] is not None
    for args, words in (([str(tmp_path / "nope"), QUESTION], "no such model"),
                        ([str(tmp_path), QUESTION], "neither a model dir"),
                        ([str(tiny_demo / "merged"), QUESTION, "--compare-base"], "needs --base")):
        r = subprocess.run([str(BIN / "lawchat"), "ask", *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)
