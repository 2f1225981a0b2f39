import json

import numpy as np
import pytest
import torch
import yaml

from conftest import (
    LEARNS,
    TINY_MODEL,
    assert_last_good_checkpoint_kept,
    assert_learned,
    checkpoint_files,
    interrupt_at_step,
    interrupt_in_epoch,
    resume_cfg,
)
from kunlun.config import load_config
from kunlun.data.registry import prepare_dataset
from kunlun.errors import KunlunError
from kunlun.training.trainer import Trainer


def tiny(*extra):
    return load_config(None, TINY_MODEL + ["train.max_steps=40", "train.epochs=2"] + list(extra))


def run(cfg, path):
    data = prepare_dataset(cfg.data.dataset)
    t = Trainer(cfg, data, path, progress=False, logger=lambda m: None)
    t.start_record()
    return t, t.fit()


def test_same_seed_same_metrics_different_seed_different(tmp_path):
    _, a = run(tiny(), tmp_path / "a")
    _, b = run(tiny(), tmp_path / "b")
    _, c = run(tiny("train.seed=1"), tmp_path / "c")
    assert a["metrics"] == b["metrics"]
    assert a["metrics"]["test"]["ne"] != c["metrics"]["test"]["ne"]


def test_run_record_contents(tmp_path):
    _, final = run(tiny(), tmp_path / "r")
    d = tmp_path / "r"
    for f in ("config.yaml", "environment.json", "epochs.jsonl", "final.json", "encoder/encoder.json",
              "checkpoints/best/model.safetensors", "checkpoints/best/config.yaml", "checkpoints/last/trainer_state.pt"):
        assert (d / f).is_file(), f
    lines = (d / "epochs.jsonl").read_text().splitlines()
    assert len(lines) == final["epochs_run"] == 1  # max_steps=40 ends inside the first epoch
    assert set(json.loads(lines[0])["valid"]) >= {"ne", "auc", "gauc", "logloss", "calibration"}
    env = json.loads((d / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["torch_threads"] >= 1
    assert final["flops_per_example"] > 0 and final["parameters"]["total"] > 0
    assert final["train_examples_per_s"] > 0 and final["metrics"]["test"]["examples"] > 0


def test_resume_continues_exactly(tmp_path, straight):
    # 2 epochs straight == the same run killed after epoch 1, then resumed
    cfg, (_, straight) = resume_cfg(), straight
    data = prepare_dataset(cfg.data.dataset)
    t = Trainer(cfg, data, tmp_path / "killed", progress=False, logger=lambda m: None)
    t.start_record()
    interrupt_in_epoch(t, 1)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    t2 = Trainer(cfg, data, tmp_path / "killed", progress=False, logger=lambda m: None)
    t2.resume(tmp_path / "killed" / "checkpoints" / "last")
    resumed = t2.fit()
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["steps"] == straight["steps"]


def test_resume_after_an_interrupt_mid_epoch_continues_exactly(tmp_path, straight):
    # killed inside the batch loop, 5 steps into epoch 2 (the weights in memory have moved past the checkpoint),
    # resumed from checkpoints/last: epoch 2 is redone from the end of epoch 1 and the run ends as if never killed
    cfg, (straight_dir, straight) = resume_cfg(), straight
    data = prepare_dataset(cfg.data.dataset)
    t = Trainer(cfg, data, tmp_path / "killed", progress=False, logger=lambda m: None)
    t.start_record()
    interrupt_at_step(t, t.steps_per_epoch + 5)  # no mid-epoch checkpoint in between (every 10 minutes by default)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert t.state.step == t.steps_per_epoch + 5
    t2 = Trainer(cfg, data, tmp_path / "killed", progress=False, logger=lambda m: None)
    t2.resume(tmp_path / "killed" / "checkpoints" / "last")
    resumed = t2.fit()
    assert resumed["metrics"] == straight["metrics"]
    for key in ("steps", "epochs_run", "best_epoch", "train_examples", "train_compute"):
        assert resumed[key] == straight[key], key

    def records(run_dir):  # epochs.jsonl without the timings
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run_dir / "epochs.jsonl").read_text().splitlines()]

    assert [r["epoch"] for r in records(tmp_path / "killed")] == [1, 2]  # epoch 1 once, no duplicated line
    assert records(tmp_path / "killed") == records(straight_dir)


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, monkeypatch):
    # epoch 1 runs through fit (writing checkpoints/best and last); in epoch 2 the loss turns NaN after 3 good
    # steps, so the weights in memory have moved past the checkpoint when training stops
    cfg = tiny("train.max_steps=0", "train.epochs=2", "train.patience=0", "train.batch_size=4096")
    data = prepare_dataset(cfg.data.dataset)
    t = Trainer(cfg, data, tmp_path / "r", progress=False, logger=lambda m: None)
    ckpt = tmp_path / "r" / "checkpoints"
    after_epoch_1 = {}
    real_epoch, forward = t.train_epoch, t.model.forward
    calls = []

    def nan_after_three_steps(batch):
        calls.append(1)
        return forward(batch) * (float("nan") if len(calls) > 3 else 1.0)

    def second_epoch_goes_non_finite(epoch):
        if epoch == 1:
            after_epoch_1.update(checkpoint_files(ckpt))
            monkeypatch.setattr(t.model, "forward", nan_after_three_steps)
        return real_epoch(epoch)

    t.train_epoch = second_epoch_goes_non_finite
    with pytest.raises(KunlunError, match=rf"non-finite training loss at step {t.steps_per_epoch + 4} \(epoch 2\)") as e:
        t.fit()
    assert_last_good_checkpoint_kept(ckpt, after_epoch_1, str(e.value))
    from kunlun.training.checkpoint import load_file

    last = load_file(str(ckpt / "last" / "model.safetensors"))
    assert any(not torch.equal(v.cpu(), last[k]) for k, v in t.model.state_dict().items())  # memory moved on; the files did not
    resumed = Trainer(cfg, data, tmp_path / "r", progress=False, logger=lambda m: None)
    resumed.resume(ckpt / "last")  # the checkpoint loads, at the end of epoch 1
    assert (resumed.state.epoch, resumed.state.step) == (1, t.steps_per_epoch)
    assert all(torch.equal(v.cpu(), last[k]) for k, v in resumed.model.state_dict().items())


