"""No hidden host work in a training step: every registered model's forward and backward make no tensor from
Python data, copy nothing between devices and read nothing back to the host.

On a GPU each of these is a host-to-device copy or a device-to-host read that waits for the stream (the host
stalls until the queued kernels have run). ``HostSyncCheck`` sees them at the dispatcher, so the check runs on
CPU as well:

* a tensor made from Python data (``torch.tensor([...])``, ``torch.as_tensor``, indexing with a Python list or
  tuple of ints): the dispatcher sees ``aten.lift_fresh``;
* a tensor read by an op that was neither made inside the step nor known beforehand (the model's parameters
  and buffers, the batch): a constant kept as a plain attribute, which ``Module.to`` would leave on the CPU;
* a copy to another device (``aten._to_copy`` / ``aten.copy_`` between devices), and on a GPU any op reading
  tensors of two devices (a CPU scalar tensor with a CUDA one is allowed by PyTorch and copies);
* a tensor made on another device than the step's: the step runs with the default device set to "meta", so a
  factory called without ``device=`` (``torch.arange(n)``, which on a GPU step makes a CPU tensor to copy) fails
  on a CPU too;
* a read back to the host or an output whose size depends on the data: ``.item()`` / ``bool(t)``
  (``aten._local_scalar_dense``), ``nonzero``, ``masked_select``, boolean-mask indexing.

On a GPU the models also run under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

import kunlun.ops.dropout
from conftest import ml_rows
from kunlun.config import model_from_dict
from kunlun.models import MODELS, build_model
from kunlun.training.step import TrainModel

FROM_PYTHON = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}
aten = torch.ops.aten
# ops whose result the host must wait for (a value, or an output size that depends on the data)
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.item.default,
              aten.equal.default, aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
              aten.bincount.default, aten.repeat_interleave.Tensor}
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.copy.default,
          torch.ops.aten._copy_from.default}


class HostSync(AssertionError):
    pass


class HostSyncCheck(TorchDispatchMode):
    """Raises ``HostSync`` on host work inside the ``with`` block (see the module docstring). ``known``: tensors
    made before the block that ops may read (parameters, buffers, inputs); ``device``: where every tensor made in
    the block must be (a factory called without ``device=`` makes its tensor on the default device, which
    ``checked`` sets to "meta" so that a forgotten ``device=`` shows on a CPU too)."""

    def __init__(self, known=(), device: torch.device | str = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # tensors say cuda:0, never bare cuda
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.seen = WeakIdKeyDictionary()
        for t in known:
            self.seen[t] = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in FROM_PYTHON:
            raise HostSync(f"a tensor made from Python data ({func})")
        if func in HOST_READS or (func is torch.ops.aten.index.Tensor
                                  and any(t is not None and t.dtype is torch.bool for t in args[1])):
            raise HostSync(f"a read back to the host or a data-dependent size ({func})")
        for t in tensors:
            if t not in self.seen:
                raise HostSync(f"{func} reads a tensor {tuple(t.shape)} made outside the step from Python data or "
                               "kept as a plain attribute (not a parameter or buffer)")
        devices = {t.device for t in tensors}
        if func in COPIES:
            target = kwargs.get("device") if func is torch.ops.aten._to_copy.default else tensors[0].device
            if target is not None and torch.device(target) != tensors[-1].device or len(devices) > 1:
                raise HostSync(f"a copy between devices ({func}: {sorted(map(str, devices | {torch.device(target)}))})")
        elif len(devices) > 1:
            raise HostSync(f"{func} reads tensors on {sorted(map(str, devices))}")
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if t.device != self.device:
                    raise HostSync(f"{func} made a tensor on {t.device}, not on the step's {self.device} (a factory "
                                   "without device=, or a copy)")
                self.seen[t] = True
        return out


def checked(known=(), device: torch.device | str = "cpu"):
    """``HostSyncCheck`` with the default device set to "meta" (see there)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.device("meta"))
    stack.enter_context(HostSyncCheck(known, device))
    return stack


def batch_tensors(batch) -> list[torch.Tensor]:
    seqs = list(batch.seqs.values()) + [w for ws in batch.windows.values() for w in ws.values()]
    return [batch.label, batch.cat, batch.num, batch.group] + [t for s in seqs for t in (s.item, s.event, s.side, s.gap, s.mask)]


def step(model: TrainModel, batch, device: torch.device) -> None:
    """One forward and backward inside ``HostSyncCheck`` (made outside it, so its setup is not checked)."""
    known = [*model.parameters(), *model.buffers(), *batch_tensors(batch)]
    with checked(known, device):
        loss, _ = model(batch)
        loss.backward()


@pytest.fixture(scope="module")
def ml():
    return ml_rows(16)


