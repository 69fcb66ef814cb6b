"""Print `uv pip install` flags for what pip is configured with here (pip.conf files and PIP_* variables).

uv does not read pip's configuration, so on a machine whose pip points at a mirror, a wheel folder or a
constraints file (an air-gapped server, this CI's CPU torch wheel on disk), `make setup` would otherwise
resolve against a different package source than `pip install` does. Read through `pip config list`.
"""
from __future__ import annotations

import ast
import shlex
import subprocess
import sys

# pip key -> uv flag; keys holding several values separate them by whitespace
FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}
SWITCHES = {"no-index": "--no-index"}    # pip key (true/false) -> uv flag


def read_pip_config() -> dict[str, str]:
    """pip's effective settings for `pip install`: the environment's (PIP_*) over the files' ([install] over
    [global])."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    files, env = {}, {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if section not in (":env:", "global", "install") or not value:
            continue
        (env if section == ":env:" else files)[key] = ast.literal_eval(value)     # pip prints each value's repr()
    return {**files, **env}


def uv_flags(config: dict[str, str]) -> list[str]:
    flags = []
    for key, flag in FLAGS.items():
        for value in config.get(key, "").split():
            flags += [flag, value]
    flags += [flag for key, flag in SWITCHES.items() if config.get(key, "").lower() in ("1", "true", "yes", "on")]
    if "extra-index-url" in config:   # pip takes the best version over all indexes; uv's default is the first index
        flags += ["--index-strategy", "unsafe-best-match"]
    return flags


if __name__ == "__main__":
    print(shlex.join(uv_flags(read_pip_config())))
