"""lawchat-client CLI: stream an answer to the terminal, or show the server status.

    lawchat-client chat "劳动合同法第三十九条是怎么规定的？"
    lawchat-client status --target 10.0.0.5:50051

Exit codes: 0 ok, 1 the RPC failed (the gRPC status is printed), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys

from .client import LawchatClient, LawchatError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lawchat-client", description="Talk to a lawchat server")
    p.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chat", help="ask one question; the answer streams to stdout")
    c.add_argument("question")
    c.add_argument("--system", default=None, help="optional system message")
    c.add_argument("--max-new-tokens", type=int, default=None)
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--top-p", type=float, default=None)
    c.add_argument("--top-k", type=int, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable)")
    c.add_argument("--no-stream", action="store_true", help="use the unary Chat RPC")
    c.add_argument("--usage", action="store_true", help="print finish reason and token usage to stderr")
    sub.add_parser("status", help="print the server status as JSON")
    a = p.parse_args(argv)

    with LawchatClient(a.target, timeout=a.timeout) as client:
        try:
            if a.command == "status":
                print(json.dumps(client.status(), ensure_ascii=False, indent=2))
                return 0
            messages = ([{"role": "system", "content": a.system}] if a.system else []) + \
                [{"role": "user", "content": a.question}]
            kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                      seed=a.seed, stop=a.stop)
            if a.no_stream:
                r = client.chat(messages, **kw)
                print(r.text)
                finish, prompt, completion = r.finish_reason, r.prompt_tokens, r.completion_tokens
            else:
                stream = client.chat_stream(messages, **kw)
                for delta in stream:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                finish, prompt, completion = stream.finish_reason, stream.prompt_tokens, stream.completion_tokens
            if a.usage:
                print(f"[finish={finish} prompt_tokens={prompt} completion_tokens={completion}]", file=sys.stderr)
            return 0
        except LawchatError as e:
            print(f"lawchat-client: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
