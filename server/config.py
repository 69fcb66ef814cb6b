"""config: server settings from configs/server.yaml, overridden by `lawchat serve` flags, validated at start.

Each section is the dataclass of the module it configures (defaults written once, there): generation →
params, engine → engine/config, limits → limiter, breaker → breaker, restart → supervisor, degraded → degraded,
auth and tls → auth, http → openai_api, retrieval → retrieval.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .auth import AuthConfig, TlsConfig
from .breaker import BreakerConfig
from .degraded import DegradedConfig
from .engine.config import EngineConfig
from .limiter import LimitsConfig
from .openai_api import HttpConfig
from .params import GenerationDefaults
from .retrieval import RetrievalConfig
from .supervisor import RestartConfig


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
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    degraded: DegradedConfig = field(default_factory=DegradedConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def validate(self) -> None:
        for section in (self.generation, self.engine, self.limits, self.breaker, self.restart, self.degraded,
                        self.tls, self.http, self.retrieval):
            section.validate()
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("port and metrics_port must be in [0, 65535]")
        if not self.grace_seconds >= 0:
            raise ValueError("grace_seconds must be >= 0")


def _check_type(value, tp, where: str):
    """YAML values against the dataclass annotation: int for int, number for float, str, bool, None, lists and
    mappings of those."""
    if typing.get_origin(tp) is list:                     # list[str]
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if typing.get_origin(tp) is dict:                     # dict[str, str]
        kt, vt = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return {_check_type(k, kt, f"{where} key"): _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
    if value is None and type(None) in args:
        return None
    for t in args:
        if typing.get_origin(t) in (list, dict) and isinstance(value, typing.get_origin(t)):   # list[str] | None
            return _check_type(value, t, where)
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number, got {value!r}")
            return float(value)
        if t is str and isinstance(value, str):
            return value
    names = " or ".join("null" if t is type(None) else getattr(typing.get_origin(t), "__name__", None) or t.__name__
                        for t in args)
    raise ValueError(f"{where} must be {names}, got {value!r}")


def build(cls, raw, where: str):
    """A dataclass (nested ones too) from a YAML mapping; unknown keys and wrong types are errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where or 'the config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{where or 'the config'}: unknown keys {sorted(unknown)}; expected {sorted(known)}")
    kw = {}
    for name, value in raw.items():
        tp, key = hints[name], f"{where}.{name}" if where else name
        kw[name] = build(tp, value, key) if dataclasses.is_dataclass(tp) else _check_type(value, tp, key)
    return cls(**kw)


def apply_sets(raw: dict, sets: list[str]) -> dict:
    """`--set section.key=value` (value parsed as YAML) into the raw config, checked like the file's keys."""
    for item in sets:
        path, sep, value = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        *parents, leaf = path.split(".")
        node = raw
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {name} is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


def load_server_config(path: str | Path | None, sets: list[str] = (), **overrides) -> ServerConfig:
    """The YAML file, then `--set` items, then the flags (`overrides`; None = flag not given)."""
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such server config: {path}")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if isinstance(raw, dict):
        raw = apply_sets(raw, list(sets or ()))
    if isinstance(raw, dict) and "max_waiting" in raw:   # top-level before the engine section existed (0.1.0)
        raw["engine"] = {"max_waiting": raw.pop("max_waiting"), **(raw.get("engine") or {})}
    try:
        cfg = build(ServerConfig, raw, "")
        for key, value in overrides.items():
            if isinstance(value, dict):          # a section: set the keys given (flags left unset are None)
                for sub, v in value.items():
                    if v is not None:
                        setattr(getattr(cfg, key), sub, v)
            elif value is not None:
                setattr(cfg, key, value)
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path else str(e)) from None
    return cfg
