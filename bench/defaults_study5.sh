#!/usr/bin/env bash
# Study 5 (docs/defaults.md): what the sparse update's schedule costs and earns, on the tuning set
# (SST-2) only. The paper's reading (the non-aggregated layers train every round, Fisher on every
# step) against the default (those below the aggregated layer every 3rd round, Fisher on every
# 2nd step), learning rates pinned to the pre-tuning values for both methods.
# Usage: bash bench/defaults_study5.sh [SHARED_DATASETS] [SEEDS]
set -euo pipefail
cd "$(dirname "$0")/.."
shared=$(cd "${1:-../shared/datasets}" && pwd)
seeds=${2:-0}
lrs="train.lr=0.002;train.head_lr=0.01"
OMP_NUM_THREADS=1 .venv/bin/fibecfed compare --config bench --no-progress --seeds "$seeds" \
  --methods "fedavg[$lrs],fibecfed[$lrs;method.sparse.every=1;method.sparse.fisher_every=1],fibecfed[$lrs]" \
  --out bench/results/defaults5-sst2 data.name=sst2 "data.path=$shared/sst-2"
