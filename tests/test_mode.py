"""Behavioural tests for mode.py (MoDE): routing, frozen base, identity init, KD, overfitting, both evaluation
routings, non-finite metrics, end to end, results envelope, resume after SIGKILL, divergence, validation."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import tyro

import common
import data
import mode

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny but still showing the phenomenon: pre-trained generation is good, seq-lora damages it
TINY = dict(d_model=48, n_layers=2, n_heads=4, d_ff=96, n_train=512, n_test=96, gen_samples=96, pretrain_steps=500,
            pretrain_batch_size=64, pretrain_lr=4e-3, steps_per_task=60, lr=4e-3, num_tasks=3, conflict_every=30,
            log_every=1000, kd_batch_size=16, seed=0)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return mode.UnifiedLM(data.MODE_VOCAB, 32, 2, 4, 64, 32)


def streams(seed=0, n=64):
    w = data.make_mode_world(seed, n_pretrain=n, n_train=n, n_test=n)
    return w, {k: mode.to_tensors({f: v[f] for f in ("tokens", "modality", "loss_mask")}, "cpu") for k, v in w.items()}


def perturb_experts(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".B_" in n:
                p.normal_(0, 0.1)


# ----------------------------------------------------------------------------- routing and isolation
def test_routing_text_and_image_tokens_reach_only_their_experts():
    model = tiny_model()
    mode.add_experts(model, mode.Args(), mode.scheme_of(mode.Args()))
    perturb_experts(model)  # with B = 0 the A-gradients would be 0 anyway: make the check able to fail
    text, image = mode.split_params(model)
    tokens = torch.randint(0, data.MODE_IMAGE_LO, (4, 12))
    for route_value, zero_side, live_side in ((0, image, text), (1, text, image)):
        model.zero_grad()
        model(tokens, torch.full_like(tokens, route_value)).square().mean().backward()
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in zero_side)
        assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in live_side)


def test_generation_gradient_never_reaches_the_text_experts_but_does_for_coupled_lora():
    _, S = streams()
    for method, text_side_zero in (("mode", True), ("seq-lora", False)):
        args = mode.Args(method=method)
        model, scheme = tiny_model(), mode.scheme_of(args)
        mode.add_experts(model, args, scheme)
        perturb_experts(model)
        c = mode.gradient_conflict(model, S["gqa_train"], S["reference_train"], scheme, data.MODE_IMAGE_LO)
        assert (c["gen_grad_norm_text_side"] == 0.0) == text_side_zero
        assert c["gen_grad_norm"] > 0


def test_experts_start_as_identity_and_teacher_bypasses_them():
    _, S = streams()
    b = S["gqa_test"]
    for method in ("mode", "seq-lora", "moe-lora", "tmoe-only"):
        args = mode.Args(method=method)
        model, scheme = tiny_model(), mode.scheme_of(args)
        model.eval()
        before = model(b["tokens"], None)
        mode.add_experts(model, args, scheme)
        model.eval()
        for stream in ("task", "gen"):
            assert torch.equal(model(b["tokens"], mode.route_for(b, scheme, stream)), before)
        perturb_experts(model)
        assert not torch.equal(model(b["tokens"], mode.route_for(b, scheme, "task")), before)
        assert torch.equal(model(b["tokens"], None), before)  # teacher = experts bypassed


def test_base_weights_bit_identical_after_training_and_experts_move():
    _, S = streams()
    args = mode.Args(lr=1e-2)
    model, scheme = tiny_model(), mode.scheme_of(args)
    trainable = mode.add_experts(model, args, scheme)
    base = {k: v.clone() for k, v in model.state_dict().items() if not mode.is_expert(k)}
    experts = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        tb, rb = mode.sample_batch(S["gqa_train"], 16, g), mode.sample_batch(S["reference_train"], 16, g)
        loss, _, _ = mode.task_step_loss(model, tb, rb, scheme, args, data.MODE_IMAGE_LO)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in base.items())
    assert all(not torch.equal(a, p) for a, p in zip(experts, trainable))


# ----------------------------------------------------------------------------- losses
def test_path_restore_swaps_the_experts_at_one_token_modality():
    _, S = streams()
    b = S["gqa_test"]
    for method, has_image_path in (("mode", True), ("seq-lora", True), ("tmoe-only", False)):
        args = mode.Args(method=method)
        model, scheme = tiny_model(), mode.scheme_of(args)
        mode.add_experts(model, args, scheme)
        model.eval()
        perturb_experts(model)
        route = mode.route_for(b, scheme, "task")
        before, snap = model(b["tokens"], route), mode.expert_snapshot(model)
        with mode.restoring(model, (snap, None), b["modality"]):  # a snapshot equal to the final state: no change
            assert torch.equal(model(b["tokens"], route), before)
        perturb_experts(model)
        after, out = model(b["tokens"], route), {}
        for path in (None, 1, 0):
            with mode.restoring(model, (snap, path), b["modality"]):
                out[path] = model(b["tokens"], route)
        assert torch.equal(out[None], before) and torch.equal(model(b["tokens"], route), after)  # cleared after
        assert (not torch.equal(out[1], after)) == has_image_path  # tmoe-only leaves image tokens un-adapted
        assert not torch.equal(out[0], after)


def test_kd_is_zero_when_student_equals_teacher_and_positive_otherwise():
    _, S = streams()
    b = S["reference_test"]
    z = torch.randn(*b["tokens"].shape, data.MODE_VOCAB)
    for double, all_pos in ((False, False), (True, False), (False, True)):
        assert mode.kd_loss(z, z.clone(), b, data.MODE_IMAGE_LO, 2.0, double, all_pos).abs() < 1e-6
        assert mode.kd_loss(z + torch.randn_like(z), z, b, data.MODE_IMAGE_LO, 2.0, double, all_pos) > 1e-3
    args = mode.Args()
    model, scheme = tiny_model(), mode.scheme_of(args)
    mode.add_experts(model, args, scheme)
    model.eval()  # fresh experts: the student is the teacher
    _, _, kd = mode.task_step_loss(model, S["gqa_train"], b, scheme, args, data.MODE_IMAGE_LO)
    assert kd.abs() < 1e-6


def test_model_overfits_a_tiny_batch_in_both_directions():
    w, _ = streams(n=8)
    understand = mode.to_tensors({f: np.concatenate([w[f"{t}_train"][f][:4] for t in data.MODE_TASKS])
                                  for f in ("tokens", "modality", "loss_mask")}, "cpu")
    generate = mode.to_tensors({f: w["reference_train"][f][:8] for f in ("tokens", "modality", "loss_mask")}, "cpu")
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    lo = data.MODE_IMAGE_LO
    start = [mode.lm_loss(model(b["tokens"]), b, lo).item() for b in (understand, generate)]
    for _ in range(150):
        loss = sum(mode.lm_loss(model(b["tokens"]), b, lo) for b in (understand, generate))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    end = [mode.lm_loss(model(b["tokens"]), b, lo).item() for b in (understand, generate)]
    assert start[0] > 1.0 and start[1] > 1.0 and end[0] < 0.05 and end[1] < 0.05
    allowed = mode.answer_vocab(understand, data.MODE_VOCAB)
    assert mode.vqa_accuracy(model, understand, mode.scheme_of(mode.Args()), lo, False, allowed) == (100.0, 100.0)


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, tokens, route=None):
        return self.logits.expand(len(tokens), -1, -1)


def test_closed_set_accuracy_scores_within_the_task_answer_vocabulary():
    w, S = streams(n=32)
    task = S["scienceqa_train"]  # answers are colour words
    allowed = mode.answer_vocab(task, data.MODE_VOCAB)
    colours = {data.MODE_TEXT.index(data.MODE_COLOURS[c]) for c in w["scienceqa_train"]["colour"]}
    assert set(allowed.nonzero().flatten().tolist()) == colours
    ans = task["tokens"][:, 21]
    red, circle = data.MODE_TEXT.index("red"), data.MODE_TEXT.index("circle")
    logits = torch.zeros(1, 24, data.MODE_VOCAB)
    logits[0, 20, circle], logits[0, 20, red] = 5.0, 3.0  # open argmax: "circle" (not an answer), closed: "red"
    closed, open_ = mode.vqa_accuracy(FixedLogits(logits), task, mode.scheme_of(mode.Args()), data.MODE_IMAGE_LO,
                                      False, allowed)
    assert open_ == 0.0
    assert closed == pytest.approx(100.0 * float((ans == red).float().mean()))


def test_image_oracle_reads_clean_images_and_rejects_broken_ones():
    w, _ = streams()
    r = w["reference_test"]
    codes = r["tokens"][:, 5:21].copy()
    ok, col, shp = data.mode_read_image(codes)
    assert ok.all() and (col == r["colour"]).all() and (shp == r["shape"]).all()
    codes[:, 0] = np.where(codes[:, 0] == data.MODE_IMAGE_LO + 4, data.MODE_IMAGE_LO + 5, data.MODE_IMAGE_LO + 4)
    assert not data.mode_read_image(codes)[0].any()  # one cell of another colour or shape breaks the image


def test_metrics_refuse_non_finite_logits():
    w, S = streams(n=16)
    task, lo = S["gqa_test"], data.MODE_IMAGE_LO
    allowed, scheme = mode.answer_vocab(task, data.MODE_VOCAB), mode.scheme_of(mode.Args())
    prompts, gumbel = S["reference_test"]["tokens"][:4, :5], torch.zeros(4, 16, data.MODE_VOCAB - lo)
    attrs = (w["reference_test"]["colour"][:4], w["reference_test"]["shape"][:4])
    for bad in (float("nan"), float("inf")):
        logits = torch.zeros(1, 24, data.MODE_VOCAB)
        logits[0, 3, 0] = logits[0, -1, lo] = bad
        model = FixedLogits(logits)
        with pytest.raises(ValueError, match="vqa accuracy"):
            mode.vqa_accuracy(model, task, scheme, lo, False, allowed, where="row 2")
        with pytest.raises(ValueError, match="gen_nll"):
            mode.generation_nll(model, S["reference_test"], scheme, lo)
        with pytest.raises(ValueError, match="gen_match"):
            mode.generation_match(model, prompts, attrs, gumbel, scheme, lo)


def test_official_routing_sends_every_token_to_the_text_experts():
    _, S = streams()
    b = S["gqa_test"]
    for method, differs in (("mode", True), ("tmoe-only", True), ("seq-lora", False), ("moe-lora", False)):
        scheme = mode.scheme_of(mode.Args(method=method))
        e1, e2 = mode.route_for(b, scheme, "eval"), mode.route_for(b, scheme, "eval", official=True)
        assert not e2.any() and (not torch.equal(e1, e2)) == differs  # E1 = E2 without modality routing


def test_method_and_variant_tags():
    A = mode.Args
    assert [mode.method_tag(a) for a in (A(), A(kd=False), A(text_moe=False, official_kd_all_positions=True),
                                         A(method="seq-lora"), A(method="seq-lora", kd=False))] == \
        ["mode", "mode+no-kd", "mode+no-text-moe+official-kd-all-positions", "seq-lora", "seq-lora"]
    variant = [common.tag(a, mode.VARIANT_FIELDS, A()) for a in (A(seed=5, out_dir="x", num_threads=2, log_every=3),
                                                                 A(lr=1e-3, num_tasks=2))]
    assert variant == ["", "lr=0.001,num_tasks=2"]  # infra flags never enter it


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Tiny pre-training once, then MoDE, MoDE without KD and seq-lora from the same pre-trained model."""
    tmp = tmp_path_factory.mktemp("mode")
    cache = str(tmp / "cache")
    out = {}
    for name, kw in (("mode", {}), ("nokd", dict(kd=False)), ("seq", dict(method="seq-lora"))):
        out[name] = mode.main(mode.Args(**{**TINY, "pretrain_cache_dir": cache, "out_dir": str(tmp / name), **kw}))
    return tmp, cache, out


