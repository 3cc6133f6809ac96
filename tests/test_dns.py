"""Tests for dns.py: the projection mechanism, the covariance statistics, the npz loader and its errors,
end-to-end behaviour on the built-in benchmark, determinism, CLI parsing and one subprocess smoke run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import tyro

import common
import data
import dns

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def low_rank(n, d, r, gen, scale=1.0):
    return scale * torch.randn(n, r, generator=gen) @ torch.randn(r, d, generator=gen) / r**0.5


def dense(p, d):
    return dns.left_mul(p, torch.eye(d))


# ----------------------------------------------------------------------------- projectors
@pytest.mark.parametrize("rank", [5, 40])  # basis form (k <= d/2) and complement form (k > d/2)
def test_projector_is_symmetric_idempotent_with_thresholded_rank(rank):
    gen = torch.Generator().manual_seed(0)
    x = low_rank(200, 48, rank, gen).double()
    c = x.T @ x / 200
    p = dns.make_projector(c, 1e-8)
    assert p[1] == (rank > 24)
    P = dense(p, 48)
    assert torch.allclose(P, P.T, atol=1e-5)
    assert torch.allclose(P @ P, P, atol=1e-5)
    assert round(float(torch.trace(P))) == rank
    assert torch.allclose(x.float() @ P, x.float(), atol=1e-3 * x.abs().max())  # old inputs lie in its range
    assert torch.allclose(dns.right_mul(torch.eye(48), p), P, atol=1e-6)


def test_threshold_is_absolute_on_eigenvalues():
    c = torch.diag(torch.tensor([5.0, 0.5, 0.05, 0.005], dtype=torch.float64))
    assert round(float(torch.trace(dense(dns.make_projector(c, 0.01), 4)))) == 3
    assert round(float(torch.trace(dense(dns.make_projector(c, 1.0), 4)))) == 1


def test_default_left_threshold_is_the_scale_free_numerical_span():
    evals = torch.tensor([5.0, 0.5, 0.05, 1e-5, 1e-7, 0.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    for scale in (1e-4, 1.0, 1e4):  # relative to the largest eigenvalue: 5e-6 * scale
        c = scale * q @ torch.diag(evals) @ q.T
        assert round(float(torch.trace(dense(dns.make_projector(c, None), 6)))) == 4
    # the right side keeps the paper's absolute lambda_min; the left side defaults to the span
    state = dns.DNSState({}, {})
    state.c_in["a"] = state.c_out["a"] = q @ torch.diag(evals) @ q.T
    p_out, p_in = dns.build_projectors(state, "a", 0.01, None, one_sided=False)
    assert round(float(torch.trace(dense(p_out, 6)))) == 4 and round(float(torch.trace(dense(p_in, 6)))) == 3


def trained_state(gen, d=32, r=6, one_step=True):
    """Modalities a, b trained on old data (random weights), statistics accumulated as at the end of a step."""
    xa, xb = low_rank(300, d, r, gen, 3.0), low_rank(300, d, r, gen, 3.0)
    wa, wb = (torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen),
              torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen))
    state = dns.DNSState({}, {})
    dns.update_covariance(state, dns.gram(xa), dns.gram(xb), len(xa), wa, wb, "a", "b")
    return state, xa, xb, wa, wb


def contrastive_grad(w, x, partner_z):
    w = w.clone().requires_grad_(True)
    dns.contrastive_loss(x @ w.T, partner_z, 1.0).backward()
    return w.grad


@pytest.mark.parametrize("one_sided", [False, True])
def test_projected_sgd_update_keeps_old_alignment_scores(one_sided):
    gen = torch.Generator().manual_seed(1)
    state, xa, xb, wa, wb = trained_state(gen)
    old = (xa @ wa.T) @ (xb @ wb.T).T
    # new step pairs modality a with a new modality c on new data that overlaps the old input span
    x_new = 0.5 * xa[:64] + low_rank(64, 32, 6, gen, 3.0)
    g = contrastive_grad(wa, x_new, torch.randn(64, 32, generator=gen))
    proj = dns.build_projectors(state, "a", 1e-6, 1e-6, one_sided)
    for grad, bound in ((g, None), (dns.project_gradient(g, proj), 1e-5)):
        new = (xa @ (wa - 0.05 * grad).T) @ (xb @ wb.T).T
        rel = float((new - old).abs().max() / old.abs().max())
        if bound is None:
            assert rel > 1e-3  # the plain update does move old scores
        else:
            assert rel < bound
    assert float(dns.project_gradient(g, proj).norm()) > 0.05 * float(g.norm())  # still learns something


def test_dual_side_keeps_more_of_the_gradient_than_one_sided():
    gen = torch.Generator().manual_seed(2)
    state, xa, _, wa, _ = trained_state(gen)
    g = contrastive_grad(wa, xa[:64] + low_rank(64, 32, 6, gen), torch.randn(64, 32, generator=gen))
    dual = dns.project_gradient(g, dns.build_projectors(state, "a", 1e-6, 1e-6, False))
    one = dns.project_gradient(g, dns.build_projectors(state, "a", 1e-6, 1e-6, True))
    assert float(dual.norm()) > float(one.norm()) * 1.05


def test_factored_projection_equals_reference():
    gen = torch.Generator().manual_seed(3)
    state, xa, xb, wa, wb = trained_state(gen)
    for batch in (16, 4):  # P_in of rank 6: the rank-k correction (k < B) and the B-wide one (k >= B)
        x, delta = low_rank(batch, 32, 6, gen), torch.randn(batch, 32, generator=gen)
        g = 0.7 * delta.T @ x  # a Linear's weight gradient, clipped by 0.7
        for one_sided in (False, True):
            proj = dns.build_projectors(state, "a", 1e-6, 1e-6, one_sided)
            ref = dns.project_gradient(g, proj)
            out = dns.project_gradient_factored(g.clone(), delta, x, torch.tensor(0.7), proj)
            assert torch.allclose(out, ref, atol=1e-5)


def test_never_seen_modality_is_not_projected():
    gen = torch.Generator().manual_seed(4)
    state, *_ = trained_state(gen)
    assert dns.build_projectors(state, "c", 1e-6, 1e-6, False) is None
    g = torch.randn(32, 32, generator=gen)
    assert torch.equal(dns.project_gradient(g, None), g)


def test_checkpointed_covariance_keeps_what_eigh_reads():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    c = x.T @ x
    c[0, 5] += 1e-9  # a GEMM result need not be exactly symmetric; eigh reads the lower triangle only
    back = dns.from_lower_half(dns.lower_half(c))
    assert dns.lower_half(c).numel() == 21 and torch.equal(back.tril(), c.tril()) and torch.equal(back, back.T)
    assert all(torch.equal(u, v) for u, v in zip(torch.linalg.eigh(back), torch.linalg.eigh(c)))


def test_covariance_update_matches_hand_formula():
    gen = torch.Generator().manual_seed(5)
    x1, y1, x2, z2 = (torch.randn(n, 4, generator=gen) for n in (3, 3, 5, 5))
    wa, wb, wc = (torch.randn(4, 4, generator=gen) for _ in range(3))
    st = dns.DNSState({}, {})
    dns.update_covariance(st, dns.gram(x1), dns.gram(y1), len(x1), wa, wb, "a", "b")
    dns.update_covariance(st, dns.gram(x2), dns.gram(z2), len(x2), wa, wc, "a", "c")  # global count: 3 then 8
    d = lambda t: t.double()
    assert st.n_bar == 8
    assert torch.allclose(st.c_in["a"], (d(x1).T @ d(x1) / 3) * 3 / 8 + d(x2).T @ d(x2) / 8)
    assert torch.allclose(st.c_in["b"], d(y1).T @ d(y1) / 3)  # absent at step 2: not rescaled
    exp_out_a = d(wb) @ (d(y1).T @ d(y1) / 3) @ d(wb).T * 3 / 8 + d(wc) @ (d(z2).T @ d(z2) / 8) @ d(wc).T
    assert torch.allclose(st.c_out["a"], exp_out_a)
    assert set(st.c_in) == set(st.c_out) == {"a", "b", "c"}


def test_inactive_modalities_are_bit_identical_after_a_step():
    gen = torch.Generator().manual_seed(6)
    model = dns.build_model({"a": 16, "b": 16, "c": 16}, 16, seed=6)
    with torch.no_grad():
        model["c"].weight.add_(0.1)  # non-identity state that weight decay would shrink
    before = {k: v.clone() for k, v in model["c"].state_dict().items()}
    state, xa, xb, *_ = trained_state(gen, d=16)
    proj = {m: dns.build_projectors(state, m, 1e-6, 1e-6, False) for m in ("a", "b")}
    args = dns.Args(epochs=2, batch_size=32)
    st = dns.new_cl_state(0, 16, "cpu")
    dns.start_step(st, model, 0, "a", "b", {"a": xa, "b": xb}, args)
    gens = {"batches": gen, "replay": torch.Generator().manual_seed(0)}
    dns.train_step(model, 0, "a", "b", xa[:100], xb[:100], proj, st, args, gens, common.Stopwatch(), "step 1")
    assert all(torch.equal(before[k], v) for k, v in model["c"].state_dict().items())
    assert model["c"].weight.grad is None
    assert not torch.equal(model["a"].weight, torch.eye(16))


# ----------------------------------------------------------------------------- end to end on the built-in benchmark
# Five of the paper's steps at the default size (about 35 s for both methods; the 11-step run takes 2 minutes)
E2E = dict(backbone="languagebind", num_threads=1, steps=["ucf101:text-video", "esc50:text-audio",
                                                        "vggsound_s:text-audio", "vggsound_s:text-video",
                                                        "clotho:text-audio"])


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    return {m: dns.main(dns.Args(method=m, out_dir=str(tmp / m), **E2E)) for m in ("dns", "vanilla")}, tmp


def test_dns_forgets_less_and_ends_higher_than_vanilla(e2e):
    res, _ = e2e
    d, v = res["dns"]["summary"], res["vanilla"]["summary"]
    assert v["bwt_acc"] < -2.0  # the benchmark makes sequential fine-tuning forget
    assert d["bwt_acc"] >= v["bwt_acc"] + 2.0
    assert d["acc"] > v["acc"]


ENVELOPE = {"schema", "script", "method", "variant", "data", "backbone", "seed", "run_name", "args", "env", "tasks",
            "rows", "matrices", "extra", "summary", "timing_s"}


def test_results_envelope_and_row0_is_the_untrained_backbone(e2e):
    res, tmp = e2e
    r = json.loads(open(tmp / "dns" / "results.json").read(), parse_constant=pytest.fail)  # strict JSON
    T = len(r["tasks"])
    assert set(r) == ENVELOPE and r["schema"] == 1 and r["script"] == "dns" and r["rows"] == ["init"] + r["tasks"]
    assert (r["method"], r["variant"], r["data"], r["backbone"]) == ("dns", "steps=" + " ".join(E2E["steps"]),
                                                                      "builtin", "languagebind")
    assert T == 5 and set(r["summary"]) == {"acc", "bwt_acc", "r1", "r5", "r10", "bwt_r10", "aia_acc", "fwt_acc",
                                            "stored_bytes"}
    for key, fn in (("aia_acc", common.average_incremental_accuracy), ("fwt_acc", common.forward_transfer)):
        assert r["summary"][key] == fn(r["matrices"]["acc"])
    assert all(v is None or isinstance(v, (int, float)) for v in r["summary"].values())
    for key, R in r["matrices"].items():
        assert len(R) == T + 1 and all(len(row) == T for row in R)
    assert r["matrices"]["acc"][0] == res["vanilla"]["matrices"]["acc"][0]  # same init, same data
    acc_entries = [j for j, v in enumerate(r["matrices"]["acc"][-1]) if v is not None]
    assert acc_entries == [0, 1, 2, 3]  # ucf101, esc50, vggsound T-A and T-VI
    assert r["matrices"]["r10"][-1][0] is None and r["matrices"]["r10"][-1][4] is not None  # no recall for UCF101
    for j in acc_entries:  # training helps: just-trained accuracy above the untrained backbone
        assert r["matrices"]["acc"][j + 1][j] > r["matrices"]["acc"][0][j]
    assert len(r["timing_s"]["train"]) == T and r["timing_s"]["total"] > 0
    # memory: DNS keeps two float64 d x d moments per seen modality (text, video, audio: 768-d), vanilla nothing
    assert r["summary"]["stored_bytes"] == 3 * 2 * 8 * 768**2 and res["vanilla"]["summary"]["stored_bytes"] == 0
    assert not (tmp / "dns" / "checkpoint.pt").exists()  # removed after results.json without --save-model
    head = open(tmp / "dns" / "metrics.csv").readline().strip()
    assert head == "script,method,variant,seed,row,after,entry,metric,value"
    assert json.load(open(tmp / "dns" / "args.json"))["method"] == "dns"
    assert res["vanilla"]["run_name"].startswith("dns__vanilla__builtin__languagebind__1__")


def test_same_seed_gives_identical_results_and_other_seed_differs(tmp_path):
    tiny = dict(bench_scale=0.005, epochs=1, steps=["esc50:text-audio", "clotho:text-audio"], num_threads=1)
    a, b = (dns.main(dns.Args(seed=7, out_dir=str(tmp_path / n), **tiny)) for n in ("a", "b"))
    c = dns.main(dns.Args(seed=8, out_dir=str(tmp_path / "c"), **tiny))
    assert a["summary"] == b["summary"] and a["matrices"] == b["matrices"]
    assert a["summary"] != c["summary"]


def test_official_float32_keeps_float32_moments_and_changes_little(tmp_path):
    tiny = dict(bench_scale=0.005, epochs=1, steps=["esc50:text-audio", "clotho:text-audio"], num_threads=1)
    ref = dns.main(dns.Args(out_dir=str(tmp_path / "f64"), **tiny))
    f32 = dns.main(dns.Args(out_dir=str(tmp_path / "f32"), official_float32=True, **tiny))
    assert f32["method"] == "dns+official-float32"
    assert f32["summary"]["stored_bytes"] * 2 == ref["summary"]["stored_bytes"]  # float32 moments: half the bytes
    assert all(abs(f32["summary"][k] - ref["summary"][k]) < 2 for k in ("acc", "r10"))


# ----------------------------------------------------------------------------- real-feature loader and bad input
def write_split(path, n=40, d_text=8, d_audio=6, **override):
    rng = np.random.default_rng(0)
    arrays = {"text": rng.standard_normal((n, d_text)).astype(np.float32),
              "audio": rng.standard_normal((n, d_audio)).astype(np.float32),
              "label": rng.integers(0, 4, n), "class_text": rng.standard_normal((4, d_text)).astype(np.float32),
              "class_names": np.array(["a", "b", "c", "d"])}
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def test_npz_loader_runs_end_to_end_with_mixed_dims(tmp_path):
    for split in ("train", "test"):
        write_split(tmp_path / f"toy_{split}.npz")
    # text is 8-d, audio 6-d: D = 8, audio gets an orthogonal Linear(6, 8); step 2 projects both (non-square P_in)
    args = dns.Args(data_dir=str(tmp_path), steps=["toy:text-audio", "toy:audio-text"], epochs=2,
                    out_dir=str(tmp_path / "out"))
    r = dns.main(args)
    assert r["tasks"] == ["toy(text-audio)", "toy(audio-text)"] and r["data"] == os.path.basename(str(tmp_path))
    assert r["matrices"]["acc"][1][0] is not None and r["matrices"]["r10"][2][1] is not None
    assert os.path.exists(tmp_path / "out" / "results.json")


BAD = {
    "missing modality": dict(audio=None),
    "different lengths": dict(audio=np.zeros((39, 6), np.float32)),
    "non-finite": dict(text=np.full((40, 8), np.nan, np.float32)),
    "empty split": dict(text=np.zeros((0, 8), np.float32), audio=np.zeros((0, 6), np.float32), label=None),
    "label out of range": dict(label=np.full(40, 7)),
    "class_text dim": dict(class_text=np.zeros((4, 5), np.float32)),
    "unknown array": {"bad-name": np.zeros((40, 3), np.float32)},
}
EXPECT = {"missing modality": "missing modality array 'audio'", "different lengths": "different lengths",
          "non-finite": "non-finite", "empty split": "empty split", "label out of range": "label out of range",
          "class_text dim": "class_text has shape", "unknown array": "unknown array"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_npz_input_is_rejected_with_file_name_and_no_results(case, tmp_path, capsys):
    write_split(tmp_path / "toy_train.npz")
    write_split(tmp_path / "toy_test.npz", **BAD[case])
    with pytest.raises(data.DataError, match=EXPECT[case]) as e:
        data.load_dns_features(str(tmp_path), [("toy", "text", "audio")])
    assert "toy_test.npz" in str(e.value)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ex:
        dns.main(dns.Args(data_dir=str(tmp_path), steps=["toy:text-audio"], out_dir=str(out)))
    assert ex.value.code == 2 and not out.exists()
    assert "toy_test.npz" in capsys.readouterr().err


def test_missing_file_and_bad_steps_are_rejected(tmp_path):
    write_split(tmp_path / "toy_train.npz")
    with pytest.raises(data.DataError, match=r"toy_test.npz: file not found"):
        data.load_dns_features(str(tmp_path), [("toy", "text", "audio")])
    for item, msg in (("toy-text-audio", "expected 'dataset:modA-modB'"), ("toy:text-sm.ell", "expected 'dataset"),
                      ("toy:text-text", "two different modalities")):
        with pytest.raises(data.DataError, match=msg):
            data.parse_dns_steps([item])
    for steps, msg in ((["esc50:text-video"], "has modalities"), (["esc50:text-smell"], "has modalities")):
        with pytest.raises(SystemExit) as e:
            dns.main(dns.Args(steps=steps, out_dir=str(tmp_path / "x")))
        assert e.value.code == 2 and not (tmp_path / "x").exists()
    with pytest.raises(data.DataError, match="unknown backbone"):
        data.make_dns_benchmark("clip", [("esc50", "text", "audio")])


def test_dim_mismatch_across_datasets_is_rejected(tmp_path):
    for split in ("train", "test"):
        write_split(tmp_path / f"one_{split}.npz")
        write_split(tmp_path / f"two_{split}.npz", d_text=9, class_text=np.zeros((4, 9), np.float32))
    with pytest.raises(data.DataError, match="modality 'text' has dim 9"):
        data.load_dns_features(str(tmp_path), [("one", "text", "audio"), ("two", "text", "audio")])


# ----------------------------------------------------------------------------- CLI
def test_tyro_parses_flags_and_rejects_unknown_backbone():
    a = tyro.cli(dns.Args, args=["--backbone", "unibind", "--method", "vanilla", "--steps", "esc50:text-audio",
                                 "--official-one-sided", "--seed", "3"])
    assert ((a.backbone, a.method, a.steps, a.official_one_sided, a.seed)
            == ("unibind", "vanilla", ["esc50:text-audio"], True, 3))
    with pytest.raises(SystemExit) as e:
        tyro.cli(dns.Args, args=["--backbone", "clip"], console_outputs=False)
    assert e.value.code == 2


TINY = dict(backbone="imagebind", bench_scale=0.05, epochs=3, steps=["esc50:text-audio", "vggsound_s:text-audio",
                                                                    "vggsound_s:text-video"], official_cov_bug=True)


def cli(kw):
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, *v] if isinstance(v, list) else [flag, str(v)]
    return out


def strip(r):
    return {k: v for k, v in r.items() if k not in ("timing_s", "run_name", "args", "env")}


def test_subprocess_kill_and_resume_is_bit_identical(tmp_path):
    ref = dns.main(dns.Args(seed=3, out_dir=str(tmp_path / "ref"), **TINY))
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "dns.py", *cli(TINY), "--seed", "3", "--out-dir", str(run)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("checkpoint 1/"):
            p.kill()  # SIGKILL on POSIX
            break
    p.wait(timeout=60)
    assert "built-in synthetic benchmark" in "".join(lines) and "step  1/3" in "".join(lines)
    assert not (run / "results.json").exists() and (run / "checkpoint.pt").exists()
    resumed = dns.main(dns.Args(seed=3, out_dir=str(run), resume=str(run), **TINY))
    assert strip(json.load(open(run / "results.json"))) == strip(json.load(open(tmp_path / "ref" / "results.json")))
    assert resumed["summary"] == ref["summary"] and not (run / "checkpoint.pt").exists()


def test_resume_refuses_other_args_and_dirs_without_checkpoint(tmp_path, capsys):
    kw = dict(bench_scale=0.005, epochs=1, steps=["esc50:text-audio", "clotho:text-audio"])
    run = tmp_path / "run"
    dns.main(dns.Args(out_dir=str(run), save_model=True, **kw))  # keeps checkpoint.pt
    assert (run / "checkpoint.pt").exists() and (run / "model_after_2.pt").exists()
    with pytest.raises(SystemExit) as e:
        dns.main(dns.Args(out_dir=str(run), resume=str(run), **{**kw, "epochs": 2}, lr=1e-3))
    assert e.value.code == 2 and "epochs (2 != 1), lr (0.001 != 0.0001)" in capsys.readouterr().err
    ckpt = (run / "checkpoint.pt").read_bytes()
    os.remove(run / "checkpoint.pt")
    with pytest.raises(SystemExit) as e:
        dns.main(dns.Args(out_dir=str(run), resume=str(run), num_threads=2, **kw))  # threads may differ
    assert e.value.code == 2 and "the run is complete" in capsys.readouterr().err
    os.remove(run / "results.json")
    (run / "checkpoint.pt").write_bytes(ckpt)
    with pytest.raises(SystemExit) as e:  # a new run must not overwrite an unfinished one
        dns.main(dns.Args(out_dir=str(run), **kw))
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    # on the command line, the stored args are the defaults: only retyped flags can differ
    stored = common.resume_defaults(dns.Args, ["--resume", str(run), "--num-threads", "2"])
    assert stored.epochs == 1 and stored.steps == kw["steps"]


@pytest.mark.parametrize("override, flag", [
    (dict(epochs=0), "--epochs"), (dict(lr=-1.0), "--lr"), (dict(batch_size=0), "--batch-size"),
    (dict(temperature=0.0), "--temperature"), (dict(embed_dim=0), "--embed-dim"),
    (dict(bench_scale=-0.1), "--bench-scale"),
    (dict(retrieval_subsets=0), "--retrieval-subsets"), (dict(max_grad_norm=-1.0), "--max-grad-norm"),
    (dict(lambda_min=-1.0), "--lambda-min"), (dict(buffer_size=-1), "--buffer-size"),
    (dict(ewc_lambda=-1.0), "--ewc-lambda"),
    (dict(der_alpha=-0.1), "--der-alpha"), (dict(co2l_past_temp=0.0), "--co2l-past-temp"),
    (dict(cflat_rho=-1.0), "--cflat-rho"),
    (dict(num_threads=-1), "--num-threads"), (dict(resume="/nonexistent/run"), "--resume"),
])
def test_bad_hyperparameters_exit_2_naming_the_flag_before_writing(override, flag, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        dns.main(dns.Args(out_dir=str(out), **override))
    assert e.value.code == 2 and flag in capsys.readouterr().err and not out.exists()


def test_missing_extra_exits_2_with_pip_command(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        dns.main(dns.Args(track=True, out_dir=str(tmp_path / "out")))
    assert e.value.code == 2 and "pip install wandb" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_divergence_stops_with_exit_1_naming_the_step_and_writes_no_results(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        dns.main(dns.Args(lr=1e30, bench_scale=0.005, epochs=2, steps=["esc50:text-audio"], out_dir=str(out)))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "diverged at step 1/1 (esc50(text-audio)) epoch" in err and "contrastive" in err
    assert not (out / "results.json").exists()


def test_plot_and_tensorboard_outputs(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    dns.main(dns.Args(plot=True, tensorboard=True, bench_scale=0.005, epochs=1,
                      steps=["esc50:text-audio", "clotho:text-audio"], out_dir=str(out)))
    assert (out / "acc_matrix.png").stat().st_size > 1000 and (out / "acc_curves.png").exists()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
