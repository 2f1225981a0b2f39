# Sourced by benchmarks/distributed.sh and benchmarks/torchrec.sh: their shared set-up. OUT (the first argument, else a
# new temporary folder) holds the run directories; CFG is the tiny Kunlun of the tests on ml-latest-small (2 epochs of
# 40 steps of 2,048 rows, one thread per process).
set -euo pipefail
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
PY=${PYTHON:-python}
CFG="model.d_model=16 model.num_layers=1 model.num_heads=2 model.num_seeds=4 model.seq_summary_tokens=2 model.summary_tokens=2
     model.fm_hidden=32 model.output_hidden=[32] data.max_seq_len=8 train.batch_size=2048 train.warmup_steps=5 train.epochs=2
     train.patience=0 train.threads=1"
