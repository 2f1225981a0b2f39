#!/bin/bash
# The README's "Distributed training" numbers: the tiny Kunlun of the tests on ml-latest-small (2 epochs of 40 steps
# of 2,048 rows, one thread per process), trained by one process, then by 2 ranks with DDP, with row-sharded tables
# and with FSDP2; then 2 DDP ranks killed inside epoch 2 and resumed by one process. Prints one line per run.
# Usage: bash benchmarks/distributed.sh [OUT]   (OUT: where the run directories go; default a new temporary folder)
source "$(dirname "$0")/tiny_kunlun.sh"
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc-per-node 2"
$PY -m kunlun train --run-dir "$OUT/one" --quiet --json $CFG > /dev/null
$TORCHRUN -m kunlun train --run-dir "$OUT/ddp" --quiet --json $CFG > /dev/null
$TORCHRUN -m kunlun train --run-dir "$OUT/row" --quiet --json $CFG train.embedding_sharding=row > /dev/null
$TORCHRUN -m kunlun train --run-dir "$OUT/fsdp" --quiet --json $CFG train.distributed=fsdp > /dev/null
# killed (SIGTERM to torchrun) once the checkpoint of step 50 (epoch 2, step 10) is written, then resumed by one process
$TORCHRUN -m kunlun train --run-dir "$OUT/killed" --quiet --json $CFG train.checkpoint_every_steps=10 > /dev/null 2> "$OUT/killed.err" &
pid=$!
until grep -qs '"step": 50' "$OUT/killed/checkpoints/last/manifest.json"; do sleep 0.2; done
kill -TERM $pid; wait $pid || true
cp "$OUT/killed/checkpoints/last/manifest.json" "$OUT/killed-last-manifest.json"  # the 2-rank checkpoint resumed from
$PY -m kunlun train --resume "$OUT/killed" --quiet --json > /dev/null
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("one", "ddp", "row", "fsdp", "killed"):
    f = json.loads((out / name / "final.json").read_text())
    m, d = f["metrics"], f.get("distributed") or {"world_size": 1}
    print(f"{name:7s} ranks {d['world_size']}  valid NE {m['valid']['ne']:.10f}  test NE {m['test']['ne']:.10f}  "
          f"test AUC {m['test']['auc']:.6f}  steps {f['steps']}  wall {f['wall_time_s']:.1f} s  {f['train_examples_per_s']:,.0f} train ex/s")
resumes = [json.loads(line) for line in (out / "killed" / "resumes.jsonl").read_text().splitlines()]
print("killed: resumed at step", resumes[0]["step"], "on", resumes[0]["world_size"], "process(es); its last checkpoint was written by",
      json.loads((out / "killed-last-manifest.json").read_text()).get("world_size", 1), "process(es)")
PY
