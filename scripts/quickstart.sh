#!/usr/bin/env bash
# Sets everything up (a virtualenv in .venv, reused when present) and then runs one job:
#   bash scripts/quickstart.sh train [extra stn-train flags]   the main job
#   bash scripts/quickstart.sh test  [extra pytest args]       the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-}"; shift || true
case "$job" in train|test) ;; *) echo "usage: bash scripts/quickstart.sh train|test [args]" >&2; exit 2;; esac

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Installing into an up-to-date venv is a quick no-op, so rerunning is cheap.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

if [ "$job" = test ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
# The main job: cifar_cnn self-tuning on CIFAR-10 from TFDS (downloaded on first use). Offline,
# it stops within seconds and names the alternative: --dataset=folder:<unpacked image folder>.
exec .venv/bin/stn-train --experiment=cifar_cnn --dataset=cifar10 --logdir=runs/cifar_cnn "$@"
