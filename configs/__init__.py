"""The shipped configs (installed as `lawchat_configs`, so `lawchat serve` finds its defaults outside the repo)."""
from pathlib import Path

DIR = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """path("server.yaml") -> the shipped file."""
    return DIR / name
