"""The GPU paths held to the CPU: every fast op, every model's forward and gradients, bf16 autocast, the quantizers
of every number format, the FLOP counter and a whole training run, on a CUDA device.

Skipped without a GPU (CI has none). ``KUNLUN_TEST_DEVICE=cpu`` runs the same checks CPU against CPU, which only
proves they execute. float32 here is float32: TF32 matrix products are off (PyTorch's default, asserted), so the
tolerances are those of a different summation order, not of a different precision.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, ml_rows
from kunlun import ops
from kunlun.config import model_from_dict
from kunlun.models import MODELS, build_model
from kunlun.ops.attention import gdpa, gdpa_heads, rotary, softmax_attention, softmax_attention_reference
from kunlun.training.step import TrainModel

DEVICE = torch.device(os.environ.get("KUNLUN_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA GPU (KUNLUN_TEST_DEVICE=cpu runs these checks CPU against CPU)")

VARIANTS = [{"name": name, **({} if name == "logistic_regression" else {"dropout": 0.0})} for name in sorted(MODELS)] + [
    {"name": "kunlun", "dropout": 0.0, "gdpa_activation": ["relu", "silu", "gelu", "silu"], "num_heads": 4, "wukong_experts": 3},
    {"name": "kunlun", "dropout": 0.0, "window": 1},  # narrow enough for the blocked sliding-window layout at L 100
]


def spec_id(spec: dict) -> str:
    return "-".join(str(v) for k, v in spec.items() if k != "dropout")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def fp32_is_fp32():
    if DEVICE.type == "cuda":
        assert not torch.backends.cuda.matmul.allow_tf32, "TF32 matrix products are on: float32 results would be tf32"


@pytest.fixture(scope="module")
def ml():
    return ml_rows(32, max_len=100)


# ----- ops: the fast kernels on the device against the float64 reference on the CPU

ATTENTION = [(3, 2, 51, 16, 16), (2, 3, 200, 8, 16), (2, 2, 100, 8, 3), (4, 1, 7, 4, 0), (2, 4, 40, 8, 100), (2, 1, 1, 4, 3)]


def ragged(b: int, length: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(0, length + 1, (b,), generator=gen)
    lengths[0] = 0  # an empty history
    mask = torch.arange(length)[None, :] >= (length - lengths)[:, None]
    return mask & (torch.rand(b, length, generator=gen) > 0.1)


def fast_on_device_vs_reference(fn, tensors, masks=()):
    """(relative error of the output, worst relative error of an input gradient): ``fn`` with the fast ops on DEVICE
    in the tensors' dtype against the reference ops on the CPU in float64, with the same upstream gradient."""
    ref_in = [t.detach().double().requires_grad_() for t in tensors]
    dev_in = [t.detach().to(DEVICE).requires_grad_() for t in tensors]
    with ops.using("reference"):
        ref = fn(*ref_in, *masks)
    with ops.using("fast"):
        out = fn(*dev_in, *[m.to(DEVICE) for m in masks])
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (ref * up).sum().backward()
    (out * up.to(DEVICE, out.dtype)).sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in dev_in)
    return rel(out, ref), max(rel(d.grad, r.grad) for d, r in zip(dev_in, ref_in))


@pytest.mark.parametrize("b,h,length,dh,window", ATTENTION)
def test_attention_on_device_matches_reference(b, h, length, dh, window):
    gen = torch.Generator().manual_seed(length * 10 + window)
    q, k, v = (torch.randn(b, h, length, dh, generator=gen) for _ in range(3))
    err, grad_err = fast_on_device_vs_reference(lambda q, k, v, m: softmax_attention(q, k, v, m, window), (q, k, v),
                                                (ragged(b, length, gen),))
    assert err < 1e-5 and grad_err < 1e-5, (err, grad_err)


