"""app: wire the engine slot, guards (auth, limiter, breaker), gRPC services (chat, admin, health, reflection)
and /metrics; bind the port before the model loads; run until signalled.

grpc.health.v1, by service name (what a balancer or an orchestrator should ask):
- `lawchat.v1.ChatService` (readiness): SERVING only while this replica's model can answer — NOT_SERVING while
  the model loads, the breaker is open, the engine is stalled, dead or restarting, or the server drains. A
  balancer (Envoy's health check, a k8s readiness probe) sends chat traffic elsewhere meanwhile; a client that
  reaches it anyway gets the canned answer.
- `liveness` and `""` (the whole server): NOT_SERVING only when the process should be restarted — the
  supervisor gave up on its engine (it then exits 3) or it is shutting down. A drain or an open breaker never
  fails liveness, so an orchestrator does not kill a replica that is finishing its streams.
- `lawchat.v1.AdminService`: SERVING while the process runs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from lawchat.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, chat_pb2_grpc

from .admin_service import AdminService
from .auth import AuthInterceptor, KeyStore, server_credentials
from .breaker import Breaker
from .chat_service import ChatService
from .config import ServerConfig, load_server_config
from .engine.engine import Engine
from .engine.engine_process import EngineClient
from .engine.model_runner import load_runner
from .engine_slot import EngineSlot
from .limiter import Limiter
from .metrics import Metrics
from .retrieval import open_retriever
from .supervisor import Supervisor

log = logging.getLogger("lawchat.server")

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


LIVENESS = "liveness"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_POLL_S = 0.5
LOOPBACK = ("127.0.0.1", "localhost", "::1")
EXIT_ENGINE_LOST = 3


@dataclass
class App:
    server: grpc.aio.Server
    slot: EngineSlot
    chat: ChatService
    health: health.aio.HealthServicer
    metrics: Metrics
    breaker: Breaker
    limiter: Limiter
    keys: KeyStore
    port: int
    supervisor: Supervisor
    http: object | None = None     # the OpenAI-compatible HTTP server (openai_api.HttpServer), when configured
    watcher: asyncio.Task | None = None
    serving: bool | None = None    # what health last said for ChatService
    live: bool | None = None       # ... and for liveness
    stop: asyncio.Event | None = None   # set by the supervisor when it gives up (serve() then exits 3)


def build_app(cfg: ServerConfig, slot: EngineSlot, clock=time.monotonic) -> App:
    """Services on a grpc.aio server bound to cfg.host:cfg.port (0 = a free port); nothing started yet.
    The slot may still be empty: the port is taken before the model loads, so a clash fails at once.
    `clock` drives the breaker's and the supervisor's windows (tests step it)."""
    keys = KeyStore(cfg.auth)
    hosts = [cfg.host] + ([cfg.http.host] if cfg.http.port is not None else [])
    exposed = [h for h in hosts if h not in LOOPBACK]
    if not keys.enabled and exposed and not cfg.auth.allow_unauthenticated:
        raise ValueError(f"refusing to listen on {exposed[0]} without API keys: anyone who reaches it could chat and "
                         "use AdminService (reload, drain, limits). Give keys (--api-keys-file, $LAWCHAT_API_KEYS; "
                         "`lawchat keys new NAME`), or pass --allow-unauthenticated if a proxy in front authenticates")
    limiter, breaker, metrics = Limiter(cfg.limits), Breaker(cfg.breaker, clock), Metrics()
    metrics.watch(slot, breaker)
    transport_cap = max(4 << 20, 4 * cfg.generation.max_request_bytes)   # above it gRPC itself answers RESOURCE_EXHAUSTED
    # so_reuseport off: a second server on a taken port must fail, not silently share it
    server = grpc.aio.server(interceptors=[AuthInterceptor(keys)],
                             options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", transport_cap)])
    health_servicer = health.aio.HealthServicer()
    retriever = open_retriever(cfg.retrieval)
    if getattr(retriever, "encoder", None) is not None:
        retriever.encoder.observe = metrics.encoder_seconds.observe
    if getattr(retriever, "reranker", None) is not None:
        retriever.reranker.observe = metrics.reranker_seconds.observe
    chat = ChatService(slot, cfg, metrics, limiter, breaker, keys, retriever)

    async def on_drain():          # `app` is bound below, before any RPC can call this
        slot.draining = True
        await update_health(app)

    admin = AdminService(slot, breaker, limiter, keys.enabled, cfg.grace_seconds, on_drain, retriever)
    chat_pb2_grpc.add_ChatServiceServicer_to_server(chat, server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (CHAT_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{cfg.host}:{cfg.port}"
    try:
        if cfg.tls.enabled:
            port = server.add_secure_port(address, server_credentials(cfg.tls))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio raises RuntimeError when the address is taken
        raise OSError(f"cannot listen on {address}: {e}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    if not keys.enabled:
        log.warning("AUTH IS OFF: anyone who can reach %s may chat AND use AdminService (reload, drain, limits)%s",
                    address, " (--allow-unauthenticated)" if cfg.host not in LOOPBACK else
                    ". Fine for a local demo; give API keys for anything else.")
    if not cfg.tls.enabled and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("TLS is off on %s: questions and answers cross the network in plain text", address)
    http = None
    if cfg.http.port is not None:
        from .openai_api import HttpServer, bind, build_http_app
        sock = bind(cfg.http.host, cfg.http.port)
        http = HttpServer(build_http_app(chat, keys, slot, cfg.http, transport_cap, lambda: chat_unready(app)), sock)

    async def give_up(reason: str):
        await update_health(app)
        if app.stop is not None:
            app.stop.set()

    supervisor = Supervisor(slot, cfg.restart, cfg.breaker.stall_seconds, give_up, clock)
    app = App(server, slot, chat, health_servicer, metrics, breaker, limiter, keys, port, supervisor, http)
    return app


async def start_app(app: App) -> None:
    """Start serving: health NOT_SERVING (chat UNAVAILABLE) until the slot has an engine."""
    await app.server.start()
    if app.http is not None:
        app.http.start()
    await app.health.set(ADMIN_SERVICE, SERVING)
    await update_health(app)
    app.watcher = asyncio.create_task(watch_health(app))


def chat_unready(app: App) -> str:
    """Why this replica should get no chat traffic now ('' = ready)."""
    slot, engine = app.slot, app.slot.engine
    if engine is None:
        return "loading"
    if slot.draining:
        return "draining"
    if slot.restarting or not getattr(engine, "alive", True):
        return "engine down"
    if app.supervisor.stalled:
        return "engine stalled"
    if app.breaker.state == "open":
        return "breaker open"
    return ""


async def update_health(app: App) -> None:
    """Health by name (see the module doc): ChatService follows chat_unready, liveness the supervisor."""
    why = chat_unready(app)
    ok, live = not why, not app.supervisor.gave_up
    if ok != app.serving:
        await app.health.set(CHAT_SERVICE, SERVING if ok else NOT_SERVING)
        if not ok and why not in ("loading", "draining"):
            log.error("health %s NOT_SERVING: %s", CHAT_SERVICE, why)
        elif ok and app.serving is False:
            log.info("health %s SERVING", CHAT_SERVICE)
        app.serving = ok
    if live != app.live:
        for name in ("", LIVENESS):
            await app.health.set(name, SERVING if live else NOT_SERVING)
        app.live = live


async def watch_health(app: App) -> None:
    while True:
        app.supervisor.check(app.chat.stopping)
        await update_health(app)
        await asyncio.sleep(HEALTH_POLL_S)


async def stop_app(app: App, grace: float) -> None:
    """Report NOT_SERVING, let in-flight RPCs finish for `grace` seconds (new ones get UNAVAILABLE), stop."""
    if app.watcher is not None:
        app.watcher.cancel()
    app.chat.stopping = True
    await app.health.enter_graceful_shutdown()
    app.slot.draining = True                     # HTTP requests get 503 from now on, like gRPC's UNAVAILABLE
    await app.server.stop(grace)
    if app.http is not None:
        await app.http.stop()
    app.slot.stop()


class ThreadedServer:
    """build_app + start_app on an event loop in a daemon thread, for sync callers (benchmarks, tests, notebooks).
    `engine` is an Engine not yet started; `loader` (model dir -> started engine) enables ReloadModel."""

    def __init__(self, engine: Engine, cfg: ServerConfig, model_name: str = "model", loader=None,
                 clock=time.monotonic):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="lawchat-grpc", daemon=True).start()
        slot = EngineSlot(loader)

        async def build_and_start():   # grpc.aio objects belong to the loop they are made on
            app = build_app(cfg, slot, clock)
            await start_app(app)
            engine.start()
            slot.set(engine, Path(model_name))
            await update_health(app)
            return app

        self.app = self.call(build_and_start())
        self.target = f"{cfg.host}:{self.app.port}"

    def call(self, coro, timeout: float | None = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        self.call(stop_app(self.app, grace), timeout=None)


def load_engine(model_dir: Path, cfg: ServerConfig):
    """The model loaded and warmed up, behind a started Engine here or an EngineClient of a separate process."""
    kw = dict(device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, config=cfg.engine)
    if cfg.engine.separate_process:
        return EngineClient(model_dir, **kw)
    runner = load_runner(model_dir, **kw)
    runner.warmup()
    engine = Engine(runner)
    engine.start()
    engine.warmup()
    return engine


async def _in_thread(fn, *args):
    """fn(*args) in a daemon thread: unlike asyncio.to_thread, a signal during a long model load can end the
    process without waiting for the load to finish."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def run():
        try:
            result = fn(*args)
        except BaseException as e:   # handed to the awaiting coroutine
            loop.call_soon_threadsafe(lambda err=e: fut.done() or fut.set_exception(err))
        else:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))
    threading.Thread(target=run, name="lawchat-load", daemon=True).start()
    return await fut