VARIANTS = [{"name": name} for name in sorted(MODELS)] + [
    {"name": "kunlun", "gdpa_activation": ["relu", "silu", "gelu", "silu"], "num_heads": 4, "wukong_experts": 3},
    {"name": "kunlun", "gdpa_activation": ["silu"], "personalized": False, "seq_pooling": "pma",
     "interaction_input": "summary", "event_split": True, "stream_window": "own"},
]


def model_and_batch(ml, spec: dict, device: torch.device):
    info, batch = ml
    torch.manual_seed(0)
    model = TrainModel(build_model(model_from_dict(spec), info)).to(device)
    return model.train(), batch.to(device)


def spec_id(spec: dict) -> str:
    return "-".join(str(v) for v in spec.values())


@pytest.mark.parametrize("spec", VARIANTS, ids=spec_id)
def test_training_step_has_no_host_sync(ml, spec, monkeypatch):
    # the fast CPU dropout draws its mask with NumPy (host work by design, and only on a CPU): here it takes the
    # path every other device takes
    monkeypatch.setattr(kunlun.ops.dropout, "dropout", lambda x, p, training=True: F.dropout(x, p, training))
    model, batch = model_and_batch(ml, spec, torch.device("cpu"))
    step(model, batch, torch.device("cpu"))


def test_blocked_band_step_has_no_host_sync(monkeypatch):
    """Kunlun with a window narrow enough for the blocked sliding-window layout (longer histories)."""
    from kunlun.ops.attention import blocked_pays

    monkeypatch.setattr(kunlun.ops.dropout, "dropout", lambda x, p, training=True: F.dropout(x, p, training))
    assert blocked_pays(101, 1)
    model, batch = model_and_batch(ml_rows(8, max_len=100), {"name": "kunlun", "window": 1}, torch.device("cpu"))
    step(model, batch, torch.device("cpu"))


@pytest.mark.parametrize("spec", VARIANTS, ids=spec_id)
def test_step_buffers_stay_out_of_checkpoints(ml, spec):
    """The constants made buffers for the step (head masks, pair indices) are not persistent: state_dict keys
    are what they were, so existing checkpoints load."""
    model, _ = model_and_batch(ml, spec, torch.device("cpu"))
    made = [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] in ("head_mask", "pairs")]
    per_head_acts = spec["name"] == "kunlun" and spec.get("gdpa_activation", ["silu", "gelu"]) != ["silu"]
    assert bool(made) == (spec["name"] == "interformer" or per_head_acts)
    assert not set(made) & set(model.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU check runs the same step)")
@pytest.mark.parametrize("spec", VARIANTS, ids=spec_id)
def test_training_step_has_no_host_sync_on_cuda(ml, spec):
    device = torch.device("cuda")
    model, batch = model_and_batch(ml, spec, device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(model, batch, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# the check itself: each kind of host work it must catch, on a deliberately bad snippet

def bad_snippets():
    c = torch.tensor([1.0, 2.0, 3.0, 4.0])  # a constant kept outside the step (a plain attribute)
    return {
        "tensor from a list": lambda x: x * torch.tensor([1.0, 2.0, 3.0, 4.0]),
        "as_tensor": lambda x: x * torch.as_tensor([True, False, True, True]),
        "list index": lambda x: x[:, [0, 2]],
        "tuple index": lambda x: x[:, (0, 2)],
        "plain-attribute constant": lambda x: x * c,
        "copy to another device": lambda x: x.to("meta"),
        "factory without device=": lambda x: x + torch.arange(4),
        "zeros without device=": lambda x: x * torch.ones(4),
        "item": lambda x: x * x.sum().item(),
        "bool of a tensor": lambda x: x if bool((x > 0).any()) else -x,
        "boolean mask index": lambda x: x[x > 0],
        "nonzero": lambda x: x.nonzero(),
        "tensor from a list in backward": lambda x: ScaleGrad.apply(x),
    }


class ScaleGrad(torch.autograd.Function):
    """Identity forward; its backward makes a tensor from a list (the check must see backward work too)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * torch.tensor([1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize("name", list(bad_snippets()))
def test_check_catches(name):
    x = torch.randn(3, 4, requires_grad=True)
    snippet = bad_snippets()[name]
    with pytest.raises(HostSync) as caught, checked([x]):
        snippet(x).sum().backward()
    print(name, "→", caught.value)


def test_check_passes_device_work():
    """Factories, scalars, slices and buffers are device work: not flagged."""
    x = torch.randn(3, 4, requires_grad=True)
    buf = torch.arange(4)
    with checked([x, buf]):
        y = (x * 0.5 + torch.arange(4, device=x.device)) [:, buf] + x[:, 1::2].sum() + x.new_zeros(()) + torch.full((1,), 2.0, device=x.device)
        idx = torch.triu_indices(3, 3, 1, device=x.device)
        (y[:, idx[0]].sum() + y.to(torch.float64).sum()).backward()
