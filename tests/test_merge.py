"""lawchat merge: float32 merge with a logits check against base + adapter, dtype choice, mismatched bases refused."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors import safe_open

from conftest import BIN
from lawchat_trainer.merge import MergeError, merge


def test_merge_writes_report_and_casts_to_the_chosen_dtype(tiny_demo, tmp_path):
    out = merge(tiny_demo / "lora" / "final", tmp_path / "bf16", base=tiny_demo / "base", dtype="bfloat16")
    report = json.loads((out / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["max_logit_diff_fp32"] <= 1e-3 * report["logit_scale"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    auto = merge(tiny_demo / "lora" / "final", tmp_path / "auto", base=tiny_demo / "base")   # the base's dtype
    assert json.loads((auto / "merge_report.json").read_text())["dtype"] == "float32"


def test_a_merge_that_changes_the_model_fails_loudly(tiny_demo, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())   # adapter dropped
    with pytest.raises(MergeError, match="merge check failed"):
        merge(tiny_demo / "lora" / "final", tmp_path / "bad", base=tiny_demo / "base")
    assert not (tmp_path / "bad").exists()


def test_adapter_on_another_base_is_refused(tiny_demo, tiny_model, tmp_path):
    from lawchat_trainer.random_model import make_random_model
    from test_train_fast import TINY
    wider = make_random_model(tmp_path / "wider", tiny_model, dict(TINY, hidden_size=96), "glm", dtype=torch.float32)
    import shutil
    moved = tmp_path / "adapter"                      # its training base gone: only the shapes can tell
    shutil.copytree(tiny_demo / "lora" / "final", moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="does not fit the base model"):
        merge(moved, tmp_path / "out", base=wider)
    other = make_random_model(tmp_path / "other", tiny_model, dict(TINY, num_hidden_layers=3), "glm",
                              dtype=torch.float32)
    r = subprocess.run([str(BIN / "lawchat"), "merge", str(tiny_demo / "lora" / "final"), str(tmp_path / "out"),
                        "--base", str(other)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "whose config differs" in r.stderr and "num_hidden_layers" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    r = subprocess.run([str(BIN / "lawchat"), "merge", str(tiny_demo / "lora" / "final"), str(tmp_path / "out"),
                        "--dtype", "int8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--dtype must be one of" in r.stderr


def test_adapter_tensors_that_peft_would_skip_are_an_error(tiny_demo, tmp_path):
    """A tensor named for a module the base lacks loads with only a warning in PEFT: the merge would drop it."""
    import shutil

    from safetensors.torch import load_file, save_file
    moved = tmp_path / "adapter"
    shutil.copytree(tiny_demo / "lora" / "final", moved)
    tensors = load_file(str(moved / "adapter_model.safetensors"))
    renamed = {k.replace("layers.0.", "layers.9."): v for k, v in tensors.items()}
    assert renamed != tensors
    save_file(renamed, str(moved / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match=r"layers\.9\..* in the adapter but missing in the model"):
        merge(moved, tmp_path / "out", base=tiny_demo / "base")
    assert not (tmp_path / "out").exists()
