"""Speed report: examples/s and model-FLOPs utilisation (MFU), fp32 and bf16 (bf16 on a CPU only where it has a
native bf16 unit, unless asked for: ``speed_dtypes``).

MFU = achieved model FLOPs/s ÷ the dense GEMM FLOP/s this machine reaches at the same dtype, measured
in the same process with a large square matmul (so it is relative to what this machine really does,
not a datasheet). FLOPs follow the project's convention (matrix products only, 2 per multiply-add;
docs/models.md#flops): MFU counts *useful* FLOPs (analytic, each example's real tokens, over the batches timed), HFU
*executed* FLOPs — counted from the aten ops one forward of the timed model dispatches on the selected op
implementation (``kunlun.models.flop_count``: every padded slot, every pair a dense masked attention kernel
scores). Training = 3 × forward (backward ≈ 2 × forward). Timings are medians of
``repeats`` runs; shared machines are noisy, so compare ratios measured in one run. A timed training step
is the trainer's own (``kunlun.training.step.TrainStep``: loss, clipping, optimizers and their schedules).

Besides the step on pre-built batches, the report gives the input path alone (``loader``: batches assembled
from the prepared split, the model's input, with nothing else) and training end to end through the real
trainer (``trainer``: loader, step, progress, records; the run's own ``train_examples_per_s``). On a GPU it
adds MFU against the datasheet's dense peak for the dtype (``DATASHEET_PEAKS``). Presets (``PRESETS``) name
the sizes docs/results/speed.md reports: today's default, the d_model-128 model of the speed issue, and a
production-like one (d_model 256, 4 layers, sequences of 512, batch 1024).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kunlun.config import Config, load_config
from kunlun.console import emit_json, log, out_console
from kunlun.data.batches import Batcher
from kunlun.data.registry import prepare_dataset
from kunlun.errors import KunlunError
from kunlun.runs import environment
from kunlun.training.step import TrainModel, TrainStep, autocast, default_device, make_optimizers, make_schedulers, set_seed
from kunlun.training.trainer import build, executed_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

PRESETS: dict[str, list[str]] = {
    "default": [],
    "d128": ["model.d_model=128", "model.num_heads=4", "model.gdpa_activation=[silu,gelu,silu,gelu]"],
    # a GPU size: on a 24 GiB CPU machine its activations (1024 × 512 tokens × 4 layers) run out of memory; there
    # add train.batch_size=64 train.eval_batch_size=128 (the CPU row of docs/results/speed.md)
    "production": ["model.d_model=256", "model.num_layers=4", "model.num_heads=4",
                   "model.gdpa_activation=[silu,gelu,silu,gelu]", "data.max_seq_len=512", "train.batch_size=1024"],
}

# dense (no sparsity) peak FLOP/s per dtype from the vendors' datasheets, by a substring of the device name;
# fp32 = the TF32 tensor-core rate is NOT used: fp32 matmuls here run in full fp32 unless the user enables TF32
DATASHEET_PEAKS: dict[str, dict[str, float]] = {
    "H100": {"fp32": 67e12, "bf16": 989e12},  # SXM5
    "H200": {"fp32": 67e12, "bf16": 989e12},
    "B200": {"fp32": 75e12, "bf16": 2250e12},
    "A100": {"fp32": 19.5e12, "bf16": 312e12},
}


def datasheet_peak(device_name: str, dtype: str) -> float | None:
    for key, peaks in DATASHEET_PEAKS.items():
        if key in device_name:
            return peaks[dtype]
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_flops_per_s(dtype: torch.dtype, device: torch.device, n: int | None = None, repeats: int = 5) -> float:
    """Median FLOP/s of an n×n @ n×n matmul (2n³ FLOPs) at ``dtype``. Default n: 8192 on a GPU; on a CPU the smallest
    of 256, 512, 1024, 2048 whose matmul takes at least ``CPU_GEMM_SECONDS`` — large enough to reach the kernel's
    rate, and not minutes on a CPU that runs the dtype many times slower (bf16 without AVX-512 BF16 / AMX)."""
    if n is None and device.type != "cuda":
        n = 256
        while n < 2048 and _gemm_seconds(n, dtype, device) < CPU_GEMM_SECONDS:
            n *= 2
    n = n or 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


CPU_GEMM_SECONDS = 0.05
# a dtype whose GEMMs run this many times slower than fp32 on the CPU at hand is not timed by default: the CPU has no
# native unit for it (bf16 on a CPU without AVX-512 BF16 / AMX), and its row would cost minutes
SLOW_DTYPE_RATIO = 2.0


def _gemm_seconds(n: int, dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    a @ a  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    a @ a
    _sync(device)
    return time.perf_counter() - t0


def speed_dtypes(device: torch.device, requested: list[str] | None = None) -> list[str]:
    """The dtypes to time: ``requested`` when given; else fp32, and bf16 on a GPU or on a CPU whose bf16 GEMM is
    within ``SLOW_DTYPE_RATIO`` of its fp32 one (measured: a 256³ matmul each, a fraction of a second)."""
    if requested:
        unknown = [d for d in requested if d not in DTYPES]
        if unknown:
            raise KunlunError(f"--dtypes: unknown {unknown[0]!r}; known: {', '.join(DTYPES)}")
        return list(dict.fromkeys(requested))
    if device.type == "cuda":
        return list(DTYPES)
    ratio = min(_gemm_seconds(256, torch.bfloat16, device) for _ in range(3)) / min(_gemm_seconds(256, torch.float32, device)
                                                                                     for _ in range(3))
    if ratio > SLOW_DTYPE_RATIO:
        log(f"bench: bf16 not timed: this CPU multiplies bf16 matrices {ratio:.0f}× slower than fp32 (no native bf16 "
            "unit such as AVX-512 BF16 or AMX); --dtypes fp32,bf16 times it anyway")
        return ["fp32"]
    return list(DTYPES)


def loader_examples_per_s(batcher: Batcher, batch_size: int, seconds: float = 2.0) -> float:
    """Examples/s of batch assembly alone over shuffled rows (at least one batch, about ``seconds`` long)."""
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while True:
        for batch in batcher.iterate(batch_size, rng):
            n += len(batch)
            if time.perf_counter() - t0 > seconds:
                return n / (time.perf_counter() - t0)


def trainer_examples_per_s(cfg: Config, steps: int) -> float:
    """Training examples/s through the real trainer (loader, step, progress, records), ``steps`` optimizer steps
    in a throw-away run directory; validation and checkpoints are not timed (the run's own measure), and the
    splits are not scored at the end."""
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from kunlun.training.runner import train_run

    train = replace(cfg.train, max_steps=steps, epochs=1, patience=0)
    with tempfile.TemporaryDirectory(prefix="kunlun-speed-") as tmp:
        final = train_run(replace(cfg, train=train), Path(tmp) / "run", progress=False, logger=lambda _: None, final_splits=())
    return final["train_examples_per_s"]


def run_speed_bench(cfg: Config, steps: int = 30, repeats: int = 3, trainer: bool = True,
                    dtypes: list[str] | None = None) -> dict[str, Any]:
    """``dtypes``: the dtypes to time (default: ``speed_dtypes``'s choice for this device)."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = default_device()
    data = prepare_dataset(cfg.data.dataset, cfg.data.data_dir, log=log)
    batcher = Batcher(data, "train", cfg.data.max_seq_len, build(cfg, data).event_windows)
    rng = np.random.default_rng(0)
    train_batches = [batcher.batch(rng.choice(len(batcher), t.batch_size, replace=False)).to(device) for _ in range(4)]
    eval_batch = batcher.batch(rng.choice(len(batcher), min(t.eval_batch_size, len(batcher)), replace=False)).to(device)
    result: dict[str, Any] = {
        "model": cfg.model.name,
        "dataset": data.name,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else environment()["cpu"],
        "threads": torch.get_num_threads(),
        "batch_size": t.batch_size,
        "eval_batch_size": len(eval_batch),
        "max_seq_len": cfg.data.max_seq_len,
        "steps": steps,
        "repeats": repeats,
        "compile": t.compile,  # training steps through torch.compile (train.compile); inference stays eager
        "code": environment()["code"]["label"],  # the commit (and source hash) every number below comes from
    }
    log("bench loader: batch assembly alone …")
    result["loader_examples_per_s"] = loader_examples_per_s(batcher, t.batch_size)
    result["dtypes"] = speed_dtypes(device, dtypes)
    for name in result["dtypes"]:
        dtype = DTYPES[name]
        log(f"bench {name}: GEMM peak, training and inference timing …")
        result[name] = _time_dtype(cfg, data, train_batches, eval_batch, dtype, device, steps, repeats, batcher)
        for key in ("flops_per_example", "useful_flops_per_example", "analytic_flops_per_example"):
            result[key] = result[name].pop(key)  # the same at both dtypes
        result["executed_flops_per_example"] = result["flops_per_example"]
        peak = datasheet_peak(result["device"], name) if device.type == "cuda" else None
        if peak:
            result[name]["datasheet_peak_flops_per_s"] = peak
            result[name]["train_mfu_datasheet"] = 3 * result["useful_flops_per_example"] * result[name]["train_examples_per_s"] / peak
        if trainer:
            log(f"bench {name}: end to end through the trainer …")
            bf16 = replace_train(cfg, bf16=dtype is torch.bfloat16)
            result[name]["trainer_examples_per_s"] = trainer_examples_per_s(bf16, steps * repeats)
    return result


def speed_bench_reported(config_path: Path | None = None, preset: str = "default", overrides: list[str] | tuple[str, ...] = (),
                         dataset: str | None = None, data_dir: str | None = None, steps: int = 30, repeats: int = 3,
                         trainer: bool = True, dtypes: list[str] | None = None, profile_path: Path | None = None,
                         as_json: bool = False) -> dict[str, Any] | None:
    """What ``kunlun bench speed`` does: the config (``config_path``, default the packaged one) with the ``preset``'s
    overrides, then ``overrides``; its speed measured (``run_speed_bench``) and printed on stdout as a table or one JSON
    object, and returned. With ``profile_path``: its training traced there instead (``profile_training``), the top
    operators printed, None returned."""
    cfg = load_config(config_path, [*PRESETS[preset], *overrides], dataset=dataset, data_dir=data_dir)
    if profile_path is not None:
        print(f"{profile_training(cfg, profile_path)}\ntrace written to {profile_path}", flush=True)
        return None
    result = run_speed_bench(cfg, steps=steps, repeats=repeats, trainer=trainer, dtypes=dtypes)
    result["preset"] = preset
    emit_json(result) if as_json else speed_table(result)
    return result


def memmap_vs_ram(cfg: Config, steps: int = 100, repeats: int = 5, log=log) -> dict[str, Any]:
    """Examples/s of the input path alone (``loader``) and of training through the trainer's own epoch loop (``trainer``:
    loader + step, no evaluation or records) from the memory-mapped cache (``memmap``, what training uses) and from the
    same arrays copied into RAM (``ram``, ``Prepared.in_memory``), alternated ``repeats`` times (the order swapped every
    other time) on one process; medians and ratios. The maps are read through the page cache: after the first pass a
    set that fits in memory is served from it, so this measures the mapping's cost, not the disk's."""
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from kunlun.training.trainer import Trainer

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    maps = prepare_dataset(cfg.data.dataset, cfg.data.data_dir, log=log)
    sources = {"memmap": maps, "ram": maps.in_memory()}
    run_cfg = replace(cfg, train=replace(t, max_steps=steps, epochs=1, patience=0, checkpoint_every_steps=0, checkpoint_every_minutes=0.0))
    rates: dict[str, dict[str, list[float]]] = {k: {"loader": [], "trainer": []} for k in sources}
    for r in range(repeats):
        for name in (("memmap", "ram") if r % 2 == 0 else ("ram", "memmap")):
            data = sources[name]
            with tempfile.TemporaryDirectory(prefix="kunlun-mmap-") as tmp:
                trainer = Trainer(run_cfg, data, Path(tmp) / "run", progress=False, logger=lambda _: None)
                rates[name]["loader"].append(loader_examples_per_s(trainer.train_batches, t.batch_size))
                trainer.train_epoch(0)
                rates[name]["trainer"].append(trainer.state.train_examples / trainer.state.train_seconds)
            log(f"repeat {r + 1}/{repeats} {name}: loader {rates[name]['loader'][-1]:,.0f} ex/s, trainer {rates[name]['trainer'][-1]:,.0f} ex/s")
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in rates.items()}
    return {"model": cfg.model.name, "dataset": maps.name, "rows": {k: len(v) for k, v in maps.splits.items()}, "steps": steps,
            "repeats": repeats, "batch_size": t.batch_size, "threads": torch.get_num_threads(), "runs": rates, "median": med,
            "memmap_over_ram": {m: med["memmap"][m] / med["ram"][m] for m in ("loader", "trainer")}}


def interleaved_step_ms(cfgs: dict[str, Config], steps: int = 10, rounds: int = 5) -> dict[str, dict[str, list[float]]]:
    """Milliseconds per training step (the trainer's ``TrainStep``) and per inference forward of each config's model,
    on the same training rows, **interleaved**: every round times each model in turn (the order rotated each round),
    so that load from other processes falls on all of them alike; compare the models by per-round ratios.

    ``cfgs``: name → config, all on one data set (the first config's); each model is built from its config's seed and
    fed batches of its own inputs (its event windows) drawn from the same row indices; one warm-up step each, untimed.
    Returns name → {"train": [ms per step, one per round], "infer": [ms per forward of a batch, one per round]}."""
    first = next(iter(cfgs.values()))
    if first.train.threads:
        torch.set_num_threads(first.train.threads)
    device = default_device()
    data = prepare_dataset(first.data.dataset, first.data.data_dir, log=log)
    rng = np.random.default_rng(0)
    n_train = len(data.splits["train"])
    rows = [rng.choice(n_train, min(first.train.batch_size, n_train), replace=False) for _ in range(4)]
    timed = {}
    for name, cfg in cfgs.items():
        set_seed(cfg.train.seed)
        model = build(cfg, data).to(device)
        batcher = Batcher(data, "train", cfg.data.max_seq_len, model.event_windows)
        batches = [batcher.batch(r).to(device) for r in rows]
        opts = make_optimizers(model, cfg.train)
        step = TrainStep(TrainModel(model, cfg.train.bf16), opts, make_schedulers(opts, cfg.train, (rounds + 1) * steps + 1),
                         cfg.train.grad_clip)
        timed[name] = (model, step, batches, cfg.train.bf16)
        model.train()
        step(batches[0])  # warm-up: first-call allocations, lazy initialisation

    def train_ms(model, step, batches, _bf16) -> float:
        model.train()
        t0 = time.perf_counter()
        for i in range(steps):
            step(batches[i % len(batches)])
        _sync(device)
        return 1e3 * (time.perf_counter() - t0) / steps

    @torch.no_grad()
    def infer_ms(model, _step, batches, bf16) -> float:
        model.eval()
        t0 = time.perf_counter()
        for i in range(steps):
            with autocast(device, bf16):
                model(batches[i % len(batches)])
        _sync(device)
        return 1e3 * (time.perf_counter() - t0) / steps

    names = list(timed)
    out: dict[str, dict[str, list[float]]] = {n: {"train": [], "infer": []} for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name]["train"].append(train_ms(*timed[name]))
            out[name]["infer"].append(infer_ms(*timed[name]))
    return out


def replace_train(cfg: Config, **changes) -> Config:
    from dataclasses import replace

    return replace(cfg, train=replace(cfg.train, **changes))


def profile_training(cfg: Config, out: Any, steps: int = 10) -> str:
    """A torch.profiler trace of ``steps`` training steps (Chrome trace JSON at ``out``, open it in Perfetto or
    chrome://tracing) and the top operators by self time, as text (returned)."""
    from torch.profiler import ProfilerActivity, profile

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = default_device()
    data = prepare_dataset(cfg.data.dataset, cfg.data.data_dir, log=log)
    set_seed(t.seed)
    model = build(cfg, data).to(device)
    batcher = Batcher(data, "train", cfg.data.max_seq_len, model.event_windows)
    opts = make_optimizers(model, t)
    step = TrainStep(TrainModel(model, t.bf16), opts, make_schedulers(opts, t, steps + 3), t.grad_clip)
    batches = batcher.iterate(t.batch_size, np.random.default_rng(0))
    for _ in range(3):  # warm-up, outside the trace
        step(next(batches).to(device))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step(next(batches).to(device))
        _sync(device)
    prof.export_chrome_trace(str(out))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25)


