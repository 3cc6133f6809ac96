"""Hand-computed checks of the continual-learning metric formulas in common.py."""

import itertools
import json

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


def test_average_incremental_accuracy_over_trained_entries_of_each_row():
    # row 1: {50} ; row 2: {40, 60} ; row 3: {45, 55} (entry 2 n/a) ; row 4: {30, 50, 70}
    assert common.average_incremental_accuracy(R) == pytest.approx((50 + 50 + 50 + 50) / 4)
    assert common.average_incremental_accuracy([[1.0, 2.0], [3.0, 4.0], [5.0, 8.0]]) == pytest.approx((3 + 6.5) / 2)


def test_forward_transfer_is_before_training_minus_row_zero():
    # j=1: R[1][1] - R[0][1] = 25-20 = 5 ; j=2: n/a ; j=3: R[3][3] - R[0][3] = 8-5 = 3 ; j=0 has no "before"
    assert common.forward_transfer(R) == pytest.approx(4.0)
    assert common.forward_transfer([[None, 1.0], [2.0, 3.0], [4.0, 5.0]]) == pytest.approx(2.0)
    assert common.forward_transfer([[1.0], [2.0]]) is None  # one entry: nothing before its training
    with pytest.raises(ValueError, match="forward transfer"):
        common.forward_transfer([[1.0, float("nan")], [2.0, 3.0], [4.0, 5.0]])


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


# ----------------------------------------------------------------------------- non-finite input, divergence
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_recall_at_k_refuses_non_finite_scores(bad):
    s = torch.eye(4)
    s[1, 2] = bad
    with pytest.raises(ValueError, match="R@K.*non-finite.*step 3"):
        common.recall_at_k(s, where="step 3")


@pytest.mark.parametrize("fn", [common.final_average, common.backward_transfer, common.forgetting])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_matrix_metrics_refuse_non_finite(fn, bad):
    with pytest.raises(ValueError, match="row 2, entry 0"):
        fn([[0.0, 0.0], [1.0, 2.0], [bad, 3.0]])


def test_stop_if_diverged_exits_1_naming_where_and_term(capsys):
    common.stop_if_diverged({"loss": torch.tensor(1.0)}, "step 1")  # finite: nothing happens
    with pytest.raises(SystemExit) as e:
        common.stop_if_diverged({"loss": 1.0, "ewc": torch.tensor(float("nan"))}, "step 2 (esc50) epoch 3")
    assert e.value.code == 1
    assert "step 2 (esc50) epoch 3: ewc = nan" in capsys.readouterr().err


def test_write_json_is_strict(tmp_path):
    with pytest.raises(ValueError):
        common.write_json(str(tmp_path / "a.json"), {"x": float("nan")})
    assert not (tmp_path / "a.json").exists()


def test_derive_seed_is_stable_and_purpose_specific():
    assert common.derive_seed(1, "batches") == common.derive_seed(1, "batches")
    assert len({common.derive_seed(1, "batches"), common.derive_seed(1, "replay"),
                common.derive_seed(2, "batches")}) == 3
    assert 0 <= common.derive_seed(123, "x") < 2**63


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    import random
    import numpy as np

    gen = torch.Generator().manual_seed(5)
    common.seed_everything(3)
    args = type("A", (), {})()
    common.save_checkpoint(str(tmp_path), "dns", args, 1, 2, {"rng": common.rng_state({"g": gen})})
    want = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    common.restore_rng(ckpt["rng"], {"g": gen})
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item()) == want
    assert ckpt["done"] == 1 and ckpt["script"] == "dns"


def test_tag_lists_only_non_default_fields():
    from dataclasses import dataclass, field
    from typing import List

    @dataclass
    class A:
        lr: float = 0.1
        k: int = 3
        steps: List[str] = field(default_factory=lambda: ["a"])

    assert common.tag(A(), ["lr", "k", "steps"], A()) == ""
    assert common.tag(A(steps=("a",)), ["steps"], A()) == ""  # a tuple/list read back from args.json is the same
    assert common.tag(A(lr=0.2, steps=["a", "b"]), ["lr", "k", "steps"], A()) == "lr=0.2,steps=a b"


# ----------------------------------------------------------------------------- the table command
def _fake_run(root, method, seed, acc, bwt, variant="", backbone="imagebind", torch_version="2.13.0"):
    d = root / f"{method}_{variant}_{seed}"
    d.mkdir(parents=True)
    res = {"schema": 1, "script": "dns", "method": method, "variant": variant, "data": "builtin",
           "backbone": backbone, "seed": seed, "env": {"torch": torch_version},
           "summary": {"acc": acc, "bwt_acc": bwt}, "timing_s": {"total": 10.0 * seed, "train": [1.0, 2.0]}}
    (d / "results.json").write_text(json.dumps(res))


