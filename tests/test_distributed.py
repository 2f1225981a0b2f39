"""Training on 2 CPU processes (gloo, started by torchrun): one run record from rank 0, the same training as one
process on the same global batches (up to float summation order), the same metrics as one process bit for bit, and
checkpoints that resume on 2 ranks exactly and on 1 rank.

Two launches of 2 processes in all (module fixtures): ``kunlun train`` under torchrun, then
``distributed_scenario.py`` (kill, resume, FSDP, the metric reduction on random predictions).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_MODEL
from kunlun.config import load_config
from kunlun.data import synthetic as S
from kunlun.data.batches import Batcher
from kunlun.data.registry import prepare_dataset
from kunlun.errors import KunlunError
from kunlun.training.checkpoint import load_weights
from kunlun.training.distributed import World, check_world, shard_scale
from kunlun.training.distributed import shares as rank_rows
from kunlun.training.runner import evaluate_run, load_trained, train_run
from kunlun.training.step import set_seed
from kunlun.training.trainer import Trainer, build

HERE = Path(__file__).parent
# 4,876 training rows: 8 batches of 608, then one of 12 rows, all rank 0's (rank 1 trains a stand-in row with weight
# 0); 629 validation rows in evaluation batches of 128: the last global evaluation batch leaves rank 1 nothing
# train.lr=0.001: a rate at which epoch 2 is the best (test_fsdp_trains_as_ddp… loads `last` as `best`)
CFG = [*TINY_MODEL, "train.batch_size=608", "train.eval_batch_size=128", "train.epochs=2", "train.patience=0", "train.threads=1",
       "train.lr=0.001"]
REL_TOL = 1e-3  # relative differences of weights and optimizer moments, 2 ranks vs 1 (measured ≤ 6e-5)
NE_TOL = 1e-5
AUC_TOL = 1e-4  # ~9 of the ~10⁵ positive-negative pairs of the 629 validation rows ordered the other way


def torchrun(root: Path, *args: str, processes: int = 2, gpus: bool = False) -> subprocess.CompletedProcess:
    """``processes`` ranks under torchrun; on CPUs (gloo) unless ``gpus``, also on a machine that has a GPU (where
    each rank would otherwise take one, and a second rank on a one-GPU machine stops with exit status 2)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KUNLUN_CACHE": str(root / "cache")}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A small synthetic world (6,000 impressions), and the 2-rank ``kunlun train`` run of CFG on it (``cli``)."""
    root = tmp_path_factory.mktemp("dist")
    S.generate(root / "w", 6000, seed=3, world=S.World(items=2000, events_per_user=30))
    r = torchrun(root, "-m", "kunlun", "train", "--dataset", str(root / "w"), "--run-dir", str(root / "cli"), "--json", "--quiet", *CFG)
    assert r.returncode == 0, r.stderr[-3000:]
    (root / "cli.out").write_text(r.stdout)
    (root / "cli.err").write_text(r.stderr)
    return root


@pytest.fixture(scope="module")
def scenario(root):
    r = torchrun(root, str(HERE / "distributed_scenario.py"), str(root))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((root / "scenario.json").read_text())


def cfg_of(root: Path, *extra: str):
    return load_config(None, [*CFG, *extra], dataset=str(root / "w"))


def test_torchrun_kunlun_train_writes_one_run_record_from_rank_0(root):
    out, err = (root / "cli.out").read_text(), (root / "cli.err").read_text()
    run = root / "cli"
    final = json.loads((run / "final.json").read_text())
    assert out.strip().splitlines() == [json.dumps(final["metrics"])]  # one JSON object: rank 0's
    assert err.count("run record:") == 1 and err.count("epoch 2: train loss") == 1  # logs from rank 0 only
    assert final["distributed"] == {"world_size": 2, "backend": "gloo", "strategy": "ddp", "embedding_sharding": "none"}
    assert json.loads((run / "environment.json").read_text())["distributed"]["world_size"] == 2
    assert final["steps"] == 18 and final["train_examples"] == 2 * 4876  # global steps and examples, as one process counts
    assert len((run / "epochs.jsonl").read_text().splitlines()) == 2
    last = json.loads((run / "checkpoints" / "last" / "manifest.json").read_text())
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "trainer_state.pt"} <= set(last["files"])
    assert last["world_size"] == 2 and not (run / "checkpoints" / "last" / "model.safetensors").exists()
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()  # one file, for eval / export / serve


