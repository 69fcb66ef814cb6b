"""`lawchat convert` on synthetic ChatGLM3 checkpoints built here in ChatGLM3's format (config, two .bin shards with an
index, a SentencePiece model trained in the test). The references are written here from the format, independently
of the converter: a ChatGLM3 forward pass in plain torch, and ChatGLM3's build_chat_input over sentencepiece."""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import BIN, ROOT
from lawchat_server.prompt import encode_prompt

SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
CFG = dict(model_type="chatglm", num_layers=2, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
           num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2, layernorm_epsilon=1e-5,
           seq_length=256, add_qkv_bias=True, add_bias_linear=False, rmsnorm=True, post_layer_norm=True,
           apply_residual_connection_post_layernorm=False, original_rope=True, rope_ratio=2, torch_dtype="float32",
           _name_or_path="THUDM/chatglm3-6b")


def train_sentencepiece(d):
    import sentencepiece as spm
    lines = []
    csv_text = (ROOT / "trainer" / "data" / "everyday_qa.csv").read_text(encoding="utf-8")
    lines += [ln for ln in csv_text.splitlines() if ln.strip()]
    lines += ["劳动合同法第三十九条 劳动者有下列情形之一的，用人单位可以解除劳动合同。", "English words and 123 numbers.",
              "The employer shall pay wages in full and on time."] * 5
    (d / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=900,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   add_dummy_prefix=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(d / "sp.model"))


