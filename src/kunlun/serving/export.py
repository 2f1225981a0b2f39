"""A trained run as one self-contained package (``kunlun export RUN --out model.pt2``), and loading it back.

The package is a PT2 archive (the zip format of ``torch.export.save`` and AOTInductor, written with
``torch.export.pt2_archive._package.package_pt2``, part of the documented torch.export API) holding:

- ``models/model``: the ``torch.export``'ed program of ``ScoringModule`` — plain tensors in, click
  probabilities out, dynamic batch size and, where the model allows it, dynamic sequence length;
- ``data/aotinductor/model``: the same program compiled ahead of time by AOTInductor (C++ built with the
  machine's compiler) when that works on the target, else absent (``meta.json`` says which and why);
- ``extra/kunlun/meta.json``: format version, model and dataset names, the run's resolved config, the request
  schema (what ``POST /score`` takes), the tensor inputs, the runtime chosen, the code version that trained the
  run and the one that exported it;
- ``extra/kunlun/encoder/*``: the run's encoder files (schema, vocabularies, numeric statistics), byte for
  byte as ``Encoder.save`` wrote them (base64 for the ``.npy`` files), read back with ``Encoder.load``.

``load_scorer`` serves a package or, as the plain reference, a run directory (the training model, eager): both
give a ``Scorer`` whose ``score_examples`` encodes raw examples with the run's encoder and returns probabilities.
``ScoringModule`` computes exactly what ``kunlun.training.trainer.predict`` computes (same forward, bf16 autocast
when the run trained in bf16, sigmoid of the float32 logits); the tests check the exported and compiled programs
against it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kunlun.config import Config
from kunlun.console import log, stage
from kunlun.data.batches import Batch, SequenceBatch
from kunlun.data.prepare import Encoder
from kunlun.errors import KunlunError
from kunlun.files import atomic_write
from kunlun.models import RankingModel
from kunlun.runs import TIME_FORMAT, code_version, cpu_name, resolve_run
from kunlun.serving.examples import BUILT_EXAMPLE, RawExamples, data_example, encode_examples, parse_examples, request_schema
from kunlun.training.runner import load_trained

PACKAGE_FORMAT = 1
META = "kunlun/meta.json"
ENCODER = "kunlun/encoder/"
MAX_BATCH = 1 << 16  # the largest batch the exported program accepts (the dynamic batch dimension's bound)
SEQUENCE_TENSORS = ("item", "event", "side", "gap", "mask")
RUNTIMES = ("auto", "aoti", "exported_program")
HEARTBEAT_SECONDS = 30.0  # while tracing or compiling, a line saying so this often


class ScoringModule(nn.Module):
    """A ranking model as plain tensors → click probabilities [B] float32 (what ``predict`` computes).

    cat: [B, F] long; num: [B, Dn] float; seqs: sequence name → (item [B, L] long, event [B, L] long,
    side [B, L, S] long, gap [B, L] float seconds, mask [B, L] bool), as ``Batcher`` makes them; windows (only for a
    model that reads per-event-type windows, ``model.event_windows``): sequence name → event-type index → the same
    five tensors of that type's own window.
    """

    def __init__(self, model: RankingModel, bf16: bool = False):
        super().__init__()
        self.model, self.bf16 = model, bf16

    def forward(self, cat: torch.Tensor, num: torch.Tensor, seqs: dict[str, tuple[torch.Tensor, ...]],
                windows: dict[str, dict[int, tuple[torch.Tensor, ...]]] | None = None) -> torch.Tensor:
        b = cat.shape[0]
        batch = Batch(label=num.new_zeros(b), cat=cat, num=num, group=cat.new_zeros(b),
                      seqs={k: SequenceBatch(*v) for k, v in seqs.items()},
                      windows={k: {c: SequenceBatch(*v) for c, v in ws.items()} for k, ws in (windows or {}).items()})
        with torch.autocast(cat.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(batch)
        return torch.sigmoid(logits.float())


def batch_inputs(batch: Batch) -> tuple:
    """A Batch as ``ScoringModule``'s arguments: (cat, num, seqs), and windows when the batch has them (so the
    inputs of a model without windows are what they always were)."""
    flat = lambda s: tuple(getattr(s, f) for f in SEQUENCE_TENSORS)  # noqa: E731
    args = (batch.cat, batch.num, {k: flat(s) for k, s in batch.seqs.items()})
    if batch.windows:
        args += ({k: {c: flat(w) for c, w in ws.items()} for k, ws in batch.windows.items()},)
    return args


def input_signature(batch: Batch, dynamic_len: bool) -> list[dict[str, Any]]:
    """Name, dtype and shape of every flat input, in call order ("batch" / "seq_len": the dynamic dimensions)."""
    cat, num, seqs, *windows = batch_inputs(batch)

    def entry(name, t, seq=False):
        shape = ["batch", *t.shape[1:]]
        if seq and dynamic_len:
            shape[1] = "seq_len"
        return {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": [d if isinstance(d, str) else int(d) for d in shape]}

    out = [entry("cat", cat), entry("num", num)]
    for q, tensors in seqs.items():
        out += [entry(f"{q}.{f}", t, seq=True) for f, t in zip(SEQUENCE_TENSORS, tensors)]
    for q, per_type in (windows[0] if windows else {}).items():
        for code, tensors in per_type.items():
            out += [entry(f"{q}.window{code}.{f}", t, seq=True) for f, t in zip(SEQUENCE_TENSORS, tensors)]
    return out


# ---------------------------------------------------------------------------------------- scoring

@dataclass
class Scorer:
    """Scores raw examples with a model (eager, exported or compiled) and the run's encoder.

    ``fn`` takes ``ScoringModule``'s arguments and returns probabilities [B]; ``runtime`` says which one it is:
    ``eager`` (the training model: the reference), ``aoti`` (AOTInductor-compiled) or ``exported_program``.
    """

    fn: Callable[..., torch.Tensor]
    encoder: Encoder
    max_len: int
    runtime: str
    meta: dict[str, Any] = field(default_factory=dict)
    max_batch: int = 4096  # rows per model call (a larger micro-batch is scored in slices)
    event_windows: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the model's (RankingModel.event_windows)
    source: str | None = None  # the package or run it was loaded from (``load_scorer``): what a scoring process loads
    example: tuple[dict[str, Any], str] | None = None  # GET /schema's example: a real row and where from (``run_example``)

    @torch.inference_mode()
    def score_batch(self, batch: Batch) -> np.ndarray:
        return self.fn(*batch_inputs(batch)).float().numpy()

    def score_examples(self, ex: RawExamples) -> np.ndarray:
        """Probabilities of validated raw examples, in order."""
        batch = encode_examples(self.encoder, ex, self.max_len, self.event_windows)
        n = len(batch)
        if n <= self.max_batch:
            return self.score_batch(batch)
        return np.concatenate([self.score_batch(slice_batch(batch, i, min(n, i + self.max_batch)))
                               for i in range(0, n, self.max_batch)])

    def score_payload(self, payload: Any) -> np.ndarray:
        """Probabilities for a parsed JSON request (one example, a list, or ``{"examples": [...]}``)."""
        return self.score_examples(parse_examples(payload, self.encoder.schema))

    @property
    def request_schema(self) -> dict[str, Any]:
        return request_schema(self.encoder, self.max_len, self.example)


def slice_batch(batch: Batch, a: int, b: int) -> Batch:
    cut = lambda s: SequenceBatch(*(getattr(s, f)[a:b] for f in SEQUENCE_TENSORS))  # noqa: E731
    return Batch(batch.label[a:b], batch.cat[a:b], batch.num[a:b], batch.group[a:b], {k: cut(s) for k, s in batch.seqs.items()},
                 {k: {c: cut(w) for c, w in ws.items()} for k, ws in batch.windows.items()})


def eager_scorer(cfg: Config, encoder: Encoder, model: RankingModel, meta: dict[str, Any] | None = None) -> Scorer:
    module = ScoringModule(model.eval(), cfg.train.bf16).eval()
    return Scorer(module, encoder, cfg.data.max_seq_len, "eager", meta or run_meta(cfg, None, model), event_windows=dict(model.event_windows))


def run_example(run: Path, cfg: Config) -> tuple[dict[str, Any], str] | None:
    """A real row of the run's data set as ``GET /schema``'s example (``examples.data_example`` of the first rows its
    chunked reader gives); None when the data set is not where the run was trained (the example is then built)."""
    from kunlun.data.registry import first_rows
    from kunlun.training.runner import scoring_dataset

    try:
        return data_example(first_rows(scoring_dataset(run, cfg), cfg.data.data_dir), cfg.data.dataset)
    except (KunlunError, OSError):
        return None


def run_meta(cfg: Config, run: Path | None, model: RankingModel) -> dict[str, Any]:
    trained = None
    if run is not None and (run / "environment.json").is_file():
        trained = json.loads((run / "environment.json").read_text()).get("code")
    return {"format": PACKAGE_FORMAT, "model": cfg.model.name, "dataset": cfg.data.dataset, "max_len": cfg.data.max_seq_len,
            "event_windows": {k: list(v) for k, v in model.event_windows.items()},
            "bf16": cfg.train.bf16, "precision": cfg.precision.format, "config": cfg.to_dict(),
            "run": str(run) if run else None, "trained_code_version": trained, "code_version": code_version()}


ISA_FLAG = re.compile(r"^(sse|ssse|avx|fma|f16c|bmi|amx|vnni|popcnt|lzcnt|movbe|adx|sha_ni|vaes|vpclmul|gfni)")


def cpu_isa() -> list[str]:
    """The instruction-set extensions this CPU reports (Linux ``/proc/cpuinfo``; [] where unknown). AOTInductor
    compiles for the exporting machine's CPU (``-march=native``), so a compiled model needs them all."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if ISA_FLAG.match(f))
    except OSError:
        pass
    return []