@pytest.mark.parametrize("bf16", [False, True])
def test_training_learns(tmp_path, bf16):
    """30 steps move the test NE clearly below what the same model scores untrained (conftest.LEARNS), in float32
    and under bf16 autocast: a training loop that does not update the model, or updates it wrongly, fails."""
    cfg = tiny(*LEARNS, f"train.bf16={str(bf16).lower()}", "train.max_steps=30", "train.epochs=1")
    t = Trainer(cfg, prepare_dataset(cfg.data.dataset), tmp_path / "r", progress=False, logger=lambda m: None)
    t.start_record()
    untrained = t.evaluate("test")["ne"]
    assert_learned(untrained, t.fit()["metrics"]["test"]["ne"])


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.num_heads=3", "model.num_heads: 3 heads do not divide model.d_model=16"),
        ("model.d_model=-4", "model.d_model: expected a positive integer"),
        ("train.batch_size=0", "train.batch_size: expected a positive integer"),
        ("model.nope=1", "model.nope is not known"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("model.name=transformer9", "unknown model 'transformer9'"),
    ],
)
def test_impossible_config_names_the_key(override, needle):
    with pytest.raises(KunlunError) as e:
        tiny(override)  # loading fails: nothing later has to validate
    assert needle in str(e.value)


def test_embedding_weight_decay_shrinks_unused_rows(tmp_path):
    from kunlun.training.trainer import make_optimizers

    cfg = tiny("train.embedding_weight_decay=0.5", "train.embedding_lr=0.1")
    data = prepare_dataset(cfg.data.dataset)
    t = Trainer(cfg, data, tmp_path / "r", progress=False, logger=lambda m: None)
    table = t.model.inputs.tables["user"].weight
    before = table.detach().clone()
    opts = make_optimizers(t.model, cfg.train)
    emb_opt = opts[-1]
    assert isinstance(emb_opt, torch.optim.AdamW) and emb_opt.param_groups[0]["weight_decay"] == 0.5
    table.grad = torch.zeros_like(table)  # no gradient: only the decay acts
    emb_opt.step()
    assert torch.allclose(table[2:], before[2:] * (1 - 0.1 * 0.5))


