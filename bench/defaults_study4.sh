#!/usr/bin/env bash
# Fourth round of the defaults study (docs/defaults.md): where FibecFed's time goes and which part
# earns its keep. Each part switched off in turn, and the difficulty scored over the class scores
# (a forward pass) instead of per-sample adapter gradients. Subj, bench setting, 3 seeds.
# (docs/defaults.md reports a run of this study on another machine's CPUs; fibecfed-no-sparse and
# SST-2 did not finish there: add them with METHODS/DATASETS.)
# The fedavg and fibecfed runs are the benchmark tables' (same config): they are copied in when
# bench/results/<dataset> has them, and run otherwise. Runs resume.
# Usage: bash bench/defaults_study4.sh [SHARED_DATASETS] [SEEDS]
set -euo pipefail
cd "$(dirname "$0")/.."
shared=$(cd "${1:-../shared/datasets}" && pwd)  # absolute, as bench/benchmarks.py writes it
seeds=${2:-0,1,2}
methods=${METHODS:-"fedavg,fibecfed,fibecfed[method.curriculum.score_wrt=logits],fibecfed-no-curriculum,fibecfed-no-layer-selection"}
declare -A folder=([subj]=subj [sst2]=sst-2)
for ds in ${DATASETS:-subj}; do
  out=bench/results/defaults4-$ds
  mkdir -p "$out"
  for m in fedavg fibecfed; do
    if [ -d "bench/results/$ds/$m" ] && [ ! -d "$out/$m" ]; then cp -r "bench/results/$ds/$m" "$out/"; fi
  done
  .venv/bin/fibecfed compare --config bench --no-progress --methods "$methods" --reference fedavg --seeds "$seeds" \
    --out "$out" data.name=$ds "data.path=$shared/${folder[$ds]}"
done
