"""The protos lint clean with real buf (STANDARD) and the checked-in stubs match a fresh generation."""
from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_buf_lint_standard_clean():
    r = subprocess.run([str(BIN / "buf"), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_buf_lint_catches_a_violation(tmp_path):
    bad = tmp_path / "protos" / "lawchat" / "v1"
    bad.mkdir(parents=True)
    (bad / "bad.proto").write_text('syntax = "proto3";\npackage lawchat.v1;\nmessage bad_name { string X = 1; }\n')
    (tmp_path / "buf.yaml").write_text((ROOT / "buf.yaml").read_text())
    r = subprocess.run([str(BIN / "buf"), "lint"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "PascalCase" in r.stdout + r.stderr


def test_generated_stubs_are_fresh(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], capture_output=True,
                       text=True, env={"PATH": f"{BIN}:/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    fresh, checked_in = tmp_path / "lawchat" / "v1", ROOT / "client" / "lawchat" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert "chat_pb2_grpc.py" in names and "admin_pb2.py" in names
    _, mismatch, missing = filecmp.cmpfiles(fresh, checked_in, names, shallow=False)
    assert not mismatch and not missing, f"stale stubs {mismatch + missing}: run scripts/gen_protos.sh"


def test_buf_format_clean_and_breaking_check_catches_a_removed_field(tmp_path):
    """scripts/check_protos.sh (run by .ci/run) against a repo whose last commit removes a response field."""
    r = subprocess.run([str(BIN / "buf"), "format", "--diff", "--exit-code"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", repo / "protos")
    shutil.copy(ROOT / "buf.yaml", repo / "buf.yaml")
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo,  # noqa: E731
                                    check=True, capture_output=True)
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "v1")
    env = dict(os.environ, BUF=str(BIN / "buf"))
    check = lambda: subprocess.run(["bash", "scripts/check_protos.sh"], cwd=repo, capture_output=True,  # noqa: E731
                                   text=True, timeout=120, env=env)
    first = check()
    assert first.returncode == 0 and "skipped" in first.stderr, first.stdout + first.stderr
    chat = repo / "protos" / "lawchat" / "v1" / "chat.proto"
    text = chat.read_text(encoding="utf-8")
    git("commit", "-q", "--allow-empty", "-m", "no change")
    assert check().returncode == 0
    line = next(ln for ln in text.splitlines() if "finish_reason" in ln and "=" in ln and ";" in ln)
    chat.write_text(text.replace(line + "\n", "", 1), encoding="utf-8")
    git("commit", "-qam", "remove a field")
    r = check()
    assert r.returncode != 0 and "finish_reason" in r.stdout + r.stderr, r.stdout + r.stderr
