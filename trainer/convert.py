"""convert: a THUDM ChatGLM3 checkpoint -> a native transformers GlmForCausalLM dir (no remote code).

The format, from ChatGLM3's public files (configuration_chatglm.py, modeling_chatglm.py, tokenization_chatglm.py):
- config: num_layers, hidden_size, ffn_hidden_size, kv_channels (head dim), num_attention_heads,
  multi_query_attention + multi_query_group_num (KV heads), padded_vocab_size, layernorm_epsilon, seq_length,
  add_qkv_bias, rope_ratio (base 10000 x ratio); RMSNorm, pre-norm, no other biases;
- weights: transformer.embedding.word_embeddings, transformer.encoder.layers.N.{input_layernorm,
  self_attention.query_key_value (q | k | v stacked), self_attention.dense, post_attention_layernorm,
  mlp.dense_h_to_4h (gate | up), mlp.dense_4h_to_h}, transformer.encoder.final_layernorm, transformer.output_layer;
  rotary on the first half of each head's dims as interleaved pairs — what GlmForCausalLM does with
  partial_rotary_factor 0.5, so no weight is permuted;
- tokenizer: a SentencePiece model; [MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|>
  <|observation|> numbered after its vocabulary; a prompt is [gMASK] sop, then per turn <|role|> + sp("\\n") +
  sp(content), then <|assistant|>; generation stops at </s>, <|user|> or <|observation|>.

Shards are converted one at a time (peak memory about one shard), written as safetensors with an index.
"""
from __future__ import annotations

import gc
import json
import re
import shutil
from pathlib import Path

SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|observation|>"]
CHAT_TEMPLATE = ("[gMASK]sop{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")


class ConvertError(Exception):
    """Not a ChatGLM3 checkpoint (or one this converter cannot map exactly): exit code 2."""


def check_chatglm3(src: Path) -> dict:
    """The checkpoint's config, after making sure it is ChatGLM3 and not another GLM generation."""
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{src} is not a model directory (no config.json)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("model_type") != "chatglm":
        raise ConvertError(f"{src} has model_type {cfg.get('model_type')!r}, not a THUDM ChatGLM checkpoint "
                           "('chatglm'); native transformers models need no conversion")
    code = (src / "tokenization_chatglm.py").read_text(encoding="utf-8", errors="replace") \
        if (src / "tokenization_chatglm.py").is_file() else ""
    name = str(cfg.get("_name_or_path", "")).lower()
    if "position_encoding_2d" in cfg or "inner_hidden_size" in cfg:
        raise ConvertError(f"{src} is ChatGLM-6B (the first generation: 2D positions, GLM blocks); only ChatGLM3 "
                           "is supported")
    if cfg.get("padded_vocab_size", 0) > 100_000 or "tiktoken" in code or "glm-4" in name or "glm4" in name:
        raise ConvertError(f"{src} is GLM-4 (tiktoken tokenizer, vocab {cfg.get('padded_vocab_size')}); "
                           "transformers loads GLM-4 natively — only ChatGLM3 is converted here")
    if "chatglm2" in name or (code and "<|user|>" not in code):
        raise ConvertError(f"{src} is ChatGLM2 (no <|user|>/<|assistant|> role tokens, another prompt format); "
                           "only ChatGLM3 is supported")
    if not (src / "tokenizer.model").is_file():
        raise ConvertError(f"{src} has no tokenizer.model (ChatGLM3's SentencePiece model)")
    for key, want in (("rmsnorm", True), ("apply_residual_connection_post_layernorm", False),
                      ("post_layer_norm", True), ("add_bias_linear", False)):
        if cfg.get(key, want) != want:
            raise ConvertError(f"{src}: {key}={cfg.get(key)!r} is not ChatGLM3's ({want}); GlmForCausalLM cannot "
                               "express it")
    if cfg.get("original_rope", True) is not True:
        raise ConvertError(f"{src}: original_rope=false is not ChatGLM3's rotary layout")
    return cfg


def attention_shape(cfg: dict) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a ChatGLM3 config."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("kv_channels") or cfg["hidden_size"] // heads
    kv_heads = cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else heads
    return heads, kv_heads, head_dim