def test_end_to_end_inter_modal_forgetting(e2e):
    _, _, out = e2e
    s = {k: v["summary"] for k, v in out.items()}
    assert out["mode"]["extra"]["gen_match"][0] > 0.8  # the pre-trained model generates well
    assert all(v["extra"]["base_weights_unchanged"] for v in out.values())
    assert s["seq"]["gen_drop"] > 10 and s["nokd"]["gen_drop"] > 10  # shared / un-anchored adapters damage generation
    assert abs(s["mode"]["gen_drop"]) < 5 and s["mode"]["gen_drop"] < s["seq"]["gen_drop"]
    assert s["seq"]["gen_drop_max"] >= s["seq"]["gen_drop"]
    assert s["mode"]["gen_nll_increase"] < s["nokd"]["gen_nll_increase"]
    assert s["mode"]["gen_grad_norm_text_side"] == 0.0 and s["seq"]["gen_grad_norm_text_side"] > 0
    # seq-lora also forgets earlier understanding tasks: the answer type (open) and, less, the skill (closed-set)
    assert s["seq"]["forgetting_open"] > 20 and s["seq"]["forgetting"] > 5
    assert s["seq"]["forgetting_open"] > s["seq"]["forgetting"]
    R = out["seq"]["matrices"]["acc"]
    assert max(R[j + 1][j] for j in range(len(R[0]))) > 50  # tasks are learnt at all


