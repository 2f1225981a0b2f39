import copy
import json
import statistics

import numpy as np
import pytest

from conftest import TINY_MODEL, schema_dataset
from kunlun.bench.quality import check_expected, pin_expected, run_ablation, run_quality
from kunlun.bench.spec import load_spec
from kunlun.blocks.embeddings import FeatureInfo
from kunlun.config import load_config, model_from_dict
from kunlun.data.tabular import FRAPPE_FIELDS
from kunlun.errors import KunlunError
from kunlun.models import build_model


@pytest.fixture
def tiny_spec(tmp_path):
    short = ["train.max_steps=3", "train.epochs=1", "data.max_seq_len=4"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({
        "datasets": ["ml-latest-small"],
        "seeds": [0, 1],
        "models": {"logistic_regression": short, "kunlun": short + TINY_MODEL[:-3]},
        "ablation": {"dataset": "ml-latest-small", "variants": {"pma": ["model.seq_pooling=pma"]}},
    }))
    return load_spec(spec)


def test_quality_of_a_schema_file_is_filed_under_the_data_sets_name(tmp_path):
    """A data set given as a schema file's path: its runs and table go under the name the schema gives it."""
    spec = load_spec(write_spec(tmp_path / "spec.yaml", {
        "datasets": [str(schema_dataset(tmp_path / "data", rows=600))], "seeds": [0],
        "models": {"logistic_regression": ["train.max_steps=2", "train.epochs=1"]}}))
    res = run_quality(spec, tmp_path / "out")
    assert list(res["results"]) == ["moved"] and res["results"]["moved"]["logistic_regression"]["split"] == "valid"
    assert (tmp_path / "out" / "runs" / "moved" / "logistic_regression" / "seed0" / "final.json").is_file()
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "### moved" in md and "Bayes" not in md and "bayes" not in res  # no known optimum, no such row


def test_a_synthetic_worlds_table_shows_its_bayes_ne_on_the_scored_split(tmp_path):
    """A synthetic world knows its optimum: the table has a row with the NE of the true click probability on the split
    the models were scored on (bayes.json, written by the generator), and the JSON keeps every split's."""
    from kunlun.data import synthetic as S

    world = tmp_path / "w"
    S.generate(world, 3000, seed=1, world=S.World(items=300, events_per_user=20))
    spec = load_spec(write_spec(tmp_path / "spec.yaml", {
        "datasets": [str(world)], "seeds": [0], "models": {"logistic_regression": ["train.max_steps=2", "train.epochs=1"]}}))
    res = run_quality(spec, tmp_path / "out")
    test = json.loads((world / "bayes.json").read_text())["splits"]["test"]
    assert res["bayes"]["w"]["test"]["ne"] == test["ne"]
    md = (tmp_path / "out" / "quality.md").read_text()
    assert f"| Bayes: the true click probability | test | | | {test['logloss']:.4f} | {test['ne']:.4f} (s.e. {test['ne_std']:.4f}) |" in md


def write_spec(path, spec: dict):
    path.write_text(json.dumps(spec))
    return path


