#!/usr/bin/env bash
# The study behind docs/defaults.md: FibecFed's open details, one switch at a time, on SST-2 in
# the bench setting (MiniLM, 20 devices, alpha 1.0, 4 a round, 15 rounds, 1 local epoch).
# Usage: bash bench/defaults_study.sh [SHARED_DATASETS] [SEEDS]
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/datasets}
seeds=${2:-0}
methods="fedavg,fibecfed"
methods+=",fibecfed[method.layers.share=0.17]"
methods+=",fibecfed[method.layers.measure=output_change]"
methods+=",fibecfed[method.sparse.share=0.3]"
methods+=",fibecfed[method.curriculum.score_wrt=embeddings]"
methods+=",fibecfed[method.curriculum.pacing=root]"
methods+=",fibecfed-no-curriculum,fibecfed-no-sparse,fibecfed-random-layers,fibecfed-hard-first"
.venv/bin/fibecfed compare --config bench --no-progress --methods "$methods" --seeds "$seeds" \
  --out bench/results/defaults-sst2 data.name=sst2 "data.path=$shared/sst-2"
