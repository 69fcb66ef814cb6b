"""Fast training on CPU-sized models: packed batches keep examples apart, the packed run logs real tokens/s and
writes its charts, and the shipped configs/lora.yaml (target_modules unset) trains a native GLM."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from conftest import ROOT
from lawchat_trainer.collate import make_collator
from lawchat_trainer.finetune import finetune
from lawchat_trainer.random_model import make_random_model

TINY = dict(vocab_size=1500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1e-5,
            max_position_embeddings=512)


@pytest.fixture(scope="module")
def glm(tiny_model, tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("glm"), tiny_model, TINY, "glm", dtype=torch.float32, seed=7)


def load_glm(path, attention: str):
    from transformers import AutoModelForCausalLM
    extra = {}
    if attention == "varlen":
        from lawchat_trainer.attention import register
        extra["attn_implementation"] = register()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).eval()


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_packed_examples_do_not_see_each_other(glm, attention):
    """Logits of each example inside a packed row equal its logits alone (and differ without the isolation)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(glm)
    model = load_glm(glm, attention)
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(5, 1400, (n,), generator=g).tolist() for n in (23, 41, 9)]
    feats = [{"input_ids": ids, "labels": ids} for ids in examples]
    batch = make_collator(tok, packing=True)(feats)
    assert batch["input_ids"].shape == (1, sum(map(len, examples)))          # no padding at all
    starts = [0, 23, 64]
    assert (batch["labels"][0, starts] == -100).all()                         # no loss across a boundary
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers skips its packed-sequence mask (and leaks)
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]   # one long sequence: attends across
        for s, ids in zip(starts, examples):
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[s:s + len(ids)], alone, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(leaky[23:64], packed[23:64], atol=1e-3)
        # the training forward as the Trainer calls it (model(**batch)) with finetune's use_cache=False: the packed
        # loss is the token-weighted mean of each example's loss alone
        model.config.use_cache = False
        labelled = [model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])) for ids in examples]
        want = sum(o.loss * (len(ids) - 1) for o, ids in zip(labelled, examples)) / sum(len(i) - 1 for i in examples)
        torch.testing.assert_close(model(**batch).loss, want, atol=1e-5, rtol=1e-5)


