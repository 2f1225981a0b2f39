"""The training step, written once: the trainer and the speed benchmark both run it.

``TrainModel`` wraps a ranking model and owns the loss: a batch goes in, ``(loss, logits)`` comes out
(TorchRec's ``DLRMTrain`` habit), so multi-task heads or distillation change the wrapper, not the loop.
``TrainStep`` is one optimizer step on it: forward, a non-finite-loss check, backward, gradient clipping,
then every optimizer and its learning-rate schedule. The check either stops before the update (``check_finite``,
one host synchronisation per step) or is left to the caller, who reads ``NonFiniteWatch`` at its own sync points:
on a GPU a per-step ``loss.item()`` or ``if not isfinite(loss)`` stalls the host until the step has run, so the
CPU cannot queue the next step's kernels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from kunlun.config import TrainConfig
from kunlun.data.batches import Batch
from kunlun.errors import KunlunError
from kunlun.models import RankingModel


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed torch and NumPy. ``deterministic``: where a GPU is present, also select deterministic kernels, so that the
    same seed, config and commit give the same metrics there too: on an H100 two identical runs otherwise differed in
    the ninth digit of NE (by default PyTorch may pick GPU kernels that sum with atomic adds, such as the
    memory-efficient attention backward and index_add, whose order follows thread arrival). Ops with no deterministic
    kernel warn rather than fail; cuBLAS gets the fixed workspace it needs for reproducible results (read when its
    handle is made, so set before the first product). A CPU's kernels are deterministic for a fixed thread count
    already. tests/test_cuda.py runs the same training twice on a GPU."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic and torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def make_optimizers(model: RankingModel, t: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW for dense weights; Adam / Adagrad / SGD, or their sparse forms, for embedding tables.

    Embedding regularisation: ``embedding_l2`` adds λ·E to every row's gradient each step (the optimizer's
    coupled L2 term, i.e. a λ/2·‖E‖² penalty on the whole table, as FuxiCTR's ``embedding_regularizer``
    used for the BARS baselines); ``embedding_weight_decay`` is decoupled decay (AdamW) for ``adam``.

    ``sparse_adam`` / ``sparse_adagrad`` switch the model's embedding lookups to sparse gradients (``nn.Embedding
    .sparse``) and update only the rows a batch touched (SparseAdam's moments are lazy: a row's decay waits until it
    is touched again): a step costs O(rows touched) instead of O(vocabulary), what large vocabularies need.
    """
    opts: list[torch.optim.Optimizer] = []
    sparse = t.embedding_optimizer.startswith("sparse_")
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.sparse = sparse
    dense = [p for p in model.dense_parameters() if p.requires_grad]
    # fused Adam(W): one kernel over every tensor instead of ~10 small ops per tensor (a third of the step time
    # of the default Kunlun on CPU went to the optimizer's per-tensor loop); same update up to float rounding
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters()) else {}
    if dense:
        opts.append(torch.optim.AdamW(dense, lr=t.lr, weight_decay=t.weight_decay, **fused))
    emb = model.embedding_parameters()
    if _mixed(emb):  # row-sharded tables (DTensors) beside replicated ones: the fused kernel takes one kind at a time
        fused = {"fused": False, "foreach": False}
    if emb:
        wd, l2 = t.embedding_weight_decay, t.embedding_l2
        if t.embedding_optimizer == "adam":  # with one of wd and l2 at most (TrainConfig checks)
            opts.append(torch.optim.AdamW(emb, lr=t.embedding_lr, weight_decay=wd, **fused) if wd
                        else torch.optim.Adam(emb, lr=t.embedding_lr, weight_decay=l2, **fused))
        elif t.embedding_optimizer == "sparse_adam":
            opts.append(torch.optim.SparseAdam(emb, lr=t.embedding_lr))
        elif t.embedding_optimizer == "sparse_adagrad":
            opts.append(torch.optim.Adagrad(emb, lr=t.embedding_lr))  # Adagrad takes sparse gradients as they are
        else:
            cls = {"adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[t.embedding_optimizer]
            opts.append(cls(emb, lr=t.embedding_lr, weight_decay=wd + l2))
    return opts


def _mixed(params: list[nn.Parameter]) -> bool:
    """Some but not all of ``params`` are DTensors."""
    from torch.distributed.tensor import DTensor

    return 0 < sum(isinstance(p, DTensor) for p in params) < len(params)


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale every gradient so their global L2 norm is at most ``max_norm``; returns the norm before (a 0-d tensor,
    not read on the host). ``torch.nn.utils.clip_grad_norm_`` with sparse gradients as well (embedding lookups with
    ``sparse=True``): a sparse gradient's norm is that of its coalesced values (a row looked up twice sums first).
    Dense gradients only: the same arithmetic as ``clip_grad_norm_``."""
    dense, sparse = [], []
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            sparse.append(p.grad)
        else:
            dense.append(p.grad)
    if not sparse:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    norms = [torch.linalg.vector_norm(g._values()) for g in sparse]
    if dense:
        norms += list(torch._foreach_norm(dense))
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if dense:
        torch._foreach_mul_(dense, coef)
    for g in sparse:
        g._values().mul_(coef)
    return total


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule in ("constant", "plateau") or total <= warmup:  # plateau: the trainer lowers the base rates
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedulers(optimizers: list[torch.optim.Optimizer], t: TrainConfig, total_steps: int) -> list[torch.optim.lr_scheduler.LRScheduler]:
    """Warm-up then ``t.schedule`` over ``total_steps``, one scheduler per optimizer."""
    return [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, t.warmup_steps, total_steps, t.schedule))
            for o in optimizers]


class TrainModel(nn.Module):
    """A ranking model with its training loss: Batch → (loss [], logits [B]).

    The model runs under bf16 autocast when ``bf16``; the loss (binary cross-entropy on the logits, mean over
    the batch) is computed in float32 outside it.

    Example::

        train_model = TrainModel(model)
        loss, logits = train_model(batch)
    """

    def __init__(self, model: RankingModel, bf16: bool = False):
        super().__init__()
        self.model, self.bf16 = model, bf16
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(batch.label.device, self.bf16):
            logits = self.model(batch)
        return self.loss_fn(logits.float(), batch.label), logits


class NonFiniteLoss(KunlunError):
    """The loss of a step was NaN or infinite; no parameter was changed."""


class NonFiniteWatch:
    """Running sum of Σ loss × batch size and the first step whose loss was not finite, kept on the device, so a
    training loop reads them (one synchronisation) only when it logs, checkpoints or ends an epoch.

    The sum is float64 and adds ``loss × n`` in step order: the same IEEE operations as summing ``loss.item() × n``
    in Python, so the epoch's mean loss is bit-identical to that of a loop that synchronises every step.
    """

    NONE = -1

    def __init__(self, device: torch.device, loss_sum: float = 0.0):
        self.loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=device)
        self.first_bad = torch.tensor(self.NONE, dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, n: int, step: int) -> None:
        """Record step ``step``'s mean loss (a 0-d tensor) over ``n`` examples; no synchronisation."""
        loss = loss.detach()
        self.loss_sum += loss.double() * n
        bad = (self.first_bad == self.NONE) & ~torch.isfinite(loss)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def read(self) -> tuple[float, int | None]:
        """(Σ loss × n, first non-finite step or None): the one synchronisation."""
        first = int(self.first_bad)
        return float(self.loss_sum), (None if first == self.NONE else first)


class TrainStep:
    """One optimizer step of ``train_model``: zero grads, forward, backward, clip to ``grad_clip`` (0: no clipping),
    then each optimizer steps and so does its scheduler. With ``check_finite`` a non-finite loss raises
    ``NonFiniteLoss`` before any update (a host synchronisation per step); without, the step runs and the caller
    watches the loss (``NonFiniteWatch``) and must not keep weights updated after a non-finite step."""

    def __init__(self, train_model: TrainModel, optimizers: list[torch.optim.Optimizer],
                 schedulers: list[torch.optim.lr_scheduler.LRScheduler], grad_clip: float = 0.0, check_finite: bool = True,
                 clip: Callable[[list[nn.Parameter], float], torch.Tensor] | None = None):
        """``clip``: the gradient clipping, when not ``clip_grad_norm`` (row-sharded tables need their own)."""
        self.train_model, self.optimizers, self.schedulers, self.grad_clip = train_model, optimizers, schedulers, grad_clip
        self.check_finite, self.clip = check_finite, clip

    def __call__(self, batch: Batch, **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``model_kwargs`` go to the train model (``scale`` of a data-parallel rank's ``ShardTrainModel``)."""
        loss, logits = self.train_model(batch, **model_kwargs)
        if self.check_finite and not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite training loss {loss.item()}")
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            (self.clip or clip_grad_norm)(list(self.train_model.parameters()), self.grad_clip)
        for o, s in zip(self.optimizers, self.schedulers):
            o.step()
            s.step()
        return loss, logits
