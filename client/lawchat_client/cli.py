"""lawchat-client CLI: stream an answer to the terminal, chat over several turns, or run an AdminService call.

    lawchat-client chat "劳动合同法第三十九条是怎么规定的？"
    lawchat-client chat -i                                     # multi-turn: the history goes with every question
    lawchat-client --target 10.0.0.5:50051,10.0.0.6:50051 chat "…"   # round_robin over the healthy servers
    lawchat-client --target 10.0.0.5:50051 --tls-ca ca.pem --api-key "$KEY" status
    lawchat-client degraded on --reason "GPU maintenance"      # needs a key with the admin scope
    lawchat-client limits --client-requests 5:10 --client-tokens 200:2000
    lawchat-client reload /models/law-v2/merged
    lawchat-client drain --timeout 60

The API key comes from --api-key or $LAWCHAT_API_KEY. Exit codes: 0 ok, 1 the RPC failed (the gRPC status is
printed), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys

from .client import LawchatClient
from .retry import LawchatError, RetryPolicy


def rate(text: str) -> dict:
    """'RATE' or 'RATE:BURST' -> {"rate": ..., "burst": ...}."""
    try:
        parts = [float(x) for x in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RATE or RATE:BURST, got {text!r}") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected RATE or RATE:BURST, got {text!r}")
    return {"rate": parts[0]} if len(parts) == 1 else {"rate": parts[0], "burst": parts[1]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lawchat-client", description="Talk to a lawchat server")
    p.add_argument("--target", default="127.0.0.1:50051",
                   help="host:port, several separated by commas (round_robin), or dns:///name:port")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds (retries included)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries on UNAVAILABLE / RESOURCE_EXHAUSTED before any text arrived (0 = none)")
    p.add_argument("--api-key", default=None, help="API key (default: $LAWCHAT_API_KEY)")
    p.add_argument("--tls-ca", default=None, help="PEM CA that signed the server's certificate (turns TLS on)")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate, for mTLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM client private key, for mTLS")
    p.add_argument("--tls", action="store_true", help="TLS with the system's trusted roots")
    p.add_argument("--server-name", default=None, help="TLS: the name in the server's certificate, if not the host")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chat", help="ask one question (or -i: several turns); the answer streams to stdout")
    c.add_argument("question", nargs="?", default=None)
    c.add_argument("-i", "--interactive", action="store_true",
                   help="multi-turn chat: read questions from stdin, keep the history; an empty line or EOF ends it")
    c.add_argument("--system", default=None, help="optional system message")
    c.add_argument("--max-new-tokens", type=int, default=None)
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--top-p", type=float, default=None)
    c.add_argument("--top-k", type=int, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable)")
    c.add_argument("--no-stream", action="store_true", help="use the unary Chat RPC")
    c.add_argument("--usage", action="store_true", help="print finish reason and token usage to stderr")
    c.add_argument("--cite", action="store_true", help="ask for statute retrieval and print the cited articles")
    c.add_argument("--adapter", default=None, help="answer with this LoRA adapter (`adapters` lists them; base = none)")
    sub.add_parser("status", help="print the server status as JSON")
    d = sub.add_parser("degraded", help="turn the degraded switch on or off (canned answers for everyone)")
    d.add_argument("state", choices=["on", "off"])
    d.add_argument("--reason", default="")
    lim = sub.add_parser("limits", help="change rate limits (RATE or RATE:BURST; rate 0 = unlimited)")
    for name in ("global-requests", "global-tokens", "client-requests", "client-tokens"):
        lim.add_argument(f"--{name}", type=rate, default=None)
    r = sub.add_parser("reload", help="serve another merged model dir (on the server's disk)")
    r.add_argument("model_path")
    ad = sub.add_parser("adapters", help="list the LoRA adapters served, or load / unload one (admin scope)")
    ad.add_argument("action", nargs="?", choices=["list", "load", "unload"], default="list")
    ad.add_argument("name", nargs="?", help="load/unload: the adapter's name")
    ad.add_argument("path", nargs="?", help="load: a PEFT adapter dir on the server's disk")
    dr = sub.add_parser("drain", help="stop admitting chat requests; wait for those in flight")
    dr.add_argument("--timeout", dest="drain_timeout", type=float, default=0.0,
                    help="seconds to wait (0 = the server's grace_seconds)")
    return p


def admin(client: LawchatClient, a) -> dict:
    if a.command == "status":
        return client.status()
    if a.command == "degraded":
        return client.set_degraded(a.state == "on", a.reason)
    if a.command == "limits":
        changes = {k: getattr(a, k) for k in ("global_requests", "global_tokens", "client_requests", "client_tokens")
                   if getattr(a, k) is not None}
        return client.update_limits(**changes)
    if a.command == "reload":
        return client.reload_model(a.model_path)
    if a.command == "adapters":
        if a.action == "list":
            return {"adapters": client.list_adapters()}
        if not a.name or (a.action == "load") != bool(a.path):
            raise ValueError(f"adapters {a.action}: " + ("NAME DIR" if a.action == "load" else "NAME"))
        return client.load_adapter(a.name, a.path) if a.action == "load" else client.unload_adapter(a.name)
    return client.drain(a.drain_timeout)


def chat(client: LawchatClient, a) -> None:
    messages = ([{"role": "system", "content": a.system}] if a.system else []) + \
        [{"role": "user", "content": a.question}]
    answer(client, a, messages)


def interactive(client: LawchatClient, a) -> None:
    """Each question goes with the whole conversation so far; a failed turn is dropped from the history."""
    history = [{"role": "system", "content": a.system}] if a.system else []
    tty = sys.stdin.isatty()
    while True:
        if tty:
            sys.stderr.write("你: ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            return
        history.append({"role": "user", "content": line.strip()})
        try:
            text = answer(client, a, history)
        except LawchatError:
            history.pop()
            raise
        history.append({"role": "assistant", "content": text})


def answer(client: LawchatClient, a, messages: list[dict]) -> str:
    """Ask, print the answer (streamed unless --no-stream) and what was asked for; -> the answer's text."""
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
              seed=a.seed, stop=a.stop, retrieval=True if a.cite else None, adapter=a.adapter)
    if a.no_stream:
        r = client.chat(messages, **kw)
        text = r.text
        print(text)
        finish, prompt, completion, degraded = r.finish_reason, r.prompt_tokens, r.completion_tokens, r.degraded
        citations, none_governs = r.citations, r.no_governing_article
    else:
        stream = client.chat_stream(messages, **kw)
        parts = []
        for delta in stream:
            parts.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        text = "".join(parts)
        finish, prompt, completion, degraded = (stream.finish_reason, stream.prompt_tokens, stream.completion_tokens,
                                                stream.degraded)
        citations, none_governs = stream.citations, stream.no_governing_article
    if a.cite:
        print("\n引用法条：" if citations else "\n未找到可以确定适用于此问题的法条。" if none_governs
              else "\n(no articles were cited)")
        for i, c in enumerate(citations, 1):
            sure = f"（置信度 {c['confidence']:.0%}）" if c.get("confidence") is not None else ""
            print(f"[{i}] 《{c['law']}》{c['article']}{sure}：{c['snippet']}")
    if degraded:
        print("[degraded: the server's canned answer, not the model's]", file=sys.stderr)
    if a.usage:
        print(f"[finish={finish} prompt_tokens={prompt} completion_tokens={completion}]", file=sys.stderr)
    sys.stdout.flush()
    return text


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.command == "chat" and (a.question is None) != a.interactive:
        p.error("chat: give a question, or -i for a multi-turn chat")
    try:
        client = LawchatClient(a.target, timeout=a.timeout, api_key=a.api_key, tls_ca=a.tls_ca, tls_cert=a.tls_cert,
                               tls_key=a.tls_key, tls=a.tls, server_name=a.server_name,
                               retry=RetryPolicy(max_attempts=1 + max(0, a.retries)))
    except (ValueError, OSError) as e:
        print(f"lawchat-client: {e}", file=sys.stderr)
        return 2
    with client:
        try:
            if a.command == "chat":
                (interactive if a.interactive else chat)(client, a)
            else:
                print(json.dumps(admin(client, a), ensure_ascii=False, indent=2))
            return 0
        except ValueError as e:
            print(f"lawchat-client: {e}", file=sys.stderr)
            return 2
        except LawchatError as e:
            print(f"lawchat-client: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
