"""bench_pretrain: how well a demo-base pretraining schedule memorises its corpus, and what it costs.

    python scripts/bench_pretrain.py --steps 300 --batch-size 16 --lr 3e-3 [--tokenizer all|focus]
    python scripts/bench_pretrain.py --model-dir runs/demo/base          # score a built base

Prints seconds and the per-character loss of the pretraining corpus (configs/demo.yaml's laws and mix), a measure
that compares across tokenizers. The demo's quality rests on it: the shipped recipe's base scores 0.033, bases at
0.11-0.13 left the fine-tune below 2x its base's ROUGE-L (issue 16's note). Minutes a point instead of a full build.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from lawchat_trainer import base_model as bm
from lawchat_trainer import demo, demo_corpus


def pretraining_texts(cfg: dict) -> tuple[list[str], list[str]]:
    """-> (the pretraining documents, the focus laws' articles as lines), as demo.pretrain_base builds them."""
    focus = demo_corpus.read_articles(demo_corpus.find_laws_db(), cfg["laws"])
    forum = demo_corpus.forum_lines(demo_corpus.statute_rows(focus, cfg["pretrain_qa_per_article"], cfg["seed"] + 1)
                                    + demo_corpus.everyday_rows())
    if cfg.get("context"):
        forum += demo_corpus.context_lines(focus, cfg["context"].get("pretrain_copies", 1), cfg["seed"] + 2)
    return demo_corpus.statute_lines(focus) + forum, forum


@torch.no_grad()
def loss_per_char(model, tokenizer, texts: list[str], seq_len: int) -> float:
    model.eval()
    docs = bm.encode_documents(tokenizer, texts, seq_len)
    total = 0.0
    for i in range(0, len(docs), 32):
        ids, labels = bm.make_batch(docs[i:i + 32], tokenizer.pad_token_id)
        logits = model(input_ids=ids).logits[:, :-1].float()             # (B, T-1, V)
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
    return total / sum(len(t) + 1 for t in texts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--model-dir", help="score this base instead of pretraining one")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tokenizer", choices=("all", "focus"), default="all")
    a = ap.parse_args()
    cfg = demo.load_demo_config(a.config)
    texts, forum = pretraining_texts(cfg)
    if a.model_dir:
        from transformers import AutoTokenizer, GlmForCausalLM
        tok, model = AutoTokenizer.from_pretrained(a.model_dir), GlmForCausalLM.from_pretrained(a.model_dir)
        print(json.dumps({"model": a.model_dir, "loss_per_char": round(loss_per_char(model, tok, texts, 256), 4)}))
        return
    articles = (demo_corpus.read_articles(demo_corpus.find_laws_db()) if a.tokenizer == "all"
                else demo_corpus.read_articles(demo_corpus.find_laws_db(), cfg["laws"]))
    tok = bm.train_tokenizer(demo_corpus.statute_lines(articles) + forum, cfg["vocab_size"])
    pc = bm.PretrainConfig(**{**cfg["pretrain"], "steps": a.steps, "batch_size": a.batch_size,
                              "learning_rate": a.lr})
    docs = bm.encode_documents(tok, texts, pc.seq_len)
    torch.manual_seed(pc.seed)
    model = bm.build_model(tok, bm.ModelShape(**cfg["model"]))
    t0 = time.time()
    bm.pretrain(model, docs, tok.pad_token_id, pc)
    print(json.dumps({"tokenizer": a.tokenizer, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
                      "seconds": round(time.time() - t0, 1), "tokens": sum(map(len, docs)),
                      "loss_per_char": round(loss_per_char(model, tok, texts, pc.seq_len), 4)}))


if __name__ == "__main__":
    main()