@pytest.fixture(scope="module")
def single(root, tmp_path_factory):
    """CFG trained by one process: (its trainer holding the last state, final.json)."""
    cfg = cfg_of(root)
    d = tmp_path_factory.mktemp("one")
    data = prepare_dataset(cfg.data.dataset, use_cache=False)  # a module fixture: outside the per-test cache, so none
    one = Trainer(cfg, data, d, progress=False, logger=lambda m: None)
    one.start_record()
    final = one.fit()
    one.resume(d / "checkpoints" / "last")  # fit() ends holding the best weights; the last state is here
    return one, final


def assert_trained_as_one_process(one: Trainer, run: Path) -> None:
    """The last checkpoint of the 2-rank ``run`` (read by one process) against ``one``: weights, Adam's moments,
    steps, metrics."""
    cfg = one.cfg
    two = Trainer(cfg, one.data, run.parent / f"{run.name}-read", progress=False, logger=lambda m: None)
    two.resume(run / "checkpoints" / "last")  # the 2-rank DCP checkpoint, read by one process
    assert (two.state.step, two.state.train_examples) == (one.state.step, one.state.train_examples) == (18, 2 * 4876)
    set_seed(cfg.train.seed)
    start = flat(build(cfg, one.data).state_dict().values())
    a, b = flat(one.model.state_dict().values()), flat(two.model.state_dict().values())
    assert float((a - b).norm() / (a - start).norm()) < REL_TOL
    for key in ("exp_avg", "exp_avg_sq"):
        x, y = (flat(st[key] for o in t.optimizers for st in o.state_dict()["state"].values()) for t in (one, two))
        assert float((x - y).norm() / x.norm()) < REL_TOL, key


def assert_metrics_close(a: dict, b: dict) -> None:
    for split in ("valid", "test"):
        for key, tol in (("ne", NE_TOL), ("auc", AUC_TOL)):
            assert abs(a[split][key] - b[split][key]) < tol, (split, key)


def test_two_ranks_train_as_one_process_on_the_same_global_batches(root, single):
    """After 18 steps (the last batch of each epoch all rank 0's), the weights and Adam's moments of the 2-rank run
    equal those of one process up to float summation order: measured ‖Δ‖/‖movement‖ 6e-5 for the weights, ‖Δ‖/‖m‖ 4e-5
    and 2e-6 for the first and second moments. (Adam's update is nearly scale-free, so the weights alone would miss
    gradients summed instead of averaged; the moments do not.)"""
    one, final1 = single
    assert_trained_as_one_process(one, root / "cli")
    assert_metrics_close(final1["metrics"], json.loads((root / "cli" / "final.json").read_text())["metrics"])