def test_embedding_l2_is_a_coupled_penalty_on_every_row(tmp_path):
    from kunlun.training.trainer import make_optimizers

    cfg = tiny("train.embedding_l2=0.05", "train.embedding_lr=0.1")
    t = Trainer(cfg, prepare_dataset(cfg.data.dataset), tmp_path / "r", progress=False, logger=lambda m: None)
    table = t.model.inputs.tables["user"].weight
    before = table.detach().clone()
    emb_opt = make_optimizers(t.model, cfg.train)[-1]
    table.grad = torch.zeros_like(table)  # no data gradient: the penalty gradient λ·E is all Adam sees
    emb_opt.step()
    # Adam's first step is lr · g / |g| per element: every nonzero element moves lr toward 0
    moved = before - table.detach()
    nz = before.abs() > 1e-3  # tiny entries: Adam's eps (1e-8) is not negligible next to λ·E
    assert torch.allclose(moved[nz], 0.1 * torch.sign(before[nz]), atol=1e-4)
    with pytest.raises(KunlunError, match="embedding_l2"):  # both at once: refused when the config is loaded
        tiny("train.embedding_l2=0.05", "train.embedding_weight_decay=0.1")


def test_single_value_for_a_list_key_and_bad_element_type():
    mc = tiny("model.gdpa_activation=relu", "model.output_hidden=48").model
    assert mc.gdpa_activation == ("relu",) and mc.output_hidden == (48,)
    with pytest.raises(KunlunError, match=r"model.output_hidden\[1\]: expected an integer"):
        tiny("model.output_hidden=[8, wide]")


def test_train_step_owns_loss_clipping_and_schedule(tmp_path):
    """TrainModel returns (loss, logits); TrainStep clips, steps every optimizer and advances every schedule; a
    non-finite loss raises before any parameter changes."""
    from kunlun.data.batches import Batcher
    from kunlun.training.step import NonFiniteLoss, TrainModel, TrainStep, make_optimizers, make_schedulers

    cfg = tiny("train.warmup_steps=4", "train.grad_clip=0.000001")
    data = prepare_dataset(cfg.data.dataset)
    t = Trainer(cfg, data, tmp_path / "r", progress=False, logger=lambda m: None)
    batch = Batcher(data, "train", cfg.data.max_seq_len, event_windows=True).batch(torch.arange(64).numpy()).to(t.device)
    loss, logits = TrainModel(t.model)(batch)
    assert loss.shape == () and logits.shape == (64,)
    assert torch.allclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label))

    opts = make_optimizers(t.model, cfg.train)
    step = TrainStep(TrainModel(t.model), opts, make_schedulers(opts, cfg.train, 100), cfg.train.grad_clip)
    lr0 = [o.param_groups[0]["lr"] for o in opts]
    step(batch)
    assert [o.param_groups[0]["lr"] for o in opts] == [2 * lr for lr in lr0]  # warm-up: step 1 of 4 → 2 of 4
    grads = [p.grad for p in t.model.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) <= 1e-6 * 1.01

    before = [p.detach().clone() for p in t.model.parameters()]
    class NanLoss(TrainModel):
        def forward(self, batch):
            loss, logits = super().forward(batch)
            return loss * float("nan"), logits

    nan_model = NanLoss(t.model)
    with pytest.raises(NonFiniteLoss):
        TrainStep(nan_model, opts, [], 0.0)(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_eval_and_predict_score_with_the_runs_thread_count(tmp_path):
    """The thread count splits GEMM sums differently: re-scoring reproduces final.json only with the run's count."""
    from kunlun.data.registry import EMBEDDED
    from kunlun.training.runner import evaluate_file, evaluate_run, predict_file, train_run

    before = torch.get_num_threads()
    try:
        final = train_run(tiny("train.threads=1"), tmp_path / "r", progress=False, logger=lambda m: None)
        torch.set_num_threads(2)  # what a 2-core user's process starts with
        assert evaluate_run(tmp_path / "r") == final["metrics"]
        assert torch.get_num_threads() == 1
        src = EMBEDDED / "ml-latest-small"  # a file of the run's schema: 300 ratings, histories from the file itself
        (tmp_path / "movies.csv").write_text((src / "movies.csv").read_text())
        (tmp_path / "ratings.csv").write_text("\n".join((src / "ratings.csv").read_text().splitlines()[:301]) + "\n")
        for score in (lambda: evaluate_file(tmp_path / "r", tmp_path / "ratings.csv"),
                      lambda: predict_file(tmp_path / "r", tmp_path / "ratings.csv", tmp_path / "p.csv")):
            torch.set_num_threads(2)
            score()
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_python_api_trains_and_scores_a_run_like_the_cli(tmp_path):
    from kunlun.training.runner import evaluate_run, load_trained, train_run

    final = train_run(tiny(), tmp_path / "r", progress=False, logger=lambda m: None)
    assert final["run_dir"] == str(tmp_path / "r")
    assert evaluate_run(tmp_path / "r") == final["metrics"]  # re-encoded with the run's vocabularies: same numbers
    cfg, _, model = load_trained(tmp_path / "r")
    assert cfg == tiny() and model.num_parameters() == final["parameters"]
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["model"]["time_scale"] == 3600.0  # defaults spelled out
    with pytest.raises(KunlunError, match="not empty"):
        train_run(tiny(), tmp_path / "r", progress=False, logger=lambda m: None)


def test_epoch_loop_does_not_synchronise_per_step(tmp_path, monkeypatch):
    """Reading a tensor's value on the host (``.item()``, ``float()``, ``int()``, ``bool()``: a device sync on a
    GPU) happens a fixed number of times per epoch, however many steps it has: the loss and the non-finite
    check stay on the device between sync points."""
    import kunlun.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "SYNC_SECONDS", float("inf"))
    data = prepare_dataset(tiny().data.dataset)
    reads = []
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    counts = []
    for steps in (3, 9):
        cfg = tiny("train.epochs=1", "train.checkpoint_every_minutes=0", f"train.max_steps={steps}")
        t = Trainer(cfg, data, tmp_path / f"r{steps}", progress=False, logger=lambda m: None)
        reads.clear()
        t.train_epoch(0)
        assert t.state.step == steps
        counts.append(len(reads))
    assert counts[0] == counts[1] <= 4, counts



