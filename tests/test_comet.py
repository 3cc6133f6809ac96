"""Tests for comet.py: VQ / adapter / EWC / CLUB / PMR mechanisms (assign rules, tau_k, frozen teacher and
mediator), the built-in benchmark and npz loader, end-to-end runs with every ablation flag checked by its mechanism,
the results envelope, determinism, validation, divergence, metric hand cases and guards, plots / TensorBoard, CLI
parsing, resume, and one subprocess smoke run killed and resumed."""

import hashlib
import importlib.util
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
import common
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


def test_attention_partner_several_keys_hand_value():
    za = torch.tensor([[[1.0, 0.0]]])
    zb = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    e = math.exp(1 / math.sqrt(2))  # scores z^a.z^b_j / sqrt(D) = (1, 0, -1) / sqrt(2)
    S = e + 1 + 1 / e
    r = comet.partner(za, zb, False)
    assert torch.allclose(r, torch.tensor([[[(e - 1 / e) / S, 1 / S]]]), atol=1e-6)  # a query-blind mean: (0, 1/3)


def test_mm_ema_partner_mixes_both_modalities():
    za = torch.tensor([[[1.0, 0.0]]])
    zb = torch.tensor([[[0.0, 3.0]]])
    assert torch.equal(comet.partner(za, zb, True), zb)
    assert torch.allclose(comet.partner(za, zb, False), zb)  # one key: attention weight 1
    cb = comet.Codebook(1, 2, decay=0.0, eps=0.0)
    cb.ema_update([(za + zb) / 2], [torch.zeros(1, 1, dtype=torch.long)])
    assert torch.allclose(cb.embed[0], torch.tensor([0.5, 1.5]))  # (z^a + r^b) / 2


def test_straight_through_gradient():
    torch.manual_seed(0)
    z = torch.randn(3, 4, 5, requires_grad=True)
    codes = torch.randn(3, 4, 5)
    q = comet.st_quantize(z, codes)
    assert torch.allclose(q, codes, atol=1e-6)  # z + (codes - z) rounds near zero
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


def test_dead_code_reset_survives_the_next_ema_update():
    torch.manual_seed(0)
    cb = comet.Codebook(6, 3, decay=0.99)
    cb.embed.copy_(torch.arange(18.0).view(6, 3))
    cb.weight.copy_(cb.embed)
    cb.idle.copy_(torch.tensor([0.0, 50, 50, 50, 50, 50]))
    assert cb.reset_dead(after=10, start=4) == 2
    reset = cb.embed[4:].clone()
    for _ in range(3):  # batches that only use code 0: an unused code must keep its (reset) value
        cb.ema_update([torch.tensor([[[0.5, 1.0, 2.0]]])], [torch.zeros(1, 1, dtype=torch.long)])
    assert torch.allclose(cb.embed[4:], reset, atol=1e-6)  # weight = embed * count was reset with the code
    assert (cb.embed[4:] - torch.arange(12.0, 18.0).view(2, 3)).abs().min() > 5  # not back to the old value


def dead_codebook(idle=(0.0, 1, 50, 50, 0, 50, 50, 50)):
    """8 codes of dimension 3 with distinct embeddings, counts and weights; codes 0, 1 and 4 active (after=10)."""
    cb = comet.Codebook(len(idle), 3, decay=0.99)
    cb.embed.copy_(torch.arange(len(idle) * 3.0).view(-1, 3))
    cb.count.copy_(torch.arange(1.0, len(idle) + 1))
    cb.weight.copy_(cb.embed * 2)
    cb.idle.copy_(torch.tensor(idle))
    return cb


def buffers(cb):
    return {n: getattr(cb, n).clone() for n in ("embed", "weight", "idle", "count")}


def test_masked_reset_resets_exactly_the_dead_codes():
    cb = dead_codebook()
    before = buffers(cb)
    n = cb.reset_dead_masked(after=10, start=3, g=torch.Generator().manual_seed(0))
    dead = torch.tensor([False, False, False, True, False, True, True, True])  # idle > 10 and index >= 3
    assert isinstance(n, torch.Tensor) and n.dim() == 0 and int(n) == 4
    for name, v in buffers(cb).items():  # every other row bit-identical
        assert torch.equal(v[~dead], before[name][~dead]), name
    assert torch.equal(cb.count, before["count"]) and torch.equal(cb.idle[dead], torch.zeros(4))
    assert torch.equal(cb.weight[dead], cb.embed[dead] * cb.count[dead, None])
    active = before["embed"][[0, 1, 4]]
    shift = cb.embed[dead][:, None] - active[None]  # [dead, active, D]
    assert ((shift.abs() <= 1 / 128).all(-1)).any(-1).all()  # some active code + a shift within +-noise


def test_masked_reset_draws_sources_among_active_codes_only():
    cb = dead_codebook((50.0,) * 30 + (0.0, 0.0))  # 30 dead codes, two active (the last two)
    cb.reset_dead_masked(after=10, g=torch.Generator().manual_seed(1))
    src = torch.cdist(cb.embed[:30], torch.arange(90.0, 96.0).view(2, 3)).argmin(1)
    assert (cb.embed[:30] - torch.arange(90.0, 96.0).view(2, 3)[src]).abs().max() <= 1 / 128
    assert set(src.tolist()) == {0, 1}  # both active codes are drawn


@pytest.mark.parametrize("idle, start", [((50.0,) * 8, 0), ((0.0, 1, 2, 3, 0, 1, 2, 3), 0), ((0.0, 50, 50), 3)])
def test_masked_reset_without_active_or_dead_codes_changes_nothing(idle, start):
    cb = dead_codebook(idle)  # all dead but none active / none dead / dead codes all below start
    before = buffers(cb)
    n = cb.reset_dead_masked(after=10, start=start, g=torch.Generator().manual_seed(0))
    assert isinstance(n, torch.Tensor) and n.dim() == 0 and int(n) == 0
    assert all(torch.equal(v, before[name]) for name, v in buffers(cb).items())


def test_masked_reset_same_generator_seed_same_result():
    a, b, c = dead_codebook(), dead_codebook(), dead_codebook()
    for cb, seed in ((a, 3), (b, 3), (c, 4)):
        cb.reset_dead_masked(after=10, g=torch.Generator().manual_seed(seed))
    assert torch.equal(a.embed, b.embed) and torch.equal(a.weight, b.weight) and not torch.equal(a.embed, c.embed)