def test_validation_inside_epochs_on_two_ranks_is_that_of_one_process(root, tmp_path):
    """train.eval_every_steps=3 on 2 ranks: every rank validates (a collective) at the same steps, inside the epochs
    of 9 steps and at their ends, and rank 0 records the validations one process records, with its metrics."""
    run = root / "evals"
    r = torchrun(root, "-m", "kunlun", "train", "--dataset", str(root / "w"), "--run-dir", str(run), "--json", "--quiet", *CFG,
                 "train.eval_every_steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = cfg_of(root, "train.eval_every_steps=3")
    one = Trainer(cfg, prepare_dataset(cfg.data.dataset, use_cache=False), tmp_path / "one", progress=False, logger=lambda m: None)
    one.start_record()
    one.fit()
    two = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    assert [(v["step"], v["end_of_epoch"]) for v in two] == [(3, False), (6, False), (9, True), (12, False), (15, False), (18, True)]
    assert [(v["step"], v["examples"]) for v in two] == [(v["step"], v["examples"]) for v in one.history]
    for a, b in zip(two, one.history):
        assert abs(a["valid"]["ne"] - b["valid"]["ne"]) < NE_TOL and abs(a["valid"]["auc"] - b["valid"]["auc"]) < AUC_TOL


def test_row_sharded_tables_train_as_one_process(root, scenario, single):
    """train.embedding_sharding=row: each rank holds half of every vocabulary table (and its Adam state), and the run
    still trains as one process does; its checkpoint reshards to one process."""
    assert scenario["row_item_rows"] == [[1067, 534], [1067, 533]]
    one, final1 = single
    assert_trained_as_one_process(one, root / "row")
    assert_metrics_close(final1["metrics"], scenario["row"])


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten().double() for t in tensors])


def test_metrics_of_two_ranks_are_those_of_one_process_bit_for_bit(root, scenario):
    reduced = scenario["metric_reduction"]
    assert reduced["rows_in_order"]  # every rank's rows gathered back into the split's row order
    assert reduced["sharded"] == reduced["single"]  # random scores with ties: the metrics of the whole split at once
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run did: the same kernels, the same probabilities
    try:
        again = evaluate_run(root / "cli")  # one process scoring the 2-rank run's best checkpoint
    finally:
        torch.set_num_threads(threads)
    assert again == json.loads((root / "cli" / "final.json").read_text())["metrics"]


def test_a_two_rank_checkpoint_resumes_on_two_ranks_exactly_and_on_one_rank(root, scenario, tmp_path):
    final2 = json.loads((root / "cli" / "final.json").read_text())
    assert scenario["resumed"] == final2["metrics"]  # killed at step 14, resumed from step 12 on 2 ranks: bit for bit

    cfg = cfg_of(root, "train.checkpoint_every_steps=12")  # the killed run's (a key that changes nothing it computes)
    data = prepare_dataset(cfg.data.dataset)
    copy = root / "killed-for-1-rank"
    loaded = Trainer(cfg, data, tmp_path / "scratch", progress=False, logger=lambda m: None)
    loaded.resume(copy / "checkpoints" / "last")
    torch.set_num_threads(1)
    assert loaded.state.step == scenario["after_load"]["step"] == 12
    assert loaded.evaluate("valid") == scenario["after_load"]["valid"]  # the same model on 1 rank as on 2
    two = torch.load(root / "optimizers-2.pt", weights_only=True)
    for o, saved in zip(loaded.optimizers, two, strict=True):
        mine = o.state_dict()
        assert mine["param_groups"] == saved["param_groups"]
        for i, st in saved["state"].items():
            for k, v in st.items():
                assert torch.equal(mine["state"][i][k], v), (i, k)

    final1 = train_run(cfg, copy, resume=True, progress=False, logger=lambda m: None)  # continued on 1 rank
    assert final1["steps"] == final2["steps"] and final1["train_examples"] == final2["train_examples"]
    for split in ("valid", "test"):
        assert abs(final1["metrics"][split]["ne"] - final2["metrics"][split]["ne"]) < NE_TOL
    worlds = [json.loads(line)["world_size"] for line in (copy / "resumes.jsonl").read_text().splitlines()]
    assert worlds == [1]


def test_fsdp_trains_as_ddp_and_its_checkpoints_load_in_one_process(root, scenario):
    ddp = json.loads((root / "cli" / "final.json").read_text())["metrics"]
    assert_metrics_close(scenario["fsdp"], ddp)
    cfg, _, model = load_trained(root / "fsdp")  # checkpoints/best: one safetensors file gathered from the shards
    assert cfg.train.distributed == "fsdp"
    last = build(cfg, prepare_dataset(cfg.data.dataset))
    load_weights(root / "fsdp" / "checkpoints" / "last", last)  # the sharded DCP checkpoint, in one process
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), last.state_dict().values()))  # best = last (epoch 2)


