"""Packaging that fits a serving box: the built wheels install into a fresh venv without the training stack, and
`lawchat serve` runs a model from outside the checkout with the configs shipped inside the package."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from conftest import READY_RE, ROOT

pytestmark = pytest.mark.slow
TRAIN_ONLY = {"peft", "accelerate", "jieba", "nltk", "rouge-chinese", "matplotlib"}


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    dist, src = tmp / "dist", tmp / "src"      # built from a copy: no build/ or egg-info left by earlier builds
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", ".whl", ".gpu", ".hypothesis", "runs", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                        str(src), str(src / "client")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = sorted(dist.glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["lawchat", "lawchat_client"]
    # the versions this test venv runs (torch's CPU build above all) pin what the fresh venv may take
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                            text=True, check=True).stdout
    constraints = tmp / "constraints.txt"
    constraints.write_text("\n".join(line for line in freeze.splitlines() if "==" in line) + "\n", encoding="utf-8")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(constraints), *map(str, wheels)],
                       capture_output=True, text=True, timeout=1200, cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return py


def test_serving_install_leaves_out_the_training_stack(serving_venv):
    r = subprocess.run([str(serving_venv), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    installed = {line.split("==")[0].lower().replace("_", "-") for line in r.stdout.split()}
    assert {"lawchat", "lawchat-client", "torch", "transformers", "grpcio", "prometheus-client"} <= installed
    assert not installed & TRAIN_ONLY, installed & TRAIN_ONLY
    r = subprocess.run([str(serving_venv.parent / "lawchat"), "train", "d", "m", "c.yaml"], capture_output=True,
                       text=True, timeout=120, cwd=serving_venv.parent)
    assert r.returncode == 2 and "pip install 'lawchat[train]'" in r.stderr, r.stderr


def test_wheel_install_serves_the_model_from_outside_the_checkout(serving_venv, tiny_model, tmp_path):
    bin_dir = serving_venv.parent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([str(bin_dir / "lawchat"), "serve", "--model", str(tiny_model), "--port", "0",
                             "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=env)
    try:
        target, deadline = None, time.monotonic() + 180
        lines = []
        for line in proc.stdout:
            lines.append(line)
            m = READY_RE.search(line)
            if m:
                target = m.group(1)
                break
            assert time.monotonic() < deadline
        assert target, "".join(lines)
        assert not any(str(ROOT) in line for line in lines)          # nothing came from the source tree
        r = subprocess.run([str(bin_dir / "lawchat-client"), "--target", target, "chat", "试用期最长可以约定多久？",
                            "--max-new-tokens", "8", "--usage"], capture_output=True, text=True, timeout=60,
                           cwd=tmp_path, env=env)
        assert r.returncode == 0 and "completion_tokens=8" in r.stderr, r.stdout + r.stderr
        r = subprocess.run([str(serving_venv), "-c", "import lawchat_configs, lawchat_server; "
                            "print(lawchat_configs.DIR); print(lawchat_server.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
        assert str(bin_dir.parent) in r.stdout and str(ROOT) not in r.stdout, r.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