def test_path_attribution_restoring_both_paths_gives_the_just_trained_accuracy(e2e):
    _, _, out = e2e
    for res in out.values():
        R, attr = res["matrices"]["acc"], res["extra"]["path_attribution"]
        assert attr["restored_both"] == [R[j + 1][j] for j in range(len(R[0]) - 1)]
        assert attr["lost"] == [R[j + 1][j] - R[-1][j] for j in range(len(R[0]) - 1)]
        s = res["summary"]
        assert s["forgetting_share_text_path"] == pytest.approx(
            sum(r - R[-1][j] for j, r in enumerate(attr["restored_text"])) / sum(attr["lost"]))
    s = out["seq"]["summary"]
    assert s["forgetting_share_text_path"] > s["forgetting_share_image_path"]  # notes 4.3: mostly the text path


def test_both_routings_scored_every_row(e2e):
    _, _, out = e2e
    m, seq = out["mode"]["matrices"], out["seq"]["matrices"]
    assert seq["acc"] == seq["acc_official_routing"] and seq["acc_open"] == seq["acc_open_official_routing"]
    assert m["acc"][0] == m["acc_official_routing"][0]  # identity experts at row 0
    assert m["acc"] != m["acc_official_routing"]  # a trained V-Adapter vs the T-MoE on image tokens
    assert out["mode"]["summary"]["forgetting_official_routing"] == \
        common.forgetting(m["acc_official_routing"])