def test_every_rank_takes_its_share_of_each_global_batch():
    cfg = load_config(None, [*TINY_MODEL, "train.batch_size=2048"])
    data = prepare_dataset(cfg.data.dataset)
    b = Batcher(data, "valid", 8)  # 10,122 rows: 4 full batches, then 1,930 rows (shares 512, 512, 512, 394)
    whole = [x.group for x in b.iterate(2048, np.random.default_rng(3))]
    shares = [[x.group for x in b.iterate(2048, np.random.default_rng(3), rank=r, world=4)] for r in range(4)]
    assert all(len(s) == len(whole) for s in shares)  # every rank: one share per global batch
    for i, batch in enumerate(whole):
        assert torch.equal(torch.cat([s[i] for s in shares]), batch)  # the shares, in rank order, are the batch
        for r in range(4):
            scale, mine, rows = shard_scale(i, len(b), cfg.train, World(r, 4))
            assert (mine, rows, scale) == (len(shares[r][i]), len(batch), 4 / len(batch))
    assert [len(s[-1]) for s in shares] == [512, 512, 512, 394]
    # what predict_shard preallocates and gather_predictions interleaves: each rank's rows of each global batch
    assert rank_rows(len(b), 512, World(0, 4)).tolist() == [[len(s[i]) for s in shares] for i in range(len(whole))]


def test_a_batch_size_that_does_not_split_over_the_ranks_is_one_line():
    t = load_config(None, ["train.batch_size=1000"]).train
    check_world(t, World(0, 8))
    with pytest.raises(KunlunError) as e:
        check_world(t, World(1, 3))
    assert str(e.value) == ("train.batch_size=1000 does not split over 3 processes: every rank takes an equal share of each batch, "
                            "so use a multiple of 3 (e.g. 999)")


HAS_TORCHREC = importlib.util.find_spec("torchrec") is not None


@pytest.mark.skipif(HAS_TORCHREC, reason="TorchRec is installed here")
def test_torchrec_sharding_without_torchrec_is_one_line():
    t = load_config(None, ["train.embedding_sharding=torchrec"]).train  # the config loads: the error comes where it is used
    with pytest.raises(KunlunError) as e:
        check_world(t, World(0, 2))
    assert str(e.value) == ('train.embedding_sharding=torchrec: TorchRec is not installed; pip install "kunlun[torchrec]" '
                            "(or use train.embedding_sharding=row)")


NO_TORCHREC = pytest.mark.skipif(not HAS_TORCHREC, reason='TorchRec is not installed (pip install "kunlun[torchrec]"; see '
                                 "pyproject.toml for the versions that load with torch 2.13)")


@NO_TORCHREC
def test_torchrec_shards_a_table_row_wise_and_trains_it_on_cpu_over_gloo(tmp_path):
    """The probe: TorchRec's planner and DistributedModelParallel on 2 CPU processes, by themselves."""
    r = torchrun(tmp_path, str(HERE / "torchrec_probe.py"))
    assert r.returncode == 0 and "torchrec probe ok" in r.stdout, r.stderr[-3000:]


@NO_TORCHREC
def test_every_model_looks_up_torchrec_tables_as_its_plain_tables(tmp_path):
    """tests/torchrec_models.py, one process: each model with its tables in TorchRec gives the logits of the plain
    model bit for bit (fields, sequences, per-type windows, candidates), and its fused SGD (Adagrad) step equals plain
    SGD (Adagrad)."""
    r = torchrun(tmp_path, str(HERE / "torchrec_models.py"), processes=1)
    assert r.returncode == 0 and "torchrec models ok" in r.stdout, r.stderr[-3000:]


