"""Tests for dns.py's baselines (GEM, DER, DER++, EWC, Co2L, C-FLAT, CILA): each mechanism against a hand value,
weight zero equals vanilla bit for bit, inactive modalities untouched, protection on a constructed conflict."""

import itertools

import pytest
import torch

import common
import dns

torch.set_num_threads(1)
TINY = dict(bench_scale=0.005, epochs=1, steps=["esc50:text-audio", "clotho:text-audio", "vggsound_s:text-audio"],
            num_threads=1)


def run(tmp_path, name, **kw):
    return dns.main(dns.Args(out_dir=str(tmp_path / name), **{**TINY, **kw}))


# ----------------------------------------------------------------------------- wiring: weight zero is vanilla
@pytest.fixture(scope="module")
def vanilla(tmp_path_factory):
    return run(tmp_path_factory.mktemp("v"), "vanilla", method="vanilla")


@pytest.mark.parametrize("kw", [dict(method="ewc", ewc_lambda=0.0), dict(method="der", der_alpha=0.0),
                                dict(method="derpp", der_alpha=0.0, der_beta=0.0), dict(method="gem", buffer_size=0),
                                dict(method="co2l", buffer_size=0, co2l_distill=0.0),
                                dict(method="cflat", cflat_rho=0.0)])
def test_weight_zero_equals_vanilla_bit_for_bit(kw, vanilla, tmp_path):
    r = run(tmp_path, "m", **kw)
    assert r["matrices"] == vanilla["matrices"]


@pytest.mark.parametrize("kw", [dict(method="ewc", ewc_lambda=1e3), dict(method="der", der_alpha=10.0),
                                dict(method="derpp"), dict(method="gem", gem_margin=0.0), dict(method="co2l"),
                                dict(method="cflat")])
def test_each_method_changes_the_result(kw, vanilla, tmp_path):
    assert run(tmp_path, "m", **kw)["matrices"] != vanilla["matrices"]


def test_cila_with_kappa_zero_equals_co2l_and_same_seed_repeats(tmp_path):
    co2l = run(tmp_path, "co2l", method="co2l")
    cila = run(tmp_path, "cila", method="cila", cila_kappa=0.0)
    again = run(tmp_path, "cila2", method="cila", cila_kappa=0.0)
    assert cila["matrices"] == co2l["matrices"] == again["matrices"]
    assert cila["extra"]["method_log"]["distill_weight"] == [1.0, 1.0, 1.0]
    big = run(tmp_path, "cila3", method="cila", cila_kappa=1e6)
    w = big["extra"]["method_log"]["distill_weight"]
    assert w[:2] == [1.0, 1.0] and w[2] > 1.0  # lambda_t = max(1, kappa * sum IRD / sum asym) from the third step


def test_memory_and_diagnostics_are_reported(tmp_path):
    r = run(tmp_path, "gem", method="gem", buffer_size=90)
    log = r["extra"]["method_log"]
    assert log["buffer_per_step"] == [[90], [45, 45], [30, 30, 30]]  # balanced: size // (#steps so far)
    assert log["gem_batches"][1] > 0 and r["summary"]["stored_bytes"] == 90 * 4 * (1024 + 1024)