@pytest.mark.parametrize("length,window", [(200, 16), (64, 0)])
def test_attention_bf16_on_device_close_to_fp32(length, window):
    """The fused bf16 kernels (flash / memory-efficient attention on a GPU): within bf16's rounding of the reference."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 2, length, 32, generator=gen) for _ in range(3))
    mask = ragged(4, length, gen)
    ref = softmax_attention_reference(q.double(), k.double(), v.double(), mask, window)
    with ops.using("fast"):
        out = softmax_attention(*(t.to(DEVICE, torch.bfloat16) for t in (q, k, v)), mask.to(DEVICE), window)
    assert out.dtype is torch.bfloat16 and rel(out, ref) < 1e-2


@pytest.mark.parametrize("act,heads", [("silu", 1), (["silu", "gelu"], 2), (["relu", "identity", "silu"], 3)])
def test_gdpa_on_device_matches_reference(act, heads):
    """Merged heads (no key mask, as the PFFN calls it) and split heads with a ragged key mask."""
    gen = torch.Generator().manual_seed(heads)
    b, lq, lk, dh = 3, 5, 33, 8
    q = torch.randn(b, lq, heads * dh, generator=gen)
    k, v = (torch.randn(b, lk, heads * dh, generator=gen) for _ in range(2))
    err, grad_err = fast_on_device_vs_reference(lambda q, k, v: gdpa_heads(q, k, v, heads, act), (q, k, v))
    assert err < 1e-5 and grad_err < 1e-5, (err, grad_err)
    split = [x.unflatten(-1, (heads, dh)).transpose(1, 2).contiguous() for x in (q, k, v)]
    err, grad_err = fast_on_device_vs_reference(lambda q, k, v, m: gdpa(q, k, v, act, key_mask=m), split, (ragged(b, lk, gen),))
    assert err < 1e-5 and grad_err < 1e-5, (err, grad_err)


def test_rotary_on_device_matches_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 51, 16, generator=gen)
    tau = torch.rand(3, 51, generator=gen) * 5
    err, grad_err = fast_on_device_vs_reference(lambda x, t: rotary(t, 10.0, x)[0], (x,), (tau,))
    assert err < 1e-6 and grad_err < 1e-6, (err, grad_err)


# ----- models: forward and every gradient on the device against the CPU

def forward_backward(spec: dict, ml, device: torch.device, bf16: bool = False):
    info, batch = ml
    torch.manual_seed(0)
    model = TrainModel(build_model(model_from_dict(spec), info)).to(device).train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, logits = model(batch.to(device))
    loss.backward()
    return loss.detach(), logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("spec", VARIANTS, ids=spec_id)
def test_model_on_device_matches_cpu(ml, spec):
    """Training mode (DIN's Dice batch statistics included), dropout off so both devices draw nothing. Gradients are
    compared against the largest gradient of the model: some are zero in exact arithmetic (a key bias adds the same
    q·b to every score of a query, which softmax cancels) and are rounding noise on both devices."""
    cpu = forward_backward(spec, ml, torch.device("cpu"))
    dev = forward_backward(spec, ml, DEVICE)
    assert rel(dev[0], cpu[0]) < 1e-5 and rel(dev[1], cpu[1]) < 1e-4, (rel(dev[0], cpu[0]), rel(dev[1], cpu[1]))
    assert set(dev[2]) == set(cpu[2])
    scale = max(g.norm().item() for g in cpu[2].values())
    worst = max(dev[2], key=lambda n: (dev[2][n].cpu() - cpu[2][n]).norm().item() / (cpu[2][n].norm().item() + 1e-3 * scale))
    err = (dev[2][worst].cpu() - cpu[2][worst]).norm().item() / (cpu[2][worst].norm().item() + 1e-3 * scale)
    assert err < 1e-3, (worst, err)


@pytest.mark.parametrize("name", ["kunlun", "interformer"])
def test_bf16_autocast_on_device_close_to_fp32(ml, name):
    fp32 = forward_backward({"name": name, "dropout": 0.0}, ml, DEVICE)
    bf16 = forward_backward({"name": name, "dropout": 0.0}, ml, DEVICE, bf16=True)
    assert rel(bf16[1], fp32[1]) < 5e-2, rel(bf16[1], fp32[1])
    assert all(g.dtype is torch.float32 and torch.isfinite(g).all() for g in bf16[2].values())  # master weights stay fp32


def test_flop_count_is_the_same_on_device(ml):
    from kunlun.models.flop_count import count_flops

    info, batch = ml
    model = build_model(model_from_dict({"name": "kunlun"}), info)
    on_cpu = count_flops(model, batch)
    on_dev = count_flops(model.to(DEVICE), batch.to(DEVICE))
    # the fused attention kernel has another name on each device (flash_attention_for_cpu, efficient_attention):
    # the products it counts are the same
    family = lambda by_op: {("attention" if "scaled_dot_product" in op else op): n for op, n in by_op.items()}  # noqa: E731
    assert on_dev.flops == on_cpu.flops and family(on_dev.by_op) == family(on_cpu.by_op) and on_dev.hidden == on_cpu.hidden


# ----- number formats: the quantizers are bit-identical on the device

@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "fp8_e5m2", "hif8", "mxfp4", "nvfp4", "hif4"])
@pytest.mark.parametrize("values", ["typical", "extremes"])
def test_quantizer_is_bit_identical_on_device(fmt, values):
    """``typical``: activations of a few orders of magnitude; ``extremes``: every binade the formats cover and beyond,
    signed zeros, a float32 subnormal and a value near float32's maximum (which makes every per-tensor-scaled value
    a float32 subnormal before its cast). A mismatch names its elements."""
    from kunlun.formats.quantize import quantize

    gen = torch.Generator().manual_seed(1)
    if values == "typical":
        x = torch.randn(64, 256, generator=gen) * torch.logspace(-2, 2, 256)
    else:
        x = torch.randn(64, 256, generator=gen) * torch.logspace(-6, 6, 256)
        x[0, :4] = torch.tensor([0.0, -0.0, 1e-40, -3e38])
    on_dev, on_cpu = quantize(x.to(DEVICE), fmt).cpu(), quantize(x, fmt)
    differ = ((on_dev != on_cpu) & ~(on_dev.isnan() & on_cpu.isnan())).nonzero()[:5].tolist()
    assert not differ, [(i, j, x[i, j].item(), on_dev[i, j].item(), on_cpu[i, j].item()) for i, j in differ]


# ----- a whole run: the trainer on the device learns, and the same seed gives the same metrics

def test_training_run_on_device_learns_and_repeats(tmp_path):
    if DEVICE.type != "cuda":
        pytest.skip("the trainer picks CUDA when there is one; on a CPU this is test_training's job")
    from conftest import LEARNS, assert_learned
    from kunlun.config import load_config
    from kunlun.data.registry import prepare_dataset
    from kunlun.training.trainer import Trainer

    cfg = load_config(None, [*TINY_MODEL, *LEARNS, "train.epochs=1", "train.max_steps=30"])
    data = prepare_dataset(cfg.data.dataset)
    finals = []
    for i in range(2):
        t = Trainer(cfg, data, tmp_path / f"r{i}", progress=False, logger=lambda m: None)
        assert t.device.type == "cuda" and next(t.model.parameters()).is_cuda
        untrained = t.evaluate("test")["ne"] if i == 0 else None
        t.start_record()
        finals.append(t.fit()["metrics"])
        if i == 0:
            assert_learned(untrained, finals[0]["test"]["ne"])
    assert finals[0] == finals[1], "same seed and config on the same GPU gave different metrics"
    assert np.isfinite(finals[0]["test"]["ne"])
