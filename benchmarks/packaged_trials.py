"""Each model's packaged configuration trained as a tuning study's packaged trial would train it (the model's
quality-spec overrides on the data set, the budget's training examples and validations, the study's seed 0), for a
study made before studies had that trial: if no model's packaged trial beats its study's best drawn trial on
validation, the old study's best trials are those the current protocol gives (the packaged trial draws nothing and
takes no draw index, so the drawn trials are the same).

    python benchmarks/packaged_trials.py DATASET EXAMPLES MODELS --out DIR [--data-dir DIR] [--validations N]

Prints each model's best validation NE; each run's record is in DIR/<model>/ (final.json, epochs.jsonl). A finished
run is reported, not trained again; an unfinished one starts over.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from kunlun.data.registry import prepare_dataset
from kunlun.runs import read_json
from kunlun.training.trainer import Trainer
from kunlun.tuning import Budget, base_overrides, load_search_space, trial_config


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("examples", type=int)
    ap.add_argument("models")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--validations", type=int, default=None, help="per trial (default: the search-space file's budget)")
    args = ap.parse_args(argv)
    data = prepare_dataset(args.dataset, args.data_dir)
    rows = len(data.splits["train"])
    settings = {"seed": 0, "threads": 1, "data_dir": args.data_dir}
    for model in args.models.split(","):
        run = args.out / model
        if (run / "final.json").is_file():  # finished: report it (seeded, so training again gives the same)
            print(f"{model}: best valid NE {read_json(run / 'final.json')['metrics']['valid']['ne']:.4f} (finished run, {run})")
            continue
        if run.exists():  # a run killed part way: start it over, as a study does with a killed trial
            shutil.rmtree(run)
        validations = args.validations or load_search_space(model)[0].validations
        cfg = trial_config(model, args.dataset, base_overrides(model, args.dataset), [], Budget(1, args.examples, validations),
                           rows, settings)
        valid: list[float] = []
        trainer = Trainer(cfg, data, run, progress=False, logger=lambda _: None, on_validation=lambda r, v=valid: v.append(r["valid"]["ne"]),
                          final_splits=("valid",))
        trainer.start_record()
        trainer.fit()
        print(f"{model}: best valid NE {min(valid):.4f} at validation {valid.index(min(valid)) + 1} of {len(valid)}", flush=True)


if __name__ == "__main__":
    main()