async def warm_front_end(app: App) -> float:
    """Before SERVING, this process's first-time costs on the request path: the default executor's threads (spawned
    on first use; every request tokenizes there), the tokenizer on a long prompt, the retriever's first search
    (jieba loads its dictionary). Measured on an H200 before: a first burst of 64 ~900-token prompts reached the
    engine at p50 289 ms vs 41 ms warm. -> seconds spent."""
    t0 = time.perf_counter()
    engine, text = app.slot.engine, "劳动合同的解除与经济补偿" * 120
    workers = min(32, (os.cpu_count() or 1) + 4)          # ThreadPoolExecutor's default size
    await asyncio.gather(*[asyncio.to_thread(engine.encode_chat, [{"role": "user", "content": text}])
                           for _ in range(workers)])
    if app.chat.retriever is not None:
        try:
            await asyncio.to_thread(app.chat.retriever.search, "用人单位解除劳动合同要给经济补偿吗", 1)
        except Exception as e:   # a store that is down now is the requests' concern (FAILED_PRECONDITION), not start-up's
            log.warning("front-end warm-up: the retriever's first search failed (%s: %s)", type(e).__name__, e)
    return time.perf_counter() - t0


async def serve(model_dir: str | Path, cfg: ServerConfig, stop: asyncio.Event | None = None) -> int:
    """Bind, then load the model, serve until `stop` is set (or SIGTERM/SIGINT), then drain and shut down;
    -> the exit code: 0, or EXIT_ENGINE_LOST when the supervisor gave up on the engine."""
    model_dir = Path(model_dir)
    slot = EngineSlot(loader=lambda path: load_engine(path, cfg))
    app = build_app(cfg, slot)                    # the port is taken now: a clash fails before the load
    http_server, _ = app.metrics.serve_http(cfg.metrics_host, cfg.metrics_port)
    await start_app(app)
    log.info("listening on %s:%d (health NOT_SERVING until the model is loaded); loading %s",
             cfg.host, app.port, model_dir)

    stop = app.stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    load = asyncio.ensure_future(_in_thread(load_engine, model_dir, cfg))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not load.done() or load.exception() is not None:
        stopped.cancel()
        await stop_app(app, 0)
        http_server.shutdown()
        if load.done():
            raise load.exception()
        log.info("stopped while loading")
        return 0
    slot.set(load.result(), model_dir)
    log.info("front end warmed in %.2f s", await warm_front_end(app))
    await update_health(app)
    # One line that scripts and tests wait for: where to connect.
    scheme = "tls" if cfg.tls.enabled else "grpc"
    openai = f" openai=http://{cfg.http.host}:{app.http.port}/v1" if app.http is not None else ""
    print(f"lawchat serve: ready grpc={cfg.host}:{app.port} metrics=http://{cfg.metrics_host}:{http_server.server_port}"
          f"/metrics model={model_dir} device={slot.engine.device} transport={scheme}{openai}", flush=True)

    await stopped
    log.info("shutting down: draining for up to %.0f s", cfg.grace_seconds)
    await stop_app(app, cfg.grace_seconds)
    http_server.shutdown()
    if app.supervisor.gave_up:
        log.critical("stopped: the engine could not be kept running (%s); exit %d", app.supervisor.gave_up,
                     EXIT_ENGINE_LOST)
        return EXIT_ENGINE_LOST
    log.info("stopped")
    return 0


