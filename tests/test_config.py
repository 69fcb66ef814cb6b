"""configs/server.yaml loading: every section validated at start, and the 0.1.0 top-level max_waiting."""
from __future__ import annotations

import pytest

from conftest import ROOT
from lawchat_server.config import load_server_config

ROOT_CONFIG = ROOT / "configs" / "server.yaml"


def test_shipped_config_loads_with_its_engine_section():
    cfg = load_server_config(ROOT_CONFIG)
    assert cfg.engine.block_size == 16 and cfg.engine.max_waiting == 64 and cfg.engine.enable_prefix_caching
    assert cfg.limits.client_requests.rate == 20 and cfg.breaker.failure_threshold == 5
    assert "12348" in cfg.degraded.message and cfg.auth.enabled is None and not cfg.tls.enabled


def test_serve_with_a_bad_config_exits_2_before_loading(tmp_path):
    import subprocess

    from conftest import BIN
    p = tmp_path / "bad.yaml"
    p.write_text("generation:\n  max_new_tokens: 4096\n")
    r = subprocess.run([str(BIN / "lawchat"), "serve", "--model", "/nonexistent", "--config", str(p)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "max_new_tokens_limit" in r.stderr, r.stderr


def test_top_level_max_waiting_of_older_configs_still_applies(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("port: 0\nmax_waiting: 7\n")
    assert load_server_config(p).engine.max_waiting == 7
    p.write_text("max_waiting: 7\nengine:\n  max_waiting: 9\n")      # the engine section wins
    assert load_server_config(p).engine.max_waiting == 9


@pytest.mark.parametrize("body, message", [
    ("engine:\n  block_size: 24\n", "block_size must be a power of two"),
    ("engine:\n  attention: flash\n", "engine.attention must be"),
    ("engine:\n  blocks: 3\n", r"engine: unknown keys \['blocks'\]"),
    ("engine:\n  gpu_memory_fraction: 1.5\n", "gpu_memory_fraction"),
    # a default above the limit would make every request that leaves it unset an INVALID_ARGUMENT
    ("generation:\n  max_new_tokens: 4096\n", r"generation.max_new_tokens \(4096\) must be in \[1, max_new_tokens_limit"),
    ("generation:\n  max_new_tokens: '512'\n", "generation.max_new_tokens must be int, got '512'"),
    ("engine:\n  max_num_seqs: 2.5\n", "engine.max_num_seqs must be int"),
    ("limits:\n  client_requests: {rate: -1}\n", "limits.client_requests.rate must be a finite number >= 0"),
    ("limits:\n  client_tokens: 5\n", "limits.client_tokens must be a mapping"),
    ("breaker:\n  failure_threshold: 0\n", "failure_threshold"),
    ("breaker:\n  stall_seconds: .nan\n", "breaker.stall_seconds must be a finite number"),
    ("tls:\n  cert_file: /nonexistent.pem\n", "set both cert_file and key_file"),
    ("tls:\n  cert_file: /nonexistent.pem\n  key_file: /nonexistent.key\n", "tls.cert_file: no such file"),
    ("degraded:\n  message: '  '\n", "degraded.message must not be empty"),
    ("grace_seconds: -1\n", "grace_seconds must be >= 0"),
    ("- a\n- b\n", "the config must be a mapping"),
])
def test_bad_engine_settings_are_clear_errors(tmp_path, body, message):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_server_config(p)


def test_serve_flags_set_retrieval_keys(tmp_path):
    """--retrieval-index / --retrieval-default override the section's keys; a missing index is exit 2 at start."""
    import subprocess

    from conftest import BIN
    index = tmp_path / "i.sqlite"
    index.write_bytes(b"")
    cfg = load_server_config(ROOT_CONFIG, retrieval={"index": str(index), "default_enabled": True})
    assert cfg.retrieval.index == str(index) and cfg.retrieval.default_enabled and cfg.retrieval.top_k == 3
    cfg = load_server_config(ROOT_CONFIG, retrieval={"index": None, "default_enabled": None})
    assert cfg.retrieval.index is None and not cfg.retrieval.default_enabled
    r = subprocess.run([str(BIN / "lawchat"), "serve", "--model", "/nonexistent", "--retrieval-index",
                        str(tmp_path / "nope.sqlite")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope.sqlite" in r.stderr
