"""Number formats against their specs (../shared/design/formats.md) and, when installed, torchao."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from kunlun.formats import quantize
from kunlun.formats.quantize import E2M1_VALUES, e8m0_code, e8m0_value, hadamard, random_hadamard, rotate

HIF4_MAGNITUDES = [0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7]


def test_e2m1_value_table_and_ties():
    # one MXFP4 block whose scale is 1 (amax 4 → 2^(2 − 2)): elements are plain E2M1 roundings
    grid = torch.linspace(-4, 4, 32 * 4)
    grid[0] = 4.0
    out = quantize(grid.reshape(4, 32).clone().index_fill_(1, torch.tensor([0]), 4.0), "mxfp4")
    assert set(out.abs().unique().tolist()) <= set(E2M1_VALUES)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 4.0, 0.0] + [0.0] * 24)
    assert quantize(ties, "mxfp4").tolist()[:8] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0]  # ties to even


def test_mxfp4_worked_block_from_spec():
    block = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] + [0.0] * 24)
    assert quantize(block, "mxfp4").tolist()[:8] == [0, 1, 1, 2, 2, 4, 4, 6]  # amax 7: X = 1, 7 clips to 6
    assert quantize(-block, "mxfp4").tolist()[:8] == [-0.0, -1, -1, -2, -2, -4, -4, -6]


def test_e8m0_nan_code_and_non_finite_blocks():
    assert e8m0_code(torch.tensor([0.0, -127.0, 127.0, 300.0, float("nan")])).tolist() == [127, 0, 254, 254, 255]
    assert math.isnan(e8m0_value(torch.tensor(255.0)).item()) and e8m0_value(torch.tensor(127.0)).item() == 1.0
    x = torch.randn(2, 32)
    x[0, 3] = float("inf")
    q = quantize(x, "mxfp4")
    assert torch.isnan(q[0]).all() and torch.isfinite(q[1]).all()  # only the block holding Inf is NaN
    x[0, 3] = float("nan")
    assert torch.isnan(quantize(x, "nvfp4")[0, :16]).all() and torch.isfinite(quantize(x, "nvfp4")[0, 16:]).all()


@pytest.mark.parametrize("n", [3, 8, 12, 20, 40])
def test_ragged_reduction_axis_is_zero_padded(n):
    # an axis shorter than a block (n < 16, 32 or 64) is quantized as a block of its own length: the same values as
    # zero-padding it to the full block
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n)) * torch.logspace(-3, 3, 5)[:, None]
    padded = torch.nn.functional.pad(x, (0, 64 - n))
    for fmt in ("mxfp4", "nvfp4", "hif4"):
        assert torch.equal(quantize(x, fmt), quantize(padded, fmt)[:, :n]), fmt
        assert torch.equal(quantize(x.T.contiguous(), fmt, axis=0), quantize(x, fmt).T)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed (optional test dependency)")
@pytest.mark.parametrize("case", ["floor", "ceil", "even", "nvfp4", "nvfp4-no-tensor-scale"])
def test_bit_exact_against_torchao(case):
    import warnings

    warnings.filterwarnings("ignore")
    from torchao.prototype.mx_formats.mx_tensor import MXTensor, ScaleCalculationMode
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 256, generator=g) * torch.exp(3 * torch.randn(128, 1, generator=g))  # scales over ~8 decades
    if case.startswith("nvfp4"):
        ts = case == "nvfp4"
        ref = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax()) if ts else None).dequantize(torch.float32)
        ours = quantize(x, "nvfp4", tensor_scale=ts)
    else:
        ref = MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode[case.upper()]).dequantize(torch.float32)
        ours = quantize(x, "mxfp4", scale_rule=case)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("s", [1.0, 1.25, 1.5 * 2**-10, 1.75 * 2**6])
def test_hif4_every_magnitude_round_trips(s):
    # first 8: e8 = 1 (e4 = 1 then 0), next 8: e8 = 0, e4 = 0 — together all 16 magnitudes; max 7·S fixes S
    unit = torch.tensor([7, 6, 5, 4, 3.5, 3, 2.5, 2, 1.75, 1.5, 1.25, 1, .75, .5, .25, 0] + [0] * 48) * s
    assert sorted(set((unit / s).tolist())) == HIF4_MAGNITUDES
    assert torch.equal(quantize(unit, "hif4"), unit)
    assert torch.equal(quantize(-unit, "hif4"), -unit)


def test_hif4_rounds_to_its_grid():
    unit = torch.tensor([7.0, 0.3, 0.49, 0.51, 1.8, 0.25, 0.24, 0] + [0] * 56)  # S = 1; the group of 8 holds 7 → e8 = 1
    q = quantize(unit, "hif4").tolist()
    # first group of 4: e4 = 1 → grid 1; second: max 1.8 → e4 = 0 → grid 0.5, ties away from zero (0.25 → 0.5)
    assert q[:8] == [7.0, 0.0, 0.0, 1.0, 2.0, 0.5, 0.0, 0.0]


# ------------------------------------------------------------------------------------------ HiF4 against its spec
# An independent reference for formats.md "HiFloat4": one unit at a time, one element at a time, in Python floats.
# Python floats are float64, so every product below is exact (a float32 value has 24 significant bits, a BF16 value
# 8), and each rounding the spec writes happens once, on the exact value.

def _round_sig(v: float, bits: int) -> float:
    """v ≥ 0 rounded to ``bits`` significant bits, ties to even (Python's round is half-even)."""
    if v == 0:
        return 0.0
    m, e = math.frexp(v)  # v = m · 2^e, 0.5 ≤ m < 1
    return math.ldexp(round(m * 2**bits) / 2**bits, e)


def _bf16(v: float) -> float:
    return _round_sig(v, 8)  # 1 implicit + 7 stored mantissa bits; S never needs BF16's subnormals (it is clipped at 2^-48)


def _e6m2(v: float) -> float:
    return _round_sig(v, 3)  # 1 implicit + 2 stored mantissa bits


def hif4_spec(row: list[float]) -> list[float]:
    """formats.md HiFloat4 steps 1–4 for one row (the reduction axis last), zero-padded to units of 64.
    A unit holding NaN or ±Inf decodes to NaN everywhere (as the 4-bit formats' non-finite blocks)."""
    n = len(row)
    padded = list(row) + [0.0] * (-n % 64)
    out: list[float] = []
    for start in range(0, len(padded), 64):
        unit = padded[start:start + 64]
        if any(math.isnan(x) or math.isinf(x) for x in unit):
            out += [math.nan] * 64
            continue
        m64 = max(abs(x) for x in unit)
        s = min(max(_e6m2(_bf16(m64 * _bf16(1 / 7))), 2.0**-48), 49152.0)  # step 2
        r = _bf16(1 / s)  # step 3
        for g8 in range(8):  # step 1: [8][2][4]
            eight = unit[8 * g8:8 * g8 + 8]
            e8 = 1 if max(abs(x) for x in eight) * r >= 4 else 0
            for g4 in range(2):
                four = eight[4 * g4:4 * g4 + 4]
                e4 = 1 if max(abs(x) for x in four) * r / 2**e8 >= 2 else 0
                for x in four:
                    k = min(7, math.floor(abs(x) * r * 4 / 2 ** (e8 + e4) + 0.5))  # step 4, half away from zero
                    out.append(math.copysign(k / 4 * 2 ** (e8 + e4) * s, x))
    return out[:n]


def assert_matches_hif4_spec(x: torch.Tensor) -> None:
    """quantize(x, "hif4") equals the reference bit for bit (NaN where the reference has NaN). x: [rows, n] float32."""
    ours = quantize(x, "hif4")
    spec = torch.tensor([hif4_spec(row) for row in x.tolist()], dtype=torch.float32).reshape(x.shape)
    nan = torch.isnan(spec)
    assert torch.equal(torch.isnan(ours), nan), f"NaN pattern differs in {(torch.isnan(ours) != nan).sum()} elements"
    bad = (ours.view(torch.int32) != spec.view(torch.int32)) & ~nan
    if bad.any():
        i = bad.nonzero()[0].tolist()
        pytest.fail(f"{int(bad.sum())} of {x.numel()} elements differ from the spec; first at {i}: "
                    f"x={x[tuple(i)].item()!r} ours={ours[tuple(i)].item()!r} spec={spec[tuple(i)].item()!r}")


def _rounding_boundaries(rng: np.random.Generator, units: int) -> np.ndarray:
    """Units whose elements sit on, and one float32 ulp either side of, every decision threshold of the spec:
    the half-way points (k + ½)·2^(e8+e4)/(4r) of the element grids and the micro-exponent thresholds 2/r, 4/r."""
    rows = []
    for _ in range(units):
        s = _e6m2(rng.uniform(1, 2)) * 2.0 ** int(rng.integers(-40, 14))
        m64 = np.float32(7 * s)
        r = _bf16(1 / min(max(_e6m2(_bf16(float(m64) * _bf16(1 / 7))), 2.0**-48), 49152.0))
        points = [(k + 0.5) * 2**e / (4 * r) for k in range(7) for e in range(3)] + [2 / r, 4 / r, 8 / r]
        near = np.array([np.nextafter(np.float32(p), np.float32(d)) for p in points for d in (-np.inf, 0, np.inf)], np.float32)
        near = near[near <= m64]
        unit = rng.choice(near, 64) * rng.choice([-1, 1], 64)
        unit[rng.integers(64)] = m64 * rng.choice([-1, 1])
        rows.append(unit)
    return np.stack(rows).astype(np.float32)


def _hif4_inputs(kind: str) -> torch.Tensor:
    """[rows, n] float32 test inputs; n = 1000 is not a multiple of 64, so every row ends in a ragged unit."""
    rng = np.random.default_rng(list(HIF4_KINDS).index(kind))
    shape = (24, 1000)
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "lognormal":  # magnitudes over ~60 decades, each row its own scale
        x = rng.choice([-1, 1], shape) * np.exp(rng.normal(0, 4, shape)) * 10.0 ** rng.uniform(-30, 30, (shape[0], 1))
    elif kind == "limits":  # unit maxima at S's clip points 2^-48 and 49152 (·7), float32 subnormals, float32's max
        centre = np.array([7 * 2.0**-48, 7 * 49152.0, 1e-40, 1e-44, 3e38, 7 * 2.0**-49, 7 * 57344.0, 1.0])
        x = rng.uniform(-1, 1, shape) * centre[np.arange(shape[0]) % len(centre), None] * 2.0 ** rng.uniform(-2, 2, (shape[0], 1))
        x[:, ::64] = np.sign(x[:, ::64]) * centre[np.arange(shape[0]) % len(centre), None]  # some unit maxima exactly on them
    elif kind == "boundaries":
        x = _rounding_boundaries(rng, shape[0] * 16).reshape(shape[0], -1)[:, :shape[1]]
    elif kind == "zeros":  # all-zero units, −0.0, and units whose only non-zero is tiny
        x = np.zeros(shape)
        x[::3] = -0.0
        x[1::3, ::64] = rng.uniform(-1, 1, x[1::3, ::64].shape) * 1e-30
    elif kind == "nonfinite":  # NaN, +Inf and −Inf in some units; the other units must be untouched
        x = rng.standard_normal(shape)
        for value in (np.nan, np.inf, -np.inf):
            x[rng.integers(0, shape[0], 8), rng.integers(0, shape[1], 8)] = value
    return torch.from_numpy(np.asarray(x, dtype=np.float32).copy())


HIF4_KINDS = ("normal", "lognormal", "limits", "boundaries", "zeros", "nonfinite")


@pytest.mark.parametrize("kind", HIF4_KINDS)
def test_hif4_matches_the_spec_bit_for_bit(kind):
    assert_matches_hif4_spec(_hif4_inputs(kind))


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 130])
def test_hif4_ragged_units_match_the_spec(n):
    assert_matches_hif4_spec(torch.randn(3, n, generator=torch.Generator().manual_seed(n)) * 1e3)


