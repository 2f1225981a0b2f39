"""Training speed side by side with FuxiCTR 2.3.10 on Frappe_x1, DNN and DCNv2 at the BARS settings (issue 12).

    python benchmarks/fuxictr_side_by_side.py --fuxictr-python /tmp/fuxi-venv/bin/python [--repeats 2] [--threads 1]

FuxiCTR runs from its own virtual environment (``python3.11 -m venv /tmp/fuxi-venv && /tmp/fuxi-venv/bin/pip
install fuxictr==2.3.10 "torch<2.14" "polars<2"``: 2.3.10 calls polars' ``scan_csv(dtypes=...)``, gone in
polars 2), never in this project's. Its pip package ships the library (layers, ``BaseModel`` with its
training loop, data pipeline) but not the model zoo, so the driver this script writes defines DNN and DCNv2
as the zoo does, from the library's own ``FeatureEmbedding``, ``MLP_Block`` and ``CrossNetV2``; nothing of
FuxiCTR's code is in this repository.

Both systems train on ``train.csv`` and validate on ``valid.csv`` (the BARS test split is held out and not
read; FuxiCTR gets no test set). The runs alternate (FuxiCTR, kunlun, FuxiCTR, kunlun, ...), each in its own
process with the same torch thread count, and the table quotes medians.

What "train ex/s" counts, on both sides: training examples / the wall time of the training epochs, without
data preprocessing (FuxiCTR's csv → parquet/npz build, done once before the timed runs; kunlun's prepared-data
cache), model construction, validation and checkpoint writing, and with each system's own batch loading during
the epochs (FuxiCTR's torch DataLoader over its npz arrays with ``num_workers`` worker processes; kunlun's
prefetch thread). FuxiCTR: ``BaseModel.train_epoch`` time minus its ``eval_step`` time (validation, checkpoint,
learning-rate decay), measured by a subclass. kunlun: ``final.json``'s ``train_examples_per_s`` (the same
definition, ``Trainer.train_epoch``). "valid AUC" is each run's kept model: FuxiCTR keeps the epoch of best
valid AUC (its monitor), and so does kunlun
(``train.monitor=auc``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEATURES = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]

# BARS Frappe_x1 settings (reczoo/BARS ranking/ctr: DNN_frappe_x1 tuner_config_02, DCNv2_frappe_x1 tuner_config_03):
# batch 4096, embedding 10, Adam lr 1e-3, embedding_regularizer 0.05 (λ/2·‖E‖² on the tables), net_regularizer 0,
# batch norm, up to 100 epochs, early stop on valid AUC with patience 2 and the learning rate ×0.1 on each plateau.
BARS_COMMON = {"batch_size": 4096, "embedding_dim": 10, "learning_rate": 1e-3, "optimizer": "adam",
               "embedding_regularizer": 0.05, "net_regularizer": 0, "batch_norm": True, "epochs": 100,
               "early_stop_patience": 2, "monitor": "AUC", "monitor_mode": "max"}
BARS = {
    "dnn": {"model": "DNN", "hidden_units": [400, 400, 400], "net_dropout": 0.2},
    "dcnv2": {"model": "DCNv2", "model_structure": "parallel", "use_low_rank_mixture": False, "num_cross_layers": 4,
              "parallel_dnn_hidden_units": [400, 400, 400], "net_dropout": 0.4},
}
# the same settings as kunlun config keys (train.schedule=plateau and train.monitor=auc are FuxiCTR's
# reduce-on-plateau and AUC monitor). Not BARS keys but FuxiCTR defaults the BARS runs used, matched too: embedding
# rows initialised N(0, 1e-4²) (model.embedding_std), gradient norm clipped at 10, Adam without weight decay on the
# dense weights, no warm-up. Left different: FuxiCTR initialises Linear weights Xavier-normal (kunlun: torch's
# default), adds the embedding penalty to the loss before clipping (kunlun: in the optimizer after clipping; the
# same gradient unless clipping binds), and counts an AUC gain below 1e-6 as no improvement.
KUNLUN_COMMON = ["train.batch_size=4096", "model.d_model=10", "train.lr=1e-3", "train.embedding_lr=1e-3",
                 "train.embedding_l2=0.05", "train.weight_decay=0", "model.batch_norm=true", "model.embedding_std=1e-4",
                 "train.grad_clip=10", "train.warmup_steps=0", "train.schedule=plateau", "train.monitor=auc",
                 "train.epochs=100", "train.patience=2"]
KUNLUN = {
    "dnn": ["model.hidden=[400,400,400]", "model.dropout=0.2"],
    "dcnv2": ["model.cross_layers=4", "model.hidden=[400,400,400]", "model.dropout=0.4"],
}

# Runs inside FuxiCTR's environment: argv[1] is a JSON file of parameters; prints one "RESULT {...}" line.
FUXICTR_DRIVER = r'''
import json, logging, os, sys, time
import numpy as np
p = json.load(open(sys.argv[1]))
import torch
torch.set_num_threads(p["threads"])
from torch import nn
import fuxictr
from fuxictr.features import FeatureMap
from fuxictr.preprocess import FeatureProcessor, build_dataset
from fuxictr.pytorch.dataloaders import RankDataLoader
from fuxictr.pytorch.layers import CrossNetV2, FeatureEmbedding, MLP_Block
from fuxictr.pytorch.models import BaseModel
from fuxictr.pytorch.torch_utils import seed_everything

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")


class Timed(BaseModel):
    """BaseModel's own training loop, timed: epochs minus evaluation (validation, checkpoint, lr decay)."""

    def start_timing(self):
        self.epoch_seconds, self.eval_seconds, self.examples, self.aucs = 0.0, 0.0, 0, []

    def train_epoch(self, data_generator):
        t0 = time.perf_counter()
        super().train_epoch(data_generator)
        self.epoch_seconds += time.perf_counter() - t0

    def eval_step(self):
        t0 = time.perf_counter()
        super().eval_step()
        self.eval_seconds += time.perf_counter() - t0

    def train_step(self, batch_data):
        self.examples += len(batch_data[self.feature_map.labels[0]])
        return super().train_step(batch_data)

    def checkpoint_and_earlystop(self, logs, min_delta=1e-6):
        self.aucs.append(float(logs["AUC"]))
        return super().checkpoint_and_earlystop(logs, min_delta)


