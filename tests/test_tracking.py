"""Experiment tracking: TensorBoard event files (kunlun.training.tracking.Tracker) and the learning curves a training
run draws into its directory (curves.png)."""

import json

import numpy as np
import pytest

from conftest import TINY_MODEL


def scalars_of(log_dir):
    """{tag: [(step, value), …]} of the TensorBoard event files in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tracker_writes_the_named_scalars_as_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from kunlun.training.tracking import TENSORBOARD_DIR, Tracker

    run = tmp_path / "run"
    tracker = Tracker(run, enabled=True)
    assert not run.exists()  # nothing is created before the first scalars: a run that fails in set-up leaves no directory
    tracker.scalars(0, {"flops/executed_per_example": 2.5e6, "flops/useful_per_example": 1.5e6})
    for step in (10, 20, 30):
        tracker.scalars(step, {"train/loss": 1.0 / step, "train/lr": 1e-3 * step, "train/examples_per_s": 100.0 * step,
                               "train/compute": 3e6 * step})
    tracker.scalars(30, {"valid/ne": 0.95, "valid/auc": 0.7})
    tracker.close()
    got = scalars_of(run / TENSORBOARD_DIR)
    assert set(got) == {"flops/executed_per_example", "flops/useful_per_example", "train/loss", "train/lr", "train/examples_per_s",
                        "train/compute", "valid/ne", "valid/auc"}
    assert [s for s, _ in got["train/loss"]] == [10, 20, 30]
    assert got["train/lr"][-1][1] == pytest.approx(0.03) and got["valid/ne"] == [(30, pytest.approx(0.95))]
    assert got["flops/executed_per_example"] == [(0, 2.5e6)]

    # a resumed run (a new process) that goes on from step 20 replaces what the first logged from step 20 on
    again = Tracker(run, enabled=True)
    again.scalars(20, {"train/loss": 0.5})
    again.close()
    assert scalars_of(run / TENSORBOARD_DIR)["train/loss"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.5))]


def test_a_disabled_tracker_writes_nothing(tmp_path):
    from kunlun.training.tracking import Tracker

    with Tracker(tmp_path / "run", enabled=False) as tracker:
        tracker.scalars(1, {"train/loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_tensorboard_missing_is_one_line_naming_the_install(monkeypatch, tmp_path):
    import importlib.util

    from kunlun.errors import KunlunError, user_error
    from kunlun.training import tracking

    find = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find(name, *a))
    with pytest.raises(KunlunError) as err:
        tracking.Tracker(tmp_path / "run", enabled=True)
    message = user_error(err.value)
    assert "pip install 'kunlun[tensorboard]'" in message and "train.tensorboard" in message and "\n" not in message
    tracking.Tracker(tmp_path / "run", enabled=False)  # off: TensorBoard is not needed


def panel_colours(png):
    """The image as an (H, W, 3) uint8 array."""
    import matplotlib.image

    return (matplotlib.image.imread(png)[..., :3] * 255).round().astype(np.uint8)


def has_colour(image, rgb, tolerance=12):
    return bool(np.any(np.all(np.abs(image.astype(int) - np.array(rgb)) <= tolerance, axis=-1)))


def test_curves_are_drawn_from_the_validation_records(tmp_path):
    """One point per line of epochs.jsonl (validations inside an epoch too), by step; the best validation NE marked."""
    from kunlun.training.tracking import CURVES, draw_curves

    assert draw_curves(tmp_path) is None and not (tmp_path / CURVES).exists()  # no validation yet: nothing drawn
    lines = [{"epoch": 1, "step": s, "train_loss": 0.6 - s / 1000, "valid": {"ne": 0.99 - s / 2000, "auc": 0.6 + s / 2000}, "seconds": 1.0}
             for s in (50, 100, 150, 200)]
    (tmp_path / "epochs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    path = draw_curves(tmp_path, "tiny on ml-latest-small")
    assert path == tmp_path / CURVES and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = panel_colours(path)
    assert image.shape[1] > 2 * image.shape[0]  # three panels side by side
    assert has_colour(image, (31, 119, 180))  # the curves (matplotlib's first colour)
    assert has_colour(image, (214, 39, 40))  # the best validation NE's star (tab:red)


def test_a_training_run_draws_its_learning_curves(tmp_path):
    from kunlun.config import load_config
    from kunlun.training.runner import train_run
    from kunlun.training.tracking import CURVES

    cfg = load_config(None, TINY_MODEL + ["train.max_steps=4", "train.epochs=1", "train.threads=1"])
    train_run(cfg, tmp_path / "run", progress=False, logger=lambda m: None)
    png = tmp_path / "run" / CURVES
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert has_colour(panel_colours(png), (31, 119, 180))


def test_a_training_run_with_tensorboard_on_logs_training_validation_and_flops(tmp_path):
    pytest.importorskip("tensorboard")
    from kunlun.config import load_config
    from kunlun.training.runner import train_run

    cfg = load_config(None, TINY_MODEL + ["train.max_steps=6", "train.epochs=1", "train.threads=1", "train.tensorboard=true",
                                          "train.eval_every_steps=3"])
    train_run(cfg, tmp_path / "run", progress=False, logger=lambda m: None)
    tags = scalars_of(tmp_path / "run" / "tensorboard")
    assert {"train/loss", "train/lr", "train/examples_per_s", "valid/ne", "valid/auc", "flops/executed_per_example"} <= set(tags)
    assert [step for step, _ in tags["valid/ne"]] == [3, 6]  # one point per validation, at its step
    off = load_config(None, TINY_MODEL + ["train.max_steps=2", "train.epochs=1", "train.threads=1"])
    train_run(off, tmp_path / "off", progress=False, logger=lambda m: None)
    assert not (tmp_path / "off" / "tensorboard").exists()
