"""configs/server.yaml loading: the engine section, its validation, and the 0.1.0 top-level max_waiting."""
from __future__ import annotations

import pytest

from conftest import ROOT
from lawchat_server.config import load_server_config

ROOT_CONFIG = ROOT / "configs" / "server.yaml"


def test_shipped_config_loads_with_its_engine_section():
    cfg = load_server_config(ROOT_CONFIG)
    assert cfg.engine.block_size == 16 and cfg.engine.max_waiting == 64 and cfg.engine.enable_prefix_caching


def test_top_level_max_waiting_of_older_configs_still_applies(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("port: 0\nmax_waiting: 7\n")
    assert load_server_config(p).engine.max_waiting == 7
    p.write_text("max_waiting: 7\nengine:\n  max_waiting: 9\n")      # the engine section wins
    assert load_server_config(p).engine.max_waiting == 9


@pytest.mark.parametrize("body, message", [
    ("engine:\n  block_size: 24\n", "block_size must be a power of two"),
    ("engine:\n  attention: flash\n", "engine.attention must be"),
    ("engine:\n  blocks: 3\n", "unexpected keyword argument 'blocks'"),
    ("engine:\n  gpu_memory_fraction: 1.5\n", "gpu_memory_fraction"),
])
def test_bad_engine_settings_are_clear_errors(tmp_path, body, message):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_server_config(p)