def glm_config(cfg: dict, tokenizer_ids: dict):
    from transformers import GlmConfig
    heads, kv_heads, head_dim = attention_shape(cfg)
    eos = [tokenizer_ids["eos"], tokenizer_ids["<|user|>"], tokenizer_ids["<|observation|>"]]
    return GlmConfig(
        vocab_size=cfg["padded_vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, partial_rotary_factor=0.5, rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        attention_bias=cfg.get("add_qkv_bias", True), max_position_embeddings=cfg.get("seq_length", 8192),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * cfg.get("rope_ratio", 1)},
        tie_word_embeddings=False, pad_token_id=tokenizer_ids["pad"], eos_token_id=eos, bos_token_id=None,
        dtype=cfg.get("torch_dtype", "float16"))


def map_tensors(state: dict, cfg: dict) -> dict:
    """ChatGLM3 names -> GlmForCausalLM names for one shard's tensors."""
    heads, kv_heads, head_dim = attention_shape(cfg)
    q, kv = heads * head_dim, kv_heads * head_dim
    out = {}
    for name, t in state.items():
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue                                    # recomputed from rope_theta
        if name == "transformer.embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "transformer.encoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif name == "transformer.output_layer.weight":
            out["lm_head.weight"] = t
        elif m := LAYER.match(name):
            i, rest = m.groups()
            p = f"model.layers.{i}."
            if rest.startswith("self_attention.query_key_value."):
                kind = rest.rsplit(".", 1)[1]           # weight | bias
                if t.shape[0] != q + 2 * kv:
                    raise ConvertError(f"{name}: {tuple(t.shape)} does not match {heads} heads + 2 x {kv_heads} KV "
                                       f"heads of {head_dim}")
                out[p + f"self_attn.q_proj.{kind}"] = t[:q].clone()
                out[p + f"self_attn.k_proj.{kind}"] = t[q:q + kv].clone()
                out[p + f"self_attn.v_proj.{kind}"] = t[q + kv:].clone()
            elif rest == "self_attention.dense.weight":
                out[p + "self_attn.o_proj.weight"] = t
            elif rest == "mlp.dense_h_to_4h.weight":
                out[p + "mlp.gate_up_proj.weight"] = t
            elif rest == "mlp.dense_4h_to_h.weight":
                out[p + "mlp.down_proj.weight"] = t
            elif rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                out[p + rest] = t
            else:
                raise ConvertError(f"unexpected tensor {name} (not in ChatGLM3's layout)")
        else:
            raise ConvertError(f"unexpected tensor {name} (not in ChatGLM3's layout)")
    return out


def shard_files(src: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            names = json.loads((src / index).read_text(encoding="utf-8"))["weight_map"].values()
            return [src / n for n in dict.fromkeys(names)]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (src / single).is_file():
            return [src / single]
    raise ConvertError(f"{src} has no weights (pytorch_model*.bin or *.safetensors, with an index when sharded)")


def load_shard(path: Path) -> dict:
    import torch
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def convert_tokenizer(src: Path, dst: Path) -> dict:
    """tokenizer.model -> tokenizer.json (+ config and chat template); -> ids of eos, pad and the special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((src / "tokenizer.model").read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != 2:                              # BPE
        raise ConvertError("tokenizer.model is not a SentencePiece BPE model (ChatGLM3's is)")
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces or not norm.add_dummy_prefix:
        raise ConvertError(f"tokenizer.model normalizes text ({norm.name}, remove_extra_whitespaces="
                           f"{norm.remove_extra_whitespaces}, add_dummy_prefix={norm.add_dummy_prefix}); ChatGLM3's "
                           "does not, and this converter maps only that")
    n = len(proto.pieces)
    pieces = [p.piece for p in proto.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = sentencepiece_merges(vocab)
    unk, bos, eos = spec.unk_id, spec.bos_id, spec.eos_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=pieces[unk], fuse_unk=True,
                               byte_fallback=spec.byte_fallback))
    # sp.encode(s) prepends "▁" to s: here to each piece of text between special tokens, and to the "\n" that
    # follows a role token on its own (ChatGLM3 encodes "\n" and the content separately)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\A\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if ids[SPECIAL_TOKENS[0]] != n or ids[SPECIAL_TOKENS[-1]] != n + len(SPECIAL_TOKENS) - 1:
        raise ConvertError("the special tokens did not land right after the SentencePiece vocabulary")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=pieces[unk], bos_token=pieces[bos],
                                   eos_token=pieces[eos], pad_token=pieces[unk], chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(dst)
    return {**ids, "eos": eos, "pad": unk, "bos": bos}


def sentencepiece_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: every split of a piece into two pieces, ranked by the
    merged piece's id (SentencePiece numbers pieces in merge order). transformers has the same logic in its slow ->
    fast converter, but its signature changed within 5.x; this is the dozen lines it needs."""
    ranked = []
    for piece, pid in vocab.items():
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked += [(pid, len(left), len(right), left, right) for left, right in local]
    ranked.sort(key=lambda r: r[:3])
    return [(left, right) for _, _, _, left, right in ranked]


def convert(src: str | Path, dst: str | Path) -> Path:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    src, dst = Path(src), Path(dst)
    cfg = check_chatglm3(src)
    shards = shard_files(src)
    if dst.exists() and any(dst.iterdir()):
        raise ConvertError(f"{dst} exists and is not empty")
    tmp = dst.with_name(dst.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ids = convert_tokenizer(src, tmp)
        glm = glm_config(cfg, ids)
        glm.save_pretrained(tmp)
        GenerationConfig(eos_token_id=glm.eos_token_id, pad_token_id=glm.pad_token_id).save_pretrained(tmp)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            tensors = map_tensors(load_shard(shard), cfg)
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(v.numel() * v.element_size() for v in tensors.values())
            del tensors
            gc.collect()
        expected = 3 + 11 * cfg["num_layers"]              # embed, norm, lm_head; 11 tensors a layer with q/k/v biases
        if not cfg.get("add_qkv_bias", True):
            expected -= 3 * cfg["num_layers"]
        if len(weight_map) != expected:
            raise ConvertError(f"converted {len(weight_map)} tensors, expected {expected}: missing shards?")
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        (tmp / "convert_report.json").write_text(json.dumps(
            {"source": str(src), "shards": len(shards), "tensors": len(weight_map), "special_token_ids": ids},
            indent=2) + "\n")
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
