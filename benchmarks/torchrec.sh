#!/bin/bash
# The README's train.embedding_sharding=torchrec numbers: the tiny Kunlun of benchmarks/distributed.sh on ml-latest-small
# (2 epochs of 40 steps of 2,048 rows, one thread per process) with the embedding optimizer TorchRec's fused tables
# have (Adagrad) and no gradient clipping, trained by one process (plain nn.Embedding tables) and by 2 ranks with the
# tables in TorchRec. Needs TorchRec (pip install "kunlun[torchrec]"). Prints one line per run.
# Usage: bash benchmarks/torchrec.sh [OUT]   (OUT: where the run directories go; default a new temporary folder)
source "$(dirname "$0")/tiny_kunlun.sh"
CFG="$CFG train.embedding_optimizer=adagrad train.embedding_lr=0.02 train.grad_clip=0"
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