def test_sparse_embedding_optimizers_touch_only_the_rows_of_the_batch(tmp_path):
    """sparse_adam / sparse_adagrad: lookups give sparse gradients and a step changes only the embedding rows the
    batch looked up (dense Adam moves every row once its moments are non-zero); clipping sees the sparse gradients."""
    from kunlun.data.batches import Batcher

    data = prepare_dataset(tiny().data.dataset)
    for name in ("sparse_adam", "sparse_adagrad", "adam"):
        cfg = tiny(f"train.embedding_optimizer={name}", "train.grad_clip=0.01", "train.warmup_steps=0")
        t = Trainer(cfg, data, tmp_path / name, progress=False, logger=lambda m: None)
        batcher = Batcher(data, "train", cfg.data.max_seq_len, t.model.event_windows)
        table = t.model.inputs.tables["item"]
        t.train_step(batcher.batch(np.arange(0, 64)).to(t.device))  # every optimizer has state now
        before = table.weight.detach().clone()
        batch = batcher.batch(np.arange(64, 72)).to(t.device)
        used = torch.unique(torch.cat([batch.cat.flatten(), batch.seqs["history"].item.flatten()]))
        loss, _ = t.train_step(batch)
        assert torch.isfinite(loss)
        assert table.weight.grad.is_sparse == name.startswith("sparse_")
        moved = torch.nonzero((table.weight.detach() != before).any(1)).flatten()
        if name.startswith("sparse_"):
            assert set(moved.tolist()) <= set(used.tolist()) and len(moved) > 0
        else:
            assert len(moved) > len(used)


def test_sparse_adam_equals_adam_when_every_row_is_touched_and_clipping_matches_torch():
    from kunlun.training.step import clip_grad_norm

    torch.manual_seed(0)
    dense_emb, sparse_emb = torch.nn.Embedding(6, 4), torch.nn.Embedding(6, 4, sparse=True)
    sparse_emb.load_state_dict(dense_emb.state_dict())
    adam, sparse_adam = torch.optim.Adam(dense_emb.parameters(), lr=0.1), torch.optim.SparseAdam(sparse_emb.parameters(), lr=0.1)
    for _ in range(4):
        idx = torch.tensor([0, 1, 2, 3, 4, 5, 2, 2])  # every row, one of them three times
        target = torch.randn(8, 4)
        for emb, opt in ((dense_emb, adam), (sparse_emb, sparse_adam)):
            opt.zero_grad()
            ((emb(idx) - target) ** 2).sum().backward()
            opt.step()
    assert torch.allclose(dense_emb.weight, sparse_emb.weight, atol=1e-6)

    # clipping with a sparse gradient among dense ones = torch's clip_grad_norm_ on the densified gradients
    emb, lin = torch.nn.Embedding(6, 4, sparse=True), torch.nn.Linear(4, 1)
    out = lin(emb(torch.tensor([1, 1, 3]))).sum() * 50
    out.backward()
    ref = [emb.weight.grad.to_dense().clone(), lin.weight.grad.clone(), lin.bias.grad.clone()]
    ref_params = [torch.nn.Parameter(torch.zeros_like(g)) for g in ref]
    for p_, g in zip(ref_params, ref):
        p_.grad = g
    want = torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
    got = clip_grad_norm([emb.weight, lin.weight, lin.bias], 0.5)
    assert torch.allclose(got, want)
    for p_, r in zip([emb.weight, lin.weight, lin.bias], ref_params):
        g = p_.grad.to_dense() if p_.grad.is_sparse else p_.grad
        assert torch.allclose(g, r.grad, atol=1e-7)


