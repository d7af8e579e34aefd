#!/usr/bin/env bash
# The CUDA code path, end to end: FedAvg and FibecFed on the bench setting (seed 0 unless SEEDS is given) with
# model.device=cuda, on a machine where the package's dependencies are already installed.
#   bash bench/gpu_check.sh MODEL DATA_NAME DATA_PATH OUT_DIR [SEEDS]
# The same command with model.device=cpu gives the CPU numbers to set beside it.
set -euo pipefail
model=$1 data=$2 path=$3 out=$4 seeds=${5:-0}
mkdir -p "$out"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$out/env.txt"
python3 -m fibecfed compare --methods fedavg,fibecfed --seeds "$seeds" --no-progress --config bench --out "$out" \
    model.name="$model" data.name="$data" data.path="$path" model.device=cuda
