"""Number formats against their specs (../shared/design/formats.md) and, when installed, torchao."""

import importlib.util
import math

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


def test_ragged_reduction_axis_is_zero_padded():
    x = torch.randn(5, 40)
    padded = torch.nn.functional.pad(x, (0, 24))
    for fmt in ("mxfp4", "nvfp4", "hif4"):
        assert torch.equal(quantize(x, fmt), quantize(padded, fmt)[:, :40])
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
    from kunlun.formats.gemm import Policy, PrecisionConfig, active, matmul

    torch.manual_seed(0)
    w = torch.randn(6, 40, requires_grad=True)  # a learned [T, N] map shared by the batch (as LCE's)
    x = torch.randn(3, 40, 24, requires_grad=True)  # [B, N, D]
    with active(Policy(PrecisionConfig(format="hif4"))):
        y = matmul(w, x, ("weights", "activations"))
    q = lambda t, axis: quantize(t.detach(), "hif4", axis)  # noqa: E731
    assert torch.equal(y.detach(), q(w, -1) @ q(x, -2))
    g = torch.randn(3, 6, 24)
    y.backward(g)
    # dW = Σ_b dY_b · X_bᵀ (reduction over D), dX = Wᵀ · dY (reduction over T), each operand quantized along its reduction axis
    assert torch.equal(w.grad, (q(g, -1) @ q(x, -1).transpose(-1, -2)).sum(0))
    assert torch.equal(x.grad, q(w, -2).transpose(-1, -2) @ q(g, -2))
    plain = torch.randn(2, 5, 7) @ torch.randn(7, 3)
    assert matmul(torch.ones(2, 5, 7), torch.ones(7, 3)).shape == plain.shape  # no policy: plain a @ b


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

    from conftest import TINY_MODEL, checkpoint_files
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
    t.train_batches.iterate = lambda batch_size, rng=None: itertools.islice(batches(batch_size, rng), 4)
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
    assert f"The last good checkpoint is in {ckpt}" in str(e.value)
    assert {"best/model.safetensors", "last/model.safetensors", "last/trainer_state.pt"} <= set(after_epoch_1)
    assert checkpoint_files(ckpt) == after_epoch_1  # byte-identical after two more steps and the overflow; no temp dir
    assert sorted(p.name for p in ckpt.iterdir()) == ["best", "last"]
    last = load_file(str(ckpt / "last" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in last.values())
    resumed = Trainer(cfg, data, tmp_path / "r", progress=False, logger=lambda m: None)
    resumed.resume(ckpt / "last")  # the checkpoint loads, at the end of epoch 1
    assert (resumed.state.epoch, resumed.state.step) == (1, 4)
    assert all(torch.equal(v, last[k]) for k, v in resumed.model.state_dict().items())


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