def test_cpu_reset_takes_todays_path(monkeypatch):
    monkeypatch.setattr(comet.Codebook, "reset_dead_masked", lambda *a, **k: pytest.fail("masked reset on CPU"))
    cb, ref = dead_codebook(), dead_codebook()
    n = cb.reset_dead(after=10, start=3, g=torch.Generator().manual_seed(0))
    assert type(n) is int and n == 4
    g = torch.Generator().manual_seed(0)  # today's draws: n sources among the active codes, then an n x D shift
    src = torch.tensor([0, 1, 4])[torch.randint(3, (4,), generator=g)]
    shift = (torch.rand(4, 3, generator=g) * 2 - 1) / 128
    assert torch.equal(cb.embed[[3, 5, 6, 7]], ref.embed[src] + shift)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_has_no_host_sync(tmp_path):
    args = tiny_args(tmp_path, reset_after=2)
    model = small_model(args).cuda()
    dd = data.comet_benchmark(0, 32, 2, 8, 10)
    x = {m: torch.from_numpy(dd["vt_train"][m]).cuda() for m in ("video", "text")}
    params = [p for n, p in model.named_parameters() if not n.startswith("club.")]
    opt, club = torch.optim.Adam(params), torch.optim.Adam(model.club.parameters())
    perm, g = torch.randperm(len(x["video"])).cuda(), torch.Generator("cuda").manual_seed(0)
    rng, teacher = torch.Generator().manual_seed(0), model.codebook.embed.clone()
    model.codebook.expand(16)  # a stage-2 step: PMR stream, reset restricted to the new codes
    pmr = comet.Replay(teacher, len(teacher), tau=1.0)
    for i in range(4):  # the step of train_stage; the first one warms up (allocations, handles)
        torch.cuda.set_sync_debug_mode("error" if i else "default")
        opt.zero_grad()
        L, _ = comet.pair_losses(model, args, {m: v[perm[:16]] for m, v in x.items()}, pmr, True, club, rng)
        sum(L.values()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        model.codebook.idle[-4:] = 50.0  # some dead codes to reset
        n = model.codebook.reset_dead(2, start=len(teacher), g=g)
    torch.cuda.set_sync_debug_mode("default")
    assert int(n) >= 4 and (model.codebook.idle[-4:] == 0).all()


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
    ad = comet.CMoEAdapter(["video", "text"], dim=4, num_experts=3, specific=True)
    z = torch.randn(2, 5, 4)
    out, g = ad(z, "video")
    assert torch.allclose(g.sum(-1), torch.ones(2))
    expert = [z @ (ad.common_w[j] + ad.spec_w["video"][j]).t() + ad.common_b[j] + ad.spec_b["video"][j]
              for j in range(3)]
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


def test_fisher_zero_for_untrained_specific_layers_and_normalised(tmp_path):
    args = tiny_args(tmp_path)
    model = small_model(args, mods=("video", "audio", "text", "image"))
    dd = data.comet_benchmark(0, 32, 2, 8, 10)
    batches = [{m: torch.from_numpy(dd["vt_train"][m][i : i + 16]) for m in ("video", "text")} for i in (0, 16)]
    torch.manual_seed(3)
    F = comet.compute_fisher(model, args, batches, None)
    for m in ("audio", "image"):  # a VT stage never activates these specific layers
        assert not F[f"spec_w.{m}"].any() and not F[f"spec_b.{m}"].any()
    assert F["spec_w.video"].any() and F["spec_w.text"].any() and F["common_w"].any()
    nz = torch.cat([f[f > 0] for f in F.values()])
    assert nz.mean().item() == pytest.approx(1.0, rel=1e-5)  # documented: mean 1 over the nonzero entries
    named, raw = comet.ewc_named(model), None  # by hand: mean squared gradient of commit + cmcm + cpc, rescaled
    torch.manual_seed(3)
    model.eval()
    for x in batches:
        L, _ = comet.pair_losses(model, args, x, None, update=False)
        g = torch.autograd.grad(L["commit"] + L["cmcm"] + L["cpc"], list(named.values()), allow_unused=True)
        sq = [torch.zeros_like(p) if gi is None else gi ** 2 / 2 for gi, p in zip(g, named.values())]
        raw = sq if raw is None else [r + q for r, q in zip(raw, sq)]
    scale = torch.cat([r[r > 0] for r in raw]).mean()
    assert all(torch.allclose(F[n], r / scale, rtol=1e-4, atol=1e-7) for n, r in zip(named, raw))


def test_adapter_switches_by_mechanism(tmp_path):
    z = torch.randn(2, 5, 32)
    ad = small_model(tiny_args(tmp_path, specific_layers=False)).adapter
    assert len(ad.spec_w) == 0 and len(ad.spec_b) == 0  # --no-specific-layers: experts are the common layer only
    assert torch.equal(ad(z, "video")[0], ad(z, "text")[0])
    model = small_model(tiny_args(tmp_path, moe=False))
    x = torch.randn(2, 5, data.COMET_DIMS["video"])
    model.eval()
    assert model.adapter is None and torch.equal(model.encode("video", x)[0], model.phi["video"](x))  # --no-moe
    L, _ = comet.pair_losses(small_model(tiny_args(tmp_path, gate_loss=False)), tiny_args(tmp_path, gate_loss=False),
                             at_batch(), None, update=False)
    assert "gate" not in L  # --no-gate-loss


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
    P, w, old = comet.pseudo_modality(z_med, teacher, new, 0.0)
    assert torch.equal(P[0], torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    assert w.tolist() == [[1.0, 1.0, 0.0]] and old.tolist() == [[True, True, False]]
    _, w1, _ = comet.pseudo_modality(z_med, teacher, new, math.exp(-1))
    assert w1[0, 2].item() == pytest.approx(math.exp(-1))


HAND_TEACHER = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
HAND_NEW = torch.tensor([[0.0, 10.0]])
HAND_MED = torch.tensor([[[1.0, 0.0], [9.0, 1.0], [0.0, 9.0], [3.0, 3.0]]])  # (3, 3): 18 from (0, 0), 58 from others


@pytest.mark.parametrize("assign, kept, P", [
    ("union", [1, 1, 0, 1], [[0, 0], [10, 0], [0, 10], [0, 0]]),
    ("threshold", [1, 1, 0, 0], [[0, 0], [10, 0], [0, 10], [0, 10]]),  # tau 4: (3, 3) finds no match in V1
    ("teacher", [1, 1, 1, 1], [[0, 0], [10, 0], [0, 0], [0, 0]])])
def test_pmr_assign_rules_hand_case(assign, kept, P):
    got_P, w, old = comet.pseudo_modality(HAND_MED, HAND_TEACHER, HAND_NEW, 0.25, assign, tau=4.0)
    assert old[0].tolist() == [bool(k) for k in kept] and torch.equal(got_P[0], torch.tensor(P, dtype=torch.float))
    assert w[0].tolist() == [1.0 if k else 0.25 for k in kept]
    P0, w0, old0 = comet.pseudo_modality(HAND_MED, HAND_TEACHER, HAND_NEW[:0], 0.25, assign, tau=4.0)  # --no-expand
    assert torch.equal(P0[0], torch.tensor([[0.0, 0], [10, 0], [0, 0], [0, 0]]))  # always the nearest teacher code
    assert w0[0].tolist() == ([1.0, 1.0, 0.0, 0.0] if assign == "threshold" else [1.0] * 4)


def test_tau_is_the_quantile_of_the_previous_stage_own_distances(tmp_path, monkeypatch):
    model = small_model(tiny_args(tmp_path, k1=2))
    model.codebook.embed.zero_()
    model.codebook.embed[1, 0] = 10.0
    a = torch.linspace(0.0, 4.9, 100).view(10, 10)  # step (i, t) at (a, 0, ...): squared distance a^2 to code 0
    feats = torch.zeros(10, 10, 32)
    feats[..., 0] = a
    modes = []

    def fake_encode(m, x):
        modes.append((m, model.training))
        return feats[x[:, 0, 0].long()], None

    monkeypatch.setattr(model, "encode", fake_encode)
    text = np.zeros((10, 10, 3), dtype=np.float32)
    text[:, 0, 0] = np.arange(10)
    tau = comet.calibrate_tau(model, text, 0.9, bs=3)
    assert tau == pytest.approx(torch.quantile(a.flatten() ** 2, 0.9).item(), rel=1e-5)
    assert modes == [("text", False)] * 4 and model.training  # eval mode, every batch, train mode restored


def replayed_P(model, args, x, pmr):
    """The P stream and aux of one update-free, eval-mode pair_losses call (captured at the CPC input)."""
    seen = []
    hook = model.cpc.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]["P"].clone()))
    model.eval()
    _, aux = comet.pair_losses(model, args, x, pmr, update=False)
    model.train()
    hook.remove()
    return seen[0], aux