def test_varlen_attention_on_right_padded_rows_equals_each_example_alone(glm):
    """Without a mask tensor, a padded batch's real tokens still see only their own example's earlier tokens."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(glm)
    tok.padding_side = "left"                     # the collator must turn this around: left padding would leak
    model = load_glm(glm, "varlen")
    g = torch.Generator().manual_seed(1)
    examples = [torch.randint(5, 1400, (n,), generator=g).tolist() for n in (30, 12, 19)]
    batch = make_collator(tok, packing=False)([{"input_ids": ids, "labels": ids} for ids in examples])
    with torch.no_grad():
        padded = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        for row, ids in enumerate(examples):
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(padded[row, :len(ids)], alone, atol=1e-5, rtol=1e-4)


def test_real_tokens_leave_out_padding(glm):
    from transformers import AutoTokenizer

    from lawchat_trainer.train_log import real_tokens
    tok = AutoTokenizer.from_pretrained(glm)
    feats = [{"input_ids": [5] * 3, "labels": [5] * 3}, {"input_ids": [6] * 7, "labels": [6] * 7}]
    padded = make_collator(tok, packing=False)(feats)
    assert padded["input_ids"].shape == (2, 7) and real_tokens(padded) == 10
    assert real_tokens(make_collator(tok, packing=True)(feats)) == 10


def test_packed_training_logs_real_tokens_and_writes_charts(tiny_demo, tmp_path):
    cfg = yaml.safe_load((tiny_demo / "lora" / "lora.yaml").read_text(encoding="utf-8"))
    cfg["batching"] = "packed"
    cfg["training_args"].update(max_steps=8, logging_steps=2, eval_steps=4, save_steps=100, dataloader_num_workers=1)
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    out = tmp_path / "run"
    final = finetune(tiny_demo / "data" / "prepared", tiny_demo / "base", tmp_path / "lora.yaml", output_dir=out)
    assert (final / "adapter_config.json").is_file()
    report = json.loads((out / "train_report.json").read_text())
    assert report["batching"] == "packed" and report["global_step"] == 8
    logs = [h for h in report["log_history"] if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4, 6, 8]
    assert all(h["real_tokens_per_second"] > 0 and "grad_norm" in h and "learning_rate" in h for h in logs)
    # real tokens = the lengths of the 8 x 4 examples seen (counted in the main process with a data worker)
    assert 8 * 4 * 10 < logs[-1]["real_tokens"] < 8 * 4 * (64 + 128)
    for name in ("loss.png", "lr.png", "grad_norm.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_shipped_lora_yaml_trains_a_native_glm_unchanged(tiny_demo, tmp_path):
    """configs/lora.yaml leaves target_modules unset: PEFT alone would refuse a GlmForCausalLM."""
    cfg = yaml.safe_load((ROOT / "configs" / "lora.yaml").read_text(encoding="utf-8"))
    assert not cfg["peft_config"].get("target_modules")
    cfg["training_args"].update(max_steps=2, save_steps=100, eval_steps=100, logging_steps=1, dataloader_num_workers=0,
                                per_device_train_batch_size=2)       # only the run length is changed
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    final = finetune(tiny_demo / "data" / "prepared", tiny_demo / "base", tmp_path / "lora.yaml",
                     output_dir=tmp_path / "run")
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert report["batching"] == "packed" and report["attention"] == "lawchat_varlen"   # the shipped fast path
    shutil.rmtree(tmp_path / "run")


def test_grouped_batching_gives_the_trainer_a_length_grouped_sampler(glm, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from lawchat_trainer.finetune import length_grouping_args
    import random
    rng = random.Random(0)
    rows = [{"input_ids": [5] * n, "labels": [5] * n} for n in (rng.randint(3, 300) for _ in range(400))]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to="none",
                             **length_grouping_args())
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(glm), args=args, train_dataset=rows)
    sampler = trainer._get_train_sampler(rows)
    assert isinstance(sampler, LengthGroupedSampler)
    order = list(sampler)
    gaps = [abs(len(rows[a]["input_ids"]) - len(rows[b]["input_ids"])) for a, b in zip(order[::2], order[1::2])]
    assert sorted(order) == list(range(400))
    assert sum(gaps) / len(gaps) < 10        # batch-mates have similar lengths (random pairs: ~100 apart)


def test_packing_and_varlen_refuse_a_model_whose_attention_cannot_be_swapped(tiny_model, tiny_demo, tmp_path):
    """Bloom builds its own masks (as THUDM's remote code does): packed rows would leak, so the config is refused."""
    from lawchat_trainer.finetune import FinetuneError
    bloom = make_random_model(tmp_path / "bloom", tiny_model, dict(vocab_size=1500, hidden_size=64, num_hidden_layers=2,
                                                                   num_attention_heads=4), "bloom", dtype=torch.float32)
    cfg = yaml.safe_load((ROOT / "configs" / "lora.yaml").read_text(encoding="utf-8"))
    cfg["training_args"].update(max_steps=1, save_steps=100, eval_steps=100, logging_steps=1, dataloader_num_workers=0,
                                per_device_train_batch_size=2)
    for batching, attention in (("packed", "sdpa"), ("grouped", "varlen")):
        cfg.update(batching=batching, attention=attention)
        (tmp_path / "lora.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        with pytest.raises(FinetuneError, match="lawchat convert"):
            finetune(tiny_demo / "data" / "prepared", bloom, tmp_path / "lora.yaml", output_dir=tmp_path / "run")
    cfg.update(batching="grouped", attention="sdpa")
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    final = finetune(tiny_demo / "data" / "prepared", bloom, tmp_path / "lora.yaml", output_dir=tmp_path / "run")
    assert (final / "adapter_config.json").is_file()


@pytest.mark.parametrize("packing", [False, True])
def test_labelled_loss_equals_the_models_loss(glm, packing):
    """The training loss computed only where labels are (finetune's labelled_logits) equals the model's own loss,
    and so do its LoRA gradients, on padded and on packed batches with prompt tokens masked."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from lawchat_trainer.train_log import labelled_loss
    tok = AutoTokenizer.from_pretrained(glm)
    model = load_glm(glm, "sdpa")
    model.config.use_cache = False
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.train()
    g = torch.Generator().manual_seed(1)
    feats = []
    for n, prompt in ((30, 12), (17, 5), (44, 40)):
        ids = torch.randint(5, 1400, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batch = make_collator(tok, packing=packing)(feats)

    def loss_and_grads(fn):
        peft.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in peft.parameters() if p.requires_grad]
    ref, ref_grads = loss_and_grads(lambda: peft(**batch).loss)
    got, got_grads = loss_and_grads(lambda: labelled_loss(peft, dict(batch)))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    n = sum(1 for f in feats for y in f["labels"][1:] if y != -100)
    torch.testing.assert_close(labelled_loss(peft, dict(batch), num_items_in_batch=n), ref, atol=1e-5, rtol=1e-5)
