"""make setup's installer: uv gets the package sources pip is configured with (scripts/uv_flags.py), so it
installs what pip would — on this CI the CPU torch wheel from the wheel folder, for a user their mirror."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

UV_FLAGS = ROOT / "scripts" / "uv_flags.py"


def pip_env(tmp_path, conf: str, **env) -> dict:
    """This pip configuration file, read after the machine's (its keys win), and no PIP_* from the machine."""
    path = tmp_path / "pip.conf"
    path.write_text(conf, encoding="utf-8")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**clean, "PIP_CONFIG_FILE": str(path), **env}


def uv_flags(env: dict) -> list[str]:
    out = subprocess.run([sys.executable, str(UV_FLAGS)], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_uv_gets_pips_index_mirrors_wheel_folders_and_constraints(tmp_path):
    conf = ("[global]\nindex-url = https://mirror.example/simple\n"
            "extra-index-url =\n    https://a.example/simple\n    https://b.example/simple\n"
            "constraint = /global/c.txt\n[install]\nconstraint = /install/c.txt\n")
    flags = uv_flags(pip_env(tmp_path, conf, PIP_FIND_LINKS="/wheels/one /wheels/two", PIP_NO_INDEX="1"))
    pairs = list(zip(flags[::2], flags[1::2]))
    assert ("--index-url", "https://mirror.example/simple") in pairs
    assert ("--extra-index-url", "https://a.example/simple") in pairs
    assert ("--extra-index-url", "https://b.example/simple") in pairs
    assert ("--find-links", "/wheels/one") in pairs and ("--find-links", "/wheels/two") in pairs
    assert ("--constraint", "/install/c.txt") in pairs and ("--constraint", "/global/c.txt") not in pairs
    assert "--no-index" in flags
    # pip takes the best version over all its indexes; uv would take the first index that has the package
    assert flags[flags.index("--index-strategy") + 1] == "unsafe-best-match"


def test_an_environment_variable_overrides_the_config_file(tmp_path):
    flags = uv_flags(pip_env(tmp_path, "[global]\nindex-url = https://file.example/simple\n",
                             PIP_INDEX_URL="https://env.example/simple"))
    assert flags[flags.index("--index-url") + 1] == "https://env.example/simple"
    assert flags.count("--index-url") == 1


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "uv").exists(), reason="make setup installs uv into .venv")
def test_uv_resolves_torch_from_the_source_pip_uses_here(tmp_path):
    """This machine's pip takes torch 2.13.0 from a CPU wheel on disk; uv, handed the same sources, resolves the
    same build (without them it would take PyPI's CUDA build, several GB)."""
    sources = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    if "find-links" not in sources and "index-url" not in sources:
        pytest.skip("pip has no package source configured on this machine")
    uv = str(ROOT / ".venv" / "bin" / "uv")
    subprocess.run([uv, "venv", "-q", str(tmp_path / "venv")], check=True)
    env = {**os.environ, "UV_CACHE_DIR": str(tmp_path / "uv-cache")}
    out = subprocess.run([uv, "pip", "install", "--dry-run", "--python", str(tmp_path / "venv" / "bin" / "python"),
                          *uv_flags(dict(os.environ)), "torch==2.13.0", "--no-deps"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--report", "-",
                          "--quiet", "--ignore-installed", "torch==2.13.0"], capture_output=True, text=True,
                         timeout=300)
    assert pip.returncode == 0, pip.stderr
    pip_version = json.loads(pip.stdout)["install"][0]["metadata"]["version"]
    assert f"torch=={pip_version}" in out.stderr, (pip_version, out.stderr)