def is_package(path: Path) -> bool:
    return path.is_file() and zipfile.is_zipfile(path)


def load_scorer(path: Path, runtime: str = "auto", threads: int = 0) -> Scorer:
    """A package written by ``export_package`` (``runtime``: auto = AOTInductor where the package has it and it
    loads here, else the exported program), or a run directory / checkpoint (the training model, eager)."""
    path = Path(path)
    if threads:
        torch.set_num_threads(threads)
    if is_package(path):
        return replace(load_package(path, runtime), source=str(path))
    if path.is_file():
        raise KunlunError(f"{path}: not a kunlun package (a zip file written by `kunlun export`) nor a run directory")
    run, _ = resolve_run(path)
    cfg, encoder, model = load_trained(path)
    return replace(eager_scorer(cfg, encoder, model, run_meta(cfg, run, model)), source=str(path), example=run_example(run, cfg))


# ---------------------------------------------------------------------------------------- export

def example_batch(encoder: Encoder, max_len: int, n: int = 4, event_windows: dict[str, tuple[int, ...]] | None = None) -> Batch:
    """A small batch made the serving way (the schema's example request, n times), to trace the model with."""
    example = request_schema(encoder, max_len)["example"]
    return encode_examples(encoder, parse_examples({"examples": [example] * n}, encoder.schema), max_len, event_windows)


