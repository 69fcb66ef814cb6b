"""config: server settings from configs/server.yaml, overridden by `lawchat serve` flags."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .engine.config import EngineConfig
from .params import GenerationDefaults


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    device: str = "cpu"
    dtype: str = "auto"
    trust_remote_code: bool = False
    grace_seconds: float = 10.0
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    engine: EngineConfig = field(default_factory=EngineConfig)


def load_server_config(path: str | Path | None, **overrides) -> ServerConfig:
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such server config: {path}")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "max_waiting" in raw:   # top-level before the engine section existed (configs of 0.1.0)
        raw["engine"] = {"max_waiting": raw.pop("max_waiting"), **(raw.get("engine") or {})}
    known = {f.name for f in fields(ServerConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(known)}")
    gen = raw.pop("generation", None) or {}
    eng = raw.pop("engine", None) or {}
    try:
        cfg = ServerConfig(**raw, generation=GenerationDefaults(**gen), engine=EngineConfig(**eng))
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    try:
        cfg.engine.validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg
