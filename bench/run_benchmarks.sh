#!/usr/bin/env bash
# Reproduce the BENCHMARKS.md tables with today's defaults (the tuned learning rates included):
# two streams of `fibecfed compare`, one per core, one torch thread each. Runs resume, so the
# script can be started again after an interruption. SST-2 is the tuning set (bench/tune.py) and
# is left out on purpose.
#   bash bench/run_benchmarks.sh [SHARED_DATASETS] [SEEDS] [METHODS]
# Then the summary table: python bench/benchmarks.py --summary-only --datasets subj,tweets,tweets-default,bbc-default,tweets-smollm2,tweets-paper
set -euo pipefail
cd "$(dirname "$0")/.."
shared=$(cd "${1:-../shared/datasets}" && pwd)
seeds=${2:-0,1,2}
# FedProx runs at its tuned rate and mu (docs/defaults.md). Each setting is one folder, so a
# session short of time can run the methods apart (third argument `fedprox`, later) into it.
methods=${3:-fedavg,fedprox,fibecfed}
export OMP_NUM_THREADS=1
fib="$(dirname "$0")/../.venv/bin/fibecfed"
{
  # The bench setting (about 50 samples a device, one local epoch): transfer weighs.
  $fib compare --config bench --no-progress --methods "$methods" --seeds "$seeds" \
    --out bench/results/subj data.name=subj "data.path=$shared/subj"
  # The decoder (SmolLM2-135M through label words).
  $fib compare --config bench-decoder --no-progress --methods "$methods" --seeds "$seeds" \
    --out bench/results/tweets-smollm2
  # The paper's scale: 100 devices, 10 a round, Dirichlet label skew (preset paper).
  $fib compare --config paper --no-progress --methods "$methods" --seeds "$seeds" \
    --out bench/results/tweets-paper
} > bench/results/stream-a.log 2>&1 &
{
  $fib compare --config bench --no-progress --methods "$methods" --seeds "$seeds" \
    --out bench/results/tweets data.name=tweets
  # The default step-based config (`fibecfed run` with no arguments): ~1,700 tweets a device,
  # 4 steps of 16 a round: compute weighs.
  $fib compare --no-progress --methods "$methods" --seeds "$seeds" --out bench/results/tweets-default
  # The same default config on a dataset no default was chosen on or looked at before (packaged
  # BBC News, 5 topics): what a new user gets on their own data.
  $fib compare --no-progress --methods "$methods" --seeds "$seeds" --out bench/results/bbc-default data.name=bbc_news
  # The server optimiser: FibecFed under FedAdam against FedAdam and FedAvg (server lr 0.01, tuned).
  $fib compare --config bench --no-progress --seeds "$seeds" --out bench/results/tweets-adam data.name=tweets \
    --methods 'fedavg,fedadam[federation.server_opt.lr=0.01],fibecfed,fibecfed[federation.server_opt.kind=adam;federation.server_opt.lr=0.01]'
  # docs/defaults.md, study 5 (the tuning set).
  bash bench/defaults_study5.sh "$shared" 0
} > bench/results/stream-b.log 2>&1 &
wait
