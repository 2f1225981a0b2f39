"""Dataset names → adapters, data-directory resolution, and the prepared-data cache."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

from kunlun.data import movielens, public, synthetic, tabular
from kunlun.data.prepare import Encoder, Prepared, cache_key, load_prepared, save_prepared
from kunlun.data.schema import RawData
from kunlun.data.stream import ChunkSource, prepare_chunked
from kunlun.data.timeline import missing_data_note
from kunlun.errors import KunlunError

EMBEDDED = Path(__file__).parent / "embedded"
# where the user documentation gives each data set's download commands (the documentation's "Data sets" page)
DATASETS_DOCS = "docs/datasets.md#downloading"


@dataclass(frozen=True)
class DatasetSpec:
    folder: str
    files: tuple[str, ...]  # every file the adapter reads (the prepared-data cache key covers exactly these)
    load: Callable[..., RawData]  # (folder, optional single file to score, labels=required?) -> raw
    description: str
    title: str = ""  # how tables and reports name it, when not simply the name (e.g. a subset of a known dataset)
    # (folder, rows per chunk) -> the dataset as chunks (kunlun.data.stream); None: read whole only
    chunks: Callable[[Path, int], ChunkSource] | None = None
    # the files of the data set's folder that scoring a file reads besides the file (MovieLens: the movie and user
    # tables); a run keeps a copy of them (``keep_side_files``). The others are the data set's events, which a timeline
    # data set (MovieLens, UserBehavior, KuaiRand) draws its rows' histories from when present; a data set whose rows
    # carry all their features (Criteo, Frappe, the BARS sets) reads nothing of its folder to score a file
    scoring_needs: tuple[str, ...] = ()


DATASETS: dict[str, DatasetSpec] = {
    "ml-latest-small": DatasetSpec(
        "ml-latest-small", ("ratings.csv", "movies.csv"), movielens.load_latest_small,
        "MovieLens latest-small, CTR (rating >= 4) with histories; embedded in the package", chunks=movielens.latest_small_chunks,
        scoring_needs=("movies.csv",),
    ),
    "ml-100k": DatasetSpec(
        "ml-100k", ("u.data", "u.item", "u.user"), movielens.load_100k,
        "MovieLens 100K, CTR (rating >= 4) with histories and user/item features", chunks=movielens.ml100k_chunks,
        scoring_needs=("u.item", "u.user"),
    ),
    "ml-1m": DatasetSpec(
        "ml-1m", movielens.ML1M_FILES, movielens.load_1m,
        "MovieLens 1M (official '::' files), CTR (rating >= 4) with histories, user and movie features",
        "ML-1M", movielens.ml1m_chunks, movielens.ML1M_FILES[1:],
    ),
    # the same adapter on the first 487,650 lines of the official ratings.dat: quote it as a subset, never as ML-1M
    "ml-1m-first-half": DatasetSpec(
        "ml-1m-first-half", movielens.ML1M_FILES, movielens.load_1m,
        "ML-1M users 1-2999 only (official layout), CTR (rating >= 4) with histories, user and movie features",
        "ML-1M users 1–2999", movielens.ml1m_chunks, movielens.ML1M_FILES[1:],
    ),
    "frappe_x1": DatasetSpec(
        "frappe_x1", tuple(tabular.FRAPPE_SPLITS.values()), tabular.load_frappe,
        "Frappe_x1 (BARS split), context features only", chunks=tabular.FrappeChunks,
    ),
    "criteo": DatasetSpec(
        "criteo", public.CRITEO_FILES, public.load_criteo,
        "Criteo Kaggle Display Advertising train.txt, CTR, 13 log-transformed numeric + 26 categorical fields, "
        "random 8:1:1 split (seed 2018)", "Criteo", public.CriteoChunks,
    ),
    "taobao-userbehavior": DatasetSpec(
        "taobao-userbehavior", public.TAOBAO_UB_FILES, public.load_user_behavior,
        "Taobao UserBehavior, label = cart/fav/buy vs pv, histories of earlier events with type and category",
        "Taobao UserBehavior", public.user_behavior_chunks, (),
    ),
    "kuairand-pure": DatasetSpec(
        "kuairand-pure", public.KUAIRAND_LOGS, public.load_kuairand_pure,
        "KuaiRand-Pure standard logs, CTR (is_click) with histories of earlier exposures (liked/clicked/skipped, tab)",
        "KuaiRand-Pure", public.kuairand_chunks, (),
    ),
    "amazonelectronics_x1": DatasetSpec(
        "amazonelectronics_x1", public.AMAZON_ELECTRONICS_X1.files, public.load_amazonelectronics_x1,
        "AmazonElectronics_x1 (BARS train/test; valid = a fixed random tenth of train.csv), item/category histories per row", "AmazonElectronics_x1",
        partial(public.BarsChunks, public.AMAZON_ELECTRONICS_X1),
    ),
    "taobaoad_x1": DatasetSpec(
        "taobaoad_x1", public.TAOBAOAD_X1.files, public.load_taobaoad_x1,
        "TaobaoAd_x1 (BARS train/test; valid = a fixed random tenth of train.csv), category/brand/behaviour histories per row", "TaobaoAd_x1",
        partial(public.BarsChunks, public.TAOBAOAD_X1),
    ),
    "kuaivideo_x1": DatasetSpec(
        "kuaivideo_x1", public.KUAIVIDEO_X1.files, public.load_kuaivideo_x1,
        "KuaiVideo_x1 (BARS train/test; valid = a fixed random tenth of train.csv), clicked / not-clicked item histories per row", "KuaiVideo_x1",
        partial(public.BarsChunks, public.KUAIVIDEO_X1),
    ),
}


def default_data_dir() -> Path:
    return Path(os.environ.get("KUNLUN_DATA") or platformdirs.user_data_dir("kunlun"))


def cache_root() -> Path:
    return Path(os.environ.get("KUNLUN_CACHE") or platformdirs.user_cache_dir("kunlun")) / "prepared"


def is_schema_file(dataset: str) -> bool:
    return dataset.endswith((".yaml", ".yml"))


def synthetic_folder(dataset: str, data_dir: str | Path | None) -> Path | None:
    """The folder of a synthetic data set (``kunlun data synth``): ``dataset`` itself when it is a folder holding
    synth.json, else ``data_dir/<dataset>`` for a name that is not registered; None when it is neither."""
    if dataset in DATASETS or is_schema_file(dataset):
        return None
    if synthetic.is_synthetic(Path(dataset)):
        return Path(dataset)
    base = Path(data_dir) if data_dir else default_data_dir()
    return base / dataset if synthetic.is_synthetic(base / dataset) else None


def dataset_folder(name: str, data_dir: str | Path | None, scoring: bool = False) -> Path:
    """Where ``name``'s files are: ``data_dir/<folder>`` (or ``data_dir`` itself if it holds them). ``scoring``: for a
    file to score, a folder holding the files it needs (``DatasetSpec.scoring_needs``) does when none holds them all
    (the adapter then says that histories come from the file alone); when it needs none, wherever the folder would be."""
    if name not in DATASETS:
        raise KunlunError(
            f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, a path to a schema .yaml file, "
            "or a synthetic data set folder (kunlun data synth)"
        )
    spec = DATASETS[name]
    base = Path(data_dir) if data_dir else default_data_dir()
    for candidate in (base / spec.folder, base):
        if all((candidate / f).is_file() for f in spec.files):
            return candidate
    if name == "ml-latest-small" and not data_dir:
        return EMBEDDED / spec.folder
    if scoring:
        for candidate in (base / spec.folder, base):
            if candidate.is_dir() and all((candidate / f).is_file() for f in spec.scoring_needs):
                return candidate
        if not spec.scoring_needs:  # nothing needed: the file alone, wherever the data set's folder would be
            return base / spec.folder
    if data_dir and not Path(data_dir).is_dir():
        raise KunlunError(f"{data_dir}: data directory not found")
    missing = [f for f in spec.files if not (base / spec.folder / f).is_file()]
    raise KunlunError(f"{base / spec.folder}: dataset {name!r} not found (missing {', '.join(missing)}); pass --data-dir "
                      f"(download commands: the Data sets page of the documentation, {DATASETS_DOCS})")


# a side file larger than this is not copied into a run (``keep_side_files``): scoring a file then needs the data set
SIDE_COPY_MAX_BYTES = 50 << 20


def keep_side_files(dataset: str, data_dir: str | Path | None, target: Path, log: Callable[[str], None] | None = None) -> list[str]:
    """Copy into ``target`` (a new folder) the files of a registered data set's folder that scoring a file reads
    (``DatasetSpec.scoring_needs``: MovieLens's movie and user tables, a few hundred KB), so that a run scores files
    after its data set's folder is moved or deleted (``load_raw``'s ``kept``). The events are not copied (they can be
    large): such a run's histories come from the file alone. A file larger than ``SIDE_COPY_MAX_BYTES`` is not copied
    either, and ``log`` gets a line saying that scoring needs the data set. Returns the names copied."""
    import shutil

    spec = DATASETS.get(dataset)
    if spec is None or not spec.scoring_needs:  # a schema file, a synthetic set, or nothing to keep
        return []
    try:
        folder = dataset_folder(dataset, data_dir)
    except KunlunError as exc:  # trained from data prepared elsewhere: the run is no less complete
        if log:
            log(f"{exc}: its files are not copied into the run, so scoring a file with this run needs the data set's folder")
        return []
    large = [f for f in spec.scoring_needs if (folder / f).stat().st_size > SIDE_COPY_MAX_BYTES]
    if large:
        if log:
            log(f"{folder / large[0]}: larger than {SIDE_COPY_MAX_BYTES >> 20} MB, so not copied into the run: scoring a "
                "file with this run needs the data set's folder")
        return []
    target.mkdir(parents=True, exist_ok=True)
    for f in spec.scoring_needs:
        shutil.copyfile(folder / f, target / f)
    return list(spec.scoring_needs)


def load_raw(dataset: str, data_dir: str | Path | None, file: Path | None = None, labels: bool = True,
             kept: Path | None = None, file_alone: bool = False) -> RawData:
    """``dataset``'s examples, or (``file``) one file to score as split ``file`` (``labels=False``: the label column
    may be missing). ``kept``: a run's copy of the files scoring reads (``keep_side_files``), read when the data set's
    folder is not found; the histories are then the file's own rows, and ``RawData.note`` says so. ``file_alone``:
    the histories are the file's own rows whatever is found (on data sets whose rows carry their own histories, or
    none, it changes nothing)."""
    if file is not None and file_alone and dataset in DATASETS:
        return _file_alone(dataset, data_dir, file, labels, kept)
    if is_schema_file(dataset):
        return tabular.SchemaFile(Path(dataset)).load(file, labels)
    synth = synthetic_folder(dataset, data_dir)
    if synth is not None:
        return synthetic.load_synthetic(synth, file, labels)
    if file is not None and dataset not in DATASETS:
        # a file scored by a run whose dataset is neither registered nor a schema file, so a synthetic data set, which
        # has been moved or deleted since: scoring a shard reads the file alone
        return synthetic.load_synthetic(Path(dataset), file, labels)
    spec = DATASETS.get(dataset)
    try:
        folder = dataset_folder(dataset, data_dir, scoring=file is not None)
    except KunlunError:
        if file is None or spec is None or not _holds_side_files(kept, spec):
            raise
        raw = spec.load(kept, file, labels)
        base = Path(data_dir) if data_dir else default_data_dir()
        events = next(f for f in spec.files if f not in spec.scoring_needs)
        raw.note = missing_data_note(base / spec.folder / events, raw.has_labels, kept=(kept, spec.scoring_needs))
        return raw
    return DATASETS[dataset].load(folder, file, labels)


def _holds_side_files(kept: Path | None, spec: DatasetSpec) -> bool:
    """Whether a run's copy ``kept`` holds every file besides the events that scoring ``spec``'s files reads."""
    return kept is not None and bool(spec.scoring_needs) and all((kept / f).is_file() for f in spec.scoring_needs)


def _file_alone(dataset: str, data_dir: str | Path | None, file: Path, labels: bool, kept: Path | None) -> RawData:
    """``file`` scored on its own rows' histories: the adapter reads a folder that holds the data set's side files
    (from its folder, else the run's copy ``kept``) and not its events."""
    spec = DATASETS[dataset]
    try:
        source = dataset_folder(dataset, data_dir, scoring=True)  # holds the side files (or needs none)
    except KunlunError:
        if not _holds_side_files(kept, spec):
            raise
        source = kept
    with tempfile.TemporaryDirectory(prefix="kunlun-file-alone-") as tmp:
        for f in spec.scoring_needs:
            os.symlink((source / f).resolve(), Path(tmp) / f)
        raw = spec.load(Path(tmp), file, labels)
    raw.note = ""  # asked for: nothing to say
    return raw


STREAM_ROWS = 2_000_000  # synthetic sets with more examples are prepared chunk by chunk (kunlun.data.stream)
# other datasets whose files read add up to more bytes are prepared chunk by chunk, when their adapter can: read whole,
# such files take tens of times their size in RAM (ml-1m-first-half: 12 MB of files, 0.67 GB at the peak; a 148 MB Parquet
# log, 3.7 GB: docs/datasets.md#data-larger-than-memory)
STREAM_BYTES = 256 << 20
CHUNK_ROWS = 1 << 16  # rows per chunk (one synthetic row group): ~30 MB of working memory, and no slower than larger chunks


def locate(dataset: str, data_dir: str | Path | None) -> tuple[Path | None, tabular.SchemaFile | None, Path | None, list[Path], str]:
    """Which kind of data set ``dataset`` is and where: (synthetic folder, schema file, registered data set's folder; one
    of them set), every file it reads, and its name."""
    synth = sf = folder = None
    if is_schema_file(dataset):
        sf = tabular.SchemaFile(Path(dataset))
        missing = [f"{split}: {f}" for split, f in sf.files.items() if not f.is_file()]
        if missing:
            raise KunlunError(f"{sf.path}: key files names a file that does not exist ({missing[0]})")
        files, name = [sf.path, *sf.files.values()], sf.name
    elif (synth := synthetic_folder(dataset, data_dir)) is not None:
        files, name = synthetic.data_files(synth), synth.resolve().name
    else:
        folder = dataset_folder(dataset, data_dir)
        files, name = [folder / f for f in DATASETS[dataset].files], dataset
    return synth, sf, folder, files, name


def first_rows(dataset: str, data_dir: str | Path | None = None, rows: int = 1024) -> RawData:
    """The first chunk of ``dataset`` (``rows`` rows, read by its chunked reader) as RawData: the rows of each split
    it holds, and the events their histories index. Real rows without making the whole data set's examples (a
    per-user timeline still reads and sorts every event); a data set read whole only is read whole."""
    synth, sf, folder, _, _ = locate(dataset, data_dir)
    if synth is None and sf is None and DATASETS[dataset].chunks is None:
        return load_raw(dataset, data_dir)
    source = chunk_source(dataset, synth, sf, folder, rows)
    chunk = next(iter(source.chunks()))
    return RawData(source.schema, chunk.splits, chunk.events, source=source.source)


def prepare_dataset(dataset: str, data_dir: str | Path | None = None, *, use_cache: bool = True, rebuild: bool = False,
                    log=None, chunk_rows: int | None = None) -> Prepared:
    """Load, encode and cache ``dataset``; a second call with unchanged files reads the cache (memory-mapped).

    ``use_cache=False`` neither reads nor writes the cache (a set prepared chunk by chunk still goes through a temporary
    directory, removed at once: its memory maps stay valid); ``rebuild`` ignores a cached copy but writes a new one.
    A dataset is prepared chunk by chunk in bounded memory when ``chunk_rows`` is given, or when it is large: a synthetic
    set of more than ``STREAM_ROWS`` examples, other datasets whose files add up to more than ``STREAM_BYTES``; else it
    is read whole. Both give byte-identical caches. Datasets whose adapter reads whole only (``DatasetSpec.chunks``
    None) refuse ``chunk_rows``."""
    synth, sf, folder, files, name = locate(dataset, data_dir)
    if chunk_rows and synth is None and sf is None and DATASETS[dataset].chunks is None:
        raise KunlunError(f"--chunk-rows: {dataset} is read whole; only datasets with a chunked reader are prepared in chunks")
    key = cache_key(name, files, {"split": list(movielens.SPLIT_FRACTIONS)})
    target = cache_root() / f"{name}-{key}"
    if use_cache and not rebuild and (target / "dataset.json").is_file():
        try:
            prepared = load_prepared(target)
            if log:
                log(f"using cached {name} from {target}")
            return prepared
        except (OSError, KeyError, ValueError, KunlunError) as exc:  # unreadable cache: rebuild it, don't fail the run
            if log:
                log(f"cache {target} unreadable ({exc}); rebuilding")
    if synth is not None:
        large = synthetic.read_manifest(synth)["examples"] > STREAM_ROWS
    else:
        large = (sf is not None or DATASETS[dataset].chunks is not None) and sum(f.stat().st_size for f in files) > STREAM_BYTES
    if chunk_rows or large:
        rows = chunk_rows or CHUNK_ROWS
        if log:
            log(f"preparing {name} chunk by chunk ({rows:,} rows at a time; cached afterwards)")
        source = chunk_source(dataset, synth, sf, folder, rows)
        if use_cache:
            prepare_chunked(source, name, target)
            return load_prepared(target)
        with tempfile.TemporaryDirectory(prefix="kunlun-prepared-", ignore_cleanup_errors=True) as tmp:
            prepare_chunked(source, name, Path(tmp) / "cache")
            return load_prepared(Path(tmp) / "cache")  # the maps outlive the files' names (POSIX)
    if log:
        log(f"preparing {name} (first run; cached afterwards)")
    raw = load_raw(dataset, data_dir)
    prepared = Encoder.fit(raw).prepare(raw, name)
    if use_cache:
        save_prepared(prepared, target)
        return load_prepared(target)  # memory maps, like every later run's: the encoded copy in RAM is freed
    return prepared


def rebuild_cache(dataset: str, data_dir: str | Path | None = None, chunk_rows: int | None = None,
                  log: Callable[[str], None] | None = None) -> Prepared:
    """Prepare ``dataset`` from its raw files into a new cache (``kunlun data prepare``), then read the cache back, which
    proves it usable; logs the time and the rows of each split."""
    t0 = time.perf_counter()
    p = prepare_dataset(dataset, data_dir, rebuild=True, log=log, chunk_rows=chunk_rows)
    seconds = time.perf_counter() - t0
    prepare_dataset(dataset, data_dir, log=log)
    (log or (lambda m: None))(f"prepared {p.name} in {seconds:.1f}s: " + ", ".join(f"{k} {len(v):,} rows" for k, v in p.splits.items()))
    return p


def chunk_source(dataset: str, synth: Path | None, sf: tabular.SchemaFile | None, folder: Path | None, rows: int) -> ChunkSource:
    """The chunked reader of a dataset (``prepare_dataset`` resolved which kind it is)."""
    if synth is not None:
        return synthetic.SyntheticChunks(synth, rows)
    if sf is not None:
        return tabular.SchemaChunks(sf, rows)
    make = DATASETS[dataset].chunks
    assert make is not None and folder is not None
    return make(folder, rows)


def prepare_file(dataset: str, data_dir: str | Path | None, file: Path, encoder: Encoder, labels: bool = True,
                 log: Callable[[str], None] | None = None, kept: Path | None = None, file_alone: bool = False) -> Prepared:
    """Encode one user-supplied file (split ``file``) with a trained model's encoder; ``labels=False``
    accepts a file without the label column (for prediction). ``log`` gets the adapter's note on how the file was
    read (``RawData.note``: e.g. that the data set was not found, so histories come from the file alone). ``kept``:
    the run's copy of the data set's side files, read when its folder is not found; ``file_alone``: histories from the
    file's own rows only (``load_raw``)."""
    raw = load_raw(dataset, data_dir, file=file, labels=labels, kept=kept, file_alone=file_alone)
    if raw.schema != encoder.schema:
        raise KunlunError(f"{file}: its schema differs from the one the model was trained on")
    if raw.note and log:
        log(raw.note)
    return encoder.prepare(raw, Path(file).name)


SPLIT_ORDER = ("train", "valid", "test", "file")


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """min / median / p90 / max (and mean) of history lengths."""
    if not len(lengths):
        return {"min": 0, "median": 0.0, "p90": 0.0, "max": 0, "mean": 0.0}
    median, p90 = np.percentile(lengths, [50, 90])
    return {"min": int(lengths.min()), "median": float(median), "p90": float(p90), "max": int(lengths.max()),
            "mean": float(lengths.mean())}


def dataset_summary(p: Prepared) -> dict[str, Any]:
    """Rows, CTR, groups and history lengths per split (in all, and per event type); fields and vocabulary sizes."""
    s = p.schema
    out: dict[str, Any] = {
        "name": p.name,
        "label": s.label,
        "train_ctr": p.train_ctr,
        "categorical": {c: {"vocab": v, "size": len(p.vocabs[v])} for c, v in s.categorical},
        "numeric": list(s.numeric),
        "sequences": [q.name for q in s.sequences],
        "event_types": {q.name: _event_names(p, q) for q in s.sequences},
        "splits": {},
    }
    # per sequence and event type: running counts over the event table, so a history's count is one subtraction
    running = {}
    for q in s.sequences:
        codes = p.events[q.name].event
        running[q.name] = {name: np.concatenate([[0], np.cumsum(codes == code)]) for code, name in _event_names(p, q).items()}
    for name in sorted(p.splits, key=lambda k: SPLIT_ORDER.index(k) if k in SPLIT_ORDER else 9):
        sp = p.splits[name]
        # group ids are ranks among the split's groups (0 .. G-1): their count is the largest + 1, no O(rows) np.unique
        row: dict[str, Any] = {"rows": len(sp), "ctr": float(sp.label.mean()), "groups": int(sp.group.max()) + 1 if len(sp) else 0}
        for q in s.sequences:
            start, end = sp.seq_start[q.name], sp.seq_end[q.name]
            row[f"{q.name}_length"] = length_stats(end - start)
            row[f"{q.name}_by_event"] = {e: length_stats(cs[end] - cs[start]) for e, cs in running[q.name].items()}
        out["splits"][name] = row
    return out


def _event_names(p: Prepared, q) -> dict[int, str]:
    """Event code → name for sequence ``q`` (codes 2.. are the training vocabulary; 1 collects unseen types)."""
    if not q.event_vocab:
        return {}
    names = {i + 2: str(k) for i, k in enumerate(p.vocabs[q.event_vocab].keys)}
    if np.any(p.events[q.name].event == 1):
        names[1] = "(unseen type)"
    return names


def dataset_info(dataset: str, data_dir: str | Path | None = None, log=None) -> dict[str, Any]:
    """``dataset_summary`` of the prepared data set, with its title and, for synthetic data, its generation
    parameters and the Bayes NE of every split (``kunlun data info``)."""
    info = dataset_summary(prepare_dataset(dataset, data_dir, log=log))
    info["title"] = DATASETS[dataset].title if dataset in DATASETS else ""
    synth = synthetic_folder(dataset, data_dir)
    if synth is not None:
        manifest = synthetic.read_manifest(synth)
        info["synthetic"] = {k: manifest[k] for k in ("seed", "examples", "users", "world")}
        info["bayes"] = synthetic.read_bayes(synth)
    return info


def info_tables(summary: dict[str, Any]) -> None:
    """``dataset_info`` as tables on stdout (``kunlun data info``): rows, CTR, groups and history lengths per split,
    events of each type, vocabularies, and the Bayes NE of synthetic data."""
    from rich.table import Table

    from kunlun.console import out_console

    con = out_console()
    title = f" ({summary['title']})" if summary.get("title") else ""
    con.print(f"[bold]{summary['name']}[/]{title}  label={summary['label']}  train CTR={summary['train_ctr']:.4f}")
    stats = lambda d: f"{d['min']} / {d['median']:g} / {d['p90']:g} / {d['max']}"  # noqa: E731
    t = Table("split", "rows", "CTR", "groups", *[f"{q} length (min/median/p90/max)" for q in summary["sequences"]])
    for name, r in summary["splits"].items():
        t.add_row(name, f"{r['rows']:,}", f"{r['ctr']:.4f}", f"{r['groups']:,}", *[stats(r[f"{q}_length"]) for q in summary["sequences"]])
    con.print(t)
    for q in summary["sequences"]:
        if summary["event_types"].get(q):
            e = Table("split", *[f"{q}: {name}" for name in summary["event_types"][q].values()],
                      title=f"events of each type in the {q} (min/median/p90/max)")
            for name, r in summary["splits"].items():
                e.add_row(name, *[stats(v) for v in r[f"{q}_by_event"].values()])
            con.print(e)
    f = Table("categorical field", "vocabulary", "size (incl. pad, OOV)")
    for c, v in summary["categorical"].items():
        f.add_row(c, v["vocab"], f"{v['size']:,}")
    con.print(f)
    con.print(f"numeric fields: {', '.join(summary['numeric']) or '(none)'}")
    if summary.get("bayes"):
        synthetic.bayes_table(summary["bayes"])
