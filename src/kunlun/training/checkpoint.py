"""Checkpoints: model weights in safetensors + the resolved config, trainer state for resuming, and a manifest
of their checksums.

A checkpoint is a directory::

    model.safetensors    the weights
    config.yaml          the resolved config that built the model
    trainer_state.pt     (``last`` only) optimizer, scheduler and RNG states, position in the run: tensors and
                         plain values only, read back with ``torch.load(weights_only=True)`` (never unpickled)
    manifest.json        size and SHA-256 of each file above, written last

A checkpoint of a run trained by several processes (``kunlun.training.distributed``) holds ``dcp/`` instead of
``model.safetensors`` when it is a ``last``: a ``torch.distributed.checkpoint`` of the weights and the optimizer
states (each rank writes its own shard; ``.metadata`` says where every tensor's pieces are), listed file by file in
the manifest. DCP reshards on load, so it resumes on any number of processes, one process without a process group
included, and ``load_weights`` reads it too (``kunlun eval``/``export`` accept it). ``best`` stays one safetensors
file, written by rank 0.

It is written to a temporary sibling (each file fsynced) and renamed into place, so a crash never leaves a
half-written checkpoint where a good one was; a write that fails (a full disk) removes the temporary directory.
Every load checks the file against the manifest first, so a truncated or bit-flipped file is a one-line error
naming it, never garbage weights. A checkpoint without a manifest was written before checksums existed and is
read unverified.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file  # noqa: F401  (re-exported: tests read raw weights with it)
from safetensors.torch import save as save_safetensors

from kunlun.errors import KunlunError
from kunlun.files import atomic_dir, os_error_text

MANIFEST = "manifest.json"
FORMAT = "kunlun-checkpoint/1"
SHARDED = "dcp"  # the torch.distributed.checkpoint folder of a checkpoint written by several processes
HASH_CHUNK = 1 << 24


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # a full disk may only show here (delayed allocation), before the rename commits it
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def checkpoint_bytes(model: torch.nn.Module, config: dict, state: dict[str, Any] | None = None,
                     tensors: dict[str, torch.Tensor] | None = None) -> dict[str, bytes]:
    """The files of a checkpoint (name → bytes), manifest aside. ``tensors``: the weights, when not ``model``'s
    own state dict (an FSDP-sharded model's, gathered by ``full_state_dict``)."""
    if tensors is None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    files = {"model.safetensors": save_safetensors(tensors), "config.yaml": yaml.safe_dump(config, sort_keys=False).encode()}
    if state is not None:
        buf = io.BytesIO()
        torch.save(state, buf)
        files["trainer_state.pt"] = buf.getvalue()
    return files


def save_checkpoint(target: Path, model: torch.nn.Module, config: dict, state: dict[str, Any] | None = None,
                    info: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the checkpoint ``target`` (replacing the one there only once the new one is complete). ``info`` (plain
    values, e.g. epoch and step) goes into the manifest. An OSError (full disk, no permission) is a KunlunError naming
    ``target``; the previous checkpoint stays as it was and no temporary file is left."""
    files = checkpoint_bytes(model, config, state, tensors)

    def write(d: Path) -> None:
        listed = {name: _write_file(d / name, data) for name, data in files.items()}
        manifest = {"format": FORMAT, **(info or {}), "files": listed}
        _write_file(d / MANIFEST, json.dumps(manifest, indent=1).encode())  # last: the checkpoint is complete

    try:
        atomic_dir(target, write)
    except OSError as exc:
        kept = "the previous checkpoint there is unchanged" if target.is_dir() else "there was no previous checkpoint"
        raise KunlunError(f"{target}: could not write the checkpoint: {os_error_text(exc)}; {kept} and no partial file was left") from None


def read_manifest(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's manifest, or None for a checkpoint written before manifests existed."""
    path = checkpoint / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        files = manifest["files"]
        if not all(isinstance(e["bytes"], int) and isinstance(e["sha256"], str) for e in files.values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise KunlunError(f"{path}: corrupt checkpoint manifest (not the JSON list of checksums written with the checkpoint)") from None
    return manifest


def read_verified(checkpoint: Path, name: str, manifest: dict[str, Any] | None = None) -> bytes:
    """The bytes of ``checkpoint/name`` after checking their size and SHA-256 against the manifest."""
    path = checkpoint / name
    manifest = read_manifest(checkpoint) if manifest is None else manifest
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KunlunError(f"{path}: missing from the checkpoint") from None
    except OSError as exc:
        raise KunlunError(f"{path}: cannot read the checkpoint file ({exc.strerror})") from None
    if manifest is None:
        return data  # written before checksums
    entry = manifest["files"].get(name)
    if entry is None:
        raise KunlunError(f"{path}: not listed in the checkpoint's {MANIFEST}; not loaded")
    if len(data) != entry["bytes"]:
        raise KunlunError(f"{path}: truncated or corrupt checkpoint file ({len(data)} bytes, {entry['bytes']} were written)")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise KunlunError(f"{path}: corrupt checkpoint file (its SHA-256 differs from the one {MANIFEST} recorded when it was written)")
    return data


def verify_checkpoint(checkpoint: Path) -> None:
    """Check every file the manifest lists (for a checkpoint read by name, e.g. its config.yaml)."""
    manifest = read_manifest(checkpoint)
    for name in (manifest or {}).get("files", {}):
        if name.startswith(SHARDED + "/"):
            _verify_streamed(checkpoint, name, manifest)
        else:
            read_verified(checkpoint, name, manifest)


def _file_entry(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, read in chunks (a shard of a distributed checkpoint may be large)."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return {"bytes": n, "sha256": h.hexdigest()}


def _verify_streamed(checkpoint: Path, name: str, manifest: dict[str, Any]) -> None:
    path, entry = checkpoint / name, manifest["files"][name]
    try:
        found = _file_entry(path)
    except FileNotFoundError:
        raise KunlunError(f"{path}: missing from the checkpoint") from None
    except OSError as exc:
        raise KunlunError(f"{path}: cannot read the checkpoint file ({exc.strerror})") from None
    if found["bytes"] != entry["bytes"]:
        raise KunlunError(f"{path}: truncated or corrupt checkpoint file ({found['bytes']} bytes, {entry['bytes']} were written)")
    if found["sha256"] != entry["sha256"]:
        raise KunlunError(f"{path}: corrupt checkpoint file (its SHA-256 differs from the one {MANIFEST} recorded when it was written)")


def is_sharded(checkpoint: Path) -> bool:
    """A checkpoint written by several processes: its weights are a DCP folder, not model.safetensors."""
    return (checkpoint / SHARDED / ".metadata").is_file()


def save_sharded(target: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], config: dict, state: dict[str, Any],
                 info: dict[str, Any], world, extra: dict[str, Any] | None = None) -> None:
    """Write the checkpoint ``target`` from every rank of ``world`` (a collective: every rank calls it): the weights and
    optimizer states as a DCP folder (each rank its shard), with ``extra`` (more sharded state, e.g. TorchRec's fused
    optimizer's, under its own top-level keys), then, by rank 0, config.yaml, ``state`` (the trainer's
    plain state, as in a one-process checkpoint) and the manifest of every file; then the directory is swapped into
    place as ``save_checkpoint`` does. Every rank returns once the new checkpoint is in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from kunlun.files import swap_dir, temporary_dir
    from kunlun.training.distributed import barrier, broadcast

    weights, optim = get_state_dict(model, optimizers)
    tmp = Path(broadcast(str(temporary_dir(target)) if world.main else None, world))
    done = False
    try:
        dcp.save({"model": weights, "optimizers": optim, **(extra or {})}, checkpoint_id=tmp / SHARDED)
        if world.main:
            files = {"config.yaml": yaml.safe_dump(config, sort_keys=False).encode()}
            buf = io.BytesIO()
            torch.save(state, buf)
            files["trainer_state.pt"] = buf.getvalue()
            listed = {f"{SHARDED}/{p.name}": _file_entry(p) for p in sorted((tmp / SHARDED).iterdir())}
            listed.update({name: _write_file(tmp / name, data) for name, data in files.items()})
            manifest = {"format": FORMAT, **info, "world_size": world.size, "files": listed}
            _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            swap_dir(tmp, target)
        done = True
    except OSError as exc:
        kept = "the previous checkpoint there is unchanged" if target.is_dir() else "there was no previous checkpoint"
        raise KunlunError(f"{target}: could not write the checkpoint: {os_error_text(exc)}; {kept} and no partial file was left") from None
    finally:
        if world.main and not done:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    barrier(world)


def load_sharded(checkpoint: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
    """Weights (and, given ``optimizers``, their states) from a checkpoint's DCP folder into ``model`` as it is laid
    out in this process — replicated, FSDP-sharded, or one process without a process group. Every rank calls it.
    ``extra``: more state saved by ``save_sharded(extra=)``, read in place (its tensors) and returned in it."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
            warnings.simplefilter("ignore", UserWarning)
            if optimizers:
                weights, optim = get_state_dict(model, optimizers)
                both = {"model": weights, "optimizers": optim, **(extra or {})}
                dcp.load(both, checkpoint_id=checkpoint / SHARDED)
                if extra:  # DCP reads tensors in place and replaces other values: hand those back
                    extra.update((k, both[k]) for k in extra)
                set_state_dict(model, optimizers, model_state_dict=both["model"], optim_state_dict=both["optimizers"])
            else:
                only = {"model": get_model_state_dict(model)}
                dcp.load(only, checkpoint_id=checkpoint / SHARDED)
                set_model_state_dict(model, only["model"])
    except (RuntimeError, ValueError, KeyError) as exc:  # CheckpointException is a BaseException subclass: below
        raise KunlunError(f"{checkpoint / SHARDED}: does not fit this run's model and optimizers ({_first_line(exc)})") from None
    except BaseException as exc:
        if type(exc).__name__ != "CheckpointException":
            raise
        raise KunlunError(f"{checkpoint / SHARDED}: does not fit this run's model and optimizers ({_first_line(exc)})") from None


def full_state_dict(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """``model``'s whole weights on the CPU, for a safetensors file; a collective when ``sharded`` (FSDP: every rank
    calls it, rank 0 gets the tensors)."""
    if not sharded:
        return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().contiguous() for k, v in full.items()}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def load_weights(checkpoint: Path, model: torch.nn.Module, sharded_model: bool = False) -> None:
    """``checkpoint``'s weights (checked against its manifest) into ``model``; ``sharded_model``: ``model`` is
    FSDP-sharded (every rank calls this, and takes its shard of the file's whole tensors)."""
    if is_sharded(checkpoint) and not (checkpoint / "model.safetensors").is_file():
        verify_checkpoint(checkpoint)
        load_sharded(checkpoint, model)
        return
    path = checkpoint / "model.safetensors"
    if not path.is_file() and not (checkpoint / MANIFEST).is_file():
        raise KunlunError(f"{checkpoint}: not a checkpoint (no model.safetensors)")
    data = read_verified(checkpoint, "model.safetensors")
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error type (and others) for a damaged header
        raise KunlunError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    if sharded_model:
        from torch.distributed.tensor import DTensor, distribute_tensor

        # every rank holds the whole tensors: each cuts its own shard out of them (src_data_rank=None: no scatter)
        layout = model.state_dict()
        tensors = {k: distribute_tensor(v.to(layout[k].device), layout[k].device_mesh, layout[k].placements, src_data_rank=None)
                   if isinstance(layout.get(k), DTensor) else v for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    else:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise KunlunError(f"{path}: weights do not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "trainer_state.pt"
    if not path.is_file():
        raise KunlunError(f"{checkpoint}: no trainer_state.pt to resume from")
    data = read_verified(checkpoint, "trainer_state.pt")
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise KunlunError(f"{path}: holds objects other than tensors and plain values, so it is not loaded "
                          f"(checkpoints are never unpickled): {_first_line(exc)}") from None
    except Exception as exc:  # a damaged archive: RuntimeError, EOFError, zipfile errors …
        raise KunlunError(f"{path}: not a readable trainer state ({_first_line(exc)})") from None