def test_sparse_embedding_optimizer_refuses_l2():
    with pytest.raises(KunlunError, match="embedding_l2: not available with train.embedding_optimizer=sparse_adam"):
        tiny("train.embedding_optimizer=sparse_adam", "train.embedding_l2=0.01")


def test_compiled_training_step_matches_eager(tmp_path):
    """train.compile=true: the Inductor-compiled forward + loss (what the trainer runs) gives the eager loss, logits
    and gradients within float tolerance (fused kernels sum in another order). One compile: about a minute here."""
    from kunlun.data.batches import Batcher
    from kunlun.training.step import TrainModel

    cfg = tiny("train.max_steps=4", "train.epochs=1")
    data = prepare_dataset(cfg.data.dataset)
    t = Trainer(cfg, data, tmp_path / "eager", progress=False, logger=lambda m: None)
    batch = Batcher(data, "train", cfg.data.max_seq_len, t.model.event_windows).batch(np.arange(300)).to(t.device)
    assert isinstance(t.train_step.train_model, TrainModel)  # eager unless asked
    compiled = Trainer(tiny("train.compile=true"), data, tmp_path / "c", progress=False, logger=lambda m: None).train_step.train_model
    compiled._orig_mod.model = t.model  # the compiled wrapper around the same weights
    results = []
    for fn in (TrainModel(t.model), compiled):
        t.model.zero_grad()
        loss, logits = fn(batch)
        loss.backward()
        results.append((loss.detach(), logits.detach(), [p.grad.clone() for p in t.model.parameters() if p.grad is not None]))
    (l0, z0, g0), (l1, z1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-6) and torch.allclose(z0, z1, atol=1e-5)
    assert len(g0) == len(g1) and all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g0, g1))


