"""Checkpoints: model weights in safetensors + the resolved config, trainer state for resuming.

A checkpoint is a directory, written to a temporary sibling and renamed into place, so a crash never
leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from kunlun.errors import KunlunError
from kunlun.files import atomic_dir


def save_checkpoint(target: Path, model: torch.nn.Module, config: dict, state: dict[str, Any] | None = None) -> None:
    def write(d: Path) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if state is not None:
            torch.save(state, d / "trainer_state.pt")

    atomic_dir(target, write)


def load_weights(checkpoint: Path, model: torch.nn.Module) -> None:
    path = checkpoint / "model.safetensors"
    if not path.is_file():
        raise KunlunError(f"{checkpoint}: not a checkpoint (no model.safetensors)")
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise KunlunError(f"{path}: weights do not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "trainer_state.pt"
    if not path.is_file():
        raise KunlunError(f"{checkpoint}: no trainer_state.pt to resume from")
    return torch.load(path, weights_only=False)