def test_quality_table_is_written_and_finished_points_are_reused(tiny_spec, tmp_path):
    out = tmp_path / "out"
    res = run_quality(tiny_spec, out)
    row = res["results"]["ml-latest-small"]["kunlun"]
    assert row["split"] == "test" and row["seeds"] == 2 and len(row["ne"]["values"]) == 2
    assert row["ne"]["std"] > 0 and row["flops_per_example"] > 0
    md = (out / "quality.md").read_text()
    assert "| kunlun | test |" in md and "±" in md
    final = out / "runs" / "ml-latest-small" / "kunlun" / "seed0" / "final.json"
    stamp = final.stat().st_mtime_ns
    again = run_quality(tiny_spec, out)  # nothing retrained
    assert final.stat().st_mtime_ns == stamp
    assert again["results"]["ml-latest-small"]["kunlun"]["ne"] == row["ne"]

    pins = {"ne": {"ml-latest-small": {"kunlun": {"mean": row["ne"]["mean"] - 0.5, "tolerance": 0.01},
                                       "logistic_regression": {"mean": 5.0, "tolerance": 0.01}}}}
    (tmp_path / "pins.json").write_text(json.dumps(pins))
    failures = check_expected(res, tmp_path / "pins.json")
    assert len(failures) == 1 and failures[0].startswith("ml-latest-small/kunlun")
    # pins from the measured run judge a different result: the pin is the mean over seeds, the tolerance
    # max(3 × sample std, 0.005), both recomputed here from the per-seed values
    values = row["ne"]["values"]
    pin = pin_expected(res, tmp_path / "own.json")["ne"]["ml-latest-small"]["kunlun"]
    assert pin["mean"] == pytest.approx(statistics.mean(values), abs=1e-5)
    assert pin["tolerance"] == pytest.approx(max(3 * statistics.stdev(values), 0.005), abs=1e-5)

    def with_kunlun_ne(ne):
        other = copy.deepcopy(res)
        other["results"]["ml-latest-small"]["kunlun"]["ne"]["mean"] = ne
        return other

    edge = pin["mean"] + pin["tolerance"]
    assert check_expected(with_kunlun_ne(edge - 1e-4), tmp_path / "own.json") == []  # worse, but within tolerance
    assert check_expected(with_kunlun_ne(pin["mean"] - 0.1), tmp_path / "own.json") == []  # better passes
    for bad in (edge + 1e-4, float("nan")):
        failures = check_expected(with_kunlun_ne(bad), tmp_path / "own.json")
        assert len(failures) == 1 and failures[0].startswith("ml-latest-small/kunlun: NE"), bad


def test_pin_tolerance_is_three_sample_stds_with_a_floor(tmp_path):
    from kunlun.bench.quality import stat_cell

    wide, narrow = [0.80, 0.81, 0.83], [0.8000, 0.8001, 0.8003]
    res = {"spec": {"seeds": [0, 1, 2]}, "results": {"d": {
        "wide": {"ne": stat_cell(np.array(wide))}, "narrow": {"ne": stat_cell(np.array(narrow))},
        "din": {"skipped": "needs a behaviour sequence"}}}}
    pins = pin_expected(res, tmp_path / "pins.json")["ne"]["d"]
    assert set(pins) == {"wide", "narrow"}
    assert pins["wide"] == {"mean": pytest.approx(0.81333, abs=1e-5), "tolerance": pytest.approx(3 * 0.0152753, abs=1e-5)}
    assert pins["narrow"] == {"mean": pytest.approx(0.80013, abs=1e-5), "tolerance": 0.005}  # 3σ = 0.00046 < floor
    assert json.loads((tmp_path / "pins.json").read_text())["ne"]["d"] == pins


def test_ablation_deltas_are_relative_to_the_full_model(tiny_spec, tmp_path):
    r = run_ablation(tiny_spec, tmp_path / "out", timing_steps=2, timing_rounds=3)
    assert set(r["rows"]) == {"full", "pma"}
    assert r["rows"]["full"]["delta_ne_pct"]["mean"] == 0.0
    assert r["rows"]["pma"]["delta_flops_pct"] != 0.0
    # step times: one per round, the median reported, Δ the median of the per-round ratios to the full model
    full, pma = r["rows"]["full"], r["rows"]["pma"]
    for kind in ("train", "infer"):
        assert len(pma["step_ms_rounds"][kind]) == 3 and all(t > 0 for t in pma["step_ms_rounds"][kind])
        assert pma["step_ms"][kind] == pytest.approx(statistics.median(pma["step_ms_rounds"][kind]))
        ratios = [a / b for a, b in zip(pma["step_ms_rounds"][kind], full["step_ms_rounds"][kind])]
        assert pma["delta_step_ms_pct"][kind] == pytest.approx(100 * (statistics.median(ratios) - 1))
        assert full["delta_step_ms_pct"][kind] == 0.0
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert f"| {pma['step_ms']['train']:.1f} ({pma['delta_step_ms_pct']['train']:+.1f}) |" in md
    assert "3 rounds of 2 steps" in md
    untimed = run_ablation(tiny_spec, tmp_path / "out", timing_rounds=0)  # the runs reused, nothing timed
    assert "step_ms" not in untimed["rows"]["pma"] and "Step times not measured" in (tmp_path / "out" / "ablation.md").read_text()


