"""Training survives what happens to real runs: kills anywhere (exact resume from mid-epoch checkpoints), corrupt
or truncated checkpoint files, full disks, resumes that would change or overrun a run, two processes on one run
directory, and sweeps killed under their training processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import TINY_MODEL, checkpoint_files, interrupt_at_step, resume_cfg
from kunlun.config import load_config
from kunlun.data.registry import prepare_dataset
from kunlun.errors import KunlunError
from kunlun.processes import lock_holder, lock_run_dir
from kunlun.training.checkpoint import load_trainer_state, load_weights, verify_checkpoint
from kunlun.training.runner import train_run
from kunlun.training.trainer import Trainer, TrainState, build


def quiet(m):
    return None


def small(*extra):
    """A run of a few steps: what the record-keeping tests need."""
    return load_config(None, TINY_MODEL + ["train.max_steps=3", "train.epochs=1", "train.warmup_steps=1"] + list(extra))


def kunlun(*args, cwd, expect):
    r = subprocess.run([sys.executable, "-m", "kunlun", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == expect, r.stderr[-2000:]
    if expect == 2:
        assert_one_error_line(r.stderr)
    return r


def assert_one_error_line(stderr: str) -> None:
    """A user error: one ``kunlun: error:`` line, the last one (logs may come before it), no traceback."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and [line for line in lines if line.startswith("kunlun: error:")] == lines[-1:], stderr


def all_files(d: Path) -> dict[str, str]:
    return checkpoint_files(d)  # {relative path: sha256} of every file under d


def records(run_dir: Path) -> list[dict]:
    """epochs.jsonl without the timings."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run_dir / "epochs.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ exact resume


def test_killed_mid_epoch_and_between_record_and_checkpoint_resumes_bit_for_bit(tmp_path, straight):
    """2 epochs with a checkpoint every 4 steps, killed twice: (1) at the end of epoch 1 between writing epochs.jsonl
    and checkpoints/last, (2) 5 steps into epoch 2 (last checkpoint at step 44). Each resume continues from the exact
    step; the run ends with the metrics and epoch records of one never interrupted, which wrote no mid-epoch
    checkpoints at all."""
    straight_dir, reference = straight
    data = prepare_dataset(resume_cfg().data.dataset)
    cfg = resume_cfg("train.checkpoint_every_steps=4")
    run = tmp_path / "killed"
    t = Trainer(cfg, data, run, progress=False, logger=quiet)
    spe = t.steps_per_epoch
    assert spe % 4 == 0 and spe > 8  # so a mid-epoch checkpoint falls on the epoch's last step
    t.start_record()
    real_save = t.save_last

    def killed_before_epoch_end_checkpoint():
        if t.state.epoch == 1 and t.state.epoch_step == 0:  # epochs.jsonl has epoch 1; checkpoints/last does not
            raise KeyboardInterrupt
        real_save()

    t.save_last = killed_before_epoch_end_checkpoint
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert [r["epoch"] for r in records(run)] == [1]
    manifest = json.loads((run / "checkpoints" / "last" / "manifest.json").read_text())
    assert (manifest["epoch"], manifest["epoch_step"], manifest["step"]) == (0, spe, spe)

    t2 = Trainer(cfg, data, run, progress=False, logger=quiet)
    t2.resume(run / "checkpoints" / "last")
    assert (t2.state.epoch, t2.state.epoch_step) == (0, spe) and (run / "epochs.jsonl").read_text() == ""  # no duplicate
    interrupt_at_step(t2, spe + 5)
    with pytest.raises(KeyboardInterrupt):
        t2.fit()

    t3 = Trainer(cfg, data, run, progress=False, logger=quiet)
    t3.resume(run / "checkpoints" / "last")
    assert (t3.state.epoch, t3.state.epoch_step, t3.state.step) == (1, 4, spe + 4)  # mid-epoch, not the epoch start
    final = t3.fit()
    assert final["metrics"] == reference["metrics"]  # bit for bit
    for key in ("steps", "epochs_run", "best_epoch", "train_examples", "train_compute", "train_compute_at_best"):
        assert final[key] == reference[key], key
    assert records(run) == records(straight_dir)


def test_time_and_step_checkpoint_cadence():
    def due(step, minutes_ago, every_steps=0, every_minutes=0.0):
        fake = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(checkpoint_every_steps=every_steps,
                                                                         checkpoint_every_minutes=every_minutes)),
                               state=TrainState(step=step), last_saved=time.monotonic() - 60 * minutes_ago)
        return Trainer.checkpoint_due(fake)

    assert not due(7, 100.0)  # both off
    assert due(8, 0.0, every_steps=4) and not due(7, 0.0, every_steps=4)
    assert due(7, 10.5, every_minutes=10) and not due(7, 9.5, every_minutes=10)
    assert load_config(None).train.checkpoint_every_minutes == 10  # on by default: a kill loses at most 10 minutes


def test_done_honours_early_stop_and_unfinished_epochs():
    def done(**state):
        fake = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(epochs=5, patience=2)), state=TrainState(**state),
                               total_steps=100)
        return Trainer.done(fake)

    assert not done(epoch=2, step=40, bad_epochs=1)
    assert done(epoch=2, step=40, bad_epochs=2)  # early-stopped: a resume must not train on
    assert done(epoch=5, step=99) and done(epoch=3, step=100)
    assert not done(epoch=3, step=100, epoch_step=20)  # steps used up inside an epoch that is still to be validated


# ------------------------------------------------------------------------------------------ corrupt checkpoints


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run killed after step 2 of 3, with checkpoints/last at step 2 (and no best yet). (run dir, config)."""
    d = tmp_path_factory.mktemp("stopped") / "run"
    cfg = small("train.checkpoint_every_steps=1")
    with pytest.MonkeyPatch.context() as mp:  # the session's cache (isolated_cache, function-scoped, is not active yet)
        mp.setenv("KUNLUN_CACHE", str(tmp_path_factory.getbasetemp() / "kunlun-cache"))
        t = Trainer(cfg, prepare_dataset(cfg.data.dataset), d, progress=False, logger=quiet)
        t.start_record()
        interrupt_at_step(t, 2)
        with pytest.raises(KeyboardInterrupt):
            t.fit()
    return d, cfg


