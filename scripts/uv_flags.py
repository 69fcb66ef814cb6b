"""Print `uv pip install` flags for what pip is configured with here (pip.conf files and PIP_* variables).

uv does not read pip's configuration, so on a machine whose pip points at a mirror, a wheel folder or a
constraints file (an air-gapped server, this CI's CPU torch wheel on disk), `make setup` would otherwise
resolve against a different package source than `pip install` does. Read through `pip config list`.
"""
from __future__ import annotations

import shlex
import subprocess
import sys

# pip key -> uv flag; keys holding several values separate them by whitespace
FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}


def read_pip_config() -> dict[str, str]:
    """pip's effective settings, the environment's (:env:) over the files' (global/user/site)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    files, env = {}, {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if section not in (":env:", "global", "install") or not value:
            continue
        (env if section == ":env:" else files)[key] = shlex.split(value)[0] if value[0] in "'\"" else value
    return {**files, **env}


def uv_flags(config: dict[str, str]) -> list[str]:
    flags = []
    for key, flag in FLAGS.items():
        for value in config.get(key, "").split():
            flags += [flag, value]
    if "extra-index-url" in config:   # pip takes the best version over all indexes; uv's default is the first index
        flags += ["--index-strategy", "unsafe-best-match"]
    return flags


if __name__ == "__main__":
    print(shlex.join(uv_flags(read_pip_config())))
