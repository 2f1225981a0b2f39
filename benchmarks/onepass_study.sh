#!/usr/bin/env bash
# The one-pass scaling study (issue 26), end to end: the world, the sweeps, the fits, and the files that
# docs/results/scaling.md reports (benchmarks/results/onepass/). Resumable: finished runs are skipped when run again.
#
#   bash benchmarks/onepass_study.sh WORK [SHARED_DATA]      # WORK: where the world and the sweeps go
#   FITS_ONLY=1 bash benchmarks/onepass_study.sh WORK       # refit and rewrite the results from the sweeps in WORK
#
# On a 2-core CPU, two sweeps side by side at one thread each: about 2 hours 20 minutes of wall time.
set -euo pipefail
work=$(realpath "${1:?usage: onepass_study.sh WORK [SHARED_DATA]}")
shared=${2:-$(dirname "$0")/../../shared/data}
here=$(cd "$(dirname "$0")" && pwd)
out=$here/results/onepass
mkdir -p "$work" "$out"
cd "$work"

if [ -z "${FITS_ONLY:-}" ]; then
  [ -f onepass-600k/bayes.json ] || kunlun data synth --out onepass-600k --examples 600k --seed 0 --events-per-user 100 \
    drift_days=20 short_term_weight=1.0 --quiet
  for m in kunlun interformer; do  # each model's sweeps in sequence, the two models side by side
    (kunlun sweep "$here/sweeps/onepass-$m.yaml" --data-dir . --out "sw-$m" &&
     kunlun sweep "$here/sweeps/onepass-layers-$m.yaml" --data-dir . --out "sw-layers-$m" &&
     kunlun sweep "$here/sweeps/onepass-ml1m-half-$m.yaml" --data-dir "$shared" --out "sw-ml1m-$m") &
  done
  wait
fi

cp onepass-600k/bayes.json onepass-600k/synth.json "$out/"
python "$here/points_csv.py" sw-kunlun sw-interformer > "$out/runs.csv"
python "$here/points_csv.py" sw-layers-kunlun sw-layers-interformer > "$out/layers-runs.csv"
python "$here/points_csv.py" sw-ml1m-kunlun sw-ml1m-interformer > "$out/ml1m-runs.csv"
for m in kunlun interformer; do
  kunlun fit "sw-$m" --frontier --holdout 2 --json --report "$out/$m" > "$out/$m.json"
  kunlun fit "sw-layers-$m" --x layers --holdout 1 --json --report "$out/layers-$m" > "$out/layers-$m.json"
done
kunlun fit sw-kunlun sw-interformer --frontier --holdout 2 --compare kunlun interformer --json --report "$out/compare" > "$out/compare.json"
kunlun fit sw-layers-kunlun sw-layers-interformer --x layers --holdout 1 --compare kunlun interformer --json \
  --report "$out/layers-compare" > "$out/layers-compare.json"
