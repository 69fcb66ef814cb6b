"""QLoRA: configs/qlora.yaml's 4-bit base (bitsandbytes) is a CUDA path; what runs here is checked here — the config,
the refusal on a machine without CUDA (exit 2 with the reason, nothing written), and the merge of an adapter
marked as trained over a quantised base (folded into the full-precision base under the usual logits check, the
comparison with the 4-bit base reported as not made). scripts/check_qlora.sh runs train -> merge -> eval on a GPU."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from conftest import BIN, ROOT


def test_the_qlora_config_asks_for_a_4bit_nf4_base():
    from lawchat_trainer.finetune import FinetuneError, load_config
    cfg = load_config(ROOT / "configs" / "qlora.yaml")
    assert cfg.quantization == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                "bnb_4bit_compute_dtype": "bfloat16"}
    assert cfg.training_args["gradient_checkpointing"] is True and cfg.batching == "packed"
    assert load_config(ROOT / "configs" / "lora.yaml").quantization == {}


def test_a_quantization_block_without_a_bit_width_is_refused(tmp_path):
    from lawchat_trainer.finetune import FinetuneError, load_config
    bad = tmp_path / "q.yaml"
    bad.write_text("quantization: {bnb_4bit_quant_type: nf4}\n")
    with pytest.raises(FinetuneError, match="load_in_4bit"):
        load_config(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: scripts/check_qlora.sh runs the real path")
def test_qlora_training_without_cuda_exits_2_with_the_reason(tiny_demo, tmp_path):
    r = subprocess.run([str(BIN / "lawchat"), "train", str(tiny_demo / "data" / "prepared"), str(tiny_demo / "base"),
                        str(ROOT / "tests" / "data" / "qlora_tiny.yaml"), "--output-dir", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "needs a CUDA card" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out" / "final").exists()


def test_a_qlora_adapter_merges_into_the_full_precision_base(tiny_demo, tmp_path):
    from lawchat_trainer.merge import merge
    adapter = tmp_path / "qlora-final"
    shutil.copytree(tiny_demo / "lora" / "final", adapter)
    (adapter / "lawchat_quantization.json").write_text(json.dumps({"load_in_4bit": True}))
    out = merge(adapter, tmp_path / "merged", base=tiny_demo / "base")
    report = json.loads((out / "merge_report.json").read_text())
    assert report["max_logit_diff_fp32"] <= report["tolerance"] * max(report["logit_scale"], 1.0)
    if not torch.cuda.is_available():
        assert report["quantized_base"] == {"compared": False, "why": "needs CUDA and bitsandbytes"}