def config_from_args(args) -> ServerConfig:
    """`lawchat serve` flags over the YAML config (the manifests' command lines are checked through this)."""
    return load_server_config(args.config, args.sets, host=args.host, port=args.port, metrics_host=args.metrics_host,
                             metrics_port=args.metrics_port,
                             device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                             retrieval={"index": args.retrieval_index, "default_enabled": args.retrieval_default},
                             auth={"keys_file": args.api_keys_file, "allow_unauthenticated": args.allow_unauthenticated},
                             tls={"cert_file": args.tls_cert, "key_file": args.tls_key,
                                  "client_ca_file": args.tls_client_ca},
                             http={"port": args.http_port, "host": args.http_host,
                                   "served_model_name": args.served_model_name},
                             engine={"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                                     "gpu_memory_fraction": args.gpu_memory_fraction,
                                     "adapters": parse_adapters(args.adapters), "default_adapter": args.default_adapter,
                                     "max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank})


def parse_adapters(items: list[str]) -> dict[str, str] | None:
    """`--adapter NAME=DIR` flags -> {name: dir}, or None when none was given (the YAML's engine.adapters stand)."""
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {item!r}: expected NAME=DIR")
        out[name] = path
    return out


def serve_from_cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = config_from_args(args)
    try:
        return asyncio.run(serve(args.model, cfg))
    except OSError as e:
        print(f"lawchat serve: error: {e}", file=sys.stderr)
        return 2