@pytest.mark.parametrize("monitor", ["auc", "ne"])
def test_monitor_picks_best_checkpoint_and_plateau_lowers_the_rate(tmp_path, monkeypatch, monitor):
    """``train.monitor`` decides the best epoch and early stopping; ``train.schedule=plateau`` multiplies every
    learning rate by 0.1 after each epoch without improvement (FuxiCTR's reduce-on-plateau), in checkpoints too.
    The scripted validation AUC peaks at epoch 4 while NE improves every epoch."""
    from kunlun.training import trainer as trainer_module
    from kunlun.training.checkpoint import load_trainer_state

    aucs = iter([0.70, 0.80, 0.79, 0.85, 0.84, 0.83, 0.82, 0.81])
    ne = iter([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    script = lambda *a, **k: {"auc": next(aucs, 0.5), "ne": next(ne, 1.0), "examples": 1}  # noqa: E731
    monkeypatch.setattr(trainer_module, "evaluate", script)
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, epoch: 0.5)  # validation is what this test is about
    cfg = tiny("train.epochs=8", "train.max_steps=0", "train.patience=2", "train.schedule=plateau",
               "train.warmup_steps=0", "train.lr=0.01", "train.embedding_lr=0.02", f"train.monitor={monitor}")
    t, final = run(cfg, tmp_path / "r")
    if monitor == "auc":  # bad epochs 3, 5, 6 → three reductions; stopped after epoch 6 (2 bad in a row)
        assert (final["best_epoch"], final["epochs_run"], t.state.best_auc) == (4, 6, 0.85)
        reductions = 3
    else:  # NE improves every epoch: no reduction, no early stop, the last epoch is the best
        assert (final["best_epoch"], final["epochs_run"], t.state.best_ne) == (8, 8, 0.2)
        reductions = 0
    want = [0.01 * 0.1**reductions, 0.02 * 0.1**reductions]
    assert [o.param_groups[0]["lr"] for o in t.optimizers] == pytest.approx(want)
    saved = load_trainer_state(tmp_path / "r" / "checkpoints" / "last")["schedulers"]
    assert [s["base_lrs"][0] for s in saved] == pytest.approx(want)


def test_plateau_rate_floor_and_unknown_monitor(tmp_path):
    from kunlun.training.trainer import PLATEAU_MIN_LR

    cfg = tiny("train.schedule=plateau", "train.lr=2e-6", "train.warmup_steps=0")
    t = Trainer(cfg, prepare_dataset(cfg.data.dataset), tmp_path / "r", progress=False, logger=lambda m: None)
    t.lower_learning_rates()
    assert t.optimizers[0].param_groups[0]["lr"] == PLATEAU_MIN_LR == t.schedulers[0].base_lrs[0]
    with pytest.raises(KunlunError, match="train.monitor: expected one of ne, auc"):
        tiny("train.monitor=logloss")
    with pytest.raises(KunlunError, match="train.schedule: expected one of cosine, linear, constant, plateau"):
        tiny("train.schedule=step")


def test_progress_bar_shows_no_loss_before_the_first_step(tmp_path, monkeypatch):
    """The bar as first drawn, before any step: a dash where the running loss goes, not ``loss nan``."""
    from rich.progress import TextColumn

    from kunlun.training import trainer

    shown = []

    class Drawn(Exception):
        pass

    class FirstFrame(trainer.Progress):
        def add_task(self, *args, **kwargs):
            task = self._tasks[super().add_task(*args, **kwargs)]
            shown.append(" ".join(str(c.render(task)) for c in self.columns if isinstance(c, TextColumn)))
            raise Drawn

    monkeypatch.setattr(trainer, "Progress", FirstFrame)
    cfg = tiny()
    t = Trainer(cfg, prepare_dataset(cfg.data.dataset), tmp_path / "r", progress=True, logger=lambda m: None)
    with pytest.raises(Drawn):
        t.fit()
    assert "nan" not in shown[0] and "loss –" in shown[0], shown


# ------------------------------------------------------------------------------------------ validation inside an epoch


def test_validation_every_n_steps_keeps_the_best_steps_checkpoint_and_stops_inside_an_epoch(tmp_path, monkeypatch):
    """train.eval_every_steps=10 over epochs of 40 steps: validations at steps 10, 20, 30 and the epoch's end, each a
    line of epochs.jsonl with its step and the examples seen. The scripted validation NE is best at step 30 (inside
    epoch 1): checkpoints/best holds the weights of step 30, not of any later step; two worse validations after it
    (train.patience=2 counts validations) stop the run at step 50, inside epoch 2, which ends there."""
    from kunlun.training import trainer as trainer_module
    from kunlun.training.checkpoint import load_file

    nes = iter([0.9, 0.8, 0.7, 0.75, 0.71])
    real_evaluate = trainer_module.evaluate
    monkeypatch.setattr(trainer_module, "evaluate", lambda *a, **k: {**real_evaluate(*a, **k), "ne": next(nes, 0.5)})
    cfg = tiny("train.max_steps=0", "train.epochs=3", "train.batch_size=2048", "train.eval_every_steps=10", "train.patience=2")
    data = prepare_dataset(cfg.data.dataset)
    weights = {}  # step → the model's weights at that validation
    t = Trainer(cfg, data, tmp_path / "r", progress=False, logger=lambda m: None,
                on_validation=lambda rec: weights.update({rec["step"]: {k: v.clone() for k, v in t.model.state_dict().items()}}))
    assert t.steps_per_epoch == 40
    t.start_record()
    final = t.fit()
    recs = [json.loads(line) for line in (tmp_path / "r" / "epochs.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["epoch_step"], r["end_of_epoch"]) for r in recs] == [
        (1, 10, 10, False), (1, 20, 20, False), (1, 30, 30, False), (1, 40, 40, True), (2, 50, 10, False)]
    n = len(data.splits["train"])  # epoch 1's last batch is short
    assert [r["examples"] for r in recs] == [10 * 2048, 20 * 2048, 30 * 2048, n, n + 10 * 2048]
    assert [r["valid"]["ne"] for r in recs] == [0.9, 0.8, 0.7, 0.75, 0.71] and sorted(weights) == [10, 20, 30, 40, 50]
    assert (final["best_step"], final["best_epoch"], final["epochs_run"], final["steps"], final["validations"]) == (30, 1, 2, 50, 5)
    manifest = json.loads((tmp_path / "r" / "checkpoints" / "best" / "manifest.json").read_text())
    assert (manifest["step"], manifest["epoch_step"]) == (30, 30)
    best = load_file(str(tmp_path / "r" / "checkpoints" / "best" / "model.safetensors"))
    assert all(torch.equal(best[k], v) for k, v in weights[30].items())
    assert any(not torch.equal(best[k], v) for k, v in weights[40].items())  # the later validations moved on
    last = json.loads((tmp_path / "r" / "checkpoints" / "last" / "manifest.json").read_text())
    assert (last["epoch"], last["epoch_step"], last["step"]) == (2, 0, 50)  # the stopped epoch was closed: done
    assert t.done()


def test_resume_between_validations_inside_epochs_continues_exactly(tmp_path):
    """Validation every 12 steps (epochs of 40), with dropout, so that a model left in eval mode after a validation
    would train differently: killed at step 30 (last checkpoint: the validation at step 24) and again at step 57
    (epoch 2's validation at step 52), each resumed, the run ends with the metrics and epoch records of one never
    interrupted, bit for bit."""
    cfg = load_config(None, TINY_MODEL + ["train.max_steps=0", "train.epochs=2", "train.patience=0", "train.batch_size=2048",
                                          "train.eval_every_steps=12", "model.dropout=0.2"])
    data = prepare_dataset(cfg.data.dataset)

    def records(run_dir):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run_dir / "epochs.jsonl").read_text().splitlines()]

    straight = Trainer(cfg, data, tmp_path / "straight", progress=False, logger=lambda m: None)
    straight.start_record()
    reference = straight.fit()
    assert [r["step"] for r in records(tmp_path / "straight")] == [12, 24, 36, 40, 52, 64, 76, 80]
    t = Trainer(cfg, data, tmp_path / "killed", progress=False, logger=lambda m: None)
    t.start_record()
    for kill, resumed_at in ((30, 24), (57, 52)):
        interrupt_at_step(t, kill)
        with pytest.raises(KeyboardInterrupt):
            t.fit()
        t = Trainer(cfg, data, tmp_path / "killed", progress=False, logger=lambda m: None)
        t.resume(tmp_path / "killed" / "checkpoints" / "last")
        assert t.state.step == resumed_at
    final = t.fit()
    assert final["metrics"] == reference["metrics"]
    for key in ("steps", "epochs_run", "best_epoch", "best_step", "train_examples", "validations"):
        assert final[key] == reference[key], key
    assert records(tmp_path / "killed") == records(tmp_path / "straight")


