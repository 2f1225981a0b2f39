"""Same seed, config and commit → same metrics on a GPU: seeding selects deterministic kernels there (the run-twice
check itself is in test_cuda.py and needs a GPU; this one checks the switch on any machine)."""

import pytest
import torch

from kunlun.training.step import set_seed


@pytest.fixture
def restore_flags(monkeypatch):
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_seeding_selects_deterministic_kernels_where_a_gpu_is(monkeypatch, restore_flags):
    import os

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.use_deterministic_algorithms(False)
    set_seed(0)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_seeding_leaves_the_kernels_alone_on_a_cpu_or_when_asked(monkeypatch, restore_flags):
    torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    set_seed(0)
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    set_seed(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
