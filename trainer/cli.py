"""The training side of the `lawchat` command: prepare → train → eval → merge, convert, and `demo` (all offline).

These need the training extras (`pip install 'lawchat[train]'`); the command itself is `lawchat_cli.main`.
`python -m lawchat_trainer.cli train ...` (e.g. under torchrun) is the same command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lawchat_configs import path as config_path


def cmd_prepare(a) -> int:
    from .prepare import prepare, print_report
    report = prepare(a.csv, a.out_dir, dev_ratio=a.dev_ratio, test_ratio=a.test_ratio, seed=a.seed,
                     keep_all_replies=a.keep_all_replies, is_best=a.is_best, with_context=a.with_context,
                     context_k=a.context_k, context_plain=a.context_plain)
    print_report(report)
    return 0


def cmd_train(a) -> int:
    from .finetune import finetune
    final = finetune(a.data_dir, a.model_dir, a.config, output_dir=a.output_dir, resume=a.resume,
                     trust_remote_code=a.trust_remote_code)
    print(final)
    return 0


def cmd_eval(a) -> int:
    from .evaluate import evaluate, print_report, write_report
    report = evaluate(a.model_dir, a.data_dir, split=a.split, compare=a.compare, max_new_tokens=a.max_new_tokens,
                      limit=a.limit, device=a.device, trust_remote_code=a.trust_remote_code, retrieval=a.retrieval,
                      retrieval_k=a.retrieval_k, cite_questions=a.cite_questions)
    print_report(report)
    if a.output:
        write_report(report, Path(a.output))
    return 0


def cmd_merge(a) -> int:
    from .merge import merge
    print(merge(a.adapter_dir, a.out_dir, base=a.base, trust_remote_code=a.trust_remote_code, dtype=a.dtype))
    return 0


def cmd_ask(a) -> int:
    from .ask import ask
    r = ask(a.model, a.question, compare_base=a.compare_base, base=a.base, max_new_tokens=a.max_new_tokens,
            device=a.device, trust_remote_code=a.trust_remote_code)
    if a.json:
        import json
        print(json.dumps(r.__dict__, ensure_ascii=False))
    elif r.base_answer is None:
        print(r.answer)
    else:
        print(f"微调后 ({r.model}):\n{r.answer}\n\n微调前 ({r.base}):\n{r.base_answer}")
    return 0


def cmd_convert(a) -> int:
    from .convert import convert
    print(convert(a.src, a.dst))
    return 0




def cmd_demo(a) -> int:
    from .demo import SAMPLE_QUESTION, build_demo, sample_answer
    merged = build_demo(a.config, workdir=a.workdir, with_eval=not a.skip_eval)
    if a.ask:
        print(f"Q: {SAMPLE_QUESTION}\nA: {sample_answer(merged, SAMPLE_QUESTION)}")
    print(merged)
    return 0


def add_trust_remote_code(s: argparse.ArgumentParser, default: bool | None = False) -> None:
    s.add_argument("--trust-remote-code", action="store_true", default=default,
                   help="allow the checkpoint's own code (a THUDM ChatGLM3 dir: model_type chatglm); only for code you trust")


def add_commands(sub) -> None:
    s = sub.add_parser("prepare", help="lawzhidao-format CSV -> train/dev/test.jsonl")
    s.add_argument("csv", help="CSV with columns title, question, reply, is_best (UTF-8, UTF-8 BOM or GBK)")
    s.add_argument("out_dir")
    s.add_argument("--dev-ratio", type=float, default=0.05)
    s.add_argument("--test-ratio", type=float, default=0.05)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--is-best", default="best-else-all",
                   choices=["best-else-all", "best", "best-else-first", "all"],
                   help="which replies of a question to keep: its best one if it has one, else all of them (default) "
                        "/ best ones only / its best one, else its first / all")
    s.add_argument("--keep-all-replies", action="store_true", help="the same as --is-best all")
    s.add_argument("--with-context", default=None, metavar="INDEX",
                   help="a `lawchat index` file: train/dev prompts get the best-matching articles before the question")
    s.add_argument("--context-k", type=int, default=3, help="articles per prompt with --with-context")
    s.add_argument("--context-plain", type=float, default=0.0, metavar="SHARE",
                   help="with --with-context: this share of train/dev prompts stays without articles (0-1)")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="LoRA fine-tune (configs/lora.yaml keys)")
    s.add_argument("data_dir", help="directory with the prepared JSONL files")
    s.add_argument("model_dir", help="base model directory (HF format)")
    s.add_argument("config", help="YAML with data_config, max_input_length, max_output_length, training_args, peft_config")
    s.add_argument("--output-dir", default=None, help="default: training_args.output_dir or runs/lora")
    s.add_argument("--resume", action="store_true", help="resume from the last checkpoint in the output dir")
    add_trust_remote_code(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="ROUGE-1/2/L and BLEU-4 of greedy answers on a prepared split")
    s.add_argument("model_dir", help="merged model dir (or any HF causal-LM dir with a chat template)")
    s.add_argument("data_dir", help="directory with the prepared JSONL files")
    s.add_argument("--split", default="test", choices=["train", "dev", "test"])
    s.add_argument("--compare", default=None, help="a second model dir scored on the same questions (e.g. the base)")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--limit", type=int, default=None, help="first N examples only")
    s.add_argument("--device", default="cpu")
    s.add_argument("--retrieval", default=None, metavar="INDEX",
                   help="a `lawchat index` file: also score each model with the retrieved articles in the prompt")
    s.add_argument("--retrieval-k", type=int, default=3)
    s.add_argument("--cite-questions", default=None, metavar="JSONL",
                   help="labelled everyday questions ({question, governing: [{law, article}]}): also report the share "
                        "of answers naming a governing article (e.g. trainer/data/retrieval_questions.jsonl)")
    s.add_argument("--output", default=None, help="write the report as JSON here, with NAME_side_by_side.jsonl (both models' "
                   "answers) and NAME_scores.png (bar chart) next to it")
    add_trust_remote_code(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    s.add_argument("adapter_dir", help="e.g. runs/lora/final or runs/lora/checkpoint-200")
    s.add_argument("out_dir")
    s.add_argument("--base", default=None, help="base model dir (default: the one recorded in the adapter)")
    s.add_argument("--dtype", default="auto", help="dtype of the merged weights: auto (the base's), float32, "
                   "bfloat16, float16; the merge itself runs in float32")
    add_trust_remote_code(s)
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("ask", help="answer one question with a model dir or a LoRA checkpoint, unmerged "
                                   "(--compare-base: the base's answer beside it)")
    s.add_argument("model", help="a model dir, or an adapter dir such as runs/lora/checkpoint-200 (its base is the one "
                                 "recorded in adapter_config.json)")
    s.add_argument("question")
    s.add_argument("--compare-base", action="store_true", help="also answer with the base (the adapter disabled)")
    s.add_argument("--base", default=None, help="the base model dir (default: recorded in the adapter)")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true", help="one JSON object: model, answer, base, base_answer")
    add_trust_remote_code(s)
    s.set_defaults(func=cmd_ask)

    s = sub.add_parser("convert", help="a THUDM ChatGLM3 checkpoint -> a native GlmForCausalLM dir (no remote code)")
    s.add_argument("src", help="ChatGLM3 dir: config.json (model_type chatglm), pytorch_model*.bin or safetensors, "
                   "tokenizer.model")
    s.add_argument("dst", help="new dir: safetensors shards, tokenizer.json with ChatGLM3's prompt format")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("demo", help="build the offline demo model (tiny GLM on PRC statutes), reusing finished steps")
    s.add_argument("--config", default=str(config_path("demo.yaml")))
    s.add_argument("--workdir", default=None, help="default: the config's workdir")
    s.add_argument("--ask", action="store_true", help="print the demo model's answer to a sample question")
    s.add_argument("--skip-eval", action="store_true",
                   help="stop at the served model (make serve); a later `lawchat demo` adds the eval, reusing the rest")
    s.set_defaults(func=cmd_demo)


def usage_errors() -> tuple[type[Exception], ...]:
    """The training side's bad-input errors (exit 2)."""
    from .convert import ConvertError
    from .finetune import FinetuneError
    from .merge import MergeError
    from .prepare import PrepareError
    return PrepareError, FinetuneError, MergeError, ConvertError


if __name__ == "__main__":
    from lawchat_cli.main import main
    sys.exit(main())
