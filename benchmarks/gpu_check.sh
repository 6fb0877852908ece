#!/usr/bin/env bash
# The GPU proof in one device call of at most 10 minutes: everything palikit runs on CUDA, on a real
# GPU. Run from the repo root on a machine with CUDA, with the python that holds torch there
# (PY=python3 by default; palikit is used from this checkout, not installed). Writes under $OUT:
#   summary.txt          each step's exit status and seconds
#   nvidia-smi.txt       the GPU
#   tests.log            pytest -m gpu (tests/test_gpu.py, tests/test_flex_attention.py's GPU test)
#   inference.log/.json  bench_inference.py --device cuda on a random PaliGemma 2 3B-224 written here
#   serve.log            bench_serve.py with the model on the GPU
# Every step is capped (timeout), so a hang costs its cap and the later steps still run.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

step() {  # step SECONDS NAME COMMAND...: run it capped, its output in $OUT/NAME.log
  local cap=$1 name=$2 start=$SECONDS rc
  shift 2
  echo "== $name (at most ${cap} s)"
  timeout --signal=INT --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  >> "$OUT/summary.txt" 2>&1
step 210 tests "$PY" -m pytest -m gpu -q -p no:cacheprovider -x --timeout 180 tests/test_gpu.py tests/test_flex_attention.py
step 240 inference "$PY" benchmarks/bench_inference.py --device cuda --new-tokens 128 \
  --columns palikit palikit-compile transformers-eager transformers-sdpa --out "$OUT/inference.json"
step 100 serve "$PY" benchmarks/bench_serve.py --device cuda
