"""ship_demo_base: put configs/demo.yaml's pretrained base model into the package (trainer/data/demo_base), so that
`make serve` on a fresh clone fine-tunes it instead of pretraining it (the base stands in for a downloaded
ChatGLM3-6B: users never pretrain one). Weights as bf16 safetensors (12 MB), the recipe's key beside them; run it
again after changing the base recipe (tests/test_pipeline.py fails until then).

    python scripts/ship_demo_base.py                      # pretrain here (~7-10 min on 2 cores), then ship
    python scripts/ship_demo_base.py --from runs/demo/base    # ship a base `lawchat demo` built from this recipe
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from lawchat_trainer.demo import SHIPPED_BASE, STAMP, base_key, load_demo_config, pretrain_base, ship_base


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"))
    ap.add_argument("--from", dest="src", type=Path, default=None, help="a base dir built from this recipe")
    a = ap.parse_args()
    cfg = load_demo_config(a.config)
    key = base_key(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        if a.src is None:
            src = Path(tmp)
            info = pretrain_base(cfg, src)
        else:
            src = a.src
            stamp = json.loads((src / STAMP).read_text()) if (src / STAMP).is_file() else {}
            if stamp.get("key") != key:
                print(f"ship_demo_base: {src} was not built from {a.config}'s base recipe (key {stamp.get('key')} "
                      f"!= {key})", file=sys.stderr)
                return 2
            info = {k: v for k, v in stamp.items() if k != "key"}
        size = ship_base(src, key, info)
    print(f"shipped {SHIPPED_BASE} ({size / 1e6:.1f} MB), recipe key {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