class DNN(Timed):
    def __init__(self, feature_map, **kw):
        super().__init__(feature_map, **kw)
        self.embedding_layer = FeatureEmbedding(feature_map, kw["embedding_dim"])
        self.mlp = MLP_Block(feature_map.sum_emb_out_dim(), hidden_units=kw["hidden_units"], hidden_activations="ReLU",
                             output_dim=1, output_activation=self.output_activation, dropout_rates=kw["net_dropout"],
                             batch_norm=kw["batch_norm"])
        self.compile(kw["optimizer"], kw["loss"], kw["learning_rate"])
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs):
        return {"y_pred": self.mlp(self.embedding_layer(self.get_inputs(inputs), flatten_emb=True))}


class DCNv2(Timed):  # the parallel structure, full-rank cross layers
    def __init__(self, feature_map, **kw):
        super().__init__(feature_map, **kw)
        self.embedding_layer = FeatureEmbedding(feature_map, kw["embedding_dim"])
        width = feature_map.sum_emb_out_dim()
        self.crossnet = CrossNetV2(width, kw["num_cross_layers"])
        self.parallel_dnn = MLP_Block(width, hidden_units=kw["parallel_dnn_hidden_units"], hidden_activations="ReLU",
                                      output_dim=None, dropout_rates=kw["net_dropout"], batch_norm=kw["batch_norm"])
        self.fc = nn.Linear(width + kw["parallel_dnn_hidden_units"][-1], 1)
        self.compile(kw["optimizer"], kw["loss"], kw["learning_rate"])
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs):
        x = self.embedding_layer(self.get_inputs(inputs), flatten_emb=True)
        return {"y_pred": self.output_activation(self.fc(torch.cat([self.crossnet(x), self.parallel_dnn(x)], dim=-1)))}


seed_everything(seed=p["seed"])
data_dir = os.path.join(p["data_root"], p["dataset_id"])
p["train_data"], p["valid_data"], p["test_data"] = build_dataset(FeatureProcessor(**p), **p)
for split in ("train", "valid"):  # the npz arrays FuxiCTR's NpzDataLoader reads, from its own parquet output
    npz = os.path.join(data_dir, split + ".npz")
    if not os.path.exists(npz):
        import pandas as pd
        frame = pd.read_parquet(os.path.join(data_dir, split + ".parquet"))
        np.savez(npz[:-4] + ".tmp.npz", **{c: frame[c].to_numpy() for c in frame.columns})
        os.replace(npz[:-4] + ".tmp.npz", npz)
    p[split + "_data"] = npz