def test_one_pass_recipe_is_one_epoch_with_the_schedule_over_it_validated_ten_times(tmp_path):
    """train.recipe=one_pass: one epoch whatever train.epochs says (recorded so), the cosine schedule reaching 0 at
    the pass's last step (it spans the pass), and ONE_PASS_VALIDATIONS validations spread over it."""
    from kunlun.config import ONE_PASS_VALIDATIONS

    cfg = tiny("train.max_steps=0", "train.epochs=5", "train.batch_size=2048", "train.patience=0", "train.recipe=one_pass")
    assert cfg.train.epochs == 1 and load_config(None, [], **{}).train.recipe == "epochs"
    t, final = run(cfg, tmp_path / "r")
    assert (t.total_steps, t.eval_every, final["epochs_run"], final["steps"]) == (40, 4, 1, 40)
    recs = [json.loads(line) for line in (tmp_path / "r" / "epochs.jsonl").read_text().splitlines()]
    assert len(recs) == ONE_PASS_VALIDATIONS == 10 and [r["step"] for r in recs] == list(range(4, 41, 4))
    assert final["train_examples"] == len(t.data.splits["train"])  # every example once
    assert all(o.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12) for o in t.optimizers)  # the schedule ended
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["train"]["epochs"] == 1
    with pytest.raises(KunlunError, match="train.recipe: expected one of epochs, one_pass"):
        tiny("train.recipe=two_pass")