def test_what_torchrec_tables_cannot_do_as_one_process_is_one_line():
    """train.embedding_sharding=torchrec takes embedding optimizers sgd and adagrad only, without weight decay or L2, and
    not train.compile (kunlun.training.torchrec_sharding); checked before TorchRec is imported, so this runs without it
    too."""
    from kunlun.training.torchrec_sharding import check_config

    for ok in ("sgd", "adagrad"):
        check_config(load_config(None, ["train.embedding_sharding=torchrec", f"train.embedding_optimizer={ok}"]).train)
    for bad, why in (("adam", "fbgemm's CPU kernels have no Adam and its GPU Adam is lazy, unlike kunlun's adam"),
                     ("sparse_adagrad", "the fused tables update only the rows of each batch already")):
        with pytest.raises(KunlunError) as e:
            check_config(load_config(None, ["train.embedding_sharding=torchrec", f"train.embedding_optimizer={bad}"]).train)
        assert str(e.value) == (f"train.embedding_optimizer={bad} with train.embedding_sharding=torchrec: TorchRec updates its "
                                f"tables in the backward with fbgemm's fused optimizers, and {why}; use "
                                f"train.embedding_optimizer=adagrad or sgd")
    with pytest.raises(KunlunError, match="fbgemm's fused SGD and Adagrad have no weight decay; set them to 0$"):
        check_config(load_config(None, ["train.embedding_optimizer=sgd", "train.embedding_l2=1e-6"]).train)
    with pytest.raises(KunlunError, match="^train.compile with train.embedding_sharding=torchrec: not built"):
        check_config(load_config(None, ["train.embedding_optimizer=sgd", "train.compile=true"]).train)


# TorchRec's fused optimizers are SGD and Adagrad (kunlun.training.torchrec_sharding); grad_clip 0: with TorchRec it clips
# the dense gradients only, so the runs compare with one process only unclipped. Learning rates that move the tables
# far from their start in 18 steps, so that the comparison of the tables measures something.
TORCHREC = {"sgd": [*CFG, "train.grad_clip=0", "train.embedding_optimizer=sgd", "train.embedding_lr=0.5"],
            "adagrad": [*CFG, "train.grad_clip=0", "train.embedding_optimizer=adagrad", "train.embedding_lr=0.02"]}


@pytest.fixture(scope="module")
def torchrec_root(tmp_path_factory):
    """The world of ``root`` and the 2-rank runs of ``tests/torchrec_scenario.py`` (TORCHREC, each with
    train.embedding_sharding=torchrec): (ROOT, its torchrec.json)."""
    root = tmp_path_factory.mktemp("torchrec")
    S.generate(root / "w", 6000, seed=3, world=S.World(items=2000, events_per_user=30))
    for name, overrides in TORCHREC.items():
        cfg = load_config(None, [*overrides, "train.embedding_sharding=torchrec"], dataset=str(root / "w"))
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    r = torchrun(root, str(HERE / "torchrec_scenario.py"), str(root))
    assert r.returncode == 0, r.stderr[-3000:]
    return root, json.loads((root / "torchrec.json").read_text())


def train_one_process(cfg, d: Path) -> tuple[Trainer, dict]:
    """``cfg`` trained by one process: (its trainer holding the last state, final.json)."""
    one = Trainer(cfg, prepare_dataset(cfg.data.dataset, use_cache=False), d, progress=False, logger=lambda m: None)
    one.start_record()
    final = one.fit()
    one.resume(d / "checkpoints" / "last")  # fit() ends holding the best weights; the last state is here
    return one, final


