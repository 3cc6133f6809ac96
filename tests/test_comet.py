"""Tests for comet.py: VQ / adapter / EWC / CLUB / PMR mechanisms, the built-in benchmark and npz loader,
end-to-end runs with every ablation flag, determinism, bad input, CLI parsing and one subprocess smoke run."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import tyro

import comet
import data

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_pairs=96, n_per_class=8, n_test=24, epochs=1, batch_size=32, cls_steps=15, fisher_batches=2,
            reset_after=2, num_threads=1)


def tiny_args(tmp_path, name="run", **kw):
    return comet.Args(out_dir=str(tmp_path / name), **{**TINY, **kw})


# ----------------------------------------------------------------------------- vector quantiser
def test_ema_update_moves_assigned_code_to_hand_computed_value():
    cb = comet.Codebook(2, 2, decay=0.5, eps=0.0)
    cb.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    cb.weight.copy_(cb.embed)
    feats = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])  # both nearest to code 0
    idx = cb.assign(feats)
    assert idx.tolist() == [[0, 0]]
    cb.ema_update([feats], [idx])
    # N0 = 0.5*1 + 0.5*2 = 1.5, o0 = 0.5*0 + 0.5*(1+3, 0) = (2, 0) -> e0 = (4/3, 0); code 1: N = 0.5, o = (5, 5)
    assert torch.allclose(cb.embed[0], torch.tensor([4 / 3, 0.0]))
    assert torch.allclose(cb.embed[1], torch.tensor([10.0, 10.0]))
    assert cb.idle.tolist() == [0.0, 1.0]


def test_mm_ema_partner_mixes_both_modalities():
    za = torch.tensor([[[1.0, 0.0]]])
    zb = torch.tensor([[[0.0, 3.0]]])
    assert torch.equal(comet.partner(za, zb, "aligned"), zb)
    assert torch.allclose(comet.partner(za, zb, "attention"), zb)  # one key: attention weight 1
    cb = comet.Codebook(1, 2, decay=0.0, eps=0.0)
    cb.ema_update([(za + zb) / 2], [torch.zeros(1, 1, dtype=torch.long)])
    assert torch.allclose(cb.embed[0], torch.tensor([0.5, 1.5]))  # (z^a + r^b) / 2


def test_straight_through_gradient():
    z = torch.randn(3, 4, 5, requires_grad=True)
    codes = torch.randn(3, 4, 5)
    q = comet.st_quantize(z, codes)
    assert torch.allclose(q, codes)
    w = torch.randn(3, 4, 5)
    (q * w).sum().backward()
    assert torch.allclose(z.grad, w)


def test_expand_keeps_old_codes_bit_identical():
    torch.manual_seed(0)
    cb = comet.Codebook(8, 4, decay=0.99)
    cb.ema_update([torch.randn(2, 5, 4)], [torch.randint(0, 8, (2, 5))])
    old, old_w, old_n = cb.embed.clone(), cb.weight.clone(), cb.count.clone()
    cb.expand(4)
    assert cb.embed.shape == (12, 4) and cb.count.shape == (12,) and cb.idle.shape == (12,)
    assert torch.equal(cb.embed[:8], old) and torch.equal(cb.weight[:8], old_w) and torch.equal(cb.count[:8], old_n)
    assert not torch.equal(cb.embed[8:], torch.zeros(4, 4))


def test_dead_code_reset_restricted_to_new_codes():
    torch.manual_seed(0)
    cb = comet.Codebook(6, 3, decay=0.99)
    cb.embed.copy_(torch.arange(18.0).view(6, 3))
    cb.idle.copy_(torch.tensor([0.0, 50, 50, 50, 50, 50]))  # only code 0 is active
    before = cb.embed.clone()
    n = cb.reset_dead(after=10, start=4)
    assert n == 2
    assert torch.equal(cb.embed[:4], before[:4])  # old codes untouched although dead
    assert torch.allclose(cb.embed[4:], before[0].expand(2, 3), atol=1 / 128)  # copies of the active code + noise
    n = cb.reset_dead(after=10, start=0)
    assert n == 3 and torch.allclose(cb.embed[1:4], before[0].expand(3, 3), atol=1 / 128)


def test_cmcm_lower_for_matching_pairs():
    torch.manual_seed(0)
    codes = torch.randn(8, 4) * 3
    za = codes[torch.randint(0, 8, (16, 5))] + 0.05 * torch.randn(16, 5, 4)
    matched = comet.cmcm_loss(za, za + 0.05 * torch.randn_like(za), codes)
    shuffled = comet.cmcm_loss(za, za[torch.randperm(16)], codes)
    assert matched < shuffled


# ----------------------------------------------------------------------------- CMoE-Adapter, gate, EWC, CLUB
def test_adapter_equals_explicit_mixture_of_experts():
    torch.manual_seed(0)
    ad = comet.CMoEAdapter(["video", "text"], dim=4, n_experts=3, specific=True)
    z = torch.randn(2, 5, 4)
    out, g = ad(z, "video")
    assert torch.allclose(g.sum(-1), torch.ones(2))
    expert = [z @ (ad.common_w[j] + ad.spec_w["video"][j]).t() + ad.common_b[j] + ad.spec_b["video"][j] for j in range(3)]
    ref = z + sum(g[:, j, None, None] * expert[j] for j in range(3))
    assert torch.allclose(out, ref, atol=1e-6)
    out_t, _ = ad(z, "text")
    assert not torch.allclose(out, out_t)  # each modality activates its own specific layer
    assert (out - z).abs().max() < 0.2  # near-identity init


def test_gate_loss_zero_for_uniform_and_hand_value():
    assert comet.gate_balance_loss(torch.full((4, 6), 1 / 6)).item() == pytest.approx(0.0, abs=1e-12)
    # loads (2, 0), ideal 1 -> ((2-1)^2 + (0-1)^2) / 2 = 1
    assert comet.gate_balance_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]])).item() == pytest.approx(1.0)
    assert comet.gate_balance_loss(torch.tensor([[0.6, 0.4], [0.5, 0.5]])).item() > 0


def test_ewc_penalty_zero_at_star_and_grows_with_fisher():
    star = {"w": torch.tensor([1.0, 2.0])}
    fisher = {"w": torch.tensor([3.0, 0.0])}
    assert comet.ewc_penalty({"w": star["w"].clone()}, fisher, star, lam=2.0).item() == 0.0
    moved = {"w": torch.tensor([1.5, 5.0])}
    assert comet.ewc_penalty(moved, fisher, star, lam=2.0).item() == pytest.approx(2 / 2 * 3 * 0.25)  # F=0 entry free
    assert comet.ewc_penalty(moved, {"w": 2 * fisher["w"]}, star, lam=2.0).item() == pytest.approx(1.5)


def test_club_estimate_lower_for_independent_inputs():
    torch.manual_seed(0)
    x = torch.randn(256, 4, 8)
    cases = {"dep": 2 * x[..., :4] + 0.1 * torch.randn(256, 4, 4), "ind": torch.randn(256, 4, 4)}
    est = {}
    for name, y in cases.items():
        club = comet.CLUB(8, 4, 32)
        opt = torch.optim.Adam(club.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            (-club.loglik(x, y)).backward()
            opt.step()
        with torch.no_grad():
            est[name] = club.mi_est(x, y, torch.randperm(256)).item()
    assert est["dep"] > 5.0 and abs(est["ind"]) < 0.1 * est["dep"]


# ----------------------------------------------------------------------------- PMR
def test_pmr_pseudo_sequence_from_frozen_codebook_masks_new_codes():
    teacher = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    new = torch.tensor([[0.0, 10.0]])
    z_med = torch.tensor([[[1.0, 0.0], [9.0, 1.0], [0.0, 9.0]]])
    P, w = comet.pseudo_modality(z_med, teacher, new, 0.0)
    assert torch.equal(P[0], torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    assert w.tolist() == [[1.0, 1.0, 0.0]]
    _, w1 = comet.pseudo_modality(z_med, teacher, new, math.exp(-1))
    assert w1[0, 2].item() == pytest.approx(math.exp(-1))


def test_cpc_terms_with_masked_pseudo_stream_vanish():
    torch.manual_seed(0)
    cpc = comet.CrossCPC(["video", "text", "P"], 4)
    seqs = {"video": torch.randn(8, 6, 4), "text": torch.randn(8, 6, 4)}
    base = cpc(seqs, 2, 0.1)
    P = torch.randn(8, 6, 4)
    masked = cpc({**seqs, "P": P}, 2, 0.1, torch.zeros(8, 6))
    kept = cpc({**seqs, "P": P}, 2, 0.1, torch.ones(8, 6))
    assert torch.allclose(masked, base) and kept > base  # 5 more InfoNCE terms when P counts


def test_pmr_gradient_reaches_encoders_only_through_p_terms(tmp_path):
    args = tiny_args(tmp_path)
    dd = data.comet_benchmark(0, 32, 2, 8, 10)
    torch.manual_seed(0)
    model = comet.CometModel(args, {m: data.COMET_DIMS[m] for m in ("video", "audio", "text")}, use_moe=True)
    x = {m: torch.from_numpy(dd["at_train"][m][:16]) for m in ("audio", "text")}
    teacher = torch.full_like(model.codebook.embed, 100.0)  # far away: every mediator step falls on a new code
    model.codebook.expand(4)
    model.eval()
    grads = []
    for w in (0.0, 1.0):
        args.pmr_new_weight = w
        torch.manual_seed(1)
        L = comet.pair_losses(model, args, x, (teacher, 32), update=False)
        grads.append(torch.autograd.grad(L["cpc"], model.phi["audio"][0].weight)[0])
    # with new-code positions masked, only P-free terms remain; weight 1 adds the P terms
    assert not torch.allclose(grads[0], grads[1])


# ----------------------------------------------------------------------------- data
def test_builtin_benchmark_structure_and_determinism():
    a = data.comet_benchmark(3, 64, 4, 16, 10)
    b = data.comet_benchmark(3, 64, 4, 16, 10)
    c = data.comet_benchmark(4, 64, 4, 16, 10)
    assert np.array_equal(a["vt_train"]["video"], b["vt_train"]["video"])
    assert not np.array_equal(a["vt_train"]["video"], c["vt_train"]["video"])
    assert a["vt_train"]["label"].min() >= 0 and a["vt_train"]["label"].max() < 12
    assert a["at_train"]["label"].min() >= 4 and a["it_train"]["label"].min() >= 8
    assert np.bincount(a["va_train"]["label"]).tolist() == [4] * 8
    sl = a["va_test"]["step_label"]
    assert ((sl == -1) | (sl == a["va_test"]["label"][:, None])).all() and (sl >= 0).sum(1).min() >= 5
    # stage-specific text domain: the mean text feature of VT and AT captions differ more than two VT halves
    t_vt, t_at = a["vt_train"]["text"].mean((1)), a["at_train"]["text"].mean((1))
    assert np.linalg.norm(t_vt.mean(0) - t_at.mean(0)) > 3 * np.linalg.norm(t_vt[:32].mean(0) - t_vt[32:].mean(0))
    # changing the number of training pairs leaves the test sets unchanged
    d = data.comet_benchmark(3, 80, 4, 16, 10)
    assert np.array_equal(a["va_test"]["audio"], d["va_test"]["audio"])


def write_npz(folder, dd):
    os.makedirs(folder, exist_ok=True)
    for name, arrs in dd.items():
        np.savez(os.path.join(folder, name + ".npz"), **{k: v for k, v in arrs.items() if k != "label" or name.startswith("va")})


def test_npz_roundtrip_gives_identical_results(tmp_path):
    args = tiny_args(tmp_path, "builtin", seed=5)
    dd = data.comet_benchmark(5, args.n_pairs, args.n_per_class, args.n_test, args.seq_len)
    write_npz(tmp_path / "feats", dd)
    r1 = comet.main(args)
    r2 = comet.main(tiny_args(tmp_path, "npz", seed=5, data_dir=str(tmp_path / "feats")))
    assert r1["summary"]["va_acc"] == r2["summary"]["va_acc"]
    assert r1["matrices"] == r2["matrices"]


@pytest.mark.parametrize("problem", ["missing_file", "bad_shape", "nan", "bad_label", "dim_mismatch", "missing_label", "bad_dir"])
def test_bad_input_rejected_exit_2_no_results(tmp_path, problem, capsys):
    dd = data.comet_benchmark(0, 40, 2, 8, 10)
    folder = tmp_path / "feats"
    if problem == "missing_file":
        dd.pop("at_train")
    elif problem == "bad_shape":
        dd["vt_train"]["video"] = dd["vt_train"]["video"][:, :, 0]
    elif problem == "nan":
        dd["it_train"]["image"][0, 0, 0] = np.nan
    elif problem == "bad_label":
        dd["va_test"]["label"][0] = 99
    elif problem == "dim_mismatch":
        dd["at_train"]["text"] = dd["at_train"]["text"][..., :10]
    elif problem == "missing_label":
        dd["va_train"].pop("label")
    write_npz(folder, dd)
    out = tmp_path / "out"
    data_dir = str(tmp_path / "nowhere") if problem == "bad_dir" else str(folder)
    with pytest.raises(SystemExit) as e:
        comet.main(comet.Args(data_dir=data_dir, out_dir=str(out), **TINY))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("nowhere" in err if problem == "bad_dir" else str(folder) in err)
    assert not out.exists()


def test_bad_order_rejected(tmp_path):
    for order in (["VT", "VA"], ["VT", "VT"]):
        with pytest.raises(SystemExit) as e:
            comet.main(tiny_args(tmp_path, order=order))
        assert e.value.code == 2
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- end to end
FLAGS = [{}, {"no_pmr": True}, {"no_moe": True}, {"no_gate_loss": True}, {"no_ewc": True},
         {"no_specific_layers": True}, {"no_comet": True}]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: next(iter(f), "full"))
def test_every_ablation_runs_three_stages(tmp_path, flags):
    res = comet.main(tiny_args(tmp_path, **flags))
    assert res["stages"] == ["VT", "AT", "IT"] and len(res["evals"]) == 4
    s = res["summary"]
    assert 0 <= s["va_acc"] <= 100 and 0 <= s["va_f1"] <= 100 and s["vt_forgetting"] is not None
    assert set(s["retrieval"]) == {"VT", "AT", "IT", "VA", "IA"} and len(s["retrieval"]["VA"]) == 4
    n_codes = [ev["diag"]["n_codes"] for ev in res["evals"]]
    assert n_codes == ([32] * 4 if flags.get("no_comet") else [32, 32, 48, 64])
    gate_h = res["evals"][-1]["diag"]["gate_entropy"]
    assert (gate_h is None) == bool(flags.get("no_moe") or flags.get("no_comet"))
    on_disk = json.load(open(tmp_path / "run" / "results.json"))
    assert on_disk["summary"]["va_acc"] == s["va_acc"]
    assert (tmp_path / "run" / "metrics.csv").read_text().startswith("row,after_step,entry,metric,value")


def test_same_seed_identical_other_seed_differs(tmp_path):
    a = comet.main(tiny_args(tmp_path, "a", seed=2))
    b = comet.main(tiny_args(tmp_path, "b", seed=2))
    c = comet.main(tiny_args(tmp_path, "c", seed=3))
    assert a["matrices"] == b["matrices"] and a["evals"] == b["evals"]
    assert a["matrices"] != c["matrices"]


def test_order_and_joint(tmp_path):
    r = comet.main(tiny_args(tmp_path, "order", order=["AT", "VT", "IT"]))
    assert r["stages"] == ["AT", "VT", "IT"] and r["entries"][:3] == ["AT", "VT", "IT"]
    # VT was trained at stage 2: forgetting = ret VT after stage 2 - after stage 3
    vt = r["summary"]["retrieval"]["VT"]
    assert r["summary"]["vt_forgetting"] == pytest.approx(vt["after VT"]["avg"] - vt["after IT"]["avg"])
    j = comet.main(tiny_args(tmp_path, "joint", joint=True, no_comet=True))
    assert j["stages"] == ["VT+AT+IT"] and len(j["evals"]) == 2


def test_ewc_holds_adapter_weights(tmp_path):
    drift = {}
    for name, kw in (("ewc", {"ewc_lambda": 1e5}), ("noewc", {"no_ewc": True})):
        comet.main(tiny_args(tmp_path, name, save_model=True, **kw))
        s1 = torch.load(tmp_path / name / "comet_stage1.pt")["model"]
        s2 = torch.load(tmp_path / name / "comet_stage2.pt")["model"]
        drift[name] = (s2["adapter.common_w"] - s1["adapter.common_w"]).norm().item()
    assert drift["ewc"] < 0.5 * drift["noewc"]


def test_tyro_parse():
    a = tyro.cli(comet.Args, args=["--order", "AT", "VT", "IT", "--no-pmr", "--seed", "3", "--k1", "64"])
    assert a.order == ["AT", "VT", "IT"] and a.no_pmr and a.seed == 3 and a.k1 == 64 and not a.no_comet
    assert tyro.cli(comet.Args, args=[]).order == ["VT", "AT", "IT"]
    assert tyro.cli(comet.Args, args=["--ema-partner", "aligned"]).ema_partner == "aligned"
    for bad in (["--epochs", "x"], ["--ema-partner", "nearest"]):
        with pytest.raises(SystemExit) as e:
            tyro.cli(comet.Args, args=bad, console_outputs=False)
        assert e.value.code == 2


def test_subprocess_smoke(tmp_path):
    out = tmp_path / "smoke"
    cmd = [sys.executable, "comet.py", "--n-pairs", "64", "--n-per-class", "6", "--n-test", "16", "--epochs", "1",
           "--batch-size", "32", "--cls-steps", "5", "--fisher-batches", "1", "--out-dir", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert "after stage 3 (IT)" in p.stdout and "epoch 1/1" in p.stdout
    res = json.load(open(out / "results.json"))
    assert 0 <= res["summary"]["va_acc"] <= 100 and os.path.exists(out / "args.json")
    assert res["stages"] == ["VT", "AT", "IT"] and len(res["evals"]) == 4  # init + one row per stage