def export_program(module: ScoringModule, batch: Batch, max_len: int, dynamic_len: bool = True) -> tuple[torch.export.ExportedProgram, bool]:
    """``torch.export`` of ``module`` with a dynamic batch size, and a dynamic sequence length (1..max_len) when
    ``dynamic_len`` and the model allows it; returns (program, sequence length dynamic?)."""
    args = batch_inputs(batch)
    B = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    L = torch.export.Dim("seq_len", min=1, max=max_len)

    def shapes(seq_dim):
        per_seq = lambda: tuple({0: B, 1: seq_dim} for _ in SEQUENCE_TENSORS)  # noqa: E731
        out = ({0: B}, {0: B}, {k: per_seq() for k in args[2]})
        if len(args) > 3:  # per-event-type windows: as long as the merged window (Batcher builds both at max_len)
            out += ({k: {c: per_seq() for c in ws} for k, ws in args[3].items()},)
        return out

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args[2] and dynamic_len:
            try:
                return torch.export.export(module, args, dynamic_shapes=shapes(L)), True
            except Exception as exc:  # a model that needs every slot of max_len (e.g. a fixed position table)
                log(f"export: sequence length kept static ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        return torch.export.export(module, args, dynamic_shapes=shapes(torch.export.Dim.STATIC)), False


def compile_aoti(program: torch.export.ExportedProgram) -> list:
    """AOTInductor: the program compiled to a shared library (files to package)."""
    args, kwargs = program.example_inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = torch._inductor.aot_compile(program.module(check_guards=False), args, kwargs, options={"aot_inductor.package": True})
    if not isinstance(files, list):
        raise RuntimeError(f"AOTInductor returned {type(files).__name__}, not package files")
    return files


def encoder_files(encoder: Encoder) -> dict[str, str]:
    """The encoder as ``Encoder.save`` writes it, as archive text entries (base64 for binary files)."""
    with tempfile.TemporaryDirectory() as tmp:
        encoder.save(Path(tmp))
        out = {}
        for f in sorted(Path(tmp).iterdir()):
            data = f.read_bytes()
            out[ENCODER + (f.name if f.suffix == ".json" else f.name + ".b64")] = (
                data.decode() if f.suffix == ".json" else base64.b64encode(data).decode())
        return out


def encoder_from_files(extra: dict[str, str]) -> Encoder:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in extra.items():
            if not name.startswith(ENCODER):
                continue
            rel = name[len(ENCODER):]
            if rel.endswith(".b64"):
                (Path(tmp) / rel.removesuffix(".b64")).write_bytes(base64.b64decode(text))
            else:
                (Path(tmp) / rel).write_text(text)
        return Encoder.load(Path(tmp))


def export_package(run: Path, out: Path, compile: str = "auto", logger: Callable[[str], None] = log,
                   dynamic_len: bool = True) -> dict[str, Any]:
    """Write the package of a trained run (directory or checkpoint) to ``out``; returns its meta.json.

    ``compile``: ``auto`` (AOTInductor, falling back to the exported program alone when compiling fails),
    ``aoti`` (fail if it fails) or ``none``. ``dynamic_len=False`` fixes the sequence length at ``max_len`` (what the
    server always sends; the compiled kernels are then specialised to it). The exported program is checked against
    the training model on a batch before anything is written."""
    if compile not in ("auto", "aoti", "none"):
        raise KunlunError(f"--compile {compile}: expected auto, aoti or none")
    if Path(out).is_dir():
        raise KunlunError(f"{out}: --out is a directory; give a file name such as model.pt2")
    run_dir, _ = resolve_run(run)
    logger(f"export: loading {run} …")
    cfg, encoder, model = load_trained(run)
    if cfg.precision.format not in ("fp32", "bf16"):
        logger(f"export: the run emulates {cfg.precision.format} GEMMs; the program exports that emulation as traced")
    reference = eager_scorer(cfg, encoder, model)
    batch = example_batch(encoder, cfg.data.max_seq_len, event_windows=reference.event_windows)
    t0 = time.perf_counter()
    with stage(f"export: tracing {cfg.model.name} with torch.export …", "export: still tracing with torch.export", HEARTBEAT_SECONDS, logger):
        program, dynamic_len = export_program(reference.fn, batch, cfg.data.max_seq_len, dynamic_len)
    logger(f"export: traced {cfg.model.name} with torch.export in {time.perf_counter() - t0:.1f}s "
           f"(dynamic batch{', dynamic sequence length' if dynamic_len else ''})")
    want = reference.score_batch(batch)
    with torch.inference_mode():
        got = program.module()(*batch_inputs(batch)).numpy()
    if not np.allclose(got, want, rtol=0, atol=1e-5):
        raise KunlunError(f"{run}: the exported program disagrees with the training model (max |Δp| {np.abs(got - want).max():.2e})")
    aoti_files, aoti_error = None, None
    if compile != "none":
        t0 = time.perf_counter()
        try:
            with stage("export: compiling with AOTInductor (can take minutes) …", "export: still compiling with AOTInductor",
                       HEARTBEAT_SECONDS, logger):
                aoti_files = compile_aoti(program)
            logger(f"export: compiled with AOTInductor in {time.perf_counter() - t0:.1f}s")
        except Exception as exc:  # no compiler, an unsupported op, …: the exported program still serves
            aoti_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if compile == "aoti":
                raise KunlunError(f"--compile aoti: AOTInductor failed ({aoti_error})") from None
            logger(f"export: AOTInductor failed ({aoti_error}); the package holds the exported program only")
    meta = {
        **run_meta(cfg, run_dir, model),
        "runtime": "aoti" if aoti_files else "exported_program",
        "aoti_error": aoti_error,
        "aoti_cpu": {"name": cpu_name(), "isa": cpu_isa()} if aoti_files else None,
        "dynamic": {"batch": [1, MAX_BATCH], "seq_len": [1, cfg.data.max_seq_len] if dynamic_len else None},
        "inputs": input_signature(batch, dynamic_len),
        "output": {"name": "probability", "dtype": "float32", "shape": ["batch"]},
        "request_schema": request_schema(encoder, cfg.data.max_seq_len, run_example(run_dir, cfg)),
        "code_version": code_version(),
        "torch": torch.__version__,
        "exported_at": time.strftime(TIME_FORMAT),
    }
    extra = {META: json.dumps(meta, indent=1), **encoder_files(encoder)}
    from torch.export.pt2_archive._package import package_pt2

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            package_pt2(f, exported_programs={"model": program}, aoti_files={"model": aoti_files} if aoti_files else None,
                        extra_files=extra)

    atomic_write(out, write)
    if aoti_files:
        shutil.rmtree(Path(next(str(f) for f in aoti_files if isinstance(f, str))).parent, ignore_errors=True)
    logger(f"wrote {out} ({Path(out).stat().st_size / 2**20:.1f} MiB): {meta['model']}, runtime {meta['runtime']}"
           + (f" (AOTInductor failed: {meta['aoti_error']})" if meta["aoti_error"] else ""))
    return meta


# ---------------------------------------------------------------------------------------- loading

def read_meta(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("extra/" + META)]
        if not names:
            raise KunlunError(f"{path}: a zip file, but not a kunlun package (no {META})")
        return json.loads(z.read(names[0]))


def missing_isa(meta: dict[str, Any]) -> str | None:
    """Why the package's compiled model must not run on this CPU (instructions it lacks), or None. Running code
    compiled for instructions the CPU lacks would kill the process rather than raise, so this is checked first."""
    want, have = set((meta.get("aoti_cpu") or {}).get("isa") or []), set(cpu_isa())
    missing = sorted(want - have) if have else []
    return f"compiled for a CPU with {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}, which this one lacks" if missing else None


def load_package(path: Path, runtime: str = "auto") -> Scorer:
    """The package's compiled model (``runtime`` aoti), its exported program (``exported_program``), or the
    compiled one where the package has it and it loads on this machine, else the exported program (``auto``)."""
    if runtime not in RUNTIMES:
        raise KunlunError(f"--runtime {runtime}: expected one of {', '.join(RUNTIMES)}")
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") != PACKAGE_FORMAT:
        raise KunlunError(f"{path}: package format {meta.get('format')}, this kunlun reads format {PACKAGE_FORMAT}")
    from torch.export.pt2_archive._package import load_pt2

    has_aoti = meta["runtime"] == "aoti"
    if runtime == "aoti" and not has_aoti:
        raise KunlunError(f"{path}: the package has no AOTInductor model ({meta.get('aoti_error') or 'exported with --compile none'})")
    data = path.read_bytes()
    contents, load_error = None, None
    if has_aoti and runtime != "exported_program":
        load_error = missing_isa(meta)
        if load_error is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    contents = load_pt2(io.BytesIO(data), run_single_threaded=True)
            except Exception as exc:  # e.g. a library built for another platform
                load_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if load_error and runtime == "aoti":
            raise KunlunError(f"{path}: the AOTInductor model does not run here ({load_error})")
    if contents is None:
        contents = load_exported_only(data)
    encoder = encoder_from_files(contents.extra_files)
    if contents.aoti_runners:
        fn, used = contents.aoti_runners["model"], "aoti"
    else:
        fn, used = contents.exported_programs["model"].module(), "exported_program"
        if load_error:
            log(f"{path}: AOTInductor model not loaded ({load_error}); serving the exported program")
    windows = {k: tuple(int(c) for c in v) for k, v in meta.get("event_windows", {}).items()}
    shown = meta.get("request_schema") or {}  # a package keeps the example drawn from the data set at export
    example = (shown["example"], shown["example_from"]) if shown.get("example_from", BUILT_EXAMPLE) != BUILT_EXAMPLE else None
    return Scorer(fn, encoder, int(meta["max_len"]), used, {**meta, "runtime_loaded": used}, event_windows=windows, example=example)


def load_exported_only(data: bytes):
    """The archive without its AOTInductor files (so nothing native is loaded)."""
    from torch.export.pt2_archive._package import load_pt2

    src, dst = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():  # entries are <archive name>/<path>
            if not info.filename.split("/", 1)[-1].startswith("data/aotinductor/"):
                z.writestr(info, src.read(info))
    dst.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_pt2(dst)