def test_interleaved_step_times_rank_a_model_with_many_more_flops_slower(tmp_path):
    """The interleaved timing measures each config's own model: a model with many times the FLOPs per example is slower
    per training step and per inference batch in the medians, on the same rows."""
    from kunlun.bench.speed import interleaved_step_ms

    base = ["train.batch_size=64", "data.max_seq_len=8", "train.threads=1"]
    cfgs = {"small": load_config(None, [*TINY_MODEL, *base], model="kunlun", dataset="ml-latest-small"),
            "big": load_config(None, [*base, "model.d_model=64", "model.num_layers=3"], model="kunlun", dataset="ml-latest-small")}
    ms = interleaved_step_ms(cfgs, steps=2, rounds=3)
    for kind in ("train", "infer"):
        assert statistics.median(ms["big"][kind]) > 2 * statistics.median(ms["small"][kind]), (kind, ms)


def test_ablation_on_another_data_set_with_chosen_variants_and_overrides_for_every_run(tiny_spec, tmp_path):
    """`bench ablation --dataset D --variants a,b KEY=VALUE…`: the ablation runs on D, only the chosen variants beside the
    full model, every run with the overrides (recorded in its config and named in the table); an unknown variant or a
    bad override is refused before anything trains."""
    spec = load_spec(None, [0], ablation_dataset="ml-100k", variants=["no_rotary_time"])
    assert spec["ablation"]["dataset"] == "ml-100k" and list(spec["ablation"]["variants"]) == ["no_rotary_time"]
    other = str(schema_dataset(tmp_path / "data", rows=600))  # a data set of its own name, "moved"
    tiny = {**tiny_spec, "seeds": [0], "ablation": {**tiny_spec["ablation"], "dataset": other}}
    tiny["models"] = {**tiny["models"], "kunlun": [o for o in tiny["models"]["kunlun"] if not o.startswith("train.max_steps")]}
    r = run_ablation(tiny, tmp_path / "out", overrides=["train.max_steps=2", "model.dropout=0.05"])
    assert r["dataset"] == "moved" and set(r["rows"]) == {"full", "pma"}
    for name in ("full", "pma"):
        cfg = load_config(tmp_path / "out" / "runs" / "moved" / f"kunlun-{name}" / "seed0" / "config.yaml")
        assert (cfg.train.max_steps, cfg.model.dropout) == (2, 0.05)
    assert "every run with `train.max_steps=2 model.dropout=0.05`" in (tmp_path / "out" / "ablation.md").read_text()
    with pytest.raises(KunlunError, match="--variants: 'no_such' is not in the spec; known: no_sliding_window"):
        load_spec(None, variants=["no_such"])
    with pytest.raises(KunlunError, match=f"ablation full on {other}: .*model.no_such_key"):
        run_ablation(tiny, tmp_path / "bad", overrides=["model.no_such_key=1"])
    assert not (tmp_path / "bad").exists()


def test_sequence_model_on_a_context_only_dataset_is_a_config_error():
    info = FeatureInfo(tuple(FRAPPE_FIELDS), {f: 10 for f in FRAPPE_FIELDS}, 0, (), 1)
    for name in ("din", "bst", "interformer"):
        with pytest.raises(KunlunError, match=f"config key model.name: {name} models a behaviour sequence"):
            build_model(model_from_dict({"name": name}), info)
    build_model(model_from_dict({"name": "dcnv2"}), info)  # non-sequence models are fine