def chatglm3_state(cfg: dict, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2                       # noqa: E731
    h, hd, nh, ng, ffn = cfg["hidden_size"], cfg["kv_channels"], cfg["num_attention_heads"], \
        cfg["multi_query_group_num"], cfg["ffn_hidden_size"]
    sd = {"transformer.embedding.word_embeddings.weight": r(vocab, h),
          "transformer.rotary_pos_emb.inv_freq": torch.ones(hd // 4),
          "transformer.encoder.final_layernorm.weight": 1 + r(h), "transformer.output_layer.weight": r(vocab, h)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + r(h), p + "post_attention_layernorm.weight": 1 + r(h),
                   p + "self_attention.query_key_value.weight": r((nh + 2 * ng) * hd, h),
                   p + "self_attention.query_key_value.bias": r((nh + 2 * ng) * hd),
                   p + "self_attention.dense.weight": r(h, nh * hd),
                   p + "mlp.dense_h_to_4h.weight": r(2 * ffn, h), p + "mlp.dense_4h_to_h.weight": r(h, ffn)})
    return sd


def write_checkpoint(d, cfg: dict, sd: dict, sp_model) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    names = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in halves.items():
        torch.save({k: sd[k] for k in keys}, d / file)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    (d / "tokenizer.model").write_bytes(sp_model)
    (d / "tokenization_chatglm.py").write_text('# stands in for THUDM\'s file: role tokens "<|user|>" ...\n')


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatglm3")
    sp = train_sentencepiece(d)
    n = sp.vocab_size()
    cfg = dict(CFG, padded_vocab_size=math.ceil((n + len(SPECIALS)) / 64) * 64)
    sd = chatglm3_state(cfg, cfg["padded_vocab_size"])
    write_checkpoint(d / "ckpt", cfg, sd, (d / "sp.model").read_bytes())
    return d / "ckpt", cfg, sd, sp


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "glm"
    r = subprocess.run([str(BIN / "lawchat"), "convert", str(checkpoint[0]), str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def chatglm3_logits(sd: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    """ChatGLM3's forward pass, written from the format (modeling_chatglm.py's math), float64."""
    sd = {k: v.double() for k, v in sd.items()}
    T, nh, ng, hd, eps = len(ids), cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"], \
        cfg["layernorm_epsilon"]
    rot = hd // 2                                            # rotary on half of each head, as (even, odd) pairs
    theta = 1.0 / ((10000 * cfg["rope_ratio"]) ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    ang = torch.outer(torch.arange(T, dtype=torch.float64), theta)             # [T, rot/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(x):                                             # x [T, heads, hd]
        xr, xp = x[..., :rot], x[..., rot:]
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
        return torch.cat([out, xp], -1)

    x = sd["transformer.embedding.word_embeddings.weight"][ids]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = rmsnorm(x, sd[p + "input_layernorm.weight"], eps)
        qkv = h @ sd[p + "self_attention.query_key_value.weight"].T + sd[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([nh * hd, ng * hd, ng * hd], -1)
        q, k, v = rope(q.view(T, nh, hd)), rope(k.view(T, ng, hd)), v.view(T, ng, hd)
        k, v = k.repeat_interleave(nh // ng, 1), v.repeat_interleave(nh // ng, 1)       # head j uses group j // 2
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        ctx = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(T, nh * hd)
        x = x + ctx @ sd[p + "self_attention.dense.weight"].T
        h = rmsnorm(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = (h @ sd[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    x = rmsnorm(x, sd["transformer.encoder.final_layernorm.weight"], eps)
    return x @ sd["transformer.output_layer.weight"].T


def chatglm3_prompt_ids(sp, messages: list[dict]) -> list[int]:
    """ChatGLM3's build_chat_input: [gMASK] sop, per turn <|role|> + sp("\\n") + sp(content), then <|assistant|>."""
    cmd = {t: sp.vocab_size() + i for i, t in enumerate(SPECIALS)}
    ids = [cmd["[gMASK]"], cmd["sop"]]
    for m in messages:
        ids += [cmd[f"<|{m['role']}|>"]] + sp.encode("\n") + sp.encode(m["content"])
    return ids + [cmd["<|assistant|>"]]


CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "user", "content": "劳动合同法第三十九条是怎么规定的？"}],
    [{"role": "system", "content": "你是一名律师。"}, {"role": "user", "content": "公司拖欠工资三个月了，我该怎么办？"},
     {"role": "assistant", "content": "可以申请劳动仲裁。\n需要准备证据。"}, {"role": "user", "content": "需要什么证据？"}],
    [{"role": "user", "content": "第一行\n第二行\n\n  缩进的第三行"}],
    [{"role": "user", "content": "English words and 123 numbers, mixed 中文 text."}],
    [{"role": "user", "content": "没见过的字：龘靐 😀 ⚖️"}],                        # byte fallback
    [{"role": "user", "content": "\n以换行开头"}],
]


def test_prompt_ids_equal_chatglm3s(checkpoint, converted):
    from transformers import AutoTokenizer
    sp = checkpoint[3]
    tok = AutoTokenizer.from_pretrained(converted)
    for conv in CONVERSATIONS:
        assert encode_prompt(tok, conv) == chatglm3_prompt_ids(sp, conv), conv
    text = CONVERSATIONS[5][0]["content"]
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text
    report = json.loads((converted / "convert_report.json").read_text())
    assert report["special_token_ids"]["[gMASK]"] == sp.vocab_size() + 1      # [MASK] is the first after the vocab
    cfg = json.loads((converted / "config.json").read_text())
    user = sp.vocab_size() + SPECIALS.index("<|user|>")
    obs = sp.vocab_size() + SPECIALS.index("<|observation|>")
    assert cfg["eos_token_id"] == [2, user, obs] and cfg["model_type"] == "glm"


def test_logits_equal_the_chatglm3_forward(checkpoint, converted):
    from transformers import AutoModelForCausalLM
    _, cfg, sd, sp = checkpoint
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ids = chatglm3_prompt_ids(sp, CONVERSATIONS[2])
    want = chatglm3_logits(sd, cfg, ids)
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits[0].double()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-4, rel
    # and the converter is not trivially right: a wrong rotary layout (halves, not pairs) would be far off
    assert ((chatglm3_logits(sd, dict(cfg, rope_ratio=1), ids) - want).abs().max() / want.abs().max()).item() > 1e-3


def test_the_converted_dir_trains_and_serves_without_remote_code(converted, tmp_path):
    import yaml

    from lawchat_server.engine.engine import Engine, generate_batch
    from lawchat_server.engine.model_runner import load_runner
    from lawchat_trainer.finetune import finetune
    runner = load_runner(converted, device="cpu")
    assert runner.path == "fast"
    engine = Engine(runner)
    engine.start()
    try:
        out = generate_batch(engine, [runner.encode_chat(CONVERSATIONS[1])], 5, ignore_eos=True)[0]
    finally:
        engine.stop()
    assert out.completion_tokens == 5
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"conversations": c + [
        {"role": "assistant", "content": "可以申请劳动仲裁。"}]}, ensure_ascii=False) for c in CONVERSATIONS[:3]) + "\n")
    cfg = yaml.safe_load((ROOT / "configs" / "lora.yaml").read_text(encoding="utf-8"))   # shipped, unchanged keys
    cfg["training_args"].update(max_steps=2, save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
                                per_device_train_batch_size=2)
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(cfg))
    final = finetune(data, converted, tmp_path / "lora.yaml", output_dir=tmp_path / "run")
    assert (final / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("change,needle", [
    (lambda d, c: c.update(position_encoding_2d=True), "ChatGLM-6B (the first generation"),
    (lambda d, c: (d / "tokenization_chatglm.py").write_text("special_tokens = ['[MASK]', '[gMASK]', 'sop']"),
     "is ChatGLM2"),
    (lambda d, c: c.update(padded_vocab_size=151552), "is GLM-4"),
    (lambda d, c: c.update(model_type="llama"), "not a THUDM ChatGLM checkpoint"),
    (lambda d, c: (d / "tokenizer.model").unlink(), "no tokenizer.model"),
    (lambda d, c: c.update(rmsnorm=False), "rmsnorm=False is not ChatGLM3's"),
])
def test_other_checkpoints_are_refused_with_the_reason(checkpoint, tmp_path, change, needle):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(checkpoint[0], src)
    cfg = json.loads((src / "config.json").read_text())
    change(src, cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([str(BIN / "lawchat"), "convert", str(src), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