def _strict(path):
    def refuse(c):
        raise ValueError(c)

    return json.load(open(path), parse_constant=refuse)


ENVELOPE = {"schema", "script", "method", "variant", "data", "backbone", "seed", "run_name", "args", "env", "tasks",
            "rows", "matrices", "extra", "summary", "timing_s"}


def test_end_to_end_results_envelope(e2e):
    tmp, _, out = e2e
    r = _strict(tmp / "nokd" / "results.json")
    assert set(r) == ENVELOPE and r["schema"] == 1 and r["rows"][0] == "init" and r["backbone"] == "tiny"
    assert (r["script"], r["method"], r["data"], r["seed"]) == ("mode", "mode+no-kd", "builtin", 0)
    assert set(r["matrices"]) == {"acc", "acc_open", "acc_official_routing", "acc_open_official_routing"}
    assert all(len(R) == len(r["rows"]) and all(len(row) == len(r["tasks"]) for row in R)
               for R in r["matrices"].values())
    assert all(v is None or type(v) in (int, float) for v in r["summary"].values())
    assert {"acc", "bwt", "forgetting_official_routing", "gen_drop", "gen_drop_max", "grad_cos"} <= set(r["summary"])
    assert {"gen_nll", "gen_match", "grad_conflict", "scheme", "trainable_params"} <= set(r["extra"])
    assert set(r["timing_s"]) == {"pretrain", "train", "eval", "total"}
    assert out["nokd"]["timing_s"]["pretrain"] == 0.0  # loaded from the cache of the first run
    lines = open(tmp / "nokd" / "metrics.csv").read().splitlines()
    assert lines[0] == "script,method,variant,seed,row,after,entry,metric,value"
    assert sum(",t2i,gen_match," in ln for ln in lines) == len(r["rows"])
    assert not os.path.exists(tmp / "nokd" / "checkpoint.pt")  # deleted after results.json


