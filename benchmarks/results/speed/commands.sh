# How the files in this folder were made (README "Speed"): code e26e8c2 (src a5cfb57b) for the new side, 89ff9b8
# (before the ops layer: the code issue 12 measured) for the old one, each from its own worktree, on the 2-core
# Intel Xeon with nothing else running, torch's default 2 threads.
#   git worktree add --detach ../old 89ff9b8 && git worktree add --detach ../new e26e8c2
set -u
NEW=../new OLD=../old
for r in 1 2; do  # end to end through the trainer, old / new / new without the window, alternating
  for side in old new newwin0; do
    case $side in old) src=$OLD/src extra="" ;; new) src=$NEW/src extra="" ;; newwin0) src=$NEW/src extra="model.window=0" ;; esac
    PYTHONPATH=$src python -m kunlun train --run-dir e2e-$side-$r --json train.max_steps=300 train.epochs=1 $extra
  done
done  # → end_to_end.csv (train_examples_per_s and test NE of each run's final.json)
for p in default d128; do PYTHONPATH=$NEW/src python -m kunlun bench speed --preset $p --json > speed-$p.json; done
PYTHONPATH=$NEW/src python -m kunlun bench speed --preset default --json train.compile=true > speed-default-compile.json
# the production preset's batch 1024 runs out of the CPU's 24 GiB: batch 64 here, no trainer column
PYTHONPATH=$NEW/src python -m kunlun bench speed --preset production --steps 5 --repeats 3 --no-trainer --json \
  train.batch_size=64 train.eval_batch_size=128 > speed-production.json
