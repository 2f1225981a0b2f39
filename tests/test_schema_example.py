"""``GET /schema``'s example is a real row of the run's data set: every value one the data holds, and the package keeps
it; where the data set is not found, the example built from the vocabularies says so."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_MODEL
from kunlun.config import load_config
from kunlun.data.registry import load_raw
from kunlun.serving.examples import BUILT_EXAMPLE, EXAMPLE_EVENTS
from kunlun.serving.export import export_package, load_package, load_scorer, run_example
from kunlun.training.runner import load_trained, train_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("schema-example")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUNLUN_CACHE", str(tmp / "cache"))
        cfg = load_config(None, [*TINY_MODEL, "train.max_steps=5", "train.epochs=1", "train.threads=1"])
        train_run(cfg, tmp / "run", progress=False, logger=lambda m: None)
    return tmp / "run"


def test_the_schema_example_is_a_real_row_of_the_data(run, tmp_path):
    scorer = load_scorer(run)
    shown = scorer.request_schema
    example = shown["example"]
    assert shown["example_from"] == f"the first test row of ml-latest-small, its {EXAMPLE_EVENTS} newest history events"
    raw = load_raw("ml-latest-small", None)
    test = raw.splits["test"]
    # the row itself: a test row whose every column holds the example's value
    at = np.flatnonzero((test.columns["user"] == example["user"]) & (test.columns["item"] == example["item"])
                        & (test.time == example["time"]))
    assert len(at) == 1
    k = int(at[0])
    for col in [c for c, _ in raw.schema.categorical] + list(raw.schema.numeric):
        assert example[col] == test.columns[col][k].item(), col
    assert example["year"] > 0 and example["genre"] != "(no genres listed)"
    assert {example[f"is_{g}"] for g in ("Action", "Drama", "Western")} <= {0.0, 1.0}
    # its history: the row's newest events, each an event of the data set
    ev, end = raw.events["history"], int(test.seq_end["history"][k])
    newest = slice(end - EXAMPLE_EVENTS, end)
    assert example["history"] == {f: ev[f][newest].tolist() for f in ("item", "event", "genre", "time")}
    assert len(scorer.score_payload(example)) == 1
    # a package keeps the example it was exported with
    export_package(run, tmp_path / "m.pt2", "none", logger=lambda m: None)
    assert load_package(tmp_path / "m.pt2").request_schema["example"] == example


def test_without_the_data_set_the_example_is_built_and_says_so(run, tmp_path):
    cfg, _, _ = load_trained(run)
    gone = replace(cfg, data=replace(cfg.data, data_dir=str(tmp_path / "nowhere")))
    assert run_example(run, gone) is None
    scorer = replace(load_scorer(run), example=None)
    assert scorer.request_schema["example_from"] == BUILT_EXAMPLE
    assert len(scorer.score_payload(scorer.request_schema["example"])) == 1
