#!/usr/bin/env bash
# One visit to a lent GPU (the device tool): CUDA parity tests, the speed benchmark, end-to-end training on
# ML-1M users 1-2999, then the whole test suite, each step under its own time limit. Results go to $OUT.
# Carried: .whl (platformdirs, missing from the image), .gpudata/ml-1m-first-half (a copy of ../shared/data's).
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 KUNLUN_DATA=$PWD/.gpudata
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, kunlun; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), 'kunlun', kunlun.__version__)" | tee -a "$OUT/gpu.txt"
step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; echo "   rc=$rc in $((SECONDS - t0)) s"; tail -n "${TAILN:-6}" "$OUT/$name.log"; }
TAILN=12 step cuda_tests 120 python3 -m pytest -o addopts="" -q -rfs -p no:cacheprovider tests/test_cuda.py \
  tests/test_host_sync.py tests/test_formats.py::test_rht_and_stochastic_rounding_train_on_cuda
step speed_default 90 python3 -m kunlun bench speed --json --repeats 3
step speed_production 75 python3 -m kunlun bench speed --preset production --json --repeats 3 --no-trainer
for m in kunlun interformer; do
  step "train_$m" 55 python3 -m kunlun train --model "$m" --dataset ml-1m-first-half --epochs 1 --json --quiet --run-dir "/tmp/runs/$m"
done
# the whole suite as a GPU user runs it (the trainer picks CUDA when there is one): one line per test as it ends, so
# a suite cut off by its limit still says what passed and failed
TAILN=3 OMP_NUM_THREADS=1 step suite "${SUITE_LIMIT:-180}" python3 -m pytest -o addopts="" -v -p no:cacheprovider -n 14 tests/
echo "suite: $(grep -c ' PASSED' "$OUT/suite.log") passed, $(grep -c ' SKIPPED' "$OUT/suite.log") skipped"; grep -E ' (FAILED|ERROR) ' "$OUT/suite.log" | head -40
