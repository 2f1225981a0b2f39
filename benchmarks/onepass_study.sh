#!/usr/bin/env bash
# The one-pass scaling study (issue 26), end to end: the world, the sweeps, the fits, and the files that
# docs/results/scaling.md reports. Resumable: finished runs are skipped when run again.
#
#   bash benchmarks/onepass_study.sh WORK [SHARED_DATA]          # WORK: where the world and the sweeps go
#   SIZE=3m bash benchmarks/onepass_study.sh WORK                 # the same study on the 3M world (onepass3m-*.yaml)
#   FITS_ONLY=1 bash benchmarks/onepass_study.sh WORK             # refit and rewrite the results from the sweeps in WORK
#
# SIZE=600k (default): the world onepass-600k, sweeps onepass-*.yaml, ML-1M users 1–2999 too; results in
# benchmarks/results/onepass/. On a 2-core CPU, two sweeps side by side at one thread each: about 2 h 20 min of wall time.
# SIZE=3m: the world onepass-3m (2.4M training rows), sweeps onepass3m-*.yaml; results in benchmarks/results/onepass3m/,
# finished runs' records in its records/ (benchmarks/run_records.py), restored into WORK before the sweeps.
# About 5.5 core-hours on a 2-core AMD EPYC at one thread per run (summed run times at 2c175d8: grids 1.1 h Kunlun,
# 1.6 h InterFormer; layer sweeps 0.8 h and 1.4 h; the d_model-32 rate check 0.5 h; the embedding-rate scans not
# recorded); about 3 h of wall time with the two models side by side.
set -euo pipefail
work=$(realpath "${1:?usage: onepass_study.sh WORK [SHARED_DATA]}")
shared=${2:-$(dirname "$0")/../../shared/data}
here=$(cd "$(dirname "$0")" && pwd)
size=${SIZE:-600k}
case $size in
  600k) world=onepass-600k prefix=onepass tag= ;;  # tag: the sweeps' folders sw$tag-<model> (the 600k study's as before)
  3m) world=onepass-3m prefix=onepass3m tag=3m ;;
  *) echo "onepass_study.sh: SIZE is 600k or 3m, not $size" >&2; exit 2 ;;
esac
out=$here/results/$prefix
mkdir -p "$work" "$out"
cd "$work"
# The 3M study outlives a machine: finished runs' records (no checkpoints) are kept in the repository and put back
# here, so kunlun sweep skips them when run by the code that trained them (their final.json names it).
records=$out/records
if [ "$size" = 3m ] && [ -d "$records" ]; then python "$here/run_records.py" restore "$records" .; fi

if [ -z "${FITS_ONLY:-}" ]; then
  [ -f $world/bayes.json ] || kunlun data synth --out $world --examples $size --seed 0 --events-per-user 100 \
    drift_days=20 short_term_weight=1.0 --quiet
  for m in kunlun interformer; do  # each model's sweeps in sequence, the two models side by side
    (if [ "$size" = 3m ]; then  # the embedding-rate scan that chose the rate the 3M sweeps pin
       kunlun sweep "$here/sweeps/$prefix-elr-$m.yaml" --data-dir . --out "sw$tag-elr-$m"
     fi &&
     kunlun sweep "$here/sweeps/$prefix-$m.yaml" --data-dir . --out "sw$tag-$m" &&
     kunlun sweep "$here/sweeps/$prefix-layers-$m.yaml" --data-dir . --out "sw$tag-layers-$m" &&
     if [ "$size" = 3m ]; then  # is d_model 32 off the frontier only because the dense rate was chosen at 16?
       kunlun sweep "$here/sweeps/$prefix-d32lr-$m.yaml" --data-dir . --out "sw$tag-d32lr-$m"
     fi &&
     if [ "$size" = 600k ]; then
       kunlun sweep "$here/sweeps/onepass-ml1m-half-$m.yaml" --data-dir "$shared" --out "sw-ml1m-$m"
     fi) &
  done
  wait
  if [ "$size" = 3m ]; then python "$here/run_records.py" save . "$records"; fi
fi

if [ -f $world/bayes.json ]; then cp $world/bayes.json $world/synth.json "$out/"; fi  # FITS_ONLY from records: kept
python "$here/points_csv.py" "sw$tag-kunlun" "sw$tag-interformer" > "$out/runs.csv"
python "$here/points_csv.py" "sw$tag-layers-kunlun" "sw$tag-layers-interformer" > "$out/layers-runs.csv"
if [ "$size" = 600k ]; then python "$here/points_csv.py" sw-ml1m-kunlun sw-ml1m-interformer > "$out/ml1m-runs.csv"; fi
if [ "$size" = 3m ] && [ -d sw3m-elr-kunlun ]; then  # the scans' records were lost with a machine; their CSV is kept
  python "$here/points_csv.py" sw3m-elr-kunlun sw3m-elr-interformer > "$out/elr-runs.csv"
fi
if [ "$size" = 3m ] && [ -d sw3m-d32lr-interformer ]; then python "$here/points_csv.py" sw3m-d32lr-kunlun sw3m-d32lr-interformer > "$out/d32lr-runs.csv"; fi
for m in kunlun interformer; do
  kunlun fit "sw$tag-$m" --frontier --holdout 2 --json --report "$out/$m" > "$out/$m.json"
  kunlun fit "sw$tag-layers-$m" --x layers --holdout 1 --json --report "$out/layers-$m" > "$out/layers-$m.json"
done
kunlun fit "sw$tag-kunlun" "sw$tag-interformer" --frontier --holdout 2 --compare kunlun interformer --json \
  --report "$out/compare" > "$out/compare.json"
kunlun fit "sw$tag-layers-kunlun" "sw$tag-layers-interformer" --x layers --holdout 1 --compare kunlun interformer --json \
  --report "$out/layers-compare" > "$out/layers-compare.json"
