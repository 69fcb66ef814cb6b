"""app: wire the model, engine, gRPC services (chat, admin, health, reflection) and /metrics; run until signalled."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from lawchat.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, chat_pb2_grpc

from .admin_service import AdminService
from .chat_service import ChatService
from .config import ServerConfig, load_server_config
from .engine.engine import Engine
from .engine.engine_process import EngineClient
from .engine.model_runner import load_runner
from .metrics import Metrics

log = logging.getLogger("lawchat.server")

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


@dataclass
class App:
    server: grpc.aio.Server
    engine: Engine | EngineClient
    health: health.aio.HealthServicer
    metrics: Metrics
    port: int


def build_app(engine: Engine | EngineClient, cfg: ServerConfig, model_name: str) -> App:
    """Services on a grpc.aio server bound to cfg.host:cfg.port (0 = a free port); nothing started yet."""
    metrics = Metrics()
    metrics.watch_engine(engine)
    # so_reuseport off: a second server on a taken port must fail, not silently share it
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatService(engine, cfg.generation, metrics), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(engine, model_name), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (CHAT_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    except RuntimeError as e:  # grpcio raises RuntimeError when the address is taken
        raise OSError(f"cannot listen on {cfg.host}:{cfg.port}: {e}") from None
    if port == 0:
        raise OSError(f"cannot listen on {cfg.host}:{cfg.port}")
    return App(server, engine, health_servicer, metrics, port)


async def start_app(app: App) -> None:
    app.engine.start()
    await app.server.start()
    for name in ("", CHAT_SERVICE, ADMIN_SERVICE):
        await app.health.set(name, health_pb2.HealthCheckResponse.SERVING)


async def stop_app(app: App, grace: float) -> None:
    """Report NOT_SERVING, let in-flight RPCs finish for `grace` seconds (new ones get UNAVAILABLE), stop."""
    await app.health.enter_graceful_shutdown()
    await app.server.stop(grace)
    app.engine.stop()


class ThreadedServer:
    """build_app + start_app on an event loop in a daemon thread, for sync callers (benchmarks, tests, notebooks)."""

    def __init__(self, engine: Engine, cfg: ServerConfig, model_name: str = "model"):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="lawchat-grpc", daemon=True).start()

        async def build_and_start():   # grpc.aio objects belong to the loop they are made on
            app = build_app(engine, cfg, model_name)
            await start_app(app)
            return app

        self.app = self.call(build_and_start())
        self.target = f"{cfg.host}:{self.app.port}"

    def call(self, coro, timeout: float | None = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        self.call(stop_app(self.app, grace), timeout=None)


def load_engine(model_dir: Path, cfg: ServerConfig):
    """The model loaded and warmed up, behind an Engine here or an EngineClient of a separate process."""
    kw = dict(device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, config=cfg.engine)
    if cfg.engine.separate_process:
        return EngineClient(model_dir, **kw)
    runner = load_runner(model_dir, **kw)
    runner.warmup()
    return Engine(runner)


async def serve(model_dir: str | Path, cfg: ServerConfig, stop: asyncio.Event | None = None) -> None:
    """Load the model, serve until `stop` is set (or SIGTERM/SIGINT), then drain and shut down."""
    model_dir = Path(model_dir)
    app = build_app(await asyncio.to_thread(load_engine, model_dir, cfg), cfg, model_dir.name)
    http_server, _ = app.metrics.serve_http(cfg.metrics_host, cfg.metrics_port)
    await start_app(app)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    # One line that scripts and tests wait for: where to connect.
    print(f"lawchat serve: ready grpc={cfg.host}:{app.port} metrics=http://{cfg.metrics_host}:{http_server.server_port}"
          f"/metrics model={model_dir} device={app.engine.device}", flush=True)

    await stop.wait()
    log.info("shutting down: draining for up to %.0f s", cfg.grace_seconds)
    await stop_app(app, cfg.grace_seconds)
    http_server.shutdown()
    log.info("stopped")


def serve_from_cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = load_server_config(args.config, host=args.host, port=args.port, metrics_port=args.metrics_port,
                             device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    try:
        asyncio.run(serve(args.model, cfg))
    except OSError as e:
        print(f"lawchat serve: error: {e}", file=sys.stderr)
        return 2
    return 0
