#!/usr/bin/env bash
# Contract safety, run by .ci/run: the protos are `buf format` clean, lint clean, and have no breaking change
# (buf's FILE rules) against the previous commit on main — or against $PROTO_BASE (a git ref, e.g. the last tag).
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=${BUF:-.venv/bin/buf}
"$BUF" format --diff --exit-code
"$BUF" lint
base=${PROTO_BASE:-HEAD~1}
if git rev-parse -q --verify "$base^{commit}" >/dev/null; then
  "$BUF" breaking --against ".git#ref=$base"
  echo "protos: format, lint and breaking (against $base) clean"
else
  echo "protos: no $base in this clone (first commit or shallow): breaking check skipped" >&2
fi
