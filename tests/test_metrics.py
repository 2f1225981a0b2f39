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
