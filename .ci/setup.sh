#!/usr/bin/env bash
# Idempotent setup for a fresh machine: Java for Spark, a virtualenv with the pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v java >/dev/null 2>&1; then
  echo "== installing a Java runtime for Spark"
  apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt .ci/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing requirements (torch 2.13 CPU, fbgemm-gpu-cpu 1.8, pyspark 4.2, deltalake, mlflow 3.17)"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  # torchrec's metadata asks for the CUDA fbgemm-gpu wheel: install it without dependencies.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps torchrec==1.8.0
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import torch, torchrec, pyspark, deltalake, mlflow; print('ready: torch', torch.__version__, '| pyspark', pyspark.__version__, '| deltalake', deltalake.__version__, '| mlflow', mlflow.__version__)"