# ----------------------------------------------------------------------------- inactive modalities
def small_model(seed=0, d=8):
    model = dns.build_model({"a": d, "b": d, "c": d}, d, seed)
    with torch.no_grad():
        for m in model.values():
            m.weight.add_(0.1 * torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return model


def two_step_state(method, d=8, n=96, seed=0, conflict=False, **kw):
    """Step 0 trains (a, b) on X0 with the method (its state filled); returns what step 1 (a, c) needs.
    conflict: step 1 pairs the old a inputs with the negated b features (the old loss must rise)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, d, generator=g)
    x0 = {m: 3 * torch.randn(n, 4, generator=g) @ basis + 0.1 * torch.randn(n, d, generator=g) for m in "ab"}
    x1 = {"a": 0.5 * x0["a"] + 3 * torch.randn(n, d, generator=g), "c": 3 * torch.randn(n, d, generator=g)}
    if conflict:
        x1 = {"a": x0["a"], "c": -x0["b"]}
    args = dns.Args(method=method, epochs=4, batch_size=32, lr=3e-2, weight_decay=0.0, buffer_size=48,
                    replay_batch_size=32, **kw)
    model = small_model(seed, d)
    st = dns.new_cl_state(args.buffer_size if method in dns.REPLAY else 0, d, "cpu")
    gens = {"batches": torch.Generator().manual_seed(1), "replay": torch.Generator().manual_seed(2)}
    for t, (a, b, x) in enumerate((("a", "b", x0), ("a", "c", x1))):
        dns.start_step(st, model, t, a, b, x, args)
        if t == 1:
            return model, st, args, gens, x0, x1
        mean = dns.train_step(model, t, a, b, x[a], x[b], {}, st, args, gens, common.Stopwatch(), "step 1")
        dns.end_step(st, model, t, a, b, x[a], x[b], args, mean, gens["replay"])


@pytest.mark.parametrize("method", ["gem", "der", "derpp", "ewc", "co2l", "cflat", "cila"])
def test_inactive_modality_is_bit_identical_with_grad_none(method):
    model, st, args, gens, x0, x1 = two_step_state(method)
    before = {k: v.clone() for k, v in model["b"].state_dict().items()}
    dns.train_step(model, 1, "a", "c", x1["a"], x1["c"], {}, st, args, gens, common.Stopwatch(), "step 2")
    assert all(torch.equal(before[k], v) for k, v in model["b"].state_dict().items())
    assert model["b"].weight.grad is None and model["b"].bias.grad is None


# ----------------------------------------------------------------------------- protection on a constructed conflict
def old_score_shift(method, seed, **kw):
    """Largest change of the old pair's scores (relative) during step 1."""
    model, st, args, gens, x0, x1 = two_step_state(method, seed=seed, **kw)
    with torch.no_grad():
        before = model["a"](x0["a"]) @ model["b"](x0["b"]).T
    dns.train_step(model, 1, "a", "c", x1["a"], x1["c"], {}, st, args, gens, common.Stopwatch(), "step 2")
    with torch.no_grad():
        after = model["a"](x0["a"]) @ model["b"](x0["b"]).T
    return float((after - before).abs().max() / before.abs().max())


@pytest.mark.parametrize("method, kw", [("ewc", dict(ewc_lambda=1e2)), ("der", dict(der_alpha=10.0)),
                                        ("derpp", dict(der_alpha=10.0)), ("co2l", dict(co2l_distill=10.0)),
                                        ("cila", dict(co2l_distill=10.0))])
def test_protection_moves_old_scores_less_than_vanilla(method, kw):
    for seed in (0, 1):
        assert old_score_shift(method, seed, **kw) < 0.7 * old_score_shift("vanilla", seed)


def test_gem_step_does_not_raise_the_memory_loss_to_first_order():
    """GEM's protection: a plain SGD step along the projected gradient keeps the old memory loss (up to O(eta^2)),
    while the raw, conflicting gradient raises it."""
    model, st, args, gens, x0, x1 = two_step_state("gem")
    params = [model["a"].weight, model["c"].weight, model["a"].bias, model["c"].bias]
    mem = dns.gem_memory_grads(model, st, "a", "c", params, 1.0)
    assert mem.shape == (1, sum(p.numel() for p in params))  # one eligible memory; c's part of it is zero
    g = -mem[0] + 0.1 * torch.randn(mem.shape[1], generator=torch.Generator().manual_seed(0))  # a conflicting step
    mem_rows = {m: x0[m][st.memory[0]] for m in "ab"}

    def memory_loss_after(grad, eta=1e-3):
        with torch.no_grad():
            w = [p.clone() for p in params]
            for p, chunk in zip(params, grad.split([p.numel() for p in params])):
                p.sub_(eta * chunk.view_as(p))
            loss = float(dns.pair_loss(model, "a", "b", mem_rows, 1.0))
            for p, w0 in zip(params, w):
                p.copy_(w0)
        return loss

    base = memory_loss_after(torch.zeros_like(g), 0.0)
    for p, chunk in zip(params, g.split([p.numel() for p in params])):
        p.grad = chunk.view_as(p).clone()
    assert dns.gem_project(params, mem, margin=0.0)
    projected = torch.cat([p.grad.flatten() for p in params])
    raw_rise, gem_rise = memory_loss_after(g) - base, memory_loss_after(projected) - base
    assert raw_rise > 1e-4 and gem_rise < 0.05 * raw_rise


# ----------------------------------------------------------------------------- GEM
def brute_force_dual(P, q, lo):
    """Enumerate active sets of min 1/2 v'Pv + q'v s.t. v >= lo; return the best feasible KKT point."""
    K, best = len(q), None
    for free in itertools.product([0, 1], repeat=K):
        idx = [i for i in range(K) if free[i]]
        v = torch.full_like(q, lo)
        if idx:
            fixed = [i for i in range(K) if not free[i]]
            rhs = -q[idx] - (P[idx][:, fixed] @ v[fixed] if fixed else 0)
            v[idx] = torch.linalg.solve(P[idx][:, idx], rhs)
        if (v >= lo - 1e-12).all():
            f = 0.5 * v @ P @ v + q @ v
            best = (f, v) if best is None or f < best[0] else best
    return best[1]


@pytest.mark.parametrize("seed, lo", [(s, lo) for s in range(4) for lo in (0.0, 0.5)])
def test_gem_dual_matches_brute_force(seed, lo):
    g = torch.Generator().manual_seed(seed)
    K = 1 + seed
    A = torch.randn(K, 6, generator=g, dtype=torch.float64)
    P, q = A @ A.T + 1e-3 * torch.eye(K, dtype=torch.float64), torch.randn(K, generator=g, dtype=torch.float64)
    assert torch.allclose(dns.gem_dual(P, q, lo), brute_force_dual(P, q, lo), atol=1e-7)


def test_gem_projection_removes_conflicts_and_leaves_agreement_alone():
    g = torch.Generator().manual_seed(0)
    params = [torch.zeros(3, 4, requires_grad=True), torch.zeros(4, requires_grad=True)]
    grad = torch.randn(16, generator=g)
    G = torch.randn(3, 16, generator=g)
    G[0] = -grad + 0.1 * torch.randn(16, generator=g)  # a memory that conflicts
    params[0].grad, params[1].grad = grad[:12].view(3, 4).clone(), grad[12:].clone()
    assert dns.gem_project(params, G, margin=0.0, eps=0.0)
    new = torch.cat([p.grad.flatten() for p in params])
    assert (G @ new >= -1e-5 * G.norm(dim=1) * new.norm()).all()
    v = torch.linalg.lstsq(G.T, (new - grad).unsqueeze(1)).solution.flatten()  # new - g = G^T v, v >= 0
    assert (v >= -1e-4).all() and torch.allclose(G.T @ v, new - grad, atol=1e-4)
    params[0].grad, params[1].grad = grad[:12].view(3, 4).clone(), grad[12:].clone()
    assert not dns.gem_project(params, torch.stack([grad, 0.5 * grad]), margin=0.5)
    assert torch.equal(torch.cat([p.grad.flatten() for p in params]), grad)


# ----------------------------------------------------------------------------- DER / DER++
def test_reservoir_fills_in_order_then_keeps_each_item_with_probability_s_over_n():
    st = dns.new_cl_state(5, 2, "cpu")
    st.pairs.append(("a", "b"))
    z = torch.arange(10.0).view(5, 2)
    dns.reservoir_add(st, 0, torch.arange(5), z, z, torch.Generator().manual_seed(0))
    assert st.slot_row.tolist() == [0, 1, 2, 3, 4] and st.n_seen == 5 and torch.equal(st.slot_z[:, 0], z)
    kept = 0
    for seed in range(400):
        st = dns.new_cl_state(5, 2, "cpu")
        gen = torch.Generator().manual_seed(seed)
        for start in range(0, 50, 10):
            dns.reservoir_add(st, 0, torch.arange(start, start + 10), torch.zeros(10, 2), torch.zeros(10, 2), gen)
        kept += int(0 in st.slot_row.tolist())
        assert st.n_seen == 50
    assert abs(kept / 400 - 0.1) < 0.05


def test_der_term_is_zero_right_after_insertion_and_positive_after_the_model_moves():
    model = small_model()
    st = dns.new_cl_state(16, 8, "cpu")
    x = {m: torch.randn(16, 8, generator=torch.Generator().manual_seed(3)) for m in "abc"}
    dns.start_step(st, model, 0, "a", "c", x, dns.Args())  # slots from an (a, c) step: c inactive later
    with torch.no_grad():
        dns.reservoir_add(st, 0, torch.arange(16), model["a"](x["a"]), model["c"](x["c"]), torch.Generator())
    st.pairs.append(("a", "b"))
    args = dns.Args(method="der", replay_batch_size=16)
    out = dns.der_terms(model, st, "a", "b", args, torch.Generator().manual_seed(0))
    assert float(out["der"].detach()) <= 1e-10
    with torch.no_grad():
        model["a"].weight.add_(0.5)
        model["c"].weight.add_(9.0)  # c is not trained at (a, b): its side must not enter the MSE
    out = dns.der_terms(model, st, "a", "b", args, torch.Generator().manual_seed(0))
    with torch.no_grad():
        hand = ((model["a"](x["a"]) - st.slot_z[:, 0]) ** 2).mean()
    assert float(out["der"].detach()) > 0 and torch.allclose(out["der"], hand)


def test_derpp_term_is_the_grouped_replay_contrastive_loss():
    model = small_model()
    st = dns.new_cl_state(6, 8, "cpu")
    xs = [{m: torch.randn(6, 8, generator=torch.Generator().manual_seed(k)) for m in "abc"} for k in range(2)]
    for k, pair in enumerate((("a", "b"), ("a", "c"))):
        dns.start_step(st, model, k, *pair, xs[k], dns.Args())
    steps, rows = torch.tensor([0, 0, 0, 1, 1, 0]), torch.tensor([0, 1, 2, 3, 4, 5])
    got = dns.replay_contrastive(model, st, steps, rows, ("a", "b"), 1.0)
    i0, i1 = torch.tensor([0, 1, 2, 5]), torch.tensor([3, 4])
    hand = (4 / 6 * dns.contrastive_loss(model["a"](xs[0]["a"][i0]), model["b"](xs[0]["b"][i0]), 1.0)
            + 2 / 6 * dns.contrastive_loss(model["a"](xs[1]["a"][i1]), model["c"](xs[1]["c"][i1]), 1.0))
    assert torch.allclose(got, hand)


# ----------------------------------------------------------------------------- EWC
def test_ewc_fisher_penalty_and_anchor():
    model = small_model()
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(100, 8, generator=g), torch.randn(100, 8, generator=g)
    args = dns.Args(batch_size=32)
    fisher, star = dns.ewc_fisher(model, "a", "b", xa, xb, args)
    assert model["a"].weight.grad is None  # autograd.grad: nothing lingers in .grad
    params = [model["a"].weight, model["a"].bias, model["b"].weight, model["b"].bias]
    hand = [torch.zeros_like(p) for p in params]
    for i in range(0, 100, 32):  # 4 batches, the last one partial
        loss = dns.contrastive_loss(model["a"](xa[i:i + 32]), model["b"](xb[i:i + 32]), 1.0)
        for h, gr in zip(hand, torch.autograd.grad(loss, params)):
            h += gr ** 2 / 4
    assert torch.allclose(fisher["a.weight"], hand[0]) and torch.allclose(fisher["b.bias"], hand[3])
    st = dns.new_cl_state(0, 8, "cpu")
    st.ewc.append({"step": 0, "fisher": fisher, "star": star})
    pen = dns.ewc_penalty(model, st, "a", "c")
    assert float(pen.detach()) == 0.0 and torch.autograd.grad(pen, model["a"].weight)[0].abs().max() == 0
    delta = 0.1 * torch.randn(8, 8, generator=g)
    with torch.no_grad():
        model["a"].weight.add_(delta)
        model["b"].weight.add_(delta)  # b is inactive at (a, c): not penalised
    st.ewc.append({"step": 1, "fisher": fisher, "star": star})  # two anchors: the sum of both
    assert torch.allclose(dns.ewc_penalty(model, st, "a", "c"), 2 * (fisher["a.weight"] * delta ** 2).sum())


# ----------------------------------------------------------------------------- Co2L / CILA
def test_ird_is_the_old_entropy_with_zero_gradient_when_models_agree():
    s = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    s_new = (s + 2.0).requires_grad_(True)  # a row constant does not change the softmax
    loss = dns.ird_loss(s_new, s, 0.5, 0.5)
    p = torch.softmax(s / 0.5, 1)
    assert torch.allclose(loss, -(p * p.log()).sum(1).mean())
    assert torch.autograd.grad(loss, s_new)[0].abs().max() < 1e-6


def test_co2l_replayed_pairs_are_negatives_only():
    model, st, args, gens, x0, x1 = two_step_state("co2l", co2l_distill=0.0)
    x = {"a": x1["a"][:16], "c": x1["c"][:16]}
    z = {m: model[m](x[m]) for m in "ac"}
    st.pairs[0] = ("c", "b")  # the stored step shares modality c (the partner side)
    st.feats[0] = {"c": x0["a"], "b": x0["b"]}
    base = dns.co2l_terms(model, st, 1, "a", "c", x, z, args, torch.Generator().manual_seed(0))["contrastive"]
    st.feats[0] = {"c": x0["a"], "b": x0["b"] * 50}  # replayed pairs' other side: must not matter
    same = dns.co2l_terms(model, st, 1, "a", "c", x, z, args, torch.Generator().manual_seed(0))["contrastive"]
    assert torch.equal(base, same)
    # extra negatives raise the loss
    assert float(base.detach()) > float(dns.contrastive_loss(z["a"], z["c"], 1.0).detach())
    st.memory = {}
    plain = dns.co2l_terms(model, st, 1, "a", "c", x, z, args, torch.Generator())["contrastive"]
    assert torch.equal(plain, dns.contrastive_loss(z["a"], z["c"], 1.0))


def test_co2l_snapshot_is_a_copy():
    model, st, args, gens, x0, x1 = two_step_state("co2l")
    snap = st.old["a"].weight.clone()
    dns.train_step(model, 1, "a", "c", x1["a"], x1["c"], {}, st, args, gens, common.Stopwatch(), "step 2")
    assert torch.equal(st.old["a"].weight, snap) and not torch.equal(model["a"].weight, snap)


def test_cila_weight():
    args = dns.Args(method="cila", cila_kappa=3.0)
    st = dns.new_cl_state(0, 2, "cpu")
    st.hist = [(1.0, 4.0), (1.0, 2.0)]  # kappa * 2 / 6 = 1 -> max(1, 1)
    assert dns.co2l_weight(args, st, 1) == 1.0 and dns.co2l_weight(args, st, 3) == 1.0
    st.hist = [(3.0, 4.0), (1.0, 2.0)]  # 3 * 4 / 6 = 2
    assert dns.co2l_weight(args, st, 3) == pytest.approx(2.0)


# ----------------------------------------------------------------------------- C-FLAT
def test_cflat_gradient_matches_the_closed_form_on_a_quadratic():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    H, b = A @ A.T + torch.eye(6, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    theta0 = torch.randn(6, generator=g, dtype=torch.float64)
    p = theta0.clone().requires_grad_(True)
    rho, lam = 0.2, 0.3

    def loss_fn():
        return 0.5 * p @ H @ p - b @ p

    dns.cflat_backward([p], loss_fn, rho, lam)
    grad = H @ theta0 - b
    u = grad / grad.norm()
    d = H @ u / (H @ u).norm()
    g2 = grad + rho * H @ d
    expect = grad + rho * H @ u + lam * rho * H @ (g2 / g2.norm())
    assert torch.allclose(p.grad, expect, atol=1e-5) and torch.equal(p.detach(), theta0)  # restored exactly
    p.grad = None
    dns.cflat_backward([p], loss_fn, rho, 0.0)  # lambda 0: the SAM gradient
    assert torch.allclose(p.grad, H @ (theta0 + rho * u) - b)