def at_batch(n=16):
    dd = data.comet_benchmark(0, 32, 2, 8, 10)
    return {m: torch.from_numpy(dd["at_train"][m][:n]) for m in ("audio", "text")}


def test_p_from_frozen_teacher_codes_after_live_codes_moved(tmp_path):
    args = tiny_args(tmp_path, pmr_assign="teacher")
    model, x = small_model(args), at_batch()
    pmr, _ = comet.begin_stage(model, args, 1)
    club = torch.optim.Adam(model.club.parameters(), lr=args.club_lr)
    for _ in range(5):  # MM-EMA moves the live copies of the old codes
        comet.pair_losses(model, args, x, pmr, update=True, club_opt=club)
    live_old = model.codebook.embed[:32]
    assert not torch.allclose(live_old, pmr.teacher)
    P, aux = replayed_P(model, args, x, pmr)
    with torch.no_grad():
        model.eval()
        z = model.encode("text", x["text"])[0]
        model.train()
    assert torch.equal(P, pmr.teacher[comet.sq_dist(z, pmr.teacher).argmin(-1)])
    assert not torch.equal(P, live_old[comet.sq_dist(z, live_old).argmin(-1)])
    assert aux["pmr_old_share"].item() == 1.0 and 0 < aux["pmr_cpc_share"].item() < 1


def test_frozen_mediator_keeps_p_while_live_mediator_moves(tmp_path):
    args = tiny_args(tmp_path, pmr_assign="teacher", pmr_mediator="frozen")
    model, x = small_model(args), at_batch()
    model.codebook.embed.copy_(torch.randn(32, 32))  # spread codes: P depends on the mediator feature
    frozen_pmr, _ = comet.begin_stage(model, args, 1)
    live_pmr = frozen_pmr._replace(frozen=None)
    fz = frozen_pmr.frozen
    frozen_params = list(fz.phi.parameters()) + list(fz.adapter.parameters())
    assert not any(p.requires_grad for p in frozen_params) and not fz.phi.training
    assert not {id(p) for p in frozen_params} & {id(p) for p in model.parameters()}  # neither Adam nor EWC sees it
    before = [p.clone() for p in frozen_params]
    P_frozen, P_live = replayed_P(model, args, x, frozen_pmr)[0], replayed_P(model, args, x, live_pmr)[0]
    assert torch.equal(P_frozen, P_live)  # same network right after the copy
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("club.")], lr=0.5)
    L, _ = comet.pair_losses(model, args, x, frozen_pmr, update=True,
                             club_opt=torch.optim.Adam(model.club.parameters()))
    sum(L.values()).backward()
    opt.step()  # one large step moves the live mediator
    assert all(torch.equal(p, b) for p, b in zip(frozen_params, before))
    assert torch.equal(replayed_P(model, args, x, frozen_pmr)[0], P_frozen)
    assert not torch.equal(replayed_P(model, args, x, live_pmr)[0], P_live)


def test_cpc_terms_with_masked_pseudo_stream_vanish():
    torch.manual_seed(0)
    cpc = comet.CrossCPC(["video", "text", "P"], 4)
    seqs = {"video": torch.randn(8, 6, 4), "text": torch.randn(8, 6, 4)}
    base, base_p = cpc(seqs, 2, 0.1)
    P = torch.randn(8, 6, 4)
    masked, masked_p = cpc({**seqs, "P": P}, 2, 0.1, torch.zeros(8, 6))
    kept, kept_p = cpc({**seqs, "P": P}, 2, 0.1, torch.ones(8, 6))
    assert base_p == 0.0 and masked_p.item() == 0.0 and torch.allclose(masked, base)
    assert torch.allclose(kept - base, kept_p) and kept_p > 0  # the P part is exactly what the P stream adds


def test_cpc_p_share_hand_value_with_blind_predictors():
    cpc = comet.CrossCPC(["video", "text", "P"], 4)
    for lin in cpc.pred.values():  # zero predictions: every InfoNCE term is log B
        torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    seqs = {m: torch.randn(8, 6, 4) for m in ("video", "text", "P")}
    w = torch.zeros(8, 6)
    w[:, 3] = 0.5  # only the predicted step t + 1 = 3 is read
    loss, loss_p = cpc(seqs, 2, 0.1, w)
    # 6 cross terms at 1 and 3 self terms at 0.1; those with P: 4 cross + 1 self, each times 0.5
    assert loss_p.item() == pytest.approx(0.5 * 4.1 * math.log(8), rel=1e-5)
    assert loss.item() == pytest.approx((2.2 + 0.5 * 4.1) * math.log(8), rel=1e-5)


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
        L, _ = comet.pair_losses(model, args, x, comet.Replay(teacher, 32, tau=1.0), update=False)
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


OLD_SETS = ("vt_train", "vt_test", "at_train", "at_test", "it_train", "it_test", "va_train", "va_test", "ia_test")


def sets_hash(dd):
    """sha256 over every array of the data sets that existed before avvp_test and speech were added."""
    h = hashlib.sha256()
    for key in sorted(f"{n}/{k}" for n in OLD_SETS for k in dd[n]):
        n, k = key.split("/")
        h.update((key + hashlib.sha256(dd[n][k].tobytes()).hexdigest()[:16]).encode())
    return h.hexdigest()[:16]


def test_existing_sets_unchanged_by_avvp_and_speech():
    # hash of data.comet_benchmark(2, 40, 3, 8, 10) computed at commit ef7acb6, before avvp_test and speech
    assert sets_hash(data.comet_benchmark(2, 40, 3, 8, 10)) == "08d58813b9c09f98"
    dd = data.comet_benchmark(2, 40, 3, 8, 10, speech=True)
    assert sets_hash(dd) == "08d58813b9c09f98" and {"st_train", "st_test", "avvp_test"} <= set(dd)
    a = dd["avvp_test"]
    assert np.bincount(a["label"]).tolist() == [3] * 8 and a["video"].shape == (24, 10, 64)
    for m in ("video", "audio"):  # one event of 2..5 steps with the clip's label, background elsewhere
        sl = a[f"step_label_{m}"]
        assert ((sl == -1) | (sl == a["label"][:, None])).all() and set((sl >= 0).sum(1)) <= {2, 3, 4, 5}
    assert (a["step_label_video"] != a["step_label_audio"]).any()  # modality-specific windows, as in AVVP
    assert np.abs(np.argmax(a["step_label_video"] >= 0, 1) - np.argmax(a["step_label_audio"] >= 0, 1)).max() <= 1


def test_speech_time_aligned_with_text():
    world = data.comet_world(0)
    d_in = data.COMET_D_LAT + data.COMET_D_STY
    for m in ("speech", "text"):  # near-linear renderers: the first 16 output dims show the hidden semantics
        w2 = np.zeros((64, data.COMET_DIMS[m]))
        w2[:d_in, :d_in] = 20 * np.eye(d_in)
        world["render"][m] = (0.05 * np.eye(d_in, 64), w2)
    y = np.arange(2, 14)
    out = data.comet_sample(world, np.random.default_rng(0), ["speech", "text"], y, 10, 0.0, 0.0, "ST")
    filler = {}  # steps whose semantics is a filler token (class token elsewhere: about 5 away from every filler)
    for m in ("speech", "text"):
        d = np.linalg.norm(out[m][..., None, :data.COMET_D_LAT] - world["filler"], axis=-1).min(-1)
        filler[m] = d < 2.0
    assert np.array_equal(filler["speech"], filler["text"])  # speech step t says text token t
    assert 0.15 < filler["text"].mean() < 0.45  # 30 % filler steps


