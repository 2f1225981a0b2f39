"""Export and serving: the package and the server score exactly as training does; requests are validated per
field; the server batches, pushes back when full, and stops cleanly. Everything on loopback, tiny models."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, TINY_MODEL, needs_shared, run_cli
from kunlun.config import load_config
from kunlun.data.batches import Batcher
from kunlun.data.prepare import OOV
from kunlun.data.registry import EMBEDDED, load_raw
from kunlun.errors import KunlunError
from kunlun.serving.examples import ExampleError, encode_examples, examples_from_raw, parse_examples
from kunlun.serving.export import export_package, load_scorer, read_meta
from kunlun.training.runner import load_trained, predict_file, train_run
from kunlun.training.trainer import predict

aiohttp = pytest.importorskip("aiohttp")

from kunlun.serving.options import ServeOptions  # noqa: E402
from kunlun.serving.server import start_server  # noqa: E402

TRAIN = [o for o in TINY_MODEL if not o.startswith("model.")] + ["train.max_steps=20", "train.epochs=1"]
MODEL = {"kunlun": [o for o in TINY_MODEL if o.startswith("model.")], "dnn": ["model.hidden=[32, 32]"]}
FP32_TOL = 1e-5  # |Δp| of the exported / compiled program against the training model, fp32
BF16_TOL = 5e-3  # |Δp| under bf16 autocast: compiled kernels round at other points than eager ones (1.4e-3 measured)


def train(tmp: Path, name: str, *overrides: str, model: str = "kunlun", dataset: str | None = None, data_dir=None) -> Path:
    cfg = load_config(None, [*TRAIN, *MODEL[model], *overrides], model=model, dataset=dataset, data_dir=str(data_dir) if data_dir else None)
    train_run(cfg, tmp / name, progress=False, logger=lambda m: None)
    return tmp / name


@pytest.fixture(scope="module")
def kunlun_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("serve"), "kunlun")


@pytest.fixture(scope="module")
def kunlun_package(kunlun_run) -> Path:
    """Compiled with AOTInductor (the one compile of the suite: it takes tens of seconds)."""
    out = kunlun_run.parent / "kunlun.pt2"
    export_package(kunlun_run, out, "auto", logger=lambda m: None)
    return out


@pytest.fixture(scope="module")
def dnn_frappe_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("serve-frappe"), "dnn", model="dnn", dataset="frappe_x1", data_dir=SHARED_DATA)


def assert_package_scores_as_training(run: Path, package: Path, split: str, runtimes: tuple[str, ...], tol: float) -> None:
    """The package's programs score ``split`` as training's ``predict`` does: on the training batches, and from raw
    examples (the serving path: the rows as a client sends them, encoded by the run's encoder)."""
    from kunlun.data.registry import prepare_dataset

    cfg, _, model = load_trained(run)
    data = prepare_dataset(cfg.data.dataset, cfg.data.data_dir)
    batcher = Batcher(data, split, cfg.data.max_seq_len, model.event_windows)
    want, _, _ = predict(model, batcher, cfg.train.eval_batch_size, cfg.train.bf16)
    raw = load_raw(cfg.data.dataset, cfg.data.data_dir)
    rows = np.arange(0, len(want), max(1, len(want) // 300))  # the raw split's rows are the prepared split's, in order
    examples = examples_from_raw(raw, split, rows)
    meta = read_meta(package)
    assert meta["code_version"]["source_sha256"] and meta["model"] == cfg.model.name
    for runtime in runtimes:
        scorer = load_scorer(package, runtime)
        assert scorer.runtime == runtime
        got = np.concatenate([scorer.score_batch(b) for b in batcher.iterate(1000)])
        assert np.abs(got - want).max() <= tol, (runtime, np.abs(got - want).max())
        assert np.abs(scorer.score_payload(examples) - want[rows]).max() <= tol, runtime


# ------------------------------------------------------------------------------------------ export parity

def test_kunlun_package_scores_as_training(kunlun_run, kunlun_package):
    meta = read_meta(kunlun_package)
    assert meta["runtime"] == "aoti", meta["aoti_error"]  # gcc is there: the compiled model must be in the package
    assert meta["dynamic"]["batch"][0] == 1 and meta["dynamic"]["seq_len"] == [1, 8]
    assert [i["name"] for i in meta["inputs"]][:3] == ["cat", "num", "history.item"]
    assert_package_scores_as_training(kunlun_run, kunlun_package, "test", ("aoti", "exported_program"), FP32_TOL)


def test_export_says_what_it_is_doing_while_it_compiles(kunlun_run, tmp_path, monkeypatch):
    """A compile of minutes is not silent: a line as each stage starts, then one every HEARTBEAT_SECONDS with the
    time elapsed, until the stage ends."""
    from kunlun.serving import export

    def slow_compile(program):
        time.sleep(0.6)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(export, "compile_aoti", slow_compile)
    monkeypatch.setattr(export, "HEARTBEAT_SECONDS", 0.1)
    lines = []
    export_package(kunlun_run, tmp_path / "m.pt2", "auto", logger=lines.append)
    assert lines[0].startswith("export: loading") and lines[1].startswith("export: tracing kunlun with torch.export")
    start = next(i for i, line in enumerate(lines) if line.startswith("export: compiling with AOTInductor"))
    end = next(i for i, line in enumerate(lines) if "AOTInductor failed (RuntimeError: no compiler here)" in line)
    ticks = lines[start + 1:end]
    assert len(ticks) >= 2 and all(re.fullmatch(r"export: still compiling with AOTInductor, \d+s elapsed", t) for t in ticks), lines
    assert not any("still" in line for line in lines[end:]), lines  # the ticks stop with the stage


def test_compiled_model_is_not_run_on_a_cpu_without_its_instructions(kunlun_run, kunlun_package, monkeypatch):
    import kunlun.serving.export as export

    compiled_for = read_meta(kunlun_package)["aoti_cpu"]["isa"]
    assert compiled_for and load_scorer(kunlun_package).runtime == "aoti"
    monkeypatch.setattr(export, "cpu_isa", lambda: [f for f in compiled_for if f != compiled_for[-1]])
    assert load_scorer(kunlun_package).runtime == "exported_program"  # auto: falls back, does not crash
    with pytest.raises(KunlunError, match=f"{compiled_for[-1]}.*lacks"):
        load_scorer(kunlun_package, "aoti")
    with pytest.raises(KunlunError, match="not a kunlun package"):
        load_scorer(kunlun_run / "config.yaml")


@needs_shared
def test_dnn_on_frappe_package_scores_as_training(dnn_frappe_run, tmp_path):
    out = tmp_path / "dnn.pt2"
    meta = export_package(dnn_frappe_run, out, "none", logger=lambda m: None)
    assert meta["runtime"] == "exported_program" and meta["dynamic"]["seq_len"] is None and meta["aoti_error"] is None
    assert [i["name"] for i in meta["inputs"]] == ["cat", "num"]  # no sequences
    assert_package_scores_as_training(dnn_frappe_run, out, "valid", ("exported_program",), FP32_TOL)


def test_bf16_run_exports_under_autocast(tmp_path):
    run = train(tmp_path, "bf16", "train.bf16=true", model="dnn")
    out = tmp_path / "bf16.pt2"
    assert export_package(run, out, "none", logger=lambda m: None)["bf16"] is True
    assert_package_scores_as_training(run, out, "test", ("exported_program",), BF16_TOL)


def test_kunlun_with_own_event_windows_exports_and_scores_as_training(tmp_path):
    """``model.stream_window=own`` reads per-event-type windows: the package takes them as inputs (one set per
    event type the model reads, whatever a request's events), and scores as training does."""
    run = train(tmp_path, "own", "model.event_split=true", "model.stream_window=own")
    _, _, model = load_trained(run)
    assert model.event_windows  # the tiny Kunlun has per-type streams
    out = tmp_path / "own.pt2"
    meta = export_package(run, out, "none", logger=lambda m: None)
    assert meta["event_windows"] == {k: list(v) for k, v in model.event_windows.items()}
    names = [i["name"] for i in meta["inputs"]]
    assert sum(".window" in n for n in names) == 5 * sum(len(v) for v in model.event_windows.values())
    assert_package_scores_as_training(run, out, "test", ("exported_program",), FP32_TOL)
    one = examples_from_raw(load_raw("ml-latest-small", None), "test", np.arange(1))[0]
    one["history"] = {k: v[:1] for k, v in one["history"].items()}  # one event: one type's window is all padding
    assert np.isfinite(load_scorer(out).score_payload(one)).all()


OTHER_MODELS = ["logistic_regression", "dnn", "dcnv2", "wukong", "din", "bst", "interformer"]


@pytest.mark.parametrize("name", OTHER_MODELS)
def test_every_model_exports(name, kunlun_run):
    """Every other registered model exports (random weights) and its program scores as the module does; the
    sequence length stays dynamic where the model allows it (not BST's or InterFormer's)."""
    from kunlun.blocks.embeddings import FeatureInfo
    from kunlun.models import MODELS
    from kunlun.serving.export import ScoringModule, batch_inputs, example_batch, export_program
    from kunlun.training.trainer import build_from_info

    assert set(MODELS) == {"kunlun", *OTHER_MODELS}  # a new model: add it to OTHER_MODELS
    _, encoder, _ = load_trained(kunlun_run)
    cfg = load_config(None, ["data.max_seq_len=8"], model=name)
    module = ScoringModule(build_from_info(cfg, FeatureInfo.from_encoder(encoder, 8)).eval()).eval()
    program, dynamic_len = export_program(module, example_batch(encoder, 8), 8)
    assert dynamic_len == (name not in ("bst", "interformer"))
    raw = load_raw("ml-latest-small", None)
    batch = encode_examples(encoder, parse_examples(examples_from_raw(raw, "test", np.arange(50)), encoder.schema), 8)
    with torch.inference_mode():
        assert torch.allclose(program.module()(*batch_inputs(batch)), module(*batch_inputs(batch)), rtol=0, atol=FP32_TOL)


# ------------------------------------------------------------------------------------------ request examples

def test_malformed_examples_name_the_field(kunlun_run):
    _, encoder, _ = load_trained(kunlun_run)
    schema = encoder.schema
    raw = load_raw("ml-latest-small", None)
    good = examples_from_raw(raw, "test", np.arange(3), newest=8)
    parse_examples({"examples": good}, schema)

    def broken(i, change):
        ex = json.loads(json.dumps(good))
        change(ex[i])
        return {"examples": ex}

    cases = [
        ([], "request", "at least one example"),
        ("x", "request", "list of example objects"),
        ({"examples": [good[0], 3]}, "examples[1]", "object of feature values"),
        (broken(1, lambda e: e.pop("genre")), "examples[1].genre", "missing"),
        (broken(2, lambda e: e.update(user=1.5)), "examples[2].user", "an id (integer or string"),
        (broken(0, lambda e: e.update(user=None)), "examples[0].user", "got null"),
        (broken(1, lambda e: e.update(log_gap_hours="3")), "examples[1].log_gap_hours", "a finite number"),
        (broken(1, lambda e: e.update(time=1.5)), "examples[1].time", "unix seconds"),
        (broken(0, lambda e: e.update(history=[1, 2])), "examples[0].history", "object of lists"),
        (broken(2, lambda e: e["history"].pop("event")), "examples[2].history.event", "missing"),
        (broken(2, lambda e: e["history"].update(time=e["history"]["time"][:-1])), "examples[2].history.time", "as many values"),
        (broken(1, lambda e: e["history"]["item"].__setitem__(3, [7])), "examples[1].history.item[3]", "an id"),
    ]
    for payload, field, expected in cases:
        with pytest.raises(ExampleError) as err:
            parse_examples(payload, schema)
        assert err.value.field == field and expected in str(err.value), (field, str(err.value))
    single = dict(good[0], weekday=True)  # one example object: fields are named from "request"
    with pytest.raises(ExampleError, match=r"^request\.weekday: expected an id"):
        parse_examples(single, schema)


def test_ids_as_text_unknown_ids_and_long_histories_encode_as_training(kunlun_run):
    cfg, encoder, _ = load_trained(kunlun_run)
    raw = load_raw("ml-latest-small", None)
    rows = np.arange(0, 2000, 97)
    full = examples_from_raw(raw, "test", rows)
    assert max(len(e["history"]["item"]) for e in full) > cfg.data.max_seq_len
    enc = lambda exs: encode_examples(encoder, parse_examples(exs, encoder.schema), cfg.data.max_seq_len)  # noqa: E731
    a = enc(full)
    b = enc(examples_from_raw(raw, "test", rows, newest=cfg.data.max_seq_len))  # only what the model reads
    texts = [dict(e, user=str(e["user"]), item=str(e["item"])) for e in full]  # ids sent as strings, as in some logs
    c = enc(texts)
    for x in (b, c):
        assert torch.equal(a.cat, x.cat) and torch.equal(a.num, x.num)
        for f in ("item", "event", "side", "gap", "mask"):
            assert torch.equal(getattr(a.seqs["history"], f), getattr(x.seqs["history"], f))
    # ids never seen in training take the out-of-vocabulary index, as training's encoder gives them
    unseen = [dict(e, user="no-such-user", item=10**12) for e in full[:3]]
    u = enc(unseen)
    cols = [c for c, _ in encoder.schema.categorical]
    assert (u.cat[:, cols.index("user")] == OOV).all() and (u.cat[:, cols.index("item")] == OOV).all()


# ------------------------------------------------------------------------------------------ the server

async def post(session, url, body, raw: bool = False):
    data = body if raw else json.dumps(body)
    async with session.post(url + "/score", data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json(), dict(r.headers)


def serve_and(scorer, opts, work):
    """Start a server on a free loopback port, run ``work(session, url)``, stop the server; returns its result."""

    async def main():
        runner, port = await start_server(scorer, "127.0.0.1", 0, opts)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
                return await work(s, f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def file_rows_through_server(package: Path, raw, chunks: list[int], newest: int | None = None) -> np.ndarray:
    """Every row of ``raw``'s file split sent through a server (requests of the given sizes, concurrently), in row order."""
    examples = examples_from_raw(raw, "file", newest=newest)
    split = raw.splits["file"]
    rows = split.row if split.row is not None else np.arange(len(examples))  # source-file order
    bodies, start, k = [], 0, 0
    while start < len(examples):
        n = chunks[k % len(chunks)]
        part = examples[start : start + n]
        bodies.append(part[0] if n == 1 else {"examples": part})
        start, k = start + n, k + 1

    async def work(s, url):
        answers = await asyncio.gather(*(post(s, url, b) for b in bodies))
        assert all(status == 200 for status, _, _ in answers), [a for a in answers if a[0] != 200][:1]
        return np.concatenate([a["probabilities"] for _, a, _ in answers])

    probs = serve_and(load_scorer(package), ServeOptions(max_batch=64, max_wait_ms=5, workers=1), work)  # scored in a child
    out = np.empty(len(probs))
    out[rows] = probs
    return out


def predicted(run: Path, file: Path, tmp: Path) -> np.ndarray:
    predict_file(run, file, tmp / "p.csv")
    lines = (tmp / "p.csv").read_text().splitlines()[1:]
    return np.array([float(line.split(",")[1]) for line in lines])


def test_served_scores_equal_predict_on_a_file(kunlun_run, kunlun_package, tmp_path):
    src = EMBEDDED / "ml-latest-small"
    lines = (src / "ratings.csv").read_text().splitlines()
    (tmp_path / "movies.csv").write_text((src / "movies.csv").read_text())
    # two users' ratings in reverse file order, and a rating of a movie and by a user never seen in training
    body = lines[1:400][::-1] + ["99999,99999999,4.0,1700000000"]
    (tmp_path / "ratings.csv").write_text("\n".join([lines[0], *body]) + "\n")
    want = predicted(kunlun_run, tmp_path / "ratings.csv", tmp_path)
    cfg, _, _ = load_trained(kunlun_run)
    raw = load_raw(cfg.data.dataset, cfg.data.data_dir, file=tmp_path / "ratings.csv", labels=False)
    got = file_rows_through_server(kunlun_package, raw, [1, 7, 50, 3])
    assert len(got) == len(want) == 400
    assert np.abs(got - want).max() <= 1e-6
    got_short = file_rows_through_server(kunlun_package, raw, [25], newest=cfg.data.max_seq_len)
    assert np.abs(got_short - want).max() <= 1e-6


@needs_shared
def test_served_scores_equal_predict_on_frappe_with_unknown_ids(dnn_frappe_run, tmp_path):
    lines = (SHARED_DATA / "frappe_x1" / "valid.csv").read_text().splitlines()
    head = lines[0].split(",")
    unseen = lines[1].split(",")
    unseen[head.index("user")], unseen[head.index("city")] = "no-such-user", "987654321"
    (tmp_path / "f.csv").write_text("\n".join([lines[0], *lines[1:300], ",".join(unseen)]) + "\n")
    want = predicted(dnn_frappe_run, tmp_path / "f.csv", tmp_path)
    out = tmp_path / "dnn.pt2"
    export_package(dnn_frappe_run, out, "none", logger=lambda m: None)
    cfg, _, _ = load_trained(dnn_frappe_run)
    raw = load_raw(cfg.data.dataset, cfg.data.data_dir, file=tmp_path / "f.csv", labels=False)
    got = file_rows_through_server(out, raw, [1, 40])
    assert len(got) == len(want) == 300 and np.abs(got - want).max() <= 1e-6


def test_bad_requests_get_4xx_naming_the_field_and_leave_others_alone(kunlun_run):
    scorer = load_scorer(kunlun_run)
    raw = load_raw("ml-latest-small", None)
    good = examples_from_raw(raw, "test", np.arange(40), newest=8)
    want = scorer.score_payload(good)
    bad = [
        (b"{not json", 400, None),
        (json.dumps({"examples": [good[0], dict(good[1], user=[1])]}).encode(), 400, "examples[1].user"),
        (json.dumps(dict(good[2], history={"item": [1]})).encode(), 400, "request.history.event"),
        (json.dumps({"examples": good * 3}).encode(), 413, None),  # 120 examples: more than the queue holds
        (b"x" * (2 * 2**20), 413, None),  # larger than --max-body-mb
    ]

    async def work(s, url):
        # the bad requests go out between the good ones, all at once
        answers = await asyncio.gather(*(post(s, url, g) for g in good[:20]), *(post(s, url, b, raw=True) for b, _, _ in bad),
                                       *(post(s, url, g) for g in good[20:]))
        async with s.get(url + "/health") as r:
            health = await r.json()
        async with s.get(url + "/schema") as r:
            schema = await r.json()
        return answers[:20] + answers[20 + len(bad):], answers[20 : 20 + len(bad)], health, schema

    good_answers, bad_answers, health, schema = serve_and(scorer, ServeOptions(max_queue=100, max_body_mb=1, workers=0), work)
    for (status, body, _), w in zip(good_answers, want):
        assert status == 200 and abs(body["probabilities"][0] - w) <= 1e-6
    for (status, body, _), (_, want_status, field) in zip(bad_answers, bad):
        assert status == want_status and body["error"], body
        if field:
            assert body["field"] == field and body["error"].startswith(field + ": "), body
    assert health["status"] == "ok" and health["failed"] == 0 and health["requests"] == len(good)
    assert health["peak_rss_mb"] > 0 and health["runtime"] == "eager"
    assert set(schema["schema"]["fields"]) >= {"user", "item", "time", "history"}
    parse_examples(schema["schema"]["example"], scorer.encoder.schema)  # the advertised example is valid


class BlockedScorer:
    """A scorer whose model calls wait until released (to fill the queue deterministically)."""

    def __init__(self, scorer):
        self.inner, self.release, self.calls = scorer, threading.Event(), 0
        self.encoder, self.max_len, self.runtime, self.meta = scorer.encoder, scorer.max_len, scorer.runtime, scorer.meta
        self.request_schema = scorer.request_schema

    def score_examples(self, ex):
        self.calls += 1
        assert self.release.wait(30)
        return self.inner.score_examples(ex)


def test_full_queue_answers_503_with_retry_after_and_recovers(kunlun_run):
    scorer = BlockedScorer(load_scorer(kunlun_run))
    raw = load_raw("ml-latest-small", None)
    ex = examples_from_raw(raw, "test", np.arange(10), newest=8)

    async def work(s, url):
        first = asyncio.create_task(post(s, url, {"examples": ex[:4]}))  # taken by the scoring thread, which then blocks
        while scorer.calls == 0:
            await asyncio.sleep(0.01)
        queued = [asyncio.create_task(post(s, url, {"examples": ex[:4]})) for _ in range(2)]  # 8 of 8 queue slots
        await asyncio.sleep(0.3)
        full = await post(s, url, ex[0])
        scorer.release.set()
        later = await asyncio.gather(first, *queued)
        again = await post(s, url, ex[0])
        return full, later, again

    (status, body, headers), later, again = serve_and(scorer, ServeOptions(max_queue=8, max_batch=4, max_wait_ms=0), work)
    assert status == 503 and headers.get("Retry-After") == "1" and "retry" in body["error"]
    assert [s for s, _, _ in later] == [200, 200, 200] and again[0] == 200


def test_concurrent_single_requests_are_batched_and_scored_alone_equal(kunlun_run):
    scorer = load_scorer(kunlun_run)
    raw = load_raw("ml-latest-small", None)
    ex = examples_from_raw(raw, "test", np.arange(60), newest=8)
    alone = np.array([scorer.score_payload(e)[0] for e in ex])
    ex = [dict(e, user=str(e["user"])) if i % 2 else e for i, e in enumerate(ex)]  # ids as text or integers, mixed in a batch

    async def work(s, url):
        answers = await asyncio.gather(*(post(s, url, e) for e in ex))
        async with s.get(url + "/health") as r:
            return answers, await r.json()

    answers, health = serve_and(scorer, ServeOptions(max_wait_ms=20, max_batch=64, workers=0), work)
    got = np.array([a["probabilities"][0] for _, a, _ in answers])
    assert np.abs(got - alone).max() <= 1e-6
    assert health["requests"] == 60 and health["batches"] < 60  # several requests shared a model call
    assert health["split_batches"] == 0 and health["failed"] == 0  # no batch had to be split up


def test_a_scoring_process_that_dies_is_replaced_and_a_bad_target_is_named(kunlun_run):
    from kunlun.serving.workers import ScoringProcess, ScoringProcessError

    scorer = load_scorer(kunlun_run)
    ex = examples_from_raw(load_raw("ml-latest-small", None), "test", np.arange(12), newest=8)
    want = scorer.score_payload(ex)

    async def work(s, url):
        async def health():
            async with s.get(url + "/health") as r:
                return await r.json()

        first = await post(s, url, {"examples": ex})
        pid = (await health())["scoring_processes"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            await asyncio.sleep(0.05)  # dead (a zombie until the server reaps it)
        return first, pid, await post(s, url, {"examples": ex}), await health()

    first, pid, again, health = serve_and(scorer, ServeOptions(workers=1, threads=1), work)
    assert first[0] == again[0] == 200, (first[1].get("error"), again[1].get("error"))
    assert np.abs(np.array(first[1]["probabilities"]) - want).max() <= 1e-6
    assert np.abs(np.array(again[1]["probabilities"]) - want).max() <= 1e-6
    assert health["scoring_processes"][0]["pid"] not in (None, pid) and health["failed"] == 0
    with pytest.raises(ScoringProcessError, match="no-such-run"):
        ScoringProcess(str(kunlun_run.parent / "no-such-run"), "auto", 1)


# ------------------------------------------------------------------------------------------ the commands

def kunlun_cmd(*args, monkeypatch, capsys, expect=0):
    """``kunlun ARGS`` in this process (a subprocess would spend seconds importing torch): its (stdout, stderr)."""
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == expect, err[-2000:]
    return out, err


def test_export_and_serve_commands(kunlun_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out, err = kunlun_cmd("export", kunlun_run, "--out", tmp_path / "m.pt2", "--compile", "none", "--static-seq-len", "--json",
                          monkeypatch=monkeypatch, capsys=capsys)
    meta = json.loads(out)
    assert meta["runtime"] == "exported_program" and "runtime exported_program" in err
    assert meta["dynamic"]["seq_len"] is None and all(i["shape"][1] == 8 for i in meta["inputs"] if i["name"].startswith("history."))
    # user errors: one line naming the path or option, exit 2, nothing written
    for args, needle in [
        (("export", tmp_path / "nothing", "--out", tmp_path / "x.pt2"), "nothing"),
        (("serve", kunlun_run / "config.yaml", "--max-batch", "0"), "--max-batch"),
        (("serve", kunlun_run, "--workers", "-1"), "--workers"),
    ]:
        err = kunlun_cmd(*args, monkeypatch=monkeypatch, capsys=capsys, expect=2)[1].strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "x.pt2").exists()
    proc = subprocess.Popen([sys.executable, "-m", "kunlun", "serve", tmp_path / "m.pt2", "--port", "0", "--threads", "1"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=tmp_path)
    try:
        url = None
        for _ in range(50):
            line = proc.stderr.readline()
            if m := re.search(r"http://127\.0\.0\.1:\d+", line):
                url = m.group(0)
                break
        assert url, "server did not announce its URL"

        async def work():
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/health") as h:
                    health = await h.json()
                async with s.get(url + "/schema") as h:
                    example = (await h.json())["schema"]["example"]
                return health, await post(s, url, [example, example])

        health, (status, body, _) = asyncio.run(work())
        assert health["runtime"] == "exported_program" and status == 200 and len(body["probabilities"]) == 2
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0  # SIGTERM: a clean stop


def test_bench_serve_reports_throughput_latency_and_memory(kunlun_run):
    from kunlun.bench.serve import Phase, run_serve_bench, serve_table

    phases = [Phase("closed", 1, concurrency=2), Phase("closed", 16, concurrency=2), Phase("open", 1, rate=50)]
    result = run_serve_bench(kunlun_run, phases, duration_s=1.0, max_requests=60, server_args=["--threads=1"], rows=200)
    assert [r["phase"] for r in result["phases"]] == ["closed c=2", "closed c=2", "open 50 req/s"]
    for r in result["phases"]:
        assert r["errors"] == 0 and 0 < r["requests"] <= 60 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["examples_per_s"] == pytest.approx(r["qps"] * r["examples_per_request"])
    assert result["server"]["peak_rss_mb"] > 0 and result["server"]["exit_code"] == 0
    assert "| open 50 req/s | 1 |" in serve_table(result)



class FakeTritonUtils:
    """The few names of ``triton_python_backend_utils`` that the written ``model.py`` uses."""

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class TritonError:
        def __init__(self, message):
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request[name]


def test_triton_repository_backend_scores_like_the_server(kunlun_run, tmp_path, monkeypatch):
    import importlib.util

    from kunlun.serving.triton import write_model_repository

    package = tmp_path / "m.pt2"
    export_package(kunlun_run, package, "none", logger=lambda m: None)
    model_dir = write_model_repository(package, tmp_path / "repo")
    config = (model_dir / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and 'name: "REQUEST"' in config and "dynamic_batching" in config
    with pytest.raises(KunlunError, match="already exists"):
        write_model_repository(package, tmp_path / "repo")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", FakeTritonUtils)
    spec = importlib.util.spec_from_file_location("kunlun_triton_model", model_dir / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    backend = module.TritonPythonModel()
    backend.initialize({"model_config": json.dumps({"parameters": {"runtime": {"string_value": "auto"}}}),
                        "model_repository": str(model_dir), "model_version": "1"})
    raw = load_raw("ml-latest-small", None)
    ex = examples_from_raw(raw, "test", np.arange(5), newest=8)
    want = load_scorer(package).score_payload(ex)
    req = lambda payload: {"REQUEST": FakeTritonUtils.Tensor("REQUEST", np.array([[json.dumps(payload).encode()]], dtype=object))}  # noqa: E731
    out = backend.execute([req(ex[:2]), req({"examples": [dict(ex[0], user=None)]}), req(ex[2])])
    assert np.abs(out[0].output_tensors[0].as_numpy()[0] - want[:2]).max() <= 1e-6
    assert out[1].error is not None and "examples[0].user" in out[1].error.message
    assert np.abs(out[2].output_tensors[0].as_numpy()[0] - want[2:3]).max() <= 1e-6
