"""Scaling fits on synthetic data with known truth, their intervals, input errors, the CLI, and sweeps."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from kunlun.errors import KunlunError
from kunlun.scaling.forms import fit_form
from kunlun.scaling.law import analyse, compare, prediction_interval
from kunlun.scaling.points import Point, load_points

C = np.logspace(10, 13, 10)


def saturating(c, e=0.75, a=0.1, alpha=0.3):
    return e + a * (c / C[0]) ** -alpha


def test_fits_recover_known_parameters():
    m2 = fit_form("M2", C, saturating(C))
    assert np.exp(m2.theta[0]) == pytest.approx(0.75, abs=2e-3)
    assert np.exp(m2.theta[1]) == pytest.approx(0.1, abs=2e-3)
    assert m2.theta[2] == pytest.approx(0.3, abs=5e-3)
    assert m2.starts_agree > 1  # several starts reach the same optimum
    m0 = fit_form("M0", C, 0.9 - 0.01 * np.log(C / C[0]))
    assert m0.params() == pytest.approx({"a": 0.9, "eta": 0.01}, abs=1e-6)
    m1 = fit_form("M1", C, 0.9 * (C / C[0]) ** -0.02)
    assert m1.params() == pytest.approx({"lnA": np.log(0.9), "alpha": 0.02}, abs=1e-6)


def synthetic_points(noise, truth=saturating, seed=0):
    rng = np.random.default_rng(seed)
    return [Point(c, truth(c) * np.exp(rng.normal(0, noise)), seed=s) for c in C for s in ((0, 1, 2) if c in C[[1, 5]] else (0,))]


def test_noisy_fit_predicts_held_out_runs():
    r = analyse(synthetic_points(2e-4), holdout=2, n_boot=100)
    assert r["chosen"] == "M2"
    assert [h["compute"] for h in r["holdout"]] == pytest.approx(list(C[-2:]))
    for h in r["holdout"]:  # 0.3 and 0.7 decades beyond the fitted runs
        assert h["predicted"] == pytest.approx(saturating(h["compute"]), rel=1e-3)
    # a pure power law cannot follow the saturation: held-out error far above the tolerance
    assert not r["forms"]["M1"]["passes"] and abs(r["forms"]["M1"]["holdout"][-1]["error"]) > 0.01


def test_law_acceptance_rules():
    # seed 0 on the true curve, repeated seeds scattered around it: the law is exact and the noise known
    pts = [p if p.seed == 0 else Point(p.compute, saturating(p.compute) * (1 + 2e-4 * (p.seed - 1.5)), seed=p.seed)
           for p in synthetic_points(0.0)]
    exact = analyse(pts, holdout=2, n_boot=100)
    assert exact["accepted"] and exact["verdict"].startswith("law accepted: M2")
    # the same runs without repeated seeds: no noise estimate, so no law can be accepted
    single = [p for p in pts if p.seed == 0]
    r = analyse(single, holdout=2, n_boot=50)
    assert not r["accepted"] and "no seed-noise estimate" in r["verdict"]
    # a curve that turns upward beyond the fitted window: every form misses the held-out runs
    bent = analyse(synthetic_points(1e-5, truth=lambda c: saturating(c) + 0.05 * (c > 3e12)), holdout=2, n_boot=50)
    assert not bent["accepted"] and "no form passes" in bent["verdict"]


def test_prediction_intervals_cover_about_90_percent():
    rng = np.random.default_rng(1)
    sigma, query = 2e-3, np.array([C[-1] * 2])
    truth = lambda c: 0.9 - 0.01 * np.log(c / C[0])  # noqa: E731
    hits, draws = 0, 40
    for _ in range(draws):
        ne = truth(C) * np.exp(rng.normal(0, sigma, len(C)))
        _, iv, _ = prediction_interval("M0", C, ne, query, 100, 0.9, None, rng)
        fresh = truth(query[0]) * np.exp(rng.normal(0, sigma))  # a new run at a held-out compute
        hits += iv["lower"][0] <= fresh <= iv["upper"][0]
    assert 0.75 <= hits / draws <= 1.0  # binomial sd at 90 %: 0.047


def test_compare_recovers_slope_ratio():
    rng = np.random.default_rng(2)
    a = [Point(c, (0.9 - 0.02 * np.log(c / C[0])) * np.exp(rng.normal(0, 3e-4)), family="a") for c in C]
    b = [Point(c, (0.9 - 0.01 * np.log(c / C[0])) * np.exp(rng.normal(0, 3e-4)), family="b") for c in C]
    r = compare(a, b, n_boot=200)
    assert r["slope_ratio"]["lower"] <= 2.0 <= r["slope_ratio"]["upper"]
    assert r["slope_ratio"]["value"] == pytest.approx(2.0, rel=0.05)
    # at the middle of the range A is 0.01·ln(c) better, which B needs exp(0.01 ln c / 0.01) = c× the compute for
    mid = r["at_compute"] / C[0]
    assert r["compute_multiplier"]["value"] == pytest.approx(mid, rel=0.1)


def write_csv(path, rows, header="compute,ne"):
    path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("rows,msg", [
    ([(1e10, 0.9), (-1, 0.8), (1e12, 0.7)], "compute = -1.0"),
    ([(1e10, 0.9), (1e11, "nan"), (1e12, 0.7)], "ne = nan"),
    ([(1e10, 0.9), (1e11, "x"), (1e12, 0.7)], "line 3, column 'ne'"),
])
def test_bad_csv_values_are_named(tmp_path, rows, msg):
    with pytest.raises(KunlunError, match=msg):
        load_points([write_csv(tmp_path / "runs.csv", rows)])


def test_input_errors(tmp_path):
    with pytest.raises(KunlunError, match="missing column 'ne'"):
        load_points([write_csv(tmp_path / "a.csv", [(1, 2)], header="compute,loss")])
    with pytest.raises(KunlunError, match="same compute"):
        analyse([Point(1e10, 0.9), Point(1e10, 0.91)], holdout=0, n_boot=10)
    with pytest.raises(KunlunError, match="leaves fewer than 2 to fit"):
        analyse([Point(1e10, 0.9), Point(1e11, 0.85), Point(1e12, 0.8)], holdout=2, n_boot=10)
    with pytest.raises(KunlunError, match="fewer points than parameters"):
        analyse([Point(1e10, 0.9), Point(1e11, 0.85), Point(1e12, 0.8)], holdout=1, n_boot=10, forms=["M2"])
    mixed = write_csv(tmp_path / "m.csv", [(1e10, 0.9, "ml-100k"), (1e11, 0.8, "frappe_x1")], header="compute,ne,dataset")
    with pytest.raises(KunlunError, match="different datasets"):
        load_points([mixed])
    metrics = write_csv(tmp_path / "n.csv", [(1e10, 0.9, "test NE"), (1e11, 0.8, "valid NE")], header="compute,ne,metric")
    with pytest.raises(KunlunError, match="different metrics"):
        load_points([metrics])
    with pytest.raises(KunlunError, match="several families"):
        analyse([Point(c, 0.9, family=f) for c, f in zip(C, "ababababab")], n_boot=10)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kunlun", *args], capture_output=True, text=True)


def test_fit_cli_json_and_report(tmp_path):
    rng = np.random.default_rng(3)
    rows = [(c, round(float(saturating(c) * np.exp(rng.normal(0, 5e-4))), 6), fam) for c in C for fam in ("a",)]
    rows += [(c, round(float(0.95 - 0.004 * np.log(c / C[0])), 6), "b") for c in C]
    csv_path = write_csv(tmp_path / "runs.csv", rows, header="compute,ne,family")
    r = run_cli("fit", str(csv_path), "--family", "a", "--bootstrap", "40", "--json", "--report", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["chosen"] in ("M0", "M1", "M2") and len(out["holdout"]) == 2
    assert set(out["holdout"][0]) == {"compute", "ne", "predicted", "lower", "upper", "seed_sigma"}
    assert set(out["forms"]) == {"M0", "M1", "M2"}
    assert (tmp_path / "rep" / "report.html").stat().st_size > 10_000  # plots are embedded
    r = run_cli("fit", str(csv_path), "--bootstrap", "50")
    assert r.returncode == 2 and "several families" in r.stderr
    r = run_cli("fit", str(csv_path), "--compare", "a", "b", "--bootstrap", "10", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["comparison"]["slope_ratio"]["value"] > 1  # a falls faster than b


def test_sweep_runs_points_resumes_and_records_compute(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "name: tiny\nmodel: kunlun\ndataset: ml-latest-small\n"
        "overrides: [train.epochs=1, train.max_steps=3, train.warmup_steps=1, train.eval_batch_size=4096, model.num_layers=1]\n"
        "mode: zip\naxes:\n  model.d_model: [4, 8]\n  train.batch_size: [32, 64]\nparallel: 2\nthreads: 1\n")
    out = tmp_path / "out"
    r = run_cli("sweep", str(sweep), "--out", str(out))
    assert r.returncode == 0, r.stderr
    finals = sorted(out.glob("points/*/seed0/final.json"))
    assert len(finals) == 2
    for f in finals:
        final = json.loads(f.read_text())
        assert final["train_examples"] == 3 * (32 if "d_model4" in str(f) else 64)
        assert final["train_compute"] == 3 * final["flops_per_example"] * final["train_examples"]
        assert final["useful_train_compute"] == 3 * final["useful_flops_per_example"] * final["train_examples"]
        assert 0 < final["useful_flops_per_example"] < final["flops_per_example"]  # ml-latest-small histories are padded
    mtime = finals[0].stat().st_mtime
    r = run_cli("sweep", str(sweep), "--out", str(out))
    assert r.returncode == 0 and "2 skipped" in r.stderr and finals[0].stat().st_mtime == mtime
    from kunlun.scaling.sweep import load_sweep, plan

    # what --dry-run lists: the recorded configs (model defaults spelled out) match the points' configs
    assert [state for _, state in plan(load_sweep(sweep), out)] == ["fresh", "fresh"]
    # a study outliving its machine: the records alone (no checkpoints) continue the sweep and feed the fit
    records, moved = tmp_path / "records", tmp_path / "moved"
    run_records = _benchmark_module("run_records")
    assert run_records.save(out, records) == 2 and run_records.restore(records, moved) == 2
    assert not list(records.rglob("checkpoints")) and not list(records.rglob("*.safetensors"))
    assert [state for _, state in plan(load_sweep(sweep), moved)] == ["fresh", "fresh"]
    assert len(load_points([records])) == 2
    (moved / "points").rename(tmp_path / "gone")
    (moved / finals[0].parent.relative_to(out)).mkdir(parents=True)  # a run folder already there (training): left alone
    assert run_records.restore(records, moved) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(sweep.read_text().replace("model.d_model", "model.d_modle"))
    r = run_cli("sweep", str(bad), "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "d_modle" in r.stderr and not (tmp_path / "bad").exists()


def _benchmark_module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_is_placed_at_the_compute_that_produced_its_ne(tmp_path):
    # a run that overfit: its best checkpoint came at half the examples it processed
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: kunlun, num_layers: 2}\n")
    (run / "final.json").write_text(json.dumps({
        "model": "kunlun", "dataset": "d", "seed": 0, "metrics": {"test": {"ne": 0.8}}, "flops_per_example": 1e6,
        "train_examples": 2000, "train_compute": 6e9, "train_compute_at_best": 3e9}))
    (pt,) = load_points([run])
    assert pt.compute == 3e9 and pt.ne == 0.8 and pt.compute_kind == "executed"  # an old record: no useful FLOPs
    final = json.loads((run / "final.json").read_text())
    (run / "final.json").write_text(json.dumps({**final, "useful_flops_per_example": 4e5, "useful_train_compute_at_best": 1.2e9}))
    (pt,) = load_points([run])
    assert pt.compute == 1.2e9 and pt.compute_kind == "useful" and pt.flops_per_example == 4e5


def test_seed_noise_is_judged_where_it_was_measured():
    from kunlun.scaling.law import seed_groups, sigma_at

    C = np.array([1e9, 1e9, 1e9, 1e10, 1e11, 1e12, 1e12, 1e12])
    ne = np.array([0.90, 0.94, 0.86, 0.85, 0.80, 0.7502, 0.7498, 0.7500])
    groups = seed_groups(C, ne)
    assert [g["compute"] for g in groups] == [1e9, 1e12]
    np.testing.assert_allclose([g["sigma"] for g in groups], [np.std([0.90, 0.94, 0.86], ddof=1), np.std([0.7502, 0.7498, 0.75], ddof=1)])
    small, large = groups[0]["sigma"], groups[1]["sigma"]
    np.testing.assert_allclose(sigma_at(np.array([2e9, 5e11, 1e13]), groups), [small, large, large])
    assert np.isnan(sigma_at(np.array([1e9]), [])).all()

    # a held-out prediction off by 3 σ of the large-compute noise passes a pooled σ (dominated by the
    # small-compute spread) but must fail the local one
    law = lambda c: 1.0 - 0.02 * np.log(c / 1e9)  # noqa: E731
    Cf = np.repeat([1e9, 3e9, 1e10, 3e10, 1e11], 3)
    rng = np.random.default_rng(0)
    fit_ne = law(Cf) + rng.normal(0, 0.01, len(Cf))
    held_c = np.array([1e12, 1e12, 1e12])
    held_ne = law(held_c) + np.array([1, -1, 0]) * 1e-4 + 3 * 1e-4 * 3
    pts = [Point(float(c), float(y), family="f", seed=i % 3) for i, (c, y) in enumerate(zip(np.r_[Cf, held_c], np.r_[fit_ne, held_ne]))]
    r = analyse(pts, holdout=1, n_boot=50, forms=["M0"])
    rows = r["forms"]["M0"]["holdout"]
    assert all(abs(row["seed_sigma"] - 1e-4) < 1e-6 for row in rows)  # σ measured at the held-out compute itself
    assert r["forms"]["M0"]["checks"]["within_2_sigma_seed"] is False


def test_compare_reports_resamples_without_a_multiplier():
    rng = np.random.default_rng(1)
    C = np.repeat(np.logspace(9, 12, 6), 2)
    a = [Point(float(c), float(1.0 - 0.02 * np.log(c / 1e9) + rng.normal(0, 1e-3)), family="a") for c in C]
    flat = [Point(float(c), float(0.9 + rng.normal(0, 1e-2)), family="b") for c in C]  # no slope: often ≤ 0 when resampled
    steep = [Point(float(c), float(1.0 - 0.01 * np.log(c / 1e9) + rng.normal(0, 1e-4)), family="b") for c in C]
    assert compare(a, steep, n_boot=200)["compute_multiplier"]["dropped_fraction"] == 0.0
    res = compare(a, flat, n_boot=200)
    dropped = res["compute_multiplier"]["dropped_fraction"]
    assert 0.05 < dropped < 0.95 and res["slope_ratio"]["dropped_fraction"] == dropped


def test_seeds_of_one_sweep_point_form_one_noise_group_at_different_computes():
    from kunlun.scaling.law import seed_groups

    C = np.array([1e9, 1e9, 2e11, 4e11, 4e11])  # point b's seeds stopped at different best checkpoints
    ne = np.array([0.90, 0.92, 0.80, 0.81, 0.83])
    groups = seed_groups(C, ne, ["a", "a", "b", "b", "b"])
    assert [g["dof"] for g in groups] == [1, 2]
    assert groups[1]["sigma"] == pytest.approx(np.std([0.80, 0.81, 0.83], ddof=1))
    assert groups[1]["compute"] == pytest.approx(np.exp(np.log([2e11, 4e11, 4e11]).mean()))
    assert [g["dof"] for g in seed_groups(C, ne)] == [1, 1]  # without point labels: equal compute only


def chinchilla_grid(alpha, beta, seeds=(0,), noise=0.002):
    """A 4 sizes × 3 data grid from L(F, D) = 0.7 + 0.3 (F/1e5)^−α + 0.1 (D/1e4)^−β, C = 3 F D; 3 seeds at one point."""
    rng = np.random.default_rng(0)
    pts = []
    for i, f in enumerate(np.logspace(5, 7, 4)):
        for j, d in enumerate(np.logspace(4, 7, 3)):
            for s in (seeds if (i, j) == (1, 1) else (0,)):
                ne = (0.7 + 0.3 * (f / 1e5) ** -alpha + 0.1 * (d / 1e4) ** -beta) * np.exp(rng.normal(0, noise))
                pts.append(Point(3 * f * d, ne, family="m", seed=s, point=f"f{i}-d{j}", flops_per_example=f))
    return pts


@pytest.mark.parametrize("alpha,beta", [(0.34, 0.34), (0.2, 0.4), (0.45, 0.15)])
def test_frontier_and_the_compute_optimal_size_of_a_grid(alpha, beta):
    from kunlun.scaling.law import frontier, optimal_size

    pts = chinchilla_grid(alpha, beta, seeds=(0, 1, 2))
    kept, rows = frontier(pts)
    assert len(rows) == 12 and [r["compute"] for r in rows] == sorted(r["compute"] for r in rows)
    for k, r in enumerate(rows):  # on the frontier ⇔ better than every cheaper point
        assert r["on_frontier"] == (r["ne"] < min((q["ne"] for q in rows[:k]), default=np.inf))
    assert {p.point for p in kept} == {r["point"] for r in rows if r["on_frontier"]} and 0 < len(kept) < len(pts)
    middle = next(r for r in rows if r["point"] == "f1-d1")
    assert middle["seeds"] == 3 and middle["ne"] == pytest.approx(np.mean([p.ne for p in pts if p.point == "f1-d1"]))
    assert middle["examples"] == pytest.approx(10 ** 5.5)
    truth = beta / (alpha + beta)  # F_opt ∝ C^(β/(α+β))
    exact = optimal_size(frontier(chinchilla_grid(alpha, beta, noise=0.0))[1], 10, 0.9, 0, holdout=2)
    assert exact["size_exponent"] == pytest.approx(truth, abs=0.005) and exact["E"] == pytest.approx(0.7, abs=0.005)
    assert exact["n_fit"] == 10 and [h["examples"] for h in exact["holdout"]] == pytest.approx([1e7, 1e7])  # the two largest F·D
    for h in exact["holdout"]:  # predicted from the other ten points
        assert h["predicted"] == pytest.approx(h["ne"], rel=1e-4)
    for h in optimal_size(rows, 100, 0.9, 0, holdout=2)["holdout"]:  # with 0.2 % noise
        assert abs(h["error"]) < 0.01 and h["lower"] <= h["ne"] <= h["upper"]
    size = optimal_size(rows, 100, 0.9, 0)  # 0.2 % noise on 12 points
    assert size["size_exponent"] == pytest.approx(truth, abs=0.06)
    assert size["size_exponent_interval"][0] <= size["size_exponent"] <= size["size_exponent_interval"][1]
    assert size["E"] == pytest.approx(0.7, abs=0.03) and size["in_sample_mean_abs_error"] < 0.005
    assert optimal_size([r for r in rows if r["flops_per_example"] == 1e5], 10, 0.9, 0) is None  # one size: no surface


def test_layer_law_and_frontier_reports(tmp_path, capsys):
    from kunlun.scaling.law import fit_inputs
    from kunlun.scaling.report import fit_and_report, fit_tables

    layers = [1, 2, 3, 4, 6, 8]
    rows = [(1e12 * n, round(0.8 - 0.01 * np.log(n), 6), "m", n) for n in layers]
    csv_path = write_csv(tmp_path / "layers.csv", rows, header="compute,ne,family,layers")
    r = fit_inputs([csv_path], x="layers", holdout=1, n_boot=20)
    assert r["x"] == "layers" and [x["compute"] for x in r["runs"]] == layers and r["holdout"][0]["compute"] == 8
    assert r["forms"]["M0"]["params"]["eta"] == pytest.approx(0.01, rel=1e-3) and "number of layers" in r["convention"]
    with pytest.raises(KunlunError, match="no model.num_layers recorded"):
        fit_inputs([write_csv(tmp_path / "no-layers.csv", [(1e12, 0.8), (2e12, 0.79)])], x="layers")
    grid = [(p.compute, p.ne, p.family, p.seed, p.flops_per_example, p.point) for p in chinchilla_grid(0.3, 0.3, seeds=(0, 1))]
    grid_csv = write_csv(tmp_path / "grid.csv", grid, header="compute,ne,family,seed,flops_per_example,point")
    res = fit_and_report([grid_csv], holdout=1, n_boot=20, report_dir=tmp_path / "rep", use_frontier=True)
    assert res["n_runs"] == sum(g["seeds"] for g in res["grid"] if g["on_frontier"]) < len(grid)
    fit_tables(res)
    out = capsys.readouterr().out
    assert "compute-optimal frontier:" in out and "compute-optimal size: FLOPs/example ∝ C^0.5" in out
    assert "Compute-optimal frontier: m" in (tmp_path / "rep" / "report.html").read_text()