def test_hif4_scale_is_one_rounding_of_the_exact_product():
    # BF16(m64 · BF16(1/7)) rounds the exact product once: m64 · 73/512 rounded to float32 first would land on a
    # BF16 tie here and give S = 0.1875 instead of the spec's 0.21875.
    unit = torch.zeros(64)
    unit[0] = 1.4280822277069092
    assert quantize(unit, "hif4")[0].item() == 7 * 0.21875 == hif4_spec(unit.tolist())[0]  # the unit's max decodes to 7·S


def test_hif4_inf_makes_the_unit_nan():
    x = torch.randn(2, 128)
    x[0, 70] = float("inf")
    q = quantize(x, "hif4")
    assert torch.isnan(q[0, 64:]).all() and torch.isfinite(q[0, :64]).all() and torch.isfinite(q[1]).all()


@pytest.mark.skipif(importlib.util.find_spec("hypothesis") is None, reason="hypothesis not installed (optional test dependency)")
def test_hif4_matches_the_spec_on_generated_rows():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    any_float32 = st.floats(width=32)  # NaN, ±Inf, subnormals, float32's extremes
    shared_scale = st.builds(lambda v, e: float(np.float32(v * 2.0**e)), st.floats(-8, 8, width=32), st.integers(-60, 30))

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.one_of(st.lists(any_float32, min_size=1, max_size=140), st.lists(shared_scale, min_size=1, max_size=140)))
    def check(row):
        assert_matches_hif4_spec(torch.tensor([row], dtype=torch.float32))

    check()