def write_npz(folder, dd):
    os.makedirs(folder, exist_ok=True)
    for name, arrs in dd.items():
        np.savez(os.path.join(folder, name + ".npz"),
                 **{k: v for k, v in arrs.items() if k != "label" or name.startswith("va")})


def test_npz_roundtrip_gives_identical_results(tmp_path):
    args = tiny_args(tmp_path, "builtin", seed=5)
    dd = data.comet_benchmark(5, args.n_pairs, args.n_per_class, args.n_test, args.seq_len)
    write_npz(tmp_path / "feats", dd)
    r1 = comet.main(args)
    r2 = comet.main(tiny_args(tmp_path, "npz", seed=5, data_dir=str(tmp_path / "feats"), min_steps_per_stage=0))
    assert r1["summary"]["va_acc"] == r2["summary"]["va_acc"]
    assert r1["matrices"] == r2["matrices"]
    # the step floor applies to --data-dir runs: 3 steps per epoch, floor 5 -> 2 epochs
    r3 = comet.main(tiny_args(tmp_path, "floor", seed=5, data_dir=str(tmp_path / "feats"), min_steps_per_stage=5,
                              order=["VT"]))
    assert r3["extra"]["train_steps"] == [0, 6]


def test_npz_without_optional_vt_test_runs_and_reports_no_vt_forgetting(tmp_path):
    dd = data.comet_benchmark(5, 40, 3, 8, 10)
    dd.pop("vt_test")
    write_npz(tmp_path / "feats", dd)
    res = comet.main(tiny_args(tmp_path, "novt", seed=5, data_dir=str(tmp_path / "feats"), min_steps_per_stage=0))
    assert res["summary"]["vt_forgetting"] is None and res["summary"]["vt_ret"] is None
    written = json.loads(next((tmp_path / "novt").rglob("results.json")).read_text())
    assert written["summary"]["vt_forgetting"] is None and written["summary"]["va_acc"] == res["summary"]["va_acc"]


@pytest.mark.parametrize("T", [3, 4])
def test_short_sequences_build_every_set(T):
    dd = data.comet_benchmark(0, 40, 2, 8, T)
    a = dd["avvp_test"]
    for m in ("video", "audio"):  # one event of 2..T steps in every clip
        n_event = (a[f"step_label_{m}"] >= 0).sum(1)
        assert a[m].shape[1] == T and n_event.min() >= 2 and n_event.max() <= T


def test_npz_speech_pair_and_avvp_test_roundtrip(tmp_path):
    dd = data.comet_benchmark(1, 40, 3, 8, 10, speech=True)
    write_npz(tmp_path / "feats", dd)
    got = data.load_comet_npz(str(tmp_path / "feats"), ["VT", "ST", "AT"])
    assert {"st_train", "st_test", "avvp_test"} <= set(got)
    for name, keys in (("st_train", ("speech", "text")), ("st_test", ("speech", "text")),
                       ("avvp_test", ("video", "audio", "step_label_video", "step_label_audio"))):
        assert all(np.array_equal(got[name][k], dd[name][k]) for k in keys)
    assert comet.modality_dims(got) == {"video": 64, "audio": 32, "text": 48, "image": 64, "speech": 40}


@pytest.mark.parametrize("problem", ["missing_file", "bad_shape", "nan", "bad_label", "dim_mismatch", "missing_label",
                                     "bad_dir", "avvp_no_step_label", "avvp_bad_label", "avvp_without_va_steps"])
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
    elif problem == "avvp_no_step_label":
        dd["avvp_test"].pop("step_label_audio")
    elif problem == "avvp_bad_label":
        dd["avvp_test"]["step_label_video"][0, 0] = 8
    elif problem == "avvp_without_va_steps":
        dd["va_train"].pop("step_label")
    write_npz(folder, dd)
    out = tmp_path / "out"
    data_dir = str(tmp_path / "nowhere") if problem == "bad_dir" else str(folder)
    with pytest.raises(SystemExit) as e:
        comet.main(comet.Args(data_dir=data_dir, out_dir=str(out), **TINY))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("nowhere" in err if problem == "bad_dir" else str(folder) in err)
    assert not out.exists()


def small_model(args, mods=("video", "audio", "text")):
    torch.manual_seed(0)
    return comet.CometModel(args, {m: data.COMET_DIMS[m] for m in mods}, use_moe=args.comet and args.moe)


def test_official_aligned_partner_changes_mm_ema(tmp_path):
    dd = data.comet_benchmark(0, 32, 2, 8, 10)
    x = {m: torch.from_numpy(dd["vt_train"][m][:16]) for m in ("video", "text")}
    codes = []
    for aligned in (False, True):
        args = tiny_args(tmp_path, official_aligned_partner=aligned)
        model, club = small_model(args), None
        club = torch.optim.Adam(model.club.parameters(), lr=args.club_lr)
        torch.manual_seed(1)
        comet.pair_losses(model, args, x, None, update=True, club_opt=club)
        codes.append(model.codebook.embed.clone())
    assert not torch.equal(codes[0], codes[1])


@pytest.mark.parametrize("flags, K, pmr, reset_from", [({}, 48, True, 32), ({"pmr": False}, 48, False, 32),
                                                        ({"expand": False}, 32, True, 0),
                                                        ({"comet": False}, 32, False, 0)])
def test_begin_stage_expand_and_replay_switches(tmp_path, flags, K, pmr, reset_from):
    args = tiny_args(tmp_path, **flags)
    model = small_model(args)
    before = model.codebook.embed.clone()
    assert comet.begin_stage(model, args, 0) == (None, 0)
    text = data.comet_benchmark(0, 32, 2, 8, 10)["vt_train"]["text"]
    got_pmr, got_reset = comet.begin_stage(model, args, 1, prev_text=text)
    assert model.codebook.embed.shape[0] == K and got_reset == reset_from and (got_pmr is not None) == pmr
    if pmr:
        assert torch.equal(got_pmr.teacher, before) and got_pmr.k_prev == 32  # frozen copy of the previous codebook
        assert got_pmr.tau > 0 and got_pmr.frozen is None  # defaults: threshold rule, live mediator


def test_begin_stage_tau_follows_pmr_quantile(tmp_path):
    text = data.comet_benchmark(0, 32, 2, 8, 10)["vt_train"]["text"]
    taus = []
    for q in (0.5, 0.99):
        args = tiny_args(tmp_path, pmr_quantile=q)
        model = small_model(args)
        want = comet.calibrate_tau(model, text, q)
        taus.append(comet.begin_stage(model, args, 1, prev_text=text)[0].tau)
        assert taus[-1] == want
    assert taus[0] < taus[1]


# ----------------------------------------------------------------------------- metrics on hand cases
def test_f1_hand_case():
    logits = torch.tensor([[5.0, -5.0], [5.0, 5.0]])  # predictions [[1, 0], [1, 1]]
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert comet.f1_score(logits, targets) == pytest.approx(80.0)  # TP 2, P 3, T 2: 2 (2/3) 1 / (2/3 + 1)
    assert comet.f1_score(-logits.abs(), targets) == 0.0  # nothing predicted
    assert comet.f1_score(logits, torch.zeros(2, 2)) == 0.0  # nothing to find