def test_spec_with_unknown_model(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("datasets: [ml-100k]\nseeds: [0]\nmodels: {gpt: []}\n")
    with pytest.raises(KunlunError, match="unknown model 'gpt'"):
        load_spec(p)


def test_dataset_overrides_come_first_and_must_name_a_benchmarked_dataset(tmp_path):
    from kunlun.bench.spec import point_overrides

    p = tmp_path / "s.yaml"
    p.write_text("datasets: [frappe_x1]\nseeds: [0]\nmodels: {dnn: [train.epochs=3], wukong: []}\n"
                 "dataset_overrides: {frappe_x1: [train.embedding_l2=0.01, train.epochs=20]}\n")
    spec = load_spec(p)
    # the model's own key is applied last, so it wins over the dataset recipe
    assert point_overrides(spec, "frappe_x1", "dnn") == ["train.embedding_l2=0.01", "train.epochs=20", "train.epochs=3"]
    assert point_overrides(spec, "frappe_x1", "wukong") == ["train.embedding_l2=0.01", "train.epochs=20"]
    p.write_text("datasets: [ml-100k]\nseeds: [0]\nmodels: {dnn: []}\ndataset_overrides: {frapee_x1: [train.epochs=2]}\n")
    with pytest.raises(KunlunError, match="dataset_overrides names 'frapee_x1'"):
        load_spec(p)


def test_speed_bench_reports_loader_step_and_trainer_rates(tmp_path):
    from kunlun.bench.speed import PRESETS, datasheet_peak, profile_training, run_speed_bench
    from kunlun.config import load_config

    cfg = load_config(None, ["model.d_model=8", "model.num_heads=2", "model.fm_hidden=16", "train.batch_size=64",
                             "train.eval_batch_size=128", "train.threads=1"])
    r = run_speed_bench(cfg, steps=2, repeats=1, dtypes=["fp32", "bf16"])  # bf16 asked for: timed on any CPU
    assert r["dtypes"] == ["fp32", "bf16"]
    assert r["loader_examples_per_s"] > 0 and r["useful_flops_per_example"] < r["flops_per_example"]
    from kunlun.runs import code_version
    assert r["code"] == code_version()["label"]  # the report names the code it measured
    for dtype in ("fp32", "bf16"):
        m = r[dtype]
        assert m["train_examples_per_s"] > 0 and m["trainer_examples_per_s"] > 0 and m["infer_examples_per_s"] > 0
        assert 0 < m["train_mfu"] < m["train_hfu"]  # useful FLOPs exclude padding
        assert ("train_mfu_datasheet" in m) == (datasheet_peak(r["device"], dtype) is not None)  # none for a CPU
    assert set(PRESETS) == {"default", "d128", "production"}
    for preset in PRESETS.values():  # every preset is a valid config
        load_config(None, preset)
    table = profile_training(cfg, tmp_path / "trace.json", steps=2)
    assert "aten::" in table and (tmp_path / "trace.json").stat().st_size > 0


def test_speed_bench_times_bf16_only_where_the_cpu_runs_it_fast(monkeypatch):
    """By default a CPU whose bf16 GEMM is many times slower than fp32 (no AVX-512 BF16 / AMX) times fp32 only; the
    GEMM peak on a CPU is sized so a slow dtype costs a fraction of a second, not minutes."""
    import torch

    from kunlun.bench import speed

    cpu = torch.device("cpu")
    rate = {torch.float32: 1.0, torch.bfloat16: 70.0}  # seconds per GEMM, by dtype: bf16 70× slower
    monkeypatch.setattr(speed, "_gemm_seconds", lambda n, dtype, device: rate[dtype] * (n / 256) ** 3 * 1e-3)
    assert speed.speed_dtypes(cpu) == ["fp32"]
    rate[torch.bfloat16] = 1.5  # a CPU with a native bf16 unit
    assert speed.speed_dtypes(cpu) == ["fp32", "bf16"]
    assert speed.speed_dtypes(cpu, ["bf16"]) == ["bf16"]
    with pytest.raises(KunlunError, match="--dtypes: unknown 'fp8'"):
        speed.speed_dtypes(cpu, ["fp8"])
    monkeypatch.undo()
    t0 = __import__("time").perf_counter()
    assert speed.gemm_flops_per_s(torch.bfloat16, cpu, repeats=1) > 0
    assert __import__("time").perf_counter() - t0 < 30  # 2048³ in bf16 took ~60 s per matmul on an AVX2 CPU