def test_gaussian_mse_ratios_match_the_paper():
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    mse = lambda fmt, **o: ((quantize(x, fmt, **o) - x) ** 2).mean().item()  # noqa: E731
    nv = mse("nvfp4")
    assert mse("hif4") / nv == pytest.approx(0.76, abs=0.02)
    assert mse("mxfp4") / nv == pytest.approx(1.46, abs=0.04)
    assert mse("mxfp4", scale_rule="ceil") > mse("mxfp4")  # coarser grid, never clips


def test_hif8_range_boundaries_and_mantissa():
    x = torch.tensor([2.0**-22, 0.99 * 2.0**-23, 1.01 * 2.0**-23, 2.0**-17 * 1.4, 32768, 40959, 40960, 1e6, -1e6,
                      1.0625, 17.0, 18.0, 1000.0, float("nan"), float("inf")])
    q = quantize(x, "hif8").tolist()
    assert q[:4] == [2.0**-22, 0.0, 2.0**-22, 2.0**-17]  # denormals are powers of two down to 2^-22
    assert q[4:9] == [32768, 32768, math.inf, math.inf, -math.inf]  # largest finite 2^15; ≥ 40960 overflows
    assert q[9:13] == [1.125, 16.0, 20.0, 1024.0]  # 3 mantissa bits at e=0, 2 at e=4, 1 at e=9 (half away)
    assert math.isnan(q[13]) and q[14] == math.inf