def test_retrieval_hand_case(monkeypatch):
    s5 = math.sqrt(5)
    emb = {"video": torch.eye(3), "text": torch.tensor([[1 / s5, 2 / s5, 0], [0, 1, 0], [0, 0, 1]])}

    def fake_quantize_all(model, m, x, where=""):
        return emb[m][:, None].expand(3, 4, 3), None, None  # constant over time: the time mean is emb

    monkeypatch.setattr(comet, "quantize_all", fake_quantize_all)
    out = comet.retrieval(None, {"vt_test": {"video": None, "text": None}})
    # video -> text: every video finds its caption first; text 0 -> video ranks video 1 (0.89) above video 0 (0.45)
    assert [out["VT"][f"r{k}_fwd"] for k in (1, 5, 10)] == [100.0, 100.0, 100.0]
    assert [out["VT"][f"r{k}_bwd"] for k in (1, 5, 10)] == pytest.approx([200 / 3, 100.0, 100.0])
    assert out["VT"]["avg"] == pytest.approx((500 + 200 / 3) / 6) and set(out) == {"VT"}
    emb["text"] = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1]])  # ties count in expectation
    out = comet.retrieval(None, {"vt_test": {"video": None, "text": None}})
    # video 0 scores (1, 1, 0): R@1 1/2; video 1 scores (0, 0, 0): 1/3; video 2 scores (0, 0, 1): 1
    assert out["VT"]["r1_fwd"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 1) / 3)


def test_explog_hand_value_and_alpha_only_rises(tmp_path):
    loss = comet.explog_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.full((2,), 0.1))
    assert loss.item() == pytest.approx(math.log(2) * math.exp(-0.1))  # -log(1/2) e^-0.1
    feats = torch.randn(6, 4, 8)
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (6, 4)), 3).float()
    args = tiny_args(tmp_path, avvp_loss="bce+explog", cls_steps=30)
    head = comet.train_head(feats, y, 3, True, args, 0)
    assert (head.alpha > 0.1).all()  # d/d alpha_c = y_c log p_c e^-alpha_c <= 0: descent only raises alpha
    plain = comet.train_head(feats, y, 3, True, tiny_args(tmp_path, cls_steps=30), 0)
    assert not hasattr(plain, "alpha") and not torch.equal(plain[1].weight, head[1].weight)
    cls = [comet.train_head(feats, y.argmax(-1)[:, 0], 3, False, a, 0)[1].weight
           for a in (args, tiny_args(tmp_path, cls_steps=30))]
    assert torch.equal(*cls)  # the classification head ignores --avvp-loss


def hand_va_sets(rng, n=40, T=10):
    """va_train / va_test whose video and audio features both show the step label (one-hot x 3 + noise)."""
    dd = {}
    for split in ("train", "test"):
        label = np.arange(n) % 8
        start, length = rng.integers(0, 5, n), rng.integers(3, 6, n)
        t = np.arange(T)[None]
        step = np.where((t >= start[:, None]) & (t < (start + length)[:, None]), label[:, None], -1)
        feats = {m: (3 * np.eye(9)[step + 1] + rng.standard_normal((n, T, 9))).astype(np.float32)
                 for m in ("video", "audio")}
        dd[f"va_{split}"] = {**feats, "label": label, "step_label": step}
    va = dd["va_test"]  # avvp_test = va_test with its step labels as both modalities' labels: xds then equals loc
    dd["avvp_test"] = {"video": va["video"], "audio": va["audio"], "step_label_video": va["step_label"].copy(),
                       "step_label_audio": va["step_label"].copy()}
    return dd


def test_xds_trains_on_va_train_and_tests_other_dataset_target_modality(tmp_path, monkeypatch):
    args, dd = tiny_args(tmp_path, cls_steps=60), hand_va_sets(np.random.default_rng(0))
    monkeypatch.setattr(comet, "quantize_all", lambda model, m, x, where="": (torch.from_numpy(x), None, None))
    model = small_model(args)  # only its codebook's device is read
    calls, real, derive = [], comet.train_head, common.derive_seed

    def spy(feats, targets, n_out, per_step, a, seed, where=""):
        calls.append((where.split(", ")[-1], per_step, seed))
        return real(feats, targets, n_out, per_step, a, seed, where)

    monkeypatch.setattr(comet, "train_head", spy)
    own = comet.downstream(model, args, dd)
    xds = [(c[1], c[2]) for c in calls if c[0] == "cross-dataset localiser"]
    assert xds == [(True, derive(args.seed, "head/xds/0")), (True, derive(args.seed, "head/xds/1"))]  # own seeds
    monkeypatch.setattr(common, "derive_seed", lambda s, p: derive(s, p.replace("xds", "loc")))  # loc's seeds
    base = comet.downstream(model, args, dd)
    assert base["xds"] == base["loc"] and min(base["loc"].values()) > 50 and base["cls"] == own["cls"]
    dd["avvp_test"]["step_label_audio"][:] = -1  # V->A is scored against the audio labels only
    moved = comet.downstream(model, args, dd)
    assert moved["xds"]["V->A"] != base["xds"]["V->A"] and moved["xds"]["A->V"] == base["xds"]["A->V"]
    dd["avvp_test"]["video"] = np.zeros_like(dd["avvp_test"]["video"])  # A->V reads avvp_test's video features
    moved = comet.downstream(model, args, dd)
    assert moved["xds"]["A->V"] != base["xds"]["A->V"] and moved["loc"] == base["loc"]
    assert comet.va_avg6(own) == pytest.approx(np.mean([own["cls"]["V->A"], own["cls"]["A->V"]]
                                                       + [*own["loc"].values()] + [*own["xds"].values()]))
    assert comet.va_avg6({**own, "xds": {}}) is None and comet.downstream(model, args, {
        k: v for k, v in dd.items() if k != "avvp_test"})["xds"] == {}


# ----------------------------------------------------------------------------- metric guards, divergence
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_metric_helpers_refuse_non_finite(tmp_path, bad):
    logits = torch.randn(6, 4)
    logits[2, 1] = bad
    with pytest.raises(ValueError, match="accuracy"):
        comet.accuracy(logits, torch.zeros(6, dtype=torch.long), "row 1")
    with pytest.raises(ValueError, match="localisation F1.*row 2"):
        comet.f1_score(logits, torch.zeros(6, 4), "row 2")
    x = np.random.default_rng(0).standard_normal((4, 10, data.COMET_DIMS["video"])).astype(np.float32)
    x[1, 3, 0] = bad
    with pytest.raises(ValueError, match="video embeddings"):
        comet.quantize_all(small_model(tiny_args(tmp_path)), "video", x, "row 0")
    with pytest.raises(SystemExit) as e:  # a head whose loss goes non-finite stops the run
        comet.train_head(torch.full((4, 3, 5), bad), torch.zeros(4, dtype=torch.long), 2, False, tiny_args(tmp_path),
                         0)
    assert e.value.code == 1


