"""The client distribution installs into a clean venv with grpcio + protobuf only, and talks to a real server."""
from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("client-venv")
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT / "client")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return py


def test_client_installs_without_torch(client_venv):
    r = subprocess.run([str(client_venv), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    installed = {line.split("==")[0].lower() for line in r.stdout.split()}
    assert {"lawchat-client", "grpcio", "protobuf"} <= installed
    assert not installed & {"torch", "transformers", "peft", "numpy"}
    r = subprocess.run([str(client_venv), "-c", "import lawchat_client, lawchat.v1.chat_pb2_grpc; print('ok')"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "ok", r.stderr


def test_installed_client_cli_streams_from_server(client_venv, server):
    cli = client_venv.parent / "lawchat-client"
    r = subprocess.run([str(cli), "--target", server.target, "chat", "试用期最长可以约定多久？", "--max-new-tokens", "12",
                        "--usage"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "completion_tokens=" in r.stderr and r.stdout.strip()
