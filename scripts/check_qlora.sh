#!/usr/bin/env bash
# QLoRA end to end on a GPU over the tiny demo: train (4-bit NF4 base, tests/data/qlora_tiny.yaml) -> merge into the
# full-precision base (logits check + the comparison with the 4-bit base it was trained on) -> eval vs the base.
#   scripts/check_qlora.sh DEMO_DIR [OUT]     DEMO_DIR: a tiny demo workdir (base/ and data/prepared/)
set -euo pipefail
demo=${1:?a tiny demo workdir}; out=${2:-/tmp/qlora-tiny}
rm -rf "$out"
lawchat train "$demo/data/prepared" "$demo/base" tests/data/qlora_tiny.yaml --output-dir "$out/lora"
python -c "import json,sys; r=json.load(open(sys.argv[1])); print('train:', {k: r[k] for k in ('quantization', 'train_loss', 'global_step', 'peak_memory_gb')})" "$out/lora/train_report.json"
lawchat merge "$out/lora/final" "$out/merged" --base "$demo/base"
cat "$out/merged/merge_report.json"
lawchat eval "$out/merged" "$demo/data/prepared" --compare "$demo/base" --device cuda --max-new-tokens 64