@NO_TORCHREC
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_torchrec_tables_train_as_one_process(torchrec_root, optimizer, tmp_path):
    """train.embedding_sharding=torchrec: each rank holds half of every vocabulary table in TorchRec's fused tables,
    and after 18 steps the weights (tables included) and the tables' Adagrad sums equal those of one process training
    with plain nn.Embedding tables (the same embedding optimizer), up to float summation order; so do the metrics.
    SGD's update is proportional to the gradient: a table gradient averaged otherwise (not divided by the world size,
    or divided twice) would move the tables by another amount."""
    root, runs = torchrec_root
    run = runs[optimizer]
    assert run["item_rows"] == [[1067, 534], [1067, 533]]
    cfg = load_config(root / f"{optimizer}.yaml")
    one, final1 = train_one_process(cfg, tmp_path / "one")
    assert_metrics_close(final1["metrics"], run["metrics"])
    two = build(cfg, one.data)
    load_weights(root / optimizer / "checkpoints" / "last", two)  # the 2-rank DCP checkpoint, TorchRec's tables included
    set_seed(cfg.train.seed)
    start = build(cfg, one.data).state_dict()
    mine, theirs = one.model.state_dict(), two.state_dict()
    assert mine.keys() == theirs.keys()
    tables = [k for k in mine if k.startswith("inputs.tables.")]
    for keys in (list(mine), tables):
        a, b, s = (flat(sd[k] for k in keys) for sd in (mine, theirs, start))
        assert float((a - b).norm() / (a - s).norm()) < REL_TOL, keys
    if optimizer == "adagrad":  # the accumulated squared gradients: Adagrad's update alone is nearly scale-free
        momentum = torch.load(root / "adagrad-momentum.pt", weights_only=True)
        names = {id(p): n for n, p in one.model.named_parameters()}
        sums = {names[id(p)]: st["sum"] for o in one.optimizers for p, st in o.state.items() if "sum" in st}
        for k in tables:
            x, y = sums[k], momentum[f"{k.split('.')[2]}.momentum1"]
            assert float((x - y).norm() / x.norm()) < REL_TOL, k


@NO_TORCHREC
def test_a_torchrec_run_resumes_exactly_and_its_checkpoints_load_in_one_process(torchrec_root, tmp_path):
    """Killed at step 14 and resumed from step 12 on 2 ranks: the metrics of the uninterrupted run, bit for bit (the
    tables and their Adagrad sums are in checkpoints/last); on 4 ranks (the checkpoint's shards resharded): the same
    up to float summation order. ``checkpoints/best`` is one safetensors file of the whole tables: one process scores
    the run as the run did. A one-process run does not resume it (one line)."""
    root, runs = torchrec_root
    assert runs["resumed"] == runs["adagrad"]["metrics"]
    r = torchrun(root, str(HERE / "torchrec_scenario.py"), str(root), "resume", processes=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_metrics_close(json.loads((root / "resumed-4.json").read_text()), runs["adagrad"]["metrics"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert evaluate_run(root / "adagrad") == runs["adagrad"]["metrics"]
    finally:
        torch.set_num_threads(threads)
    cfg = load_config(root / "adagrad.yaml")
    one = Trainer(cfg, prepare_dataset(cfg.data.dataset), tmp_path, progress=False, logger=lambda m: None)
    last = root / "adagrad" / "checkpoints" / "last"
    with pytest.raises(KunlunError) as e:
        one.resume(last)
    assert str(e.value) == (f"{last}: written with train.embedding_sharding=torchrec, whose tables' optimizer state is TorchRec's: "
                            f"it resumes with train.embedding_sharding=torchrec on several processes (its weights load anywhere: "
                            f"kunlun eval, export)")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"NCCL needs 2 CUDA GPUs; this machine has {torch.cuda.device_count()}")
def test_two_gpus_nccl_train_as_one(tmp_path):
    root = tmp_path
    S.generate(root / "w", 6000, seed=3, world=S.World(items=2000, events_per_user=30))
    r = torchrun(root, "-m", "kunlun", "train", "--dataset", str(root / "w"), "--run-dir", str(root / "gpu"), "--json", "--quiet", *CFG, gpus=True)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((root / "gpu" / "final.json").read_text())
    assert final["distributed"]["backend"] == "nccl"
    shutil.rmtree(root / "cache", ignore_errors=True)
