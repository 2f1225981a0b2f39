import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from kunlun.metrics import MetricAccumulator, auc, binary_entropy, gauc, logloss


def random_case(seed, n=2000, ties=True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    p = rng.random(n)
    if ties:
        p = np.round(p, 2)  # many tied scores
    return y, np.clip(p, 0.001, 0.999)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_logloss_match_sklearn(seed):
    y, p = random_case(seed)
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-12)


def test_gauc_is_impression_weighted_mean_of_per_user_auc():
    rng = np.random.default_rng(123)  # not the seed of random_case: g must not mirror y
    y, p = random_case(3, n=3000)
    g = rng.integers(0, 40, len(y))
    g[:5] = 999  # a group with one class only is skipped
    y[:5] = 1
    expected_num = expected_den = 0.0
    for k in np.unique(g):
        m = g == k
        if len(np.unique(y[m])) < 2:
            continue
        expected_num += roc_auc_score(y[m], p[m]) * m.sum()
        expected_den += m.sum()
    assert gauc(y, p, g) == pytest.approx(expected_num / expected_den, abs=1e-12)


def test_ne_of_constant_train_ctr_predictor_is_one():
    # predicting the training CTR on data with that CTR has logloss = H(ctr), so NE = 1
    y = np.array([1] * 30 + [0] * 70, dtype=float)
    acc = MetricAccumulator(train_ctr=0.3)
    for chunk in np.array_split(np.arange(100), 7):  # streaming in uneven batches
        acc.update(y[chunk], np.full(len(chunk), 0.3), chunk % 3)
    m = acc.compute()
    assert m["ne"] == pytest.approx(1.0, abs=1e-12)
    assert m["calibration"] == pytest.approx(1.0)
    assert m["auc"] == 0.5


def test_ne_uses_training_ctr_not_evaluation_ctr():
    y = np.array([1, 0, 0, 0], dtype=float)
    p = np.array([0.9, 0.2, 0.1, 0.3])
    m = MetricAccumulator(train_ctr=0.5)
    m.update(y, p)
    assert m.compute()["ne"] == pytest.approx(log_loss(y, p) / math.log(2), rel=1e-12)
    assert binary_entropy(0.5) == pytest.approx(math.log(2))


def grouped_case(seed, n=3000):
    y, p = random_case(seed, n)
    g = np.random.default_rng(seed + 100).integers(0, 50, n)
    return y, p, g


@pytest.mark.parametrize("seed", [0, 1])
def test_one_update_is_bit_identical_to_the_reference_functions(seed):
    y, p, g = grouped_case(seed)
    acc = MetricAccumulator(train_ctr=0.4)
    acc.update(y, p, g)
    m = acc.compute()
    assert m["logloss"] == logloss(y, p) and m["ne"] == logloss(y, p) / binary_entropy(0.4)
    assert m["auc"] == auc(y, p) and m["gauc"] == gauc(y, p, g)
    assert m["calibration"] == p.mean() / y.mean() and m["ctr"] == y.mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_gauc_exact_whatever_the_batching_and_merge_order(seed):
    """Batches of random sizes, in a shuffled order, spread over several 'ranks' merged in another order: AUC and
    gAUC equal the one-pass values exactly (and sklearn's to rounding); the float sums agree to rounding."""
    y, p, g = grouped_case(seed)
    one = MetricAccumulator(train_ctr=0.4)
    one.update(y, p, g)
    expected = one.compute()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    cuts = np.sort(rng.choice(np.arange(1, len(y)), 11, replace=False))
    batches = np.split(perm, cuts)
    ranks = [MetricAccumulator(train_ctr=0.4) for _ in range(3)]
    for b in batches:
        ranks[rng.integers(0, 3)].update(y[b], p[b], g[b])
    merged = MetricAccumulator.from_state(ranks[2].state()).merge(ranks[0]).merge(MetricAccumulator.from_state(ranks[1].state()))
    m = merged.compute()
    assert m["auc"] == expected["auc"] and m["gauc"] == expected["gauc"]
    assert m["examples"] == expected["examples"] and m["ctr"] == expected["ctr"]
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    for k in ("ne", "logloss", "calibration"):
        assert m[k] == pytest.approx(expected[k], rel=1e-12)
    # the AUC state is the count table of distinct (group, score) pairs, not the predictions
    assert len(merged.score) == len(np.unique(np.stack([g, p]), axis=1).T) < len(y)


def test_updates_must_all_have_groups_or_none():
    acc = MetricAccumulator(train_ctr=0.5)
    acc.update([1, 0], [0.6, 0.4])
    assert math.isnan(acc.compute()["gauc"])
    with pytest.raises(ValueError, match="groups"):
        acc.update([1, 0], [0.6, 0.4], [1, 1])