def test_diverging_run_exits_1_and_writes_no_results(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        comet.main(tiny_args(tmp_path, lr=1e30))
    assert e.value.code == 1
    assert "training diverged at stage 1 (VT) epoch 1" in capsys.readouterr().err
    assert (tmp_path / "run" / "args.json").exists() and not (tmp_path / "run" / "results.json").exists()


# ----------------------------------------------------------------------------- validation, names, CLI
BAD_ARGS = [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"),
            ({"club_lr": 0.0}, "club-lr"), ({"cls_lr": 0.0}, "cls-lr"), ({"max_grad_norm": 0.0}, "max-grad-norm"),
            ({"n_heads": 3}, "n-heads"),
            ({"n_layers": 0}, "n-layers"), ({"d_ff": 0}, "d-ff"), ({"d_spec": 0}, "d-spec"), ({"k2": -1}, "k2"),
            ({"reset_after": 0}, "reset-after"), ({"fisher_batches": 0}, "fisher-batches"),
            ({"cls_steps": 0}, "cls-steps"), ({"ema_decay": 1.5}, "ema-decay"), ({"ema_decay": 0.0}, "ema-decay"),
            ({"beta": -0.1}, "beta"), ({"ewc_lambda": -1.0}, "ewc-lambda"), ({"club_steps": -1}, "club-steps"),
            ({"pmr_new_weight": 2.0}, "pmr-new-weight"), ({"use_threshold": 0.0}, "use-threshold"),
            ({"shared": 1.5}, "shared"), ({"sty": -1.0}, "sty"), ({"num_experts": 0}, "num-experts"),
            ({"seq_len": 2}, "seq-len"), ({"num_threads": -1}, "num-threads"), ({"order": ["VT", "VA"]}, "order"),
            ({"order": ["VT", "VT"]}, "order"), ({"order": []}, "order"),
            ({"comet": False, "pmr": False}, "no-pmr"), ({"comet": False, "expand": False}, "no-expand"),
            ({"moe": False, "ewc": False}, "no-ewc"), ({"moe": False, "gate_loss": False}, "no-gate-loss"),
            ({"pmr_quantile": 0.0}, "pmr-quantile"), ({"pmr_quantile": 1.5}, "pmr-quantile"),
            ({"min_steps_per_stage": -1}, "min-steps-per-stage"), ({"pmr_assign": "nearest"}, "pmr-assign"),
            ({"pmr_mediator": "old"}, "pmr-mediator"), ({"pmr": False, "pmr_assign": "union"}, "pmr-assign"),
            ({"avvp_loss": "focal"}, "avvp-loss"), ({"order": ["VT", "SA"]}, "order"),
            ({"comet": False, "pmr_mediator": "frozen"}, "pmr-mediator"), ({"pmr": False, "pmr_quantile": 0.9},
                                                                           "pmr-quantile")]


@pytest.mark.parametrize("overrides, flag", BAD_ARGS, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_hyperparameters_exit_2_before_writing(tmp_path, capsys, overrides, flag):
    with pytest.raises(SystemExit) as e:
        comet.main(tiny_args(tmp_path, **overrides))
    assert e.value.code == 2
    assert f"error: --{flag}:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_track_without_wandb_exits_2_before_writing(tmp_path, capsys):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    with pytest.raises(SystemExit) as e:
        comet.main(tiny_args(tmp_path, track=True))
    assert e.value.code == 2 and "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_method_and_variant_tags():
    A = comet.Args
    assert (comet.method_tag(A()), common.tag(A(), comet.VARIANT_FIELDS, A())) == ("comet", "")
    assert comet.method_tag(A(pmr=False, expand=False)) == "comet+no-pmr+no-expand"
    assert comet.method_tag(A(comet=False, joint=True)) == "dcid+joint"
    assert comet.method_tag(A(official_aligned_partner=True)) == "comet+official-aligned-partner"
    assert common.tag(A(k1=64, pmr=False, seed=4, out_dir="x"), comet.VARIANT_FIELDS, A()) == "k1=64"
    fields = comet.INFRA_FIELDS + comet.METHOD_FIELDS + comet.VARIANT_FIELDS + ("data_dir",)
    assert sorted(fields) == sorted(A.__dataclass_fields__)  # every field in exactly one group


def test_tyro_parse_and_help(capsys):
    a = tyro.cli(comet.Args, args=["--order", "AT", "VT", "IT", "--no-pmr", "--seed", "3", "--k1", "64",
                                   "--max-grad-norm", "0.5", "--num-experts", "4", "--d-ff", "32"])
    assert a.order == ["AT", "VT", "IT"] and not a.pmr and a.seed == 3 and a.k1 == 64 and a.comet
    assert (a.max_grad_norm, a.num_experts, a.d_ff) == (0.5, 4, 32)
    assert tyro.cli(comet.Args, args=[]).order == ["VT", "AT", "IT"]
    b = tyro.cli(comet.Args, args=["--official-aligned-partner", "--no-expand", "--no-comet", "--no-moe"])
    assert b.official_aligned_partner and not b.expand and not b.comet and not b.moe
    c = tyro.cli(comet.Args, args=["--pmr-assign", "teacher", "--pmr-mediator", "frozen", "--pmr-quantile", "0.9",
                                   "--min-steps-per-stage", "0"])
    assert (c.pmr_assign, c.pmr_mediator, c.pmr_quantile, c.min_steps_per_stage) == ("teacher", "frozen", 0.9, 0)
    d = tyro.cli(comet.Args, args=[])
    assert (d.pmr_assign, d.pmr_mediator, d.pmr_quantile, d.min_steps_per_stage) == ("threshold", "live", 0.95, 300)
    e = tyro.cli(comet.Args, args=["--avvp-loss", "bce+explog", "--order", "VT", "ST", "AT"])
    assert (e.avvp_loss, e.order, d.avvp_loss) == ("bce+explog", ["VT", "ST", "AT"], "bce")
    for bad in (["--epochs", "x"], ["--no-no-pmr"], ["--clip", "1.0"], ["--pmr-assign", "nearest"],
                ["--avvp-loss", "explog"]):
        with pytest.raises(SystemExit) as e:
            tyro.cli(comet.Args, args=bad, console_outputs=False)
        assert e.value.code == 2
    with pytest.raises(SystemExit):
        tyro.cli(comet.Args, args=["--help"])
    out = capsys.readouterr().out
    assert "COMET (arXiv 2504.00561)" in out and "--no-specific-layers" in out and "--no-no-" not in out
    assert "--min-steps-per-stage" in out and "--data-dir only" in out and "tau_k" in out


def test_epoch_plan_floor_only_with_data_dir():
    dd = {"vt_train": {"text": np.zeros((100, 3, 2))}, "at_train": {"text": np.zeros((40, 3, 2))}}
    A, stages = comet.Args, [["VT"], ["AT"]]
    assert comet.epoch_plan(A(epochs=2, batch_size=32), dd, stages) == [2, 2]  # built-in: --epochs
    assert comet.epoch_plan(A(epochs=2, batch_size=32, data_dir="x"), dd, stages) == [100, 300]  # 3 and 1 steps
    assert comet.epoch_plan(A(epochs=2, batch_size=32, data_dir="x", min_steps_per_stage=0), dd, stages) == [2, 2]
    assert comet.epoch_plan(A(epochs=400, batch_size=32, data_dir="x"), dd, stages) == [400, 400]
    assert comet.epoch_plan(A(epochs=2, batch_size=32, data_dir="x"), dd, [["VT", "AT"]]) == [300]  # --joint


# ----------------------------------------------------------------------------- end to end
def strict_json(path):
    def refuse(c):
        raise ValueError(f"non-strict JSON constant {c} in {path}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


ENVELOPE = {"schema", "script", "method", "variant", "data", "backbone", "seed", "run_name", "args", "env", "tasks",
            "rows", "matrices", "extra", "summary", "timing_s"}
FLAGS = [({}, "comet"), ({"pmr": False}, "comet+no-pmr"), ({"expand": False}, "comet+no-expand"),
         ({"moe": False}, "comet+no-moe"), ({"gate_loss": False}, "comet+no-gate-loss"),
         ({"ewc": False}, "comet+no-ewc"),
         ({"specific_layers": False}, "comet+no-specific-layers"), ({"comet": False}, "dcid")]


@pytest.mark.parametrize("flags, method", FLAGS, ids=[m for _, m in FLAGS])
def test_every_ablation_runs_three_stages(tmp_path, flags, method, capsys):
    res = comet.main(tiny_args(tmp_path, **flags))
    assert set(res) == ENVELOPE and res["schema"] == 1 and res["script"] == "comet" and res["method"] == method
    assert res["tasks"] == ["VT", "AT", "IT"] and res["rows"] == ["init", "VT", "AT", "IT"]
    assert res["data"] == "builtin" and res["backbone"] is None and res["seed"] == 1
    assert res["variant"] == ("batch_size=32,cls_steps=15,epochs=1,fisher_batches=2,n_pairs=96,n_per_class=8,"
                              "n_test=24,reset_after=2")
    assert sorted(res["matrices"]) == sorted(f"ret_{k}" for k in comet.RET_KEYS)
    assert all(len(R) == 4 and all(len(r) == 3 and None not in r for r in R) for R in res["matrices"].values())
    s = res["summary"]
    assert all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in s.values())
    assert 0 <= s["va_acc"] <= 100 and 0 <= s["va_f1"] <= 100 and s["vt_forgetting"] is not None
    assert s["va_avg_s3"] == s["va_avg"] and set(res["timing_s"]) == {"train", "eval", "total", "train_cpu"}
    ex = res["extra"]
    last = {(k, d): v[-1] for k in ("cls_acc", "loc_f1", "xds_f1") for d, v in ex["downstream"][k].items()
            if k != "cls_acc" or d in ("V->A", "A->V")}
    assert len(last) == 6 and s["va_avg6"] == pytest.approx(np.mean(list(last.values())))  # the paper's "Avg."
    assert s["va_avg"] == pytest.approx(np.mean([ex["downstream"][k][d][-1] for k in ("cls_acc", "loc_f1")
                                                 for d in ("V->A", "A->V")]))  # four numbers, unchanged meaning
    assert s["va_xds"] == pytest.approx(np.mean([v[-1] for v in ex["downstream"]["xds_f1"].values()]))
    assert s["va_avg6_s3"] == s["va_avg6"] and s["st_ret"] is None
    assert ex["ret_candidates"] == {"VT": 24, "AT": 24, "IT": 24, "VA": 64, "IA": 24}  # VA: va_test, 8 x n_per_class
    assert set(ex["retrieval"]) == {"VT", "AT", "IT", "VA", "IA"} and len(ex["retrieval"]["VA"]["r1_fwd"]) == 4
    assert ex["retrieval"]["AT"]["avg"] == [row[1] for row in res["matrices"]["ret_avg"]]
    assert ex["train_steps"] == [0, 3, 3, 3] and len(ex["downstream"]["cls_acc"]["A->V"]) == 4
    grows = flags.get("comet", True) and flags.get("expand", True)
    assert ex["diagnostics"]["n_codes"] == ([32, 32, 48, 64] if grows else [32] * 4)
    assert (ex["diagnostics"]["gate_entropy"][-1] is None) == ("moe" in flags or "comet" in flags)
    replays = flags.get("comet", True) and flags.get("pmr", True)
    assert ex["pmr_old_share"][:2] == [None, None]  # per epoch, from stage 2 on, when the P stream exists
    assert all(0 <= v <= 1 for v in ex["pmr_old_share"][2] + ex["pmr_old_share"][3]) if replays else \
        ex["pmr_old_share"] == [None] * 4
    assert all(0 <= v < 1 for v in ex["pmr_cpc_share"][2] + ex["pmr_cpc_share"][3]) if replays else \
        ex["pmr_cpc_share"] == [None] * 4
    assert ex["pmr_tau"][:2] == [None, None] and all((t is not None and t > 0) == replays for t in ex["pmr_tau"][2:])
    epochs = [ln for ln in capsys.readouterr().out.splitlines() if "] epoch " in ln]
    adapter = flags.get("comet", True) and flags.get("moe", True)
    assert len(epochs) == 3 and all((" gate " in ln) == (adapter and "gate_loss" not in flags) for ln in epochs)
    assert [" ewc " in ln for ln in epochs] == [False] + [adapter and "ewc" not in flags] * 2  # from stage 2 on
    assert all((" pmr_cpc_share " in ln) == (replays and not ln.startswith("[VT]")) for ln in epochs)
    run = tmp_path / "run"
    assert strict_json(run / "results.json")["summary"] == s and not (run / "checkpoint.pt").exists()
    csv = (run / "metrics.csv").read_text().splitlines()
    assert csv[0] == "script,method,variant,seed,row,after,entry,metric,value"
    assert sum(",VA,ret_avg," in ln for ln in csv) == 4 and sum(",VT,ret_avg," in ln for ln in csv) == 4
    assert any(",A->V,cls_acc," in ln for ln in csv) and any(",all,n_codes," in ln for ln in csv)


def test_pmr_variants_end_to_end(tmp_path):
    res = comet.main(tiny_args(tmp_path, pmr_assign="teacher", pmr_mediator="frozen"))
    ex = res["extra"]
    assert ex["pmr_old_share"] == [None, None, [1.0], [1.0]] and ex["pmr_tau"] == [None] * 4
    assert all(0 < v[0] < 1 for v in ex["pmr_cpc_share"][2:])
    assert res["method"] == "comet" and {"pmr_assign=teacher", "pmr_mediator=frozen"} <= set(res["variant"].split(","))


INIT_SHARED = ("phi.", "psi.", "dec.", "club.", "cpc.", "codebook.")


def test_init_shared_across_flags(tmp_path):
    dims = {m: data.COMET_DIMS[m] for m in ("video", "audio", "text", "image")}
    models = {}
    for name, kw in (("full", {}), ("no-moe", {"moe": False}), ("dcid", {"comet": False}),
                     ("no-sl", {"specific_layers": False}), ("seed2", {"seed": 2})):
        args = tiny_args(tmp_path, **kw)
        models[name] = comet.CometModel(args, dims, args.comet and args.moe).state_dict()
    full = models["full"]
    for name in ("no-moe", "dcid", "no-sl"):
        assert all(torch.equal(full[k], v) for k, v in models[name].items() if k.startswith(INIT_SHARED))
    assert all(torch.equal(full[k], models["no-sl"][k]) for k in ("adapter.router.weight", "adapter.common_w"))
    assert not torch.equal(full["codebook.embed"], models["seed2"]["codebook.embed"])


def test_stage1_bit_identical_when_flag_acts_later(tmp_path):
    res, states = {}, {}
    for name, kw in (("full", {}), ("no-ewc", {"ewc": False}), ("no-pmr", {"pmr": False}),
                     ("ewc0", {"ewc_lambda": 0.0})):
        res[name] = comet.main(tiny_args(tmp_path, name, save_model=True, **kw))
        states[name] = torch.load(tmp_path / name / "model_after_VT.pt")["model"]
    for name in ("no-ewc", "no-pmr"):
        assert all(torch.equal(states["full"][k], v) for k, v in states[name].items())
        for metric, R in res[name]["matrices"].items():
            assert R[:2] == res["full"]["matrices"][metric][:2]
        ppl = [r["extra"]["diagnostics"]["perplexity"][2:] for r in (res[name], res["full"])]
        assert ppl[0] != ppl[1]  # the switch acts from stage 2 on
        assert res[name]["extra"]["downstream"]["va_avg"][:2] == res["full"]["extra"]["downstream"]["va_avg"][:2]
    # the Fisher pass draws from its own stream: --no-ewc equals lambda 0 through stage 2 (later, clipping's norm
    # reduction sees extra zero gradients and may round differently)
    a, b = res["no-ewc"], res["ewc0"]
    assert a["matrices"]["ret_avg"][:3] == b["matrices"]["ret_avg"][:3]
    assert a["extra"]["downstream"]["va_avg"][:3] == b["extra"]["downstream"]["va_avg"][:3]


def test_same_seed_identical_other_seed_differs(tmp_path):
    a = comet.main(tiny_args(tmp_path, "a", seed=2))
    b = comet.main(tiny_args(tmp_path, "b", seed=2))
    c = comet.main(tiny_args(tmp_path, "c", seed=3))
    assert a["matrices"] == b["matrices"] and a["extra"] == b["extra"] and a["summary"] == b["summary"]
    assert a["matrices"] != c["matrices"]


OLD_SUMMARY = ("va_acc", "va_f1", "va_avg", "vv_acc", "vt_forgetting", "seen_forgetting", "vt_ret", "va_ret", "ia_ret",
               "multi_share", "code_agree", "perplexity", "gate_entropy", "n_codes", "va_avg_s1", "va_avg_s2",
               "va_avg_s3")
OLD_EXTRA = ("retrieval", "diagnostics", "train_steps", "pmr_old_share", "pmr_cpc_share", "pmr_tau")


def old_keys_hash(res):
    """sha256 of the summary, matrices and extra keys that the committed results/comet_builtin runs have."""
    ex = res["extra"]
    sub = {"summary": {k: res["summary"][k] for k in OLD_SUMMARY}, "matrices": res["matrices"],
           "extra": {k: ex[k] for k in OLD_EXTRA}}
    sub["extra"]["downstream"] = {k: ex["downstream"][k] for k in ("cls_acc", "loc_f1", "va_avg")}
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("flags, digest", [({}, "cfc5cbd2e431b6dc"), ({"comet": False}, "75f58e8232bb3b1f")])
def test_old_result_keys_bit_identical_to_before_avvp_and_speech(tmp_path, flags, digest):
    # digests of the same tiny runs at commit ef7acb6 (the code of results/comet_builtin), torch 2.13 CPU
    if not torch.__version__.startswith("2.13.") or torch.cuda.is_available():
        pytest.skip("bit-identity is pinned for the torch 2.13 CPU build only")
    res = comet.main(tiny_args(tmp_path, **flags))
    assert old_keys_hash(json.loads(json.dumps(res))) == digest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_same_seed_identical(tmp_path):
    a, b = (comet.main(tiny_args(tmp_path, name, cuda=True)) for name in ("a", "b"))
    assert a["env"]["device"] == "cuda" and a["matrices"] == b["matrices"] and a["summary"] == b["summary"]


def test_order_vt_st_at_with_speech(tmp_path):
    res = comet.main(tiny_args(tmp_path, order=["VT", "ST", "AT"]))
    ex, s = res["extra"], res["summary"]
    assert res["tasks"] == ["VT", "ST", "AT"] and ex["diagnostics"]["n_codes"] == [32, 32, 48, 64]
    st = [row[1] for row in res["matrices"]["ret_avg"]]
    assert st == ex["retrieval"]["ST"]["avg"] and s["st_ret"] == st[-1] and ex["ret_candidates"]["ST"] == 24
    assert all(v is not None for v in ex["pmr_tau"][2:])  # replay from stage 2 (ST) on
    model = small_model(tiny_args(tmp_path), mods=("video", "audio", "text", "image", "speech"))
    ref = small_model(tiny_args(tmp_path), mods=("video", "audio", "text", "image"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.state_dict().items() if k.startswith(INIT_SHARED))


def test_order_and_joint(tmp_path):
    r = comet.main(tiny_args(tmp_path, "order", order=["AT", "VT", "IT"]))
    assert r["tasks"] == ["AT", "VT", "IT"] and "order=AT VT IT" in r["variant"]
    # VT was trained at stage 2: forgetting = ret VT after stage 2 - after stage 3
    vt = [row[1] for row in r["matrices"]["ret_avg"]]
    assert r["summary"]["vt_forgetting"] == pytest.approx(vt[2] - vt[3])
    j = comet.main(tiny_args(tmp_path, "joint", joint=True, comet=False))
    assert j["tasks"] == ["VT+AT+IT"] and j["method"] == "dcid+joint" and len(j["matrices"]["ret_avg"]) == 2
    ret = j["extra"]["retrieval"]
    assert j["matrices"]["ret_avg"][1][0] == pytest.approx(np.mean([ret[p]["avg"][1] for p in ("VT", "AT", "IT")]))
    assert j["summary"]["seen_forgetting"] is None and j["summary"]["va_avg_s1"] == j["summary"]["va_avg"]


def test_ewc_holds_adapter_weights_and_save_model_keeps_files(tmp_path):
    drift = {}
    for name, kw in (("ewc", {"ewc_lambda": 1e5}), ("noewc", {"ewc": False})):
        comet.main(tiny_args(tmp_path, name, save_model=True, **kw))
        s1 = torch.load(tmp_path / name / "model_after_VT.pt")["model"]
        s2 = torch.load(tmp_path / name / "model_after_AT.pt")["model"]
        drift[name] = (s2["adapter.common_w"] - s1["adapter.common_w"]).norm().item()
        assert (tmp_path / name / "checkpoint.pt").exists() and (tmp_path / name / "model_after_IT.pt").exists()
    assert drift["ewc"] < 0.5 * drift["noewc"]


def test_plot_and_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    comet.main(tiny_args(tmp_path, plot=True, tensorboard=True, order=["VT", "AT"]))
    run = tmp_path / "run"
    assert (run / "acc_matrix.png").stat().st_size > 0 and (run / "acc_curves.png").stat().st_size > 0
    ev = EventAccumulator(str(run / "tb")).Reload()
    tags = ev.Tags()["scalars"]
    assert {"losses/commit", "losses/ewc", "train/club_nll", "train/pmr_old_share", "charts/va_avg",
            "charts/ret_VA"} <= set(tags)
    assert [e.step for e in ev.Scalars("charts/va_avg")] == [0, 1, 2]  # one point per row
    assert len(ev.Scalars("losses/cpc")) == 2  # one per epoch


# ----------------------------------------------------------------------------- resume
def test_resume_refuses_changed_args_and_missing_checkpoint(tmp_path, capsys):
    args = tiny_args(tmp_path)
    run_dir, _ = common.open_run(args, "x", "comet")  # a run dir with args.json and no checkpoint
    with pytest.raises(SystemExit) as e:
        comet.main(tiny_args(tmp_path, epochs=2, resume=run_dir))
    assert e.value.code == 2 and "epochs (2 != 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        comet.main(tiny_args(tmp_path, num_threads=2, resume=run_dir))  # free field: passes the args check
    assert e.value.code == 2 and "checkpoint.pt not found" in capsys.readouterr().err


SMOKE = dict(n_pairs=192, n_per_class=6, n_test=16, epochs=2, batch_size=32, cls_steps=10, fisher_batches=1, seed=3)


def test_subprocess_smoke_killed_after_first_stage_resumes_bit_identical(tmp_path, capsys):
    ref = comet.main(comet.Args(out_dir=str(tmp_path / "ref"), **SMOKE))  # uninterrupted, in-process
    run = tmp_path / "run"
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in SMOKE.items()]
    p = subprocess.Popen([sys.executable, "comet.py", *cli, "--out-dir", str(run)], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("checkpoint 1/"):
            p.kill()  # SIGKILL
            break
    p.wait(timeout=60)
    assert "[VT] epoch 2/2" in "".join(lines) and "checkpoint 1/3" in lines[-1]
    assert (run / "checkpoint.pt").exists() and not (run / "results.json").exists()
    argv = ["--resume", str(run)]  # what `python comet.py --resume RUN` does, in-process
    capsys.readouterr()
    comet.main(tyro.cli(comet.Args, args=argv, default=common.resume_defaults(comet.Args, argv)))
    out = capsys.readouterr().out
    assert "[VT] epoch" not in out and "after stage 3 (IT)" in out and "checkpoint 3/3" in out
    got = strict_json(run / "results.json")
    ref = strict_json(tmp_path / "ref" / "results.json")
    for r in (got, ref):
        for k in ("timing_s", "run_name", "args", "env"):
            r.pop(k)
    assert got == ref
    assert not (run / "checkpoint.pt").exists()