def test_fp8_and_bf16():
    x = torch.tensor([1000.0, -1000.0, float("inf"), 0.1])
    assert quantize(x, "fp8_e4m3", scaled=False).tolist()[:2] == [448.0, -448.0]
    assert math.isnan(quantize(x, "fp8_e4m3", scaled=False)[2])
    assert quantize(x, "fp8_e5m2", scaled=False)[2] == math.inf
    y = torch.randn(100)
    assert (quantize(y, "fp8_e4m3").abs().max() - y.abs().max()).abs() < 1e-6  # amax maps to 448 exactly
    assert torch.equal(quantize(y, "bf16"), y.bfloat16().float())


def test_straight_through_gradient_and_stochastic_rounding():
    x = torch.randn(4, 64, requires_grad=True)
    quantize(x, "hif4").mul(torch.arange(64.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(64.0).expand(4, 64))
    v = torch.full((20000, 32), 0.3)
    v[:, 0] = 4.0  # scale 1: 0.3 lies between 0 and 0.5
    g = torch.Generator().manual_seed(0)
    sr = quantize(v, "mxfp4", stochastic=True, generator=g)[:, 1:]
    assert set(sr.unique().tolist()) == {0.0, 0.5} and sr.mean().item() == pytest.approx(0.3, abs=0.005)  # unbiased
    assert torch.equal(sr, quantize(v, "mxfp4", stochastic=True, generator=torch.Generator().manual_seed(0))[:, 1:])
    with pytest.raises(ValueError, match="stochastic rounding"):
        quantize(v, "bf16", stochastic=True)
    with pytest.raises(ValueError, match="unknown format"):
        quantize(v, "fp4")


def test_random_hadamard_preserves_products():
    h = hadamard(16)
    assert torch.allclose(h @ h.T, torch.eye(16), atol=1e-6)
    r = random_hadamard(32, torch.Generator().manual_seed(1))
    x, w = torch.randn(8, 70), torch.randn(5, 70)
    assert torch.allclose(rotate(x, r) @ rotate(w, r).T, x @ w.T, atol=1e-4)


# ------------------------------------------------------------------------------------------ emulated training

def emulated(fmt, **kw):
    from kunlun.formats.gemm import EmulatedLinear, PrecisionConfig, apply_precision

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24), torch.nn.Linear(24, 1))
    cfg = PrecisionConfig(format=fmt, keep_high_precision=kw.pop("keep", ["first", "last"]), **kw)
    apply_precision(net, cfg, seed=0)
    return net, [type(m) is EmulatedLinear for m in net]