def _kill_after_first_checkpoint(cmd, run):
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(300, p.kill)
    timer.start()
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("checkpoint 1/"):
            p.kill()  # SIGKILL on POSIX
            break
    p.wait()
    timer.cancel()
    assert p.returncode == -signal.SIGKILL, "".join(lines)
    assert (run / "checkpoint.pt").exists() and not (run / "results.json").exists()
    return "".join(lines)


def test_subprocess_kill_and_resume_equals_an_uninterrupted_run(e2e, tmp_path, capsys):
    tmp, cache, out = e2e
    run = tmp_path / "run"
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    log = _kill_after_first_checkpoint([sys.executable, "mode.py", *cli, "--pretrain-cache-dir", cache,
                                        "--out-dir", str(run)], run)
    assert "loaded pre-trained model" in log
    resume = dict(TINY, pretrain_cache_dir=cache, out_dir=str(run), resume=str(run))
    with pytest.raises(SystemExit) as e:
        mode.main(mode.Args(**{**resume, "steps_per_task": 61}))
    assert e.value.code == 2 and "steps_per_task" in capsys.readouterr().err
    os.rename(cache, cache + ".away")  # resume must not need the pre-training cache
    try:
        mode.main(mode.Args(**resume))
    finally:
        os.rename(cache + ".away", cache)
    strip = ("timing_s", "run_name", "args", "env")
    got, ref = _strict(run / "results.json"), _strict(tmp / "mode" / "results.json")
    assert {k: v for k, v in got.items() if k not in strip} == {k: v for k, v in ref.items() if k not in strip}
    assert got["extra"]["base_weights_unchanged"] and not (run / "checkpoint.pt").exists()
    with pytest.raises(SystemExit) as e:  # a finished run has no checkpoint left
        mode.main(mode.Args(**resume))
    assert e.value.code == 2 and "results.json exists" in capsys.readouterr().err


def test_divergence_stops_with_exit_1_and_no_results(e2e, tmp_path, capsys):
    _, cache, _ = e2e
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:  # the cached pre-trained model, then adapters at lr 1e30
        mode.main(mode.Args(**{**TINY, "lr": 1e30, "num_tasks": 1, "pretrain_cache_dir": cache, "out_dir": str(out)}))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "diverged at task 1 (scienceqa) step" in err
    assert not (out / "results.json").exists()
    small = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32, n_train=64, n_test=32, gen_samples=8, pretrain_steps=20,
                 pretrain_lr=1e30, pretrain_cache_dir=str(tmp_path / "c"), out_dir=str(tmp_path / "pre"))
    with pytest.raises(SystemExit) as e:
        mode.main(mode.Args(**small))
    assert e.value.code == 1 and "diverged at pretrain step" in capsys.readouterr().err
    assert not (tmp_path / "pre" / "results.json").exists() and not (tmp_path / "c").exists()  # no cache


SMALL = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32, n_train=64, n_test=32, gen_samples=8, pretrain_steps=2,
             steps_per_task=2, num_tasks=2, conflict_every=0, log_every=1)