def test_table_cells_and_paired_differences(tmp_path, capsys):
    for s, acc, bwt in ((1, 70.0, 0.0), (2, 72.0, None), (3, 74.0, 1.0)):
        _fake_run(tmp_path, "dns", s, acc, bwt)
    for s, acc, bwt in ((1, 60.0, -10.0), (2, 66.0, -8.0), (3, 63.0, -9.0)):
        _fake_run(tmp_path, "vanilla", s, acc, bwt)
    text = common.table([str(tmp_path)], metrics=["acc", "bwt_acc", "time_total", "time_train"],
                        paired_with="vanilla", out=str(tmp_path / "t.md"))
    lines = text.splitlines()
    assert lines[0] == "| method | seeds | acc | bwt_acc | time_total | time_train |"
    # dns acc: mean 72, std 2; bwt: (0, 1) -> 0.50 ± 0.71 over n=2; times 20 ± 10, train sum 3
    assert lines[2] == "| dns | 3 | 72.00 ± 2.00 | 0.50 ± 0.71 (n=2) | 20.00 ± 10.00 | 3.00 ± 0.00 |"
    assert lines[3] == "| vanilla | 3 | 63.00 ± 3.00 | -9.00 ± 1.00 | 20.00 ± 10.00 | 3.00 ± 0.00 |"
    # paired acc differences (10, 6, 11): mean 9, sd sqrt(7), s.e. sqrt(7/3) = 1.53, 3 of 3 positive
    paired = [ln for ln in lines if ln.startswith("| dns | 3 |") and "±" in ln][-1]
    assert "+9.00 ± 1.53 (3/3)" in paired
    # bwt differences over seeds 1, 3 only: (10, 10) -> +10.00 ± 0.00 (2/2)
    assert "+10.00 ± 0.00 (2/2)" in paired
    assert (tmp_path / "t.md").read_text().strip() == text
    only_paired = common.table([str(tmp_path)], metrics=["acc"], paired_with="vanilla", paired_only=True)
    assert only_paired.splitlines()[0] == "| method | paired seeds | Δ acc vs vanilla |"
    assert len(only_paired.splitlines()) == 3


def test_table_rejects_duplicate_seed_and_empty_dirs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        common.table([str(tmp_path / "empty")])
    assert e.value.code == 2
    _fake_run(tmp_path / "a", "dns", 1, 70.0, 0.0)
    _fake_run(tmp_path / "b", "dns", 1, 71.0, 0.0)
    with pytest.raises(SystemExit) as e:
        common.table([str(tmp_path / "a"), str(tmp_path / "b")])
    assert e.value.code == 2 and "appears twice" in capsys.readouterr().err


def test_table_shows_differing_group_keys_and_per_seed(tmp_path):
    _fake_run(tmp_path, "dns", 1, 70.0, 0.0)
    _fake_run(tmp_path, "dns", 2, 71.0, 0.0)
    _fake_run(tmp_path, "dns", 1, 50.0, 0.0, variant="epochs=1")
    text = common.table([str(tmp_path)], metrics=["acc"], per_seed=True)
    assert "| method | variant | seeds | acc |" in text
    assert "| dns | (defaults) | 2 | 70.50 ± 0.71 (70.00, 71.00) |" in text
    assert "| dns | epochs=1 | 1 | 50.00 |" in text
    _fake_run(tmp_path, "dns", 3, 72.0, 0.0)
    for s in (1, 2, 3):  # integer metrics (stored_bytes) print as integers
        path = tmp_path / f"dns__{s}" / "results.json"
        r = json.loads(path.read_text())
        r["summary"]["stored_bytes"] = 1000 * s
        path.write_text(json.dumps(r))
    assert "| dns | 3 | 2,000 ± 1,000 |" in common.table([str(tmp_path)], metrics=["stored_bytes"], only="dns//")


def test_table_command_line(tmp_path):
    import subprocess
    import sys

    _fake_run(tmp_path, "dns", 1, 70.0, 0.0)
    out = subprocess.run([sys.executable, "common.py", "table", str(tmp_path), "--metrics", "acc"],
                         capture_output=True, text=True, check=True).stdout
    assert "| dns | 1 | 70.00 |" in out


def test_read_npz_rejects_pickled_arrays(tmp_path):
    import numpy as np
    import data

    np.savez(tmp_path / "x.npz", a=np.array([{"k": 1}], dtype=object))
    with pytest.raises(data.DataError, match="x.npz: cannot read as .npz without pickle"):
        data.read_npz(str(tmp_path / "x.npz"))
    with pytest.raises(data.DataError, match="missing.npz: file not found \\(hint\\)"):
        data.read_npz(str(tmp_path / "missing.npz"), hint="hint")


def test_paired_test_hand_values():
    lo, hi, p = common.paired_test([1.0, 2.0, 3.0])  # mean 2, s.e. 1/sqrt(3), t(2) = 4.303
    assert abs(lo - (2 - 4.303 / 3 ** 0.5)) < 1e-9 and abs(hi - (2 + 4.303 / 3 ** 0.5)) < 1e-9
    assert p == 2 / 8  # only all-plus and all-minus reach |mean| >= 2
    d = [1.0, -1.0, 2.0, 2.0, 0.5]
    hits = [abs(sum(s * v for s, v in zip(signs, d))) >= abs(sum(d)) - 1e-12
            for signs in itertools.product((1, -1), repeat=len(d))]
    assert common.paired_test(d)[2] == sum(hits) / 32
    assert abs(common.t975(31) - 2.0395) < 1e-3 and common.t975(9) == 2.262


def test_table_test_flag_adds_interval_and_p(tmp_path):
    for seed, (a, b) in enumerate([(3.0, 2.0), (5.0, 3.0), (4.0, 1.0)], start=1):
        _fake_run(tmp_path, "x", seed, a, 0.0)
        _fake_run(tmp_path, "ref", seed, b, 0.0)
    text = common.table([str(tmp_path)], metrics=["acc"], paired_with="ref", paired_only=True, test=True)
    assert "+2.00 ± 0.58 (3/3) [-0.48, +4.48] p=0.250" in text


def test_table_just_trained_is_the_mean_diagonal(tmp_path):
    _fake_run(tmp_path, "x", 1, 50.0, 0.0)
    path = tmp_path / "x__1" / "results.json"
    res = json.loads(path.read_text())
    res["matrices"] = {"acc": [[0.0, 0.0, 0.0], [80.0, 1.0, None], [40.0, 60.0, 9.0]]}  # R[1][0] = 80, R[2][1] = 60
    path.write_text(json.dumps(res))
    assert "| x | 1 | 70.00 |" in common.table([str(tmp_path)], metrics=["just_trained_acc"])
