#!/usr/bin/env bash
# The tuned quality table (issue 24, item 4): each model of the quality spec tuned by `kunlun tune` on one data set's
# validation split at the same budget, then trained from its best trial with every seed by `kunlun bench quality
# --tuned`. Everything resumes: a study continues where it stopped, finished runs are reused.
#
#   benchmarks/tuned_quality.sh OUT DATASET EXAMPLES TRIALS MODELS [--data-dir DIR]
#
#   OUT       folder: OUT/tune/<model>-<dataset> (studies), OUT/runs and OUT/quality.{md,json} (the table)
#   EXAMPLES  training examples per trial, the same for every model (e.g. 3 epochs of the data set's training split)
#   TRIALS    finished trials per study
#   MODELS    comma-separated, tuned in this order, then trained with every seed (run several copies with disjoint
#             MODELS to use several cores; each study has one process, so that no study runs past TRIALS)
#
# Example (the CPU budget of docs/results/quality.md):
#   benchmarks/tuned_quality.sh ~/tuned ml-100k 240000 10 kunlun,dnn,logistic_regression,interformer --data-dir ~/data &
#   benchmarks/tuned_quality.sh ~/tuned ml-100k 240000 10 dcnv2,din,wukong,bst --data-dir ~/data
# Set SEEDS (default 0,1,2,3,4) for the table's seeds. One torch thread per process (OMP_NUM_THREADS=1). When every copy
# has finished, the whole table (every run reused, nothing trained):
#   kunlun bench quality --tuned ~/tuned/tune --datasets ml-100k --seeds 0,1,2,3,4 --threads 1 --out ~/tuned --data-dir ~/data
set -euo pipefail
[ $# -ge 5 ] || { sed -n 6,7p "$0" >&2; exit 2; }
out=$1 dataset=$2 examples=$3 trials=$4 models=$5
shift 5
export OMP_NUM_THREADS=1
kunlun=${KUNLUN:-kunlun}
for model in ${models//,/ }; do
  $kunlun tune "$model" --dataset "$dataset" --study-root "$out/tune" --trials "$trials" --examples "$examples" --threads 1 "$@"
done
# these models' seeds; refused (one line, exit 2) unless their studies are finished at the same budget
$kunlun bench quality --tuned "$out/tune" --datasets "$dataset" --models "$models" --seeds "${SEEDS:-0,1,2,3,4}" --threads 1 \
  --out "$out" "$@"