p["data_format"] = "npz"
if p.get("prepare_only"):
    sys.exit(0)
feature_map = FeatureMap(p["dataset_id"], data_dir)
feature_map.load(os.path.join(data_dir, "feature_map.json"), p)
model = {"DNN": DNN, "DCNv2": DCNv2}[p["model"]](feature_map, **p)
os.makedirs(model.model_dir, exist_ok=True)
model.start_timing()
train_gen, valid_gen = RankDataLoader(feature_map, stage="train", **p)
model.fit(train_gen, validation_data=valid_gen, **p)
train_seconds = model.epoch_seconds - model.eval_seconds
print("RESULT " + json.dumps({
    "valid_auc": max(model.aucs), "epochs": len(model.aucs), "best_epoch": 1 + model.aucs.index(max(model.aucs)),
    "train_examples": model.examples, "train_seconds": train_seconds, "train_examples_per_s": model.examples / train_seconds,
    "parameters": sum(x.numel() for x in model.parameters()), "fuxictr": fuxictr.__version__, "torch": torch.__version__}))
'''


def fuxictr_params(model: str, args: argparse.Namespace, work: Path, seed: int, prepare_only: bool = False) -> dict:
    data = Path(args.data_dir) / "frappe_x1"
    return {
        "threads": args.threads, "seed": seed, "data_root": str(work / "fuxictr-data"), "dataset_id": "frappe_x1",
        "data_format": "csv", "train_data": str(data / "train.csv"), "valid_data": str(data / "valid.csv"),
        "test_data": None, "min_categr_count": 1,
        "feature_cols": [{"active": True, "dtype": "str", "name": FEATURES, "type": "categorical"}],
        "label_col": {"dtype": "float", "name": "label"},
        "model_id": f"{model}_{seed}", "model_root": str(work / "fuxictr-checkpoints"), "task": "binary_classification",
        "loss": "binary_crossentropy", "metrics": ["AUC", "logloss"], "shuffle": True, "save_best_only": True,
        "eval_steps": None, "verbose": 0, "num_workers": args.fuxictr_workers, "prepare_only": prepare_only,
        **BARS_COMMON, **BARS[model], **({"epochs": args.max_epochs} if args.max_epochs else {}),
    }


def run(cmd: list[str], env: dict[str, str], log: Path) -> str:
    with open(log, "w") as out:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=out, text=True)
    if proc.returncode:
        sys.exit(f"{shlex.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return proc.stdout


def run_fuxictr(model: str, args: argparse.Namespace, work: Path, seed: int, env: dict[str, str], tag: str,
                prepare_only: bool = False) -> dict:
    cfg = work / f"fuxictr-{tag}.json"
    cfg.write_text(json.dumps(fuxictr_params(model, args, work, seed, prepare_only)))
    out = run([args.fuxictr_python, str(work / "fuxictr_driver.py"), str(cfg)], env, work / f"fuxictr-{tag}.log")
    if prepare_only:
        return {}
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run_kunlun(model: str, args: argparse.Namespace, work: Path, seed: int, env: dict[str, str], tag: str) -> dict:
    run_dir = work / f"kunlun-{tag}"
    cmd = [args.kunlun_python, "-m", "kunlun", "train", "--model", model, "--dataset", "frappe_x1",
           "--data-dir", str(args.data_dir), "--run-dir", str(run_dir), "--quiet", "--seed", str(seed),
           f"train.threads={args.threads}", *KUNLUN_COMMON, *KUNLUN[model], *args.kunlun_override,
           *([f"train.epochs={args.max_epochs}"] if args.max_epochs else [])]
    run(cmd, {**env, "PYTHONPATH": str(ROOT / "src")}, work / f"kunlun-{tag}.log")
    final = json.loads((run_dir / "final.json").read_text())
    examples, rate = final["train_examples"], final["train_examples_per_s"]
    return {"valid_auc": final["metrics"]["valid"]["auc"], "epochs": final["epochs_run"], "best_epoch": final["best_epoch"],
            "train_examples": examples, "train_seconds": examples / rate, "train_examples_per_s": rate,
            "parameters": final["parameters"]["total"], "commit": final["code"].get("label")}


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def table(results: dict, models: list[str]) -> str:
    lines = ["| model | system | valid AUC (median; runs) | train ex/s (median; runs) | epochs | training s | ratio |",
             "|---|---|---|---|---|---|---|"]
    for model in models:
        med = {}
        for system in ("fuxictr", "kunlun"):
            rs = results[model][system]
            med[system] = statistics.median(r["train_examples_per_s"] for r in rs)
            aucs = ", ".join(f"{r['valid_auc']:.4f}" for r in rs)
            rates = ", ".join(f"{r['train_examples_per_s']:,.0f}" for r in rs)
            ratio = "1.00×" if system == "fuxictr" else f"**{med['kunlun'] / med['fuxictr']:.2f}×**"
            name = "FuxiCTR 2.3.10" if system == "fuxictr" else "kunlun"
            lines.append(f"| {model} | {name} | {statistics.median(r['valid_auc'] for r in rs):.4f} ({aucs}) | "
                         f"{med[system]:,.0f} ({rates}) | {', '.join(str(r['epochs']) for r in rs)} | "
                         f"{statistics.median(r['train_seconds'] for r in rs):.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fuxictr-python", required=True, help="python of a venv with fuxictr==2.3.10")
    ap.add_argument("--kunlun-python", default=sys.executable)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="folder holding frappe_x1/")
    ap.add_argument("--models", default="dnn,dcnv2")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run (both systems)")
    ap.add_argument("--fuxictr-workers", type=int, default=1, help="FuxiCTR DataLoader worker processes")
    ap.add_argument("--seed", type=int, default=2021, help="seed of repeat 0; repeat r uses seed + r")
    ap.add_argument("--kunlun-override", action="append", default=[], help="extra kunlun config override (repeatable)")
    ap.add_argument("--max-epochs", type=int, default=0, help="cap both systems' epochs (a quick check, not the benchmark)")
    ap.add_argument("--work", help="folder for configs, logs and run records (default: a new temporary folder)")
    ap.add_argument("--json", help="write every run's numbers here")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if unknown := sorted(set(models) - set(BARS)):
        sys.exit(f"--models: unknown {unknown[0]!r}; known: {', '.join(BARS)}")
    if not (Path(args.data_dir) / "frappe_x1" / "train.csv").is_file():
        sys.exit(f"--data-dir {args.data_dir}: no frappe_x1/train.csv there")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fuxictr-side-by-side-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "fuxictr_driver.py").write_text(FUXICTR_DRIVER)
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONHASHSEED": "0"}
    print(f"work folder: {work}", file=sys.stderr)
    run_fuxictr(models[0], args, work, args.seed, env, "prepare", prepare_only=True)  # csv → parquet → npz, untimed
    results: dict = {m: {"fuxictr": [], "kunlun": []} for m in models}
    for r in range(args.repeats):
        for model in models:
            seed = args.seed + r
            for system, fn in (("fuxictr", run_fuxictr), ("kunlun", run_kunlun)):
                t0 = time.time()
                res = fn(model, args, work, seed, env, f"{model}-{r}")
                results[model][system].append(res)
                if args.json:  # after every run, so an interrupted benchmark keeps what it measured
                    Path(args.json).write_text(json.dumps({"results": results, "commit": git_commit()}, indent=1))
                print(f"repeat {r} {model} {system}: valid AUC {res['valid_auc']:.4f}, {res['train_examples_per_s']:,.0f} "
                      f"train ex/s, {res['epochs']} epochs ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    command = shlex.join([Path(sys.executable).name, "benchmarks/fuxictr_side_by_side.py", *sys.argv[1:]])
    print(table(results, models))
    print(f"\nkunlun commit {git_commit()}; FuxiCTR {results[models[0]]['fuxictr'][0]['fuxictr']}; {args.threads} torch "
          f"thread(s) each, FuxiCTR DataLoader workers {args.fuxictr_workers}; {args.repeats} alternating repeats, "
          f"seeds {args.seed}..{args.seed + args.repeats - 1}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.\n`{command}`")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "command": command, "commit": git_commit()}, indent=1))


if __name__ == "__main__":
    main()