def test_plot_tensorboard_and_save_model(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    mode.main(mode.Args(**SMALL, plot=True, tensorboard=True, save_model=True, pretrain_cache_dir=str(tmp_path / "c"),
                        out_dir=str(out)))
    assert (out / "acc_matrix.png").stat().st_size > 0 and (out / "acc_curves.png").exists()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
    assert (out / "checkpoint.pt").exists() and (out / "model_after_textvqa.pt").exists()  # kept with --save-model


def test_data_dir_roundtrip_runs(tmp_path):
    w = data.make_mode_world(0, n_pretrain=64, n_train=64, n_test=32)
    d = tmp_path / "tasks"
    d.mkdir()
    json.dump({"vocab_size": data.MODE_VOCAB, "image_token_start": data.MODE_IMAGE_LO, "tasks": ["gqa", "vizwiz"]},
              open(d / "meta.json", "w"))
    for name in ["pretrain", "reference_train", "reference_test", "gqa_train", "gqa_test", "vizwiz_train",
                 "vizwiz_test"]:
        np.savez(d / f"{name}.npz", **{f: w[name][f] for f in ("tokens", "modality", "loss_mask")})
    res = mode.main(mode.Args(data_dir=str(d), d_model=32, n_layers=1, d_ff=64, pretrain_steps=5, steps_per_task=3,
                              pretrain_cache_dir=str(tmp_path / "c"), out_dir=str(tmp_path / "o"), log_every=1000))
    assert res["tasks"] == ["gqa", "vizwiz"] and res["data"] == "tasks"
    assert res["summary"]["gen_drop"] is None and res["summary"]["gen_drop_max"] is None
    assert len(res["extra"]["gen_nll"]) == 3 and np.isfinite(res["extra"]["gen_nll"]).all()
    _strict(tmp_path / "o" / "results.json")


# ----------------------------------------------------------------------------- bad input, CLI
def _bad_dir(tmp_path, breakage):
    w = data.make_mode_world(0, n_pretrain=16, n_train=16, n_test=16)
    d = tmp_path / "bad"
    d.mkdir()
    meta = {"vocab_size": data.MODE_VOCAB, "image_token_start": data.MODE_IMAGE_LO, "tasks": ["gqa"]}
    arrays = {n: {f: w[n][f].copy() for f in ("tokens", "modality", "loss_mask")}
              for n in ["pretrain", "reference_train", "reference_test", "gqa_train", "gqa_test"]}
    breakage(meta, arrays)
    json.dump(meta, open(d / "meta.json", "w"))
    for n, a in arrays.items():
        if a is not None:
            np.savez(d / f"{n}.npz", **a)
    return d


BREAKAGES = {
    "missing file": (lambda m, a: a.__setitem__("gqa_test", None), "gqa_test.npz: file not found"),
    "bad meta": (lambda m, a: m.__setitem__("image_token_start", 0), "meta.json"),
    "token out of range": (lambda m, a: a["gqa_train"]["tokens"].__setitem__((0, 3), 999), "out of range"),
    "shape mismatch": (lambda m, a: a["pretrain"].__setitem__("modality", a["pretrain"]["modality"][:, :5]),
                       "share one"),
    "bad modality": (lambda m, a: a["reference_train"]["modality"].__setitem__((0, 0), 2), "only 0/1"),
    "no target": (lambda m, a: a["gqa_test"]["loss_mask"].__setitem__(0, 0), "target"),
    "missing array": (lambda m, a: a["gqa_train"].pop("loss_mask"), "missing array 'loss_mask'"),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_bad_data_dir_is_rejected_with_a_clear_message(tmp_path, case, capsys):
    breakage, message = BREAKAGES[case]
    d = _bad_dir(tmp_path, breakage)
    with pytest.raises(data.DataError, match=message.replace("(", r"\(")):
        data.load_mode_dir(str(d), 32)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        mode.main(mode.Args(data_dir=str(d), out_dir=str(out), pretrain_cache_dir=str(tmp_path / "c")))
    assert e.value.code == 2 and message.split(":")[0] in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "c").exists()  # nothing written


BAD_ARGS = [
    (dict(steps_per_task=0), "--steps-per-task"), (dict(num_tasks=9), "--num-tasks"),
    (dict(num_tasks=-1), "--num-tasks"), (dict(lr=0.0), "--lr"), (dict(pretrain_lr=-1.0), "--pretrain-lr"),
    (dict(n_heads=3), "--n-heads"), (dict(lora_dropout=1.5), "--lora-dropout"),
    (dict(kd_lambda=-1.0), "--kd-lambda"),
    (dict(max_grad_norm=-1.0), "--max-grad-norm"), (dict(pretrain_max_grad_norm=0.0), "--pretrain-max-grad-norm"),
    (dict(conflict_every=-1), "--conflict-every"), (dict(conflict_batch_size=0), "--conflict-batch-size"),
    (dict(d_ff=0), "--d-ff"), (dict(lora_alpha=0.0), "--lora-alpha"), (dict(kd_temperature=0.0), "--kd-temperature"),
    (dict(max_len=16), "--max-len"), (dict(num_threads=-1), "--num-threads"), (dict(lr=float("nan")), "--lr"),
]


@pytest.mark.parametrize("overrides,flag", BAD_ARGS, ids=[f for _, f in BAD_ARGS])
def test_bad_arguments_exit_2_naming_the_flag_before_writing(tmp_path, capsys, overrides, flag):
    out, cache = tmp_path / "out", tmp_path / "c"
    with pytest.raises(SystemExit) as e:
        mode.main(mode.Args(out_dir=str(out), pretrain_cache_dir=str(cache), n_train=64, n_test=32, **overrides))
    assert e.value.code == 2 and f"error: {flag}: " in capsys.readouterr().err
    assert not out.exists() and not cache.exists()


def test_missing_data_dir_and_missing_extras_exit_2(tmp_path, capsys):
    cases = [dict(data_dir=str(tmp_path / "nope"))]
    cases += [dict(track=True)] if importlib.util.find_spec("wandb") is None else []
    for kw in cases:
        with pytest.raises(SystemExit) as e:
            mode.main(mode.Args(out_dir=str(tmp_path / "out"), **kw))
        assert e.value.code == 2 and not (tmp_path / "out").exists()
    if importlib.util.find_spec("wandb") is None:
        assert "pip install wandb" in capsys.readouterr().err


def test_tyro_parses_methods_ablations_and_official_switches():
    a = tyro.cli(mode.Args, args=["--method", "seq-lora", "--no-kd", "--no-text-moe", "--seed", "3",
                                  "--max-grad-norm", "5", "--official-kd-double-temperature"])
    assert (a.method, a.kd, a.text_moe, a.visual_adapter, a.seed) == ("seq-lora", False, False, True, 3)
    assert (a.max_grad_norm, a.official_kd_double_temperature) == (5.0, True)
    assert mode.scheme_of(a) == dict(n_text=1, image_side=False, coupled=True, kd=False)
    assert mode.scheme_of(mode.Args(visual_adapter=False))["kd"] is False
    for bad in (["--method", "nope"], ["--quirk-eval-routing"], ["--grad-clip", "1"]):  # removed / renamed
        with pytest.raises(SystemExit) as e:
            tyro.cli(mode.Args, args=bad, console_outputs=False)
        assert e.value.code == 2


# ----------------------------------------------------------------------------- paired seeds
def test_task_batches_are_paired_across_methods(tmp_path, monkeypatch):
    drawn, original = [], mode.sample_batch

    def recording(stream, n, gen):
        batch = original(stream, n, gen)
        drawn.append((gen.initial_seed(), batch["tokens"]))
        return batch

    monkeypatch.setattr(mode, "sample_batch", recording)
    purpose = {common.derive_seed(1, p): p for p in ("batches", "reference", "conflict")} | {2: "pretrain"}
    seqs = {}
    for method in ("mode", "seq-lora", "moe-lora"):
        drawn.clear()
        mode.main(mode.Args(**{**SMALL, "conflict_every": 1}, method=method, pretrain_cache_dir=str(tmp_path / "c"),
                            out_dir=str(tmp_path / method)))
        seqs[method] = [t for s, t in drawn if purpose[s] == "batches"]
        used = {purpose[s] for s, _ in drawn} - {"pretrain"}
        assert used == ({"batches", "reference", "conflict"} if method == "mode" else {"batches", "conflict"})
    assert len(seqs["mode"]) == SMALL["steps_per_task"] * SMALL["num_tasks"]
    for method in ("seq-lora", "moe-lora"):  # the KD batches and gradient checks draw from their own generators
        assert all(torch.equal(a, b) for a, b in zip(seqs["mode"], seqs[method], strict=True))


def test_kd_forward_leaves_the_task_dropout_stream_untouched():
    _, S = streams()
    tb, rb, states = S["gqa_train"], S["reference_train"], {}
    for method, kd_gen in (("seq-lora", None), ("mode", torch.Generator().manual_seed(0)), ("mode", None)):
        args = mode.Args(method=method)
        model, scheme = tiny_model(), mode.scheme_of(args)
        mode.add_experts(model, args, scheme)  # train mode: the experts' input dropout draws from the global RNG
        torch.manual_seed(5)
        mode.task_step_loss(model, tb, rb, scheme, args, data.MODE_IMAGE_LO, kd_gen)
        states[method, kd_gen is None] = torch.get_rng_state()
    assert torch.equal(states["mode", False], states["seq-lora", True])
    assert not torch.equal(states["mode", True], states["seq-lora", True])  # an un-forked KD forward would draw
