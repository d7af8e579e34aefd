#!/usr/bin/env bash
# Second round of the defaults study (docs/defaults.md): with the Fisher collected during
# training (method.sparse.fisher_source=training), how many layers to aggregate and how much data
# the curriculum starts with. SST-2, bench setting, seeds 0 and 1.
# Usage: bash bench/defaults_study2.sh [SHARED_DATASETS] [SEEDS]
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/datasets}
seeds=${2:-0,1}
methods="fedavg"
methods+=",fibecfed[method.layers.share=0.5]"
methods+=",fibecfed[method.layers.share=0.17]"
methods+=",fibecfed[method.layers.share=0.17;method.curriculum.start_fraction=0.5]"
.venv/bin/fibecfed compare --config bench --no-progress --methods "$methods" --seeds "$seeds" \
  --out bench/results/defaults2-sst2 data.name=sst2 "data.path=$shared/sst-2"
