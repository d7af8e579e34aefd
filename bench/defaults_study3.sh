#!/usr/bin/env bash
# Third round of the defaults study (docs/defaults.md): a class-balanced curriculum pool.
# The fedavg and share-0.17 runs are the same configs as study 2 (copy those run folders in to
# reuse them; runs resume). SST-2, bench setting, seeds 0 and 1.
# Usage: bash bench/defaults_study3.sh [SHARED_DATASETS] [SEEDS]
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/datasets}
seeds=${2:-0,1}
methods="fedavg"
methods+=",fibecfed[method.layers.share=0.17]"
methods+=",fibecfed[method.layers.share=0.17;method.curriculum.class_balanced=true]"
.venv/bin/fibecfed compare --config bench --no-progress --methods "$methods" --seeds "$seeds" \
  --out bench/results/defaults3-sst2 data.name=sst2 "data.path=$shared/sst-2"
