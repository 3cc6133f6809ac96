"""Hand-computed checks of the continual-learning metric formulas in common.py."""

import pytest
import torch

import common

# R[k][j]: row 0 = before training, entry j trained at step j+1; None = not applicable.
R = [
    [10.0, 20.0, None, 5.0],
    [50.0, 25.0, None, 6.0],
    [40.0, 60.0, None, 7.0],
    [45.0, 55.0, None, 8.0],
    [30.0, 50.0, None, 70.0],
]


def test_final_average_skips_missing_entries():
    assert common.final_average(R) == pytest.approx((30 + 50 + 70) / 3)
    assert common.final_average([[None, None], [None, None], [None, None]]) is None


def test_backward_transfer_is_final_minus_just_trained_over_all_but_last():
    # j=0: 30-50 = -20 ; j=1: 50-60 = -10 ; j=2: n/a ; j=3 is the last entry (excluded)
    assert common.backward_transfer(R) == pytest.approx(-15.0)


def test_forgetting_uses_max_over_rows_before_the_last():
    # j=0: max(50, 40, 45) - 30 = 20 ; j=1: max(60, 55) - 50 = 10
    assert common.forgetting(R) == pytest.approx(15.0)


def test_forgetting_is_negative_with_positive_backward_transfer():
    up = [[0.0, 0.0], [10.0, 0.0], [20.0, 5.0]]
    assert common.forgetting(up) == pytest.approx(-10.0)
    assert common.backward_transfer(up) == pytest.approx(10.0)


def test_recall_at_k_hand_computed_with_ties():
    s = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],  # true best: rank 1
        [0.5, 0.4, 0.6, 0.1],  # two candidates higher: rank 3
        [0.7, 0.1, 0.7, 0.7],  # tied with two others: in the top 1 with probability 1/3, top 2 with 2/3
        [0.0, 0.0, 0.0, 0.0],  # all tied (4 candidates): top 1 w.p. 1/4
    ])
    r1, r2, r3 = common.recall_at_k(s, ks=(1, 2, 3))
    assert r1 == pytest.approx(100 * (1 + 0 + 1 / 3 + 1 / 4) / 4)
    assert r2 == pytest.approx(100 * (1 + 0 + 2 / 3 + 2 / 4) / 4)
    assert r3 == pytest.approx(100 * (1 + 1 + 1 + 3 / 4) / 4)


def test_recall_at_k_perfect_and_reversed():
    assert common.recall_at_k(torch.eye(5) * 3, ks=(1,)) == [100.0]
    rev = -torch.eye(5)  # the true partner is strictly last
    assert common.recall_at_k(rev, ks=(1, 4, 5)) == [0.0, 0.0, 100.0]