def test_emulated_linear_matches_reference_quantized_gemms():
    net, swapped = emulated("mxfp4", keep=[])
    layer = net[0]
    assert swapped == [True, False, True, True]
    x = torch.randn(8, 40, requires_grad=True)
    y = layer(x)
    w = layer.weight.detach()
    ref = quantize(x.detach(), "mxfp4") @ quantize(w, "mxfp4").T + layer.bias.detach()
    assert torch.equal(y.detach(), ref)
    g = torch.randn(8, 24)
    y.backward(g)
    assert torch.equal(x.grad, quantize(g, "mxfp4") @ quantize(w, "mxfp4", axis=0))
    assert torch.equal(layer.weight.grad, quantize(g.T, "mxfp4") @ quantize(x.detach(), "mxfp4", axis=0))


def test_emulated_matmul_quantizes_all_three_gemms_and_broadcasts():
    from kunlun.formats.gemm import EmulatedMatMul, MatMul, PrecisionConfig, apply_precision

    torch.manual_seed(0)
    w = torch.randn(6, 40, requires_grad=True)  # a learned [T, N] map shared by the batch (as LCE's)
    x = torch.randn(3, 40, 24, requires_grad=True)  # [B, N, D]
    mm = MatMul()
    apply_precision(mm, PrecisionConfig(format="hif4"))
    assert type(mm) is EmulatedMatMul
    y = mm(w, x, ("weights", "activations"))
    q = lambda t, axis: quantize(t.detach(), "hif4", axis)  # noqa: E731
    assert torch.equal(y.detach(), q(w, -1) @ q(x, -2))
    g = torch.randn(3, 6, 24)
    y.backward(g)
    # dW = Σ_b dY_b · X_bᵀ (reduction over D), dX = Wᵀ · dY (reduction over T), each operand quantized along its reduction axis
    assert torch.equal(w.grad, (q(g, -1) @ q(x, -1).transpose(-1, -2)).sum(0))
    assert torch.equal(x.grad, q(w, -2).transpose(-1, -2) @ q(g, -2))
    a, b = torch.randn(2, 5, 7), torch.randn(7, 3)
    assert torch.equal(MatMul()(a, b), a @ b)  # not swapped (FP32): plain a @ b


def test_rht_keeps_the_product_and_first_last_stay_high_precision():
    net, swapped = emulated("bf16", rht=True)
    assert swapped == [False, False, True, False]  # first and last Linear kept in FP32
    layer = net[2]
    x = torch.randn(16, 24)
    ref = x @ layer.weight.detach().T + layer.bias.detach()
    assert torch.allclose(layer(x).detach(), ref, atol=0.05)  # rotation is exact; only bf16 rounding remains
    r = layer.rht_matrix
    manual = quantize(rotate(x, r), "bf16") @ quantize(rotate(layer.weight.detach(), r), "bf16").T + layer.bias.detach()
    assert torch.equal(layer(x).detach(), manual)