def _time_dtype(cfg, data, train_batches, eval_batch, dtype, device, steps: int, repeats: int, batcher) -> dict[str, float]:
    """Median training / inference examples/s of a fresh model at ``dtype`` (autocast for bf16), MFU and HFU."""
    t = cfg.train
    set_seed(t.seed)
    model = build(cfg, data).to(device)
    flops, _ = executed_flops(model, batcher, device)  # executed: counted from one forward's ops, every padded slot
    with torch.no_grad():  # useful: each example's real tokens, over the batches being timed
        useful = model.useful_flops_per_example(train_batches)
    bf16 = dtype is torch.bfloat16
    # the trainer's own step (loss, non-finite check, clipping, optimizers and schedules), over the steps timed here
    opts = make_optimizers(model, t)
    train_model = TrainModel(model, bf16)
    if t.compile:  # as the trainer does; compiling happens in the untimed warm-up
        train_model = torch.compile(train_model)
    step = TrainStep(train_model, opts, make_schedulers(opts, t, (repeats + 1) * steps), t.grad_clip)

    def train_steps(k: int) -> None:
        model.train()
        for i in range(k):
            step(train_batches[i % len(train_batches)])
        _sync(device)

    @torch.no_grad()
    def infer(k: int) -> None:
        model.eval()
        for _ in range(k):
            with autocast(device, bf16):
                model(eval_batch)
        _sync(device)

    def median_seconds(fn, k: int) -> float:
        fn(min(k, 3))  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(k)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    peak = gemm_flops_per_s(dtype, device)
    train_eps = steps * t.batch_size / median_seconds(train_steps, steps)
    infer_steps = max(3, steps // 5)
    infer_eps = infer_steps * len(eval_batch) / median_seconds(infer, infer_steps)
    # MFU counts useful FLOPs (the model's work on real tokens); HFU counts executed FLOPs (padding included)
    return {
        "flops_per_example": flops,
        "useful_flops_per_example": useful,
        "analytic_flops_per_example": model.flops_per_example(),
        "gemm_flops_per_s": peak,
        "train_examples_per_s": train_eps,
        "train_mfu": 3 * useful * train_eps / peak,
        "train_hfu": 3 * flops * train_eps / peak,
        "infer_examples_per_s": infer_eps,
        "infer_mfu": useful * infer_eps / peak,
        "infer_hfu": flops * infer_eps / peak,
    }


def speed_table(r: dict[str, Any]) -> None:
    from rich.table import Table

    tab = Table(title=f"{r['model']} on {r['dataset']} — {r['device']}, {r['threads']} threads, "
                      f"{r['useful_flops_per_example'] / 1e6:.2f} useful (analytic) / {r['flops_per_example'] / 1e6:.2f} executed "
                      "(counted) MFLOPs/example forward (MFU: useful FLOPs; HFU: executed, padding and masked attention "
                      "pairs included); code " + r["code"])
    cols = ["dtype", "GEMM GFLOP/s", "train ex/s", "trainer ex/s", "train MFU", "train HFU", "infer ex/s", "infer MFU", "infer HFU"]
    timed = [name for name in DTYPES if name in r]
    datasheet = any("train_mfu_datasheet" in r[name] for name in timed)
    for col in cols + (["MFU vs datasheet"] if datasheet else []):
        tab.add_column(col, justify="right")
    for name in timed:
        m = r[name]
        row = [name, f"{m['gemm_flops_per_s'] / 1e9:.1f}", f"{m['train_examples_per_s']:.0f}",
               f"{m['trainer_examples_per_s']:.0f}" if "trainer_examples_per_s" in m else "–", f"{100 * m['train_mfu']:.2f} %",
               f"{100 * m['train_hfu']:.2f} %", f"{m['infer_examples_per_s']:.0f}", f"{100 * m['infer_mfu']:.2f} %",
               f"{100 * m['infer_hfu']:.2f} %"]
        if datasheet:
            row.append(f"{100 * m['train_mfu_datasheet']:.2f} %" if "train_mfu_datasheet" in m else "–")
        tab.add_row(*row)
    out_console().print(tab)
    out_console().print(f"loader alone: {r['loader_examples_per_s']:,.0f} examples/s "
                        f"({r['loader_examples_per_s'] / max(r[n]['train_examples_per_s'] for n in timed):.0f}× the fastest training step)")


def memmap_text(r: dict[str, Any], repeats: int) -> str:
    """``memmap_vs_ram``'s medians, one line for the loader and one for the trainer."""
    return "\n".join(f"{m:8s} memmap {r['median']['memmap'][m]:>10,.0f} ex/s   ram {r['median']['ram'][m]:>10,.0f} ex/s   "
                     f"memmap/ram {r['memmap_over_ram'][m]:.3f}   (medians of {repeats}; {r['model']} on {r['dataset']})"
                     for m in ("loader", "trainer"))
