#!/bin/bash
# The README's train.embedding_sharding=torchrec numbers: the tiny Kunlun of benchmarks/distributed.sh on ml-latest-small
# (2 epochs of 40 steps of 2,048 rows, one thread per process) with the embedding optimizer TorchRec's fused tables
# have (Adagrad) and no gradient clipping, trained by one process (plain nn.Embedding tables) and by 2 ranks with the
# tables in TorchRec. Needs TorchRec (pip install "kunlun[torchrec]"). Prints one line per run.
# Usage: bash benchmarks/torchrec.sh [OUT]   (OUT: where the run directories go; default a new temporary folder)
set -euo pipefail
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
PY=${PYTHON:-python}
CFG="model.d_model=16 model.num_layers=1 model.num_heads=2 model.num_seeds=4 model.seq_summary_tokens=2 model.summary_tokens=2
     model.fm_hidden=32 model.output_hidden=[32] data.max_seq_len=8 train.batch_size=2048 train.warmup_steps=5 train.epochs=2
     train.patience=0 train.threads=1 train.embedding_optimizer=adagrad train.embedding_lr=0.02 train.grad_clip=0"
$PY -m kunlun train --run-dir "$OUT/one" --quiet --json $CFG > /dev/null
$PY -m torch.distributed.run --standalone --nproc-per-node 2 -m kunlun train --run-dir "$OUT/torchrec" --quiet --json $CFG \
  train.embedding_sharding=torchrec > /dev/null
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("one", "torchrec"):
    f = json.loads((out / name / "final.json").read_text())
    m, d = f["metrics"], f.get("distributed") or {"world_size": 1}
    print(f"{name:8s} ranks {d['world_size']}  valid NE {m['valid']['ne']:.10f}  test NE {m['test']['ne']:.10f}  "
          f"test AUC {m['test']['auc']:.6f}  steps {f['steps']}  wall {f['wall_time_s']:.1f} s  {f['train_examples_per_s']:,.0f} train ex/s")
PY