def test_train_with_precision_and_reload(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import TINY_MODEL

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "kunlun", "train", "--precision", "mxfp4", "--run-dir", str(run_dir), "--json", "--quiet",
           *TINY_MODEL, "train.max_steps=10", "train.epochs=1", "precision.rht=true"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    trained = json.loads(r.stdout)
    r = subprocess.run([sys.executable, "-m", "kunlun", "eval", str(run_dir), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["test"]["ne"] == trained["test"]["ne"]  # the reloaded model runs the same emulation
    r = subprocess.run([sys.executable, "-m", "kunlun", "train", "--precision", "fp4", "--run-dir", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "precision.format" in r.stderr


def test_inf_in_a_quantized_block_stops_training_and_keeps_checkpoint(tmp_path):
    import itertools

    from conftest import TINY_MODEL, assert_last_good_checkpoint_kept, checkpoint_files
    from kunlun.config import load_config
    from kunlun.data.registry import prepare_dataset
    from kunlun.errors import KunlunError
    from kunlun.formats.gemm import EmulatedLinear
    from kunlun.training.checkpoint import load_file
    from kunlun.training.trainer import Trainer

    cfg = load_config(None, TINY_MODEL + ["train.epochs=2", "train.patience=0", "precision.format=mxfp4"])
    data = prepare_dataset(cfg.data.dataset)
    t = Trainer(cfg, data, tmp_path / "r", progress=False, logger=lambda m: None)
    batches = t.train_batches.iterate  # short epochs, the first 4 batches of each shuffle: a full emulated one takes a minute
    t.train_batches.iterate = lambda batch_size, rng=None, start=0: itertools.islice(batches(batch_size, rng, start), 4 - start)
    layer = next(m for m in t.model.modules() if isinstance(m, EmulatedLinear))
    ckpt = tmp_path / "r" / "checkpoints"
    after_epoch_1, calls = {}, []
    real_epoch, forward = t.train_epoch, t.model.forward

    def overflow_at_third_step(batch):
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                layer.weight[0, 0] = float("inf")  # an overflow: the E8M0 scale of its block becomes NaN
        return forward(batch)

    def second_epoch_overflows(epoch):  # epoch 1 ran through fit and wrote checkpoints/best and last
        if epoch == 1:
            after_epoch_1.update(checkpoint_files(ckpt))
            t.model.forward = overflow_at_third_step
        return real_epoch(epoch)

    t.train_epoch = second_epoch_overflows
    with pytest.raises(KunlunError, match=r"non-finite training loss at step 7 \(epoch 2\)") as e:
        t.fit()
    assert_last_good_checkpoint_kept(ckpt, after_epoch_1, str(e.value))
    last = load_file(str(ckpt / "last" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in last.values())
    resumed = Trainer(cfg, data, tmp_path / "r", progress=False, logger=lambda m: None)
    resumed.resume(ckpt / "last")  # the checkpoint loads, at the end of epoch 1
    assert (resumed.state.epoch, resumed.state.step) == (1, 4)
    assert all(torch.equal(v.cpu(), last[k]) for k, v in resumed.model.state_dict().items())


def token_net(fmt, seed=0, **kw):
    """LCE over tokens, then three Linear layers: x [B, 40, 24] → [B, 6, 1]; every GEMM emulated (nothing kept)."""
    from kunlun.blocks.summary import LinearCompress
    from kunlun.formats.gemm import PrecisionConfig, apply_precision

    torch.manual_seed(0)
    net = torch.nn.Sequential(LinearCompress(40, 6), torch.nn.Linear(24, 24), torch.nn.Linear(24, 24), torch.nn.Linear(24, 1))
    apply_precision(net, PrecisionConfig(format=fmt, keep_high_precision=[], **kw), seed=seed)
    return net


def test_precision_state_moves_with_the_model():
    from kunlun.formats.gemm import EmulatedLinear, policies

    net = token_net("hif4", rht=True, stochastic_rounding=True)
    layer = net[1]
    assert type(layer) is EmulatedLinear and "rht_matrix" in dict(layer.named_buffers())
    assert set(net.state_dict()) == set(token_net("fp32").state_dict())  # non-persistent: a plain model's checkpoint keys
    net(torch.randn(3, 40, 24)).sum().backward()
    assert set(policies(net)[0].generators) == {"cpu"}  # stochastic rounding drew on the gradients' device
    net.to(torch.float64)
    assert layer.rht_matrix.dtype == torch.float64
    net(torch.randn(3, 40, 24, dtype=torch.float64)).sum().backward()  # the rotation follows the operands' dtype
    net.to("meta")
    assert layer.rht_matrix.device.type == "meta" and layer.weight.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: RHT buffers and SR generators on a GPU need one")
def test_rht_and_stochastic_rounding_train_on_cuda():
    from kunlun.formats.gemm import policies

    net = token_net("hif4", rht=True, stochastic_rounding=True).cuda()
    x = torch.randn(3, 40, 24, device="cuda")
    net(x).square().sum().backward()
    assert net[1].rht_matrix.is_cuda and set(policies(net)[0].generators) == {"cuda:0"}
    assert all(p.grad.is_cuda and torch.isfinite(p.grad).all() for p in net.parameters())
    assert torch.equal(quantize(x, "hif4").cpu(), quantize(x.cpu(), "hif4"))  # the quantizer is bit-identical on the GPU
    ref = token_net("hif4", rht=True)  # the same weights on the CPU; the GEMM's summation order may differ
    assert torch.allclose(net[0](x).cpu(), ref[0](x.cpu()), rtol=1e-5, atol=1e-6)


def test_models_of_different_precision_do_not_interfere():
    from kunlun.formats.gemm import policies

    x = torch.randn(3, 40, 24)
    nets = {fmt: token_net(fmt, stochastic_rounding=fmt != "fp32") for fmt in ("hif4", "mxfp4", "fp32")}
    w = nets["fp32"][0].weight.detach()  # the same initial weights in all three
    expected = {fmt: w @ x if fmt == "fp32" else quantize(w, fmt) @ quantize(x, fmt, axis=-2) for fmt in nets}
    # The module multiplies a Parameter (autograd on), the expected value a detached copy: the CPU may pick another
    # GEMM kernel for each (on an AVX2 CPU they differ by up to ~1e-6), so compare within a tolerance far below the
    # gap between any two formats' products, which is what tells the formats apart.
    close = dict(rtol=0, atol=1e-5)
    gaps = [(expected[a] - expected[b]).abs().max().item() for a, b in (("hif4", "mxfp4"), ("hif4", "fp32"), ("mxfp4", "fp32"))]
    assert min(gaps) > 1e3 * close["atol"], gaps
    for fmt in ("hif4", "mxfp4", "fp32", "hif4", "fp32", "mxfp4"):  # interleaved, each model keeps its own format
        torch.testing.assert_close(nets[fmt][0](x), expected[fmt], **close, msg=fmt)  # the LCE submodule run on its own, too
        nets[fmt](x)
    with pytest.raises(RuntimeError):
        nets["hif4"](torch.randn(3, 41, 24))  # a forward that fails half-way leaves nothing behind
    torch.testing.assert_close(nets["fp32"][0](x), expected["fp32"], **close)
    # stochastic rounding: each model draws from its own generators
    hif4, mxfp4 = policies(nets["hif4"])[0], policies(nets["mxfp4"])[0]
    nets["mxfp4"](x).sum().backward()
    before = mxfp4.state_dict()["cpu"].clone()
    nets["hif4"](x).sum().backward()
    assert torch.equal(mxfp4.state_dict()["cpu"], before) and hif4 is not mxfp4


def _head(data, n: int, n_eval: int):
    """``data`` cut to its first n training and n_eval validation / test examples (a seconds-long training run)."""
    import dataclasses

    def cut(s, k):
        return dataclasses.replace(s, **{f: getattr(s, f)[:k] for f in ("label", "cat", "num", "group", "time", "row")},
                                   seq_start={q: a[:k] for q, a in s.seq_start.items()},
                                   seq_end={q: a[:k] for q, a in s.seq_end.items()})

    return dataclasses.replace(data, splits={k: cut(s, n if k == "train" else n_eval) for k, s in data.splits.items()})


def test_stochastic_rounding_run_resumes_exactly(tmp_path):
    # 2 epochs straight == the same run killed after epoch 1, then resumed: the rounding noise continues exactly
    from conftest import TINY_MODEL, interrupt_in_epoch
    from kunlun.config import load_config
    from kunlun.data.registry import prepare_dataset
    from kunlun.training.checkpoint import load_trainer_state
    from kunlun.training.trainer import Trainer

    cfg = load_config(None, TINY_MODEL + ["model.d_model=8", "train.epochs=2", "train.max_steps=0", "train.patience=0",
                                          "train.batch_size=256", "precision.format=mxfp4", "precision.rht=true",
                                          "precision.stochastic_rounding=true"])
    data = _head(prepare_dataset(cfg.data.dataset), 2048, 1024)
    trainer = lambda d: Trainer(cfg, data, tmp_path / d, progress=False, logger=lambda m: None)  # noqa: E731
    straight = trainer("straight")
    straight.start_record()
    straight_final = straight.fit()
    killed = trainer("killed")
    killed.start_record()
    interrupt_in_epoch(killed, 1)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    last = tmp_path / "killed" / "checkpoints" / "last"
    assert set(load_trainer_state(last)["precision_rng"][0]) == {str(torch.empty(0, device=killed.device).device)}  # cpu, cuda:0
    resumed = trainer("killed")
    resumed.resume(last)
    final = resumed.fit()
    assert final["metrics"] == straight_final["metrics"] and final["steps"] == straight_final["steps"] == 16
    # the final metrics are the best epoch's, maybe the first: the second epoch's own numbers must match too
    epochs = lambda t: [(h["train_loss"], h["valid"]) for h in t.history]  # noqa: E731
    assert epochs(resumed) == epochs(straight) and len(epochs(straight)) == 2


def test_formats_benchmark_spec_errors(tmp_path):
    from kunlun.bench.formats import load_formats_spec, variants
    from kunlun.errors import KunlunError

    spec = tmp_path / "f.yaml"
    spec.write_text("datasets: [ml-100k]\nseeds: [0]\nmodel: kunlun\nformats: [hif4, mxfp4]\n")
    with pytest.raises(KunlunError, match="must include bf16"):
        load_formats_spec(spec)
    spec.write_text("datasets: [ml-100k]\nseeds: [0]\nmodel: kunlun\nformats: [bf16, fp3]\n")
    with pytest.raises(KunlunError, match="unknown format 'fp3'"):
        load_formats_spec(spec)
    v = variants({"formats": ["bf16", "hif4"], "variant_formats": ["hif4"], "variants": {"rht": ["precision.rht=true"]}})
    assert v["hif4+rht"] == ("hif4", ["precision.format=hif4", "precision.rht=true"]) and set(v) == {"bf16", "hif4", "hif4+rht"}


def test_hif4_head_to_head_is_paired_by_seed():
    from scipy.stats import t as student_t

    from kunlun.bench.formats import head_to_head

    def row(fmt, rel):
        return {"format": fmt, "rel_ne_pct": {"values": rel}}

    rows = {"bf16": row("bf16", [0.0, 0.0, 0.0]), "hif4": row("hif4", [0.5, 0.6, 0.4]), "mxfp4": row("mxfp4", [1.0, 1.2, 0.8]),
            "fp8_e4m3": row("fp8_e4m3", [0.1, 0.1, 0.2]), "hif4+rht": row("hif4", [0.6, 0.5, 0.4])}
    h = head_to_head(rows, "hif4")
    assert set(h) == {"mxfp4", "hif4+rht"}  # only 4-bit rivals
    d = h["mxfp4"]["delta_pct"]
    assert d["mean"] == pytest.approx(-0.5) and d["std"] == pytest.approx(0.1)
    # paired t: mean / (std / sqrt(n)) with n − 1 degrees of freedom
    assert h["mxfp4"]["p_value"] == pytest.approx(2 * student_t.sf(0.5 / (0.1 / 3 ** 0.5), 2))
    assert head_to_head({"bf16": rows["bf16"]}, "hif4") == {}