def flip(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize("damage", [flip, truncate])
@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt", "config.yaml", "manifest.json"])
def test_a_damaged_checkpoint_file_is_named_and_never_loaded(stopped_run, tmp_path, name, damage):
    run, cfg = stopped_run
    ckpt = tmp_path / "last"
    shutil.copytree(run / "checkpoints" / "last", ckpt)
    damage(ckpt / name)
    needle = "manifest" if name == "manifest.json" else str(ckpt / name)
    with pytest.raises(KunlunError, match="corrupt") as e:
        verify_checkpoint(ckpt)
    assert needle in str(e.value) and "\n" not in str(e.value)
    if name in ("model.safetensors", "manifest.json"):
        model = build(cfg, prepare_dataset(cfg.data.dataset))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(KunlunError, match="corrupt"):
            load_weights(ckpt, model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was loaded
    if name in ("trainer_state.pt", "manifest.json"):
        with pytest.raises(KunlunError, match="corrupt"):
            load_trainer_state(ckpt)


def test_trainer_state_is_never_unpickled(stopped_run, tmp_path):
    # a trainer_state.pt holding an arbitrary object, with a manifest that vouches for it: refused, and its code never ran
    import hashlib
    import io

    run, _ = stopped_run
    ckpt = tmp_path / "last"
    shutil.copytree(run / "checkpoints" / "last", ckpt)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    buf = io.BytesIO()
    torch.save({"train_state": Payload()}, buf)
    (ckpt / "trainer_state.pt").write_bytes(buf.getvalue())
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["trainer_state.pt"] = {"bytes": len(buf.getvalue()), "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KunlunError, match="objects other than tensors"):
        load_trainer_state(ckpt)
    assert not marker.exists()


def test_cli_resume_and_eval_of_damaged_checkpoints_exit_2_naming_the_file(stopped_run, tmp_path):
    run, _ = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    truncate(copy / "checkpoints" / "last" / "trainer_state.pt")
    before = all_files(copy)
    r = kunlun("train", "--resume", copy, "--quiet", cwd=tmp_path, expect=2)
    assert f"{copy / 'checkpoints' / 'last' / 'trainer_state.pt'}: truncated or corrupt checkpoint file" in r.stderr
    assert {k: v for k, v in all_files(copy).items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    # the silent-garbage case of the issue: 64 flipped bytes in the weights an eval would score
    flip(copy / "checkpoints" / "last" / "model.safetensors")
    r = kunlun("eval", copy / "checkpoints" / "last", "--json", cwd=tmp_path, expect=2)
    assert f"{copy / 'checkpoints' / 'last' / 'model.safetensors'}: corrupt checkpoint file" in r.stderr and not r.stdout


def test_resume_checks_every_file_of_the_checkpoint(stopped_run, tmp_path):
    # the checkpoint's config.yaml is not read to resume, but a damaged checkpoint is not trained on from
    run, cfg = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    flip(copy / "checkpoints" / "last" / "config.yaml", 8)
    with pytest.raises(KunlunError, match=f"{copy / 'checkpoints' / 'last' / 'config.yaml'}: corrupt checkpoint file"):
        train_run(cfg, copy, resume=True, progress=False, logger=quiet)


# ------------------------------------------------------------------------------------------ full disk


def test_interrupted_checkpoint_swaps_are_undone(tmp_path):
    from kunlun.files import atomic_dir, os_error_text, recover_dir

    ckpts = tmp_path / "checkpoints"
    atomic_dir(ckpts / "last", lambda d: (d / "f").write_text("1"))
    # killed between the two renames of the next swap: only the previous version, as .last.old, and the new one's tmp
    os.replace(ckpts / "last", ckpts / ".last.old")
    (ckpts / ".last.tmpx").mkdir()
    recover_dir(ckpts / "last")
    assert sorted(p.name for p in ckpts.iterdir()) == ["last"] and (ckpts / "last" / "f").read_text() == "1"
    # killed after the swap, before the old version was removed: the new one stays, the old goes
    shutil.copytree(ckpts / "last", ckpts / ".last.old")
    atomic_dir(ckpts / "last", lambda d: (d / "f").write_text("2"))  # a leftover .old does not stop the next swap
    shutil.copytree(ckpts / "last", ckpts / ".last.old")
    recover_dir(ckpts / "last")
    assert sorted(p.name for p in ckpts.iterdir()) == ["last"] and (ckpts / "last" / "f").read_text() == "2"
    assert os_error_text(OSError(28, "No space left on device")) == "No space left on device (ENOSPC)"
    assert "short write" in os_error_text(OSError("610 requested and 496 written"))




def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_good_checkpoint(stopped_run, tmp_path):
    # a real write failure: the resumed process may write no file over 1 MB (RLIMIT_FSIZE; Python ignores SIGXFSZ, so
    # write() fails with EFBIG, as a full disk fails with ENOSPC). The weights fit, the trainer state does not.
    run, cfg = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    last = copy / "checkpoints" / "last"
    assert (last / "model.safetensors").stat().st_size < 1 << 20 < (last / "trainer_state.pt").stat().st_size
    before = checkpoint_files(copy / "checkpoints")
    prepare_dataset(cfg.data.dataset)  # the prepared-data cache exists: the limit hits the checkpoint, not the cache
    code = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            f"sys.argv = ['kunlun', 'train', '--resume', {str(copy)!r}, '--quiet']; runpy.run_module('kunlun', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert_one_error_line(r.stderr)
    assert f"{last}: could not write the checkpoint: File too large (EFBIG); the previous checkpoint there is unchanged" in r.stderr
    assert checkpoint_files(copy / "checkpoints") == before  # byte-identical, nothing added
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["last"]  # no temporary directory left
    final = train_run(cfg, copy, resume=True, progress=False, logger=quiet)  # room again: the run continues
    assert final["steps"] == 3


# ------------------------------------------------------------------------------------------ resume dead ends


def test_a_run_killed_before_its_first_checkpoint_can_be_resumed_from_the_beginning(tmp_path):
    cfg = small()
    run = tmp_path / "run"
    t = Trainer(cfg, prepare_dataset(cfg.data.dataset), run, progress=False, logger=quiet)
    t.start_record()  # what a kill -9 during the first steps leaves: the record's start, no checkpoint
    (run / "epochs.jsonl").write_text('{"epoch": 1, "stale": true}\n')  # a line of a first epoch whose checkpoint never came
    with pytest.raises(KunlunError, match="already exists and is not empty .use --resume"):
        train_run(cfg, run, progress=False, logger=quiet)
    with lock_run_dir(tmp_path / "bare"):  # killed before it wrote its config: a new start is the way, and --resume says so
        pass
    with pytest.raises(KunlunError, match="no run was recorded here yet .no config.yaml.; start it anew with --run-dir"):
        train_run(cfg, tmp_path / "bare", resume=True, progress=False, logger=quiet)
    logged = []
    final = train_run(cfg, run, resume=True, progress=False, logger=logged.append)
    assert any("stopped before its first checkpoint; starting it again from the beginning" in m for m in logged)
    assert final["steps"] == 3 and [r["epoch"] for r in records(run)] == [1] and "stale" not in records(run)[0]
    # checkpoints/last gone but checkpoints/best from a later epoch: more than a lost first epoch, so it is not restarted
    (run / "final.json").unlink()
    shutil.rmtree(run / "checkpoints" / "last")
    manifest = json.loads((run / "checkpoints" / "best" / "manifest.json").read_text())
    (run / "checkpoints" / "best" / "manifest.json").write_text(json.dumps({**manifest, "epoch": 3}))
    before = all_files(run)
    with pytest.raises(KunlunError, match="checkpoints/last is missing but checkpoints/best holds epoch 3; nothing was changed"):
        train_run(cfg, run, resume=True, progress=False, logger=quiet)
    assert {k: v for k, v in all_files(run).items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    cfg = small()
    run = tmp_path / "run"
    train_run(cfg, run, progress=False, logger=quiet)
    before = all_files(run)
    with pytest.raises(KunlunError, match=r"the run is finished \(1 epoch\(s\), 3 steps, best epoch 1\); nothing to resume"):
        train_run(cfg, run, resume=True, progress=False, logger=quiet)
    assert all_files(run) == before
    # killed after its last epoch but before final.json (an early stop, or steps used up): resume only finishes it
    (run / "final.json").unlink()
    final = train_run(cfg, run, resume=True, progress=False, logger=quiet)
    assert final["steps"] == 3 and final["epochs_run"] == 1 and len(records(run)) == 1
    assert all_files(run / "checkpoints") == {k.removeprefix("checkpoints/"): v for k, v in before.items() if k.startswith("checkpoints/")}


def test_resume_rejects_overrides_that_would_change_the_run(tmp_path):
    cfg = small()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    before = all_files(run)
    with pytest.raises(KunlunError, match=r"train.lr=0.01 would change the run, which was trained with train.lr=0.002"):
        train_run(small("train.lr=0.01"), run, resume=True, progress=False, logger=quiet)
    with pytest.raises(KunlunError, match=r"model.name=\"dnn\" would change the run"):
        train_run(load_config(None, ["train.max_steps=3"], model="dnn"), run, resume=True, progress=False, logger=quiet)
    assert all_files(run) == before  # nothing written, not even a lock file
    r = kunlun("train", "--resume", run, "train.lr=0.01", cwd=tmp_path, expect=2)
    assert "train.lr=0.01 would change the run" in r.stderr
    r = kunlun("train", "--resume", run, "--config", run / "config.yaml", cwd=tmp_path, expect=2)
    assert "--config: not used with --resume" in r.stderr


def test_checkpoint_cadence_does_not_make_a_finished_run_another_question(tmp_path):
    from kunlun.runs import reuse_state

    cfg = small()
    saved = cfg.to_dict()
    for key in ("checkpoint_every_steps", "checkpoint_every_minutes"):
        del saved["train"][key]  # a run recorded before these keys existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    (tmp_path / "final.json").write_text("{}")
    for requested in (cfg, small("train.checkpoint_every_steps=5")):
        assert reuse_state(tmp_path, requested.to_dict())[0] == "stale"  # same question (code unknown), not "config differs"
    assert reuse_state(tmp_path, small("train.lr=0.01").to_dict())[0] == "config differs"


def test_resume_applies_and_records_keys_that_do_not_change_the_run(stopped_run, tmp_path):
    run, cfg = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    logged = []
    final = train_run(small("train.checkpoint_every_steps=1", "train.threads=1"), copy, resume=True, progress=False,
                      logger=logged.append)
    assert final["steps"] == 3
    assert any("resume: train.threads 0 → 1" in m for m in logged)
    (line,) = (copy / "resumes.jsonl").read_text().splitlines()
    rec = json.loads(line)
    assert rec["step"] == 2 and rec["changed"] == {"train.threads": [0, 1]}


# ------------------------------------------------------------------------------------------ concurrency


def test_a_second_process_on_a_run_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    with lock_run_dir(run):
        with pytest.raises(KunlunError, match=f"run directory {run} is in use by process {os.getpid()}"):
            train_run(small(), run, progress=False, logger=quiet)
        assert lock_holder(run) == str(os.getpid())
        r = kunlun("train", "--run-dir", run, "--quiet", *TINY_MODEL, "train.max_steps=2", cwd=tmp_path, expect=2)
        assert f"run directory {run} is in use by process {os.getpid()}" in r.stderr
    assert lock_holder(run) is None
    assert [p.name for p in run.iterdir()] == [".lock"]  # the refused processes wrote nothing


def test_a_lock_dies_with_its_process(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from kunlun.processes import lock_run_dir\n"
                               f"with lock_run_dir(Path({str(run)!r})):\n    print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert lock_holder(run) == str(holder.pid)
        holder.kill()  # kill -9: no cleanup runs
        holder.wait()
        assert lock_holder(run) is None
        with lock_run_dir(run):
            pass
    finally:
        holder.kill()


def sweep_file(tmp_path: Path, steps: int) -> Path:
    f = tmp_path / "sweep.yaml"
    f.write_text("name: tiny\nmodel: kunlun\ndataset: ml-latest-small\n"
                 f"overrides: [train.epochs=1000, train.max_steps={steps}, train.warmup_steps=1, model.num_layers=1, train.batch_size=32]\n"
                 "axes:\n  model.d_model: [4]\nparallel: 1\nthreads: 1\n")
    return f


def test_a_restarted_sweep_does_not_train_beside_a_running_process(tmp_path):
    from kunlun.scaling.sweep import jobs, load_sweep, run_sweep

    spec = load_sweep(sweep_file(tmp_path, 3))
    out = tmp_path / "out"
    (job,) = jobs(spec, out)
    with lock_run_dir(job.run_dir):  # a training process of an earlier sweep, still running
        (job.run_dir / "config.yaml").write_text("its record\n")
        result = run_sweep(spec, out)
        assert result["done"] == [] and result["failed"] == [str(job.run_dir)]
        assert (job.run_dir / "config.yaml").read_text() == "its record\n"  # neither removed nor trained over


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_sweep_training_processes_die_with_the_sweep(tmp_path, sig):
    # kill -9: the kernel ends the child (PR_SET_PDEATHSIG); SIGTERM: the sweep stops its children itself and exits
    out = tmp_path / "out"
    sweep = subprocess.Popen([sys.executable, "-m", "kunlun", "sweep", str(sweep_file(tmp_path, 10**9)), "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out / "points" / "d_model4" / "seed0" / ".lock"
    child = None
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip().isdigit()) and time.monotonic() < deadline:
            time.sleep(0.2)
        child = int(lock.read_text())  # the training process, holding its run directory
        assert child != sweep.pid
        sweep.send_signal(sig)
        assert sweep.wait(timeout=30) == (-9 if sig == signal.SIGKILL else 143)
        deadline = time.monotonic() + 30
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(child)
        assert lock_holder(lock.parent) is None
    finally:
        sweep.kill()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
