"""The README's examples run: every ```python block and every grpcurl command of its grpcurl section, against
real servers (in-process, tiny model, loopback), with the README's address replaced by theirs."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import BIN, ROOT
from faults import InProcessServer
from lawchat_server.auth import AuthConfig
from lawchat_server.config import ServerConfig
from lawchat_server.engine.model_runner import load_runner
from lawchat_server.openai_api import HttpConfig
from lawchat_server.retrieval import RetrievalConfig, build_index
from test_auth import make_key
from test_retrieval import laws_db  # noqa: F401  (the laws.db-format fixture)

README = (ROOT / "README.md").read_text(encoding="utf-8")
PY_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


GRPCURL = [line for block in re.findall(r"```bash\n(.*?)```", section("grpcurl"), re.S)
           for line in block.splitlines() if line.startswith(".venv/bin/grpcurl")]


@pytest.fixture(scope="module")
def runner(tiny_model):
    return load_runner(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def plain_server(runner, laws_db, tmp_path_factory):  # noqa: F811
    index = tmp_path_factory.mktemp("idx") / "laws.sqlite"
    build_index(index, laws_db)
    srv = InProcessServer(runner, ServerConfig(port=0, retrieval=RetrievalConfig(index=str(index)),
                                               http=HttpConfig(port=0, served_model_name="lawchat-demo")))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def auth_server(runner, tmp_path_factory):
    key, line = make_key("readme", "chat")
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(line + "\n")
    srv = InProcessServer(runner, ServerConfig(port=0, auth=AuthConfig(enabled=True, keys_file=str(keys))))
    yield srv, key
    srv.stop()


def test_readme_has_the_examples_this_file_runs():
    assert len(PY_BLOCKS) >= 2
    assert [c.split()[2 if "-H" not in c else 4] for c in GRPCURL if "-d" not in c] == ["localhost:50051"] * 2
    kinds = {"list": 0, "describe": 0, "ChatStream": 0, "x-api-key": 0, "Health/Check": 0}
    for cmd in GRPCURL:
        for k in kinds:
            kinds[k] += k in shlex.split(cmd)[-1] or k in shlex.split(cmd)[-2] or k in cmd
    assert all(kinds.values()), kinds


@pytest.mark.parametrize("i", range(len(PY_BLOCKS)))
def test_python_example_runs(i, plain_server):
    code = PY_BLOCKS[i].replace("127.0.0.1:50051", plain_server.target).replace(
        "127.0.0.1:8000", f"127.0.0.1:{plain_server.app.http.port}")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip()


@pytest.mark.parametrize("cmd", GRPCURL, ids=lambda c: shlex.split(c)[-1])
def test_grpcurl_command_runs(cmd, plain_server, auth_server):
    srv, key = (auth_server if "x-api-key" in cmd else (plain_server, None))
    argv = [str(BIN / "grpcurl") if a == ".venv/bin/grpcurl" else a
            for a in shlex.split(cmd.replace("localhost:50051", srv.target).replace("$KEY", key or ""))]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    if argv[-1] == "list":
        assert "lawchat.v1.ChatService" in out and "grpc.health.v1.Health" in out
    elif argv[-2] == "describe":
        assert "rpc ChatStream" in out
    elif argv[-1].endswith("ChatStream"):
        msgs = [json.loads(m) for m in re.findall(r"^\{.*?^\}", out, re.S | re.M)]
        assert msgs[-1]["finish_reason"].startswith("FINISH_REASON_") and "".join(m.get("delta", "") for m in msgs)
    else:
        assert '"SERVING"' in out


def test_grpcurl_key_command_needs_the_key(auth_server):
    """The API-key example is not passing by accident: without the header the same server refuses."""
    srv, _ = auth_server
    cmd = next(c for c in GRPCURL if "x-api-key" in c).replace('-H "x-api-key:$KEY" ', "")
    argv = [str(BIN / "grpcurl") if a == ".venv/bin/grpcurl" else a
            for a in shlex.split(cmd.replace("localhost:50051", srv.target))]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Unauthenticated" in r.stdout + r.stderr


def test_readme_curl_stream_runs(plain_server):
    """The first lines' `curl -N` against the OpenAI-compatible API: an SSE stream that ends with [DONE]."""
    block = re.findall(r"```bash\n(.*?)```", README, re.S)[1]
    line = next(ln for ln in block.replace("\\\n", " ").splitlines() if ln.startswith("curl -N"))
    argv = shlex.split(line.replace("localhost:8000", f"127.0.0.1:{plain_server.app.http.port}"))
    r = subprocess.run(argv + ["-sS"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    events = [ln[6:] for ln in r.stdout.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                                              for e in events[:-1] if json.loads(e)["choices"])
