"""Behavioural tests for mode.py (MoDE): routing, frozen base, identity init, KD, overfitting, both evaluation
routings, non-finite metrics, end to end, results envelope, resume after SIGKILL, divergence, validation."""

import copy
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
import torch.nn.functional as F
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


def test_one_expert_class_for_both_backbones_route_from_a_holder_and_a_bfloat16_base():
    torch.manual_seed(0)
    a = mode.ExpertLinear(8, 6)
    a.add_experts(4, 8.0, 0.0, 2, True)
    with torch.no_grad():
        a.B_t.normal_(0, 0.1), a.B_v.normal_(0, 0.1)
    x, route = torch.randn(3, 5, 8), torch.randint(0, 2, (3, 5))
    b = copy.deepcopy(a)
    b.holder = mode.Route()  # the hf backbone: transformers' MLP passes only x
    b.holder.value = route
    assert torch.equal(b(x), a(x, route)) and not torch.equal(a(x, route), a.base(x))
    b.holder.value = None  # the teacher: the holder wins over a route argument
    assert torch.equal(b(x, route), a.base(x))
    c = copy.deepcopy(a)
    c.base.to(torch.bfloat16)  # experts stay float32 and compute in float32
    xb = x.bfloat16()
    delta = a(xb.float(), route) - a.base(xb.float())
    assert c.A_t.dtype == torch.float32 and torch.equal(c(xb, route), c.base(xb) + delta.bfloat16())


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
    for method in ("mode", "seq-lora", "moe-lora", "tmoe-only", "cl-moe", "model-tailor"):
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
        self.logits, self.prompts = logits, None

    def forward(self, tokens, route=None, prompt=None):
        return self.logits.expand(len(tokens), -1, -1)


class TextLover(torch.nn.Module):
    """A tiny model whose logits favour every non-image id by 50 nats; records the routes it is given."""

    def __init__(self, model, table):
        super().__init__()
        self.m, self.table, self.prompts, self.routes = model, table, None, []

    def forward(self, tokens, route=None, prompt=None):
        self.routes.append(route)
        return self.m(tokens, route, prompt) + 50.0 * (~self.table)


def test_image_sampling_forces_boi_only_when_missing_then_n_image_ids_then_eoi():
    """Anole-like ids: image codes 5..16 inside the vocabulary, <boi> 3, <eoi> 4, text ids around them."""
    table = torch.zeros(data.MODE_VOCAB, dtype=torch.bool)
    table[5:17] = True
    torch.manual_seed(0)
    model = TextLover(mode.UnifiedLM(data.MODE_VOCAB, 32, 2, 4, 64, 32), table).eval()
    scheme, special = mode.scheme_of(mode.Args()), {"boi_id": 3, "eoi_id": 4}
    text = torch.randint(17, data.MODE_VOCAB, (6, 4))
    got = []
    for prompts in (text, F.pad(text, (0, 1), value=3)):  # without <boi>, then ending with it
        codes, seq = mode.sample_image(model, prompts, 7, scheme, table, torch.Generator().manual_seed(1), special)
        assert seq.shape == (6, 4 + 1 + 7 + 1) and torch.equal(seq[:, :prompts.shape[1]], prompts)
        assert (seq[:, 4] == 3).all() and torch.equal(seq[:, 5:12], codes) and (seq[:, 12] == 4).all()
        assert codes.shape == (6, 7) and bool(table[codes].all())  # never a text id, however favoured
        got.append(codes)
    assert torch.equal(got[0], got[1]) and len(set(got[0].flatten().tolist())) > 1  # a forced <boi> = a prompted one
    assert all(bool(r.all()) for r in model.routes) and len(model.routes) == 14  # every token to the image side
    mode.sample_image(model, text, 2, scheme, table, torch.Generator(), {"boi_id": None, "eoi_id": None})
    assert model.routes[-1].shape == (6, 5)  # no special ids: nothing forced, 2 codes sampled after the prompt


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
    split = [A(method="cl-moe", moe_split_rank=True), A(moe_split_rank=True), A(text_moe=False, moe_split_rank=True),
             A(method="seq-lora", moe_split_rank=True), A(method="model-tailor", official_tailor_sign=True)]
    assert [mode.method_tag(a) for a in split] == ["cl-moe+moe-split-rank", "mode+moe-split-rank", "mode+no-text-moe",
                                                   "seq-lora", "model-tailor+official-tailor-sign"]
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
    assert r["summary"]["fwt_official_routing"] == common.forward_transfer(r["matrices"]["acc_official_routing"])
    assert r["summary"]["aia_open"] == common.average_incremental_accuracy(r["matrices"]["acc_open"])
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
    (dict(moe_split_rank=True, lora_rank=6), "--moe-split-rank"), (dict(clmoe_momentum=1.5), "--clmoe-momentum"),
    (dict(method="dualprompt", dp_e_layers=(1, 4)), "--dp-e-layers"), (dict(dp_lr=0.0), "--dp-lr"),
    (dict(tailor_keep=-0.1), "--tailor-keep"), (dict(tailor_samples=0), "--tailor-samples"),
    (dict(answers="multi", max_len=24), "--max-len"), (dict(answers="multi", eval_max_new_tokens=13), "--max-len"),
    (dict(eval_max_new_tokens=0), "--eval-max-new-tokens"), (dict(answers="multi", data_dir="somewhere"), "--answers"),
    (dict(save_samples=-1), "--save-samples"),
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
    b = tyro.cli(mode.Args, args=["--method", "dualprompt", "--dp-e-layers", "1", "3", "--answers", "multi",
                                  "--official-tailor-sign", "--moe-split-rank", "--tailor-score", "obs"])
    assert (b.method, b.dp_e_layers, b.answers, b.official_tailor_sign, b.moe_split_rank, b.tailor_score) == \
        ("dualprompt", (1, 3), "multi", True, True, "obs")
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
    purpose = {common.derive_seed(1, p): p for p in ("batches", "reference", "conflict", "tailor")} | {2: "pretrain"}
    seqs, methods = {}, ("mode", "seq-lora", "moe-lora", *mode.BASELINES)
    own = {"mode": {"reference"}, "model-tailor": {"tailor"}}
    for method in methods:
        drawn.clear()
        mode.main(mode.Args(**{**SMALL, "conflict_every": 1}, method=method, pretrain_cache_dir=str(tmp_path / "c"),
                            out_dir=str(tmp_path / method), dp_e_layers=(0,)))
        seqs[method] = [t for s, t in drawn if purpose[s] == "batches"]
        used = {purpose[s] for s, _ in drawn} - {"pretrain"}
        assert used == {"batches", "conflict"} | own.get(method, set())
    assert len(seqs["mode"]) == SMALL["steps_per_task"] * SMALL["num_tasks"]
    for method in methods[1:]:  # KD batches, gradient checks, tailoring calibration draw from their own generators
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


# ----------------------------------------------------------------------------- baselines
def baseline_model(method, seed=0, n_tasks=3, **kw):
    args = mode.Args(method=method, dp_e_layers=(1,), **kw)
    model, scheme = tiny_model(seed), mode.scheme_of(args)
    trainable = mode.add_experts(model, args, scheme, n_tasks)
    return model, scheme, args, trainable


def test_clmoe_merge_arithmetic_and_endpoints():
    model, _, _, _ = baseline_model("cl-moe")
    perturb_experts(model)
    old = mode.expert_snapshot(model)
    perturb_experts(model)
    with torch.no_grad():
        for layer in model.expert_layers():
            layer.A_t.normal_()
            layer.router.weight.normal_()
    new = mode.expert_snapshot(model)
    used_old, used_new = torch.tensor([5.0, 3.0, 0.0, 2.0]), torch.tensor([4.0, 0.0, 0.0, 6.0])  # expert 1: old only
    mode.clmoe_merge(model.expert_layers(), old, used_old, used_new, 0.7, 8)
    for layer, o, n in zip(model.expert_layers(), old, new):
        for name in ("A_t", "B_t"):
            for e in range(4):
                a = 0.3 if e == 1 else 0.7
                torch.testing.assert_close(getattr(layer, name)[e], a * o[name][e] + (1 - a) * n[name][e],
                                           atol=1e-7, rtol=0)
        assert torch.equal(layer.router.weight, n["router"])  # routers come from the new model
    for momentum, want in ((1.0, old), (0.0, new)):  # endpoints, bit for bit
        mode.clmoe_merge(model.expert_layers(), new, used_new, used_new, 1.0, 8)  # reset to `new`
        mode.clmoe_merge(model.expert_layers(), old, used_new, used_new, momentum, 8)
        assert all(torch.equal(getattr(layer, k), w[k]) for layer, w in zip(model.expert_layers(), want)
                   for k in ("A_t", "B_t"))
    assert mode.top_experts(torch.tensor([0.0, 9.0, 1.0, 5.0]), 2) == {1, 3}


def test_clmoe_usage_counts_top2_of_training_forwards_only():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0], [1.0, 2.5, -2.0, 0.0]])
    assert mode.top2_usage(torch.softmax(logits, -1)).tolist() == [2.0, 2.0, 0.0, 0.0]
    assert mode.top2_usage(torch.full((5, 4), 0.25)).tolist() == [0.0] * 4  # all tied: nothing counted
    model, _, _, _ = baseline_model("cl-moe")
    mode.before_task(model, mode.Args(method="cl-moe"), 0)
    tokens = torch.randint(0, data.MODE_IMAGE_LO, (3, 8))
    with torch.no_grad():
        for layer in model.expert_layers():
            layer.router.weight.zero_()
        model(tokens, torch.zeros_like(tokens))  # zero routers: every token tied
        assert all(layer.usage.sum() == 0 for layer in model.expert_layers())
        for layer in model.expert_layers():
            layer.router.weight.normal_()
        model.eval()
        model(tokens, torch.zeros_like(tokens))  # evaluation forwards do not count
        assert all(layer.usage.sum() == 0 for layer in model.expert_layers())
        model.train()
        model(tokens, torch.zeros_like(tokens))
    assert all(layer.usage.sum() == 2 * tokens.numel() for layer in model.expert_layers())


def test_dualprompt_prompt_isolation_and_shared_pool_init():
    _, S = streams()
    model, scheme, args, trainable = baseline_model("dualprompt", dp_lr=0.03)
    tokens, route = S["gqa_test"]["tokens"][:8], torch.zeros(8, 24, dtype=torch.long)
    model.eval()
    out = {j: model(tokens, route, torch.full((8,), j)) for j in range(3)}
    with torch.no_grad():
        model.prompts.e[1].normal_()  # changing task 1's prefix leaves outputs under prefixes 0 and 2 unchanged
    assert all(torch.equal(model(tokens, route, torch.full((8,), j)), out[j]) for j in (0, 2))
    assert not torch.equal(model(tokens, route, torch.full((8,), 1)), out[1])
    model.train()
    mode.before_task(model, args, 1)
    assert torch.equal(model.prompts.e[1], model.prompts.e[0])  # E-prefix k starts from E-prefix k-1
    before = {k: v.detach().clone() for k, v in model.prompts.named_parameters()}
    opt = torch.optim.AdamW(trainable, lr=args.dp_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        loss, _, _ = mode.task_step_loss(model, mode.sample_batch(S["gqa_train"], 8, g), None, scheme, args,
                                         data.MODE_IMAGE_LO)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = dict(model.prompts.named_parameters())
    for name, others in (("e", (0, 2)), ("keys", (0, 2))):
        assert all(torch.equal(p[name][j], before[name][j]) for j in others)
        assert not torch.equal(p[name][1], before[name][1])
    assert not torch.equal(p["g"], before["g"])


def test_dualprompt_prefixes_are_causal_and_visible_to_the_first_token():
    model, _, _, _ = baseline_model("dualprompt")
    model.eval()
    tokens = torch.randint(0, data.MODE_IMAGE_LO, (4, 12))
    route, sel = torch.zeros_like(tokens), torch.tensor([0, 1, 2, 1])
    plain = tiny_model()
    plain.eval()
    assert torch.equal(model(tokens, route), plain(tokens))  # without prefixes: the pre-trained model, bit for bit
    assert mode.prompt_for(model, tokens, torch.full((4,), 6)) is None  # before the first task (row 0)
    base = model(tokens, route, sel)
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % data.MODE_IMAGE_LO
    assert torch.equal(model(changed, route, sel)[:, :7], base[:, :7])  # prefixes precede tokens causally
    assert not torch.equal(model(changed, route, sel)[:, 7:], base[:, 7:])
    assert not torch.equal(model(tokens, route, sel)[:, 0], model(tokens, route)[:, 0])  # token 0 sees the prefix
    with torch.no_grad():
        model.prompts.e[0, 0, 1, :, :8] += 50.0  # one value slot of one head
    assert not torch.equal(model(tokens, route, sel)[0, 0], base[0, 0])
    model.prompts.seen.fill_(3)
    q_pos = torch.full((4,), 6)
    assert torch.equal(mode.prompt_for(model, tokens, q_pos), mode.prompt_for(model, changed, q_pos))
    assert torch.equal(mode.prompt_for(model, tokens[:, :7], q_pos), mode.prompt_for(model, tokens, q_pos))


def test_dualprompt_key_query_selection_picks_the_trained_task():
    _, S = streams()
    tasks = ["scienceqa", "gqa", "vizwiz"]
    model, scheme, args, _ = baseline_model("dualprompt")
    opt = torch.optim.AdamW([model.prompts.keys], lr=args.dp_lr, weight_decay=0.0)
    for k, t in enumerate(tasks):
        mode.before_task(model, args, k)
        b = S[f"{t}_train"]
        start = float(mode.pull_cosine(model, b["tokens"], mode.query_pos(b)).detach())
        for _ in range(40):  # the pull constraint alone
            loss = -mode.pull_cosine(model, b["tokens"], mode.query_pos(b))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert float(mode.pull_cosine(model, b["tokens"], mode.query_pos(b)).detach()) > start
        mode.after_task(model, args, S, k, t, {}, {}, [])
    for j, t in enumerate(tasks):
        assert mode.dp_selection_acc(model, S[f"{t}_test"], j) > 90
    ref = S["reference_test"]  # generation selects once from the prompt = the teacher-forced selection
    assert torch.equal(mode.prompt_for(model, ref["tokens"][:, :5], torch.full((64,), 4)),
                       mode.prompt_for(model, ref["tokens"], mode.query_pos(ref)))
    assert (mode.query_pos(ref) == 4).all()


def correlated_layer(seed=0, n=2048, d_in=64, d_out=32):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g) @ torch.randn(8, d_in, generator=g) + 0.3 * torch.randn(n, d_in, generator=g)
    W0 = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    return X, W0, W0 + 0.05 * torch.randn(d_out, d_in, generator=g), 2 * X.T @ X / n


def test_tailor_identity_and_patch_size():
    X, W0, Wf, H = correlated_layer(d_in=200, d_out=256)  # two blocks of columns: 128 + 72
    for score in ("official", "obs"):
        assert torch.equal(mode.tailor_linear(W0, Wf, H, 1.0, score=score), Wf)
        assert torch.equal(mode.tailor_linear(W0, Wf, H, 0.0, score=score), W0)
        W = mode.tailor_linear(W0, Wf, H, 0.1, score=score)
        for i1, i2 in ((0, 128), (128, 200)):
            share = float((W[:, i1:i2] != W0[:, i1:i2]).float().mean())
            assert 0.1 - 1 / (256 * (i2 - i1)) <= share <= 0.1


def test_tailor_compensation_sign_pinned_on_correlated_inputs():
    X, W0, Wf, H = correlated_layer()  # inputs with correlated columns, where the OBS sign matters

    def mse(sign):
        return float(((X @ (mode.tailor_linear(W0, Wf, H, 0.1, sign) - Wf).T) ** 2).mean())

    sparsegpt, none, release = mse(-1.0), mse(0.0), mse(1.0)
    assert sparsegpt < 0.9 * none and none < 0.9 * release


def test_tailor_model_keeps_base_zeroes_lora_and_applies_the_patch():
    _, S = streams()
    model, scheme, args, _ = baseline_model("model-tailor")
    base = {k: v.clone() for k, v in model.state_dict().items() if not mode.is_expert(k)}
    perturb_experts(model)
    mode.tailor_model(model, S["gqa_train"], args, 0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    for layer in model.expert_layers():
        assert not layer.B_t.any() and 0 < float((layer.patch != 0).float().mean()) <= 0.1 + 1e-9
    model.eval()
    tokens = S["gqa_test"]["tokens"]
    patched = tiny_model()
    with torch.no_grad():
        for layer, ref in zip(model.expert_layers(), patched.expert_layers()):
            ref.base.weight += layer.patch
    torch.testing.assert_close(model(tokens, torch.zeros_like(tokens)), patched(tokens), atol=1e-5, rtol=1e-5)


def test_moe_split_rank_matches_seq_lora_capacity_and_scale():
    def count(**kw):
        args = mode.Args(**kw)
        model = mode.UnifiedLM(data.MODE_VOCAB, 128, 4, 4, 256, 32)
        trainable = mode.add_experts(model, args, mode.scheme_of(args))
        experts = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "router" not in n)
        return sum(p.numel() for p in trainable), experts

    assert count(method="seq-lora") == (36864, 36864)
    assert count(method="moe-lora", moe_split_rank=True) == (45056, 36864)  # + 4 * in router weights per linear
    assert count(method="cl-moe", moe_split_rank=True) == (45056, 36864)
    assert count(method="moe-lora") == (155648, 147456) and count(moe_split_rank=True)[0] == 81920
    split = mode.ExpertLinear(16, 24)
    split.add_experts(8, 16.0, 0.0, 4, False, r_text=2)
    lora = mode.ExpertLinear(16, 24)
    lora.add_experts(8, 16.0, 0.0, 1, False)
    with torch.no_grad():
        lora.base.weight.copy_(split.base.weight)
        lora.B_t.normal_()
        split.router.weight.zero_()  # uniform 1/E mixture
        for e in range(4):
            split.A_t[e] = lora.A_t[0][:, 2 * e:2 * e + 2]
            split.B_t[e] = lora.B_t[0][2 * e:2 * e + 2]
    x = torch.randn(2, 5, 16)
    route = torch.zeros(2, 5, dtype=torch.long)
    y0 = split.base(x)
    torch.testing.assert_close(split(x, route) - y0, (lora(x, route) - y0) / 4)


def test_baselines_resume_is_bit_identical(tmp_path, monkeypatch):
    class Crash(Exception):
        pass

    original, strip = common.save_checkpoint, ("timing_s", "run_name", "args", "env")

    def crash_after_saving(*a, **kw):
        original(*a, **kw)
        raise Crash

    kw = dict(SMALL, num_tasks=3, steps_per_task=3, conflict_every=2, dp_e_layers=(0,),
              pretrain_cache_dir=str(tmp_path / "c"))
    for method in mode.BASELINES:
        ref = mode.main(mode.Args(**kw, method=method, out_dir=str(tmp_path / method)))
        run = str(tmp_path / f"{method}-killed")
        monkeypatch.setattr(common, "save_checkpoint", crash_after_saving)
        with pytest.raises(Crash):
            mode.main(mode.Args(**kw, method=method, out_dir=run))
        monkeypatch.setattr(common, "save_checkpoint", original)
        got = mode.main(mode.Args(**kw, method=method, out_dir=run, resume=run))
        assert {k: v for k, v in got.items() if k not in strip} == {k: v for k, v in ref.items() if k not in strip}
        assert got["extra"]["base_weights_unchanged"] and got["method"] == method
        assert (len(got["extra"]["clmoe_usage"] or []) == 3) == (method == "cl-moe")
        assert (got["extra"]["path_attribution"] is None) == (method == "dualprompt")
        assert (got["extra"]["dp_selection_acc"] is None) != (method == "dualprompt")


def test_clmoe_end_to_end_merges_every_task_into_the_previous_one(tmp_path, monkeypatch):
    snaps, pre, olds = [], [], []
    snapshot, merge = mode.expert_snapshot, mode.clmoe_merge

    def recording_snapshot(model):
        snaps.append(snapshot(model))
        return snaps[-1]

    def recording_merge(layers, old, *rest):
        pre.append([{k: getattr(layer, k).detach().clone() for k in ("A_t", "B_t")} for layer in layers])
        olds.append(old)
        merge(layers, old, *rest)

    monkeypatch.setattr(mode, "expert_snapshot", recording_snapshot)
    monkeypatch.setattr(mode, "clmoe_merge", recording_merge)
    res = mode.main(mode.Args(**{**SMALL, "num_tasks": 3, "steps_per_task": 3}, method="cl-moe",
                              pretrain_cache_dir=str(tmp_path / "c"), out_dir=str(tmp_path / "o")))
    usage = res["extra"]["clmoe_usage"]
    assert len(usage) == 3 and all(min(u) > 0 for u in usage)  # every expert used: 0.7 old + 0.3 new for all
    assert len(pre) == 2  # no merge after the first task
    for k in (1, 2):
        assert olds[k - 1] is snaps[k - 1]  # old = the post-merge state after the previous task
        for after, before, new in zip(snaps[k], snaps[k - 1], pre[k - 1]):
            for name in ("A_t", "B_t"):
                torch.testing.assert_close(after[name], 0.7 * before[name] + 0.3 * new[name], atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------- --answers multi
MULTI_LO, MULTI_VOCAB = data.MODE_IMAGE_LO + len(data.MODE_MULTI_WORDS), data.MODE_VOCAB + len(data.MODE_MULTI_WORDS)
EOS = data.MODE_IMAGE_LO + data.MODE_MULTI_WORDS.index("<eos>")


def test_multi_answer_world_templates_answers_and_shifts_image_codes():
    w = data.make_mode_world(0, n_pretrain=16, n_train=64, n_test=16)
    m = data.mode_multi_answer_world(w)
    word = {data.MODE_TEXT.index(x): x for x in data.MODE_TEXT} | {data.MODE_IMAGE_LO + i: x
                                                                  for i, x in enumerate(data.MODE_MULTI_WORDS)}
    for t in ("textvqa", "vizwiz", "gqa"):
        for old, new, mask in zip(w[f"{t}_train"]["tokens"], m[f"{t}_train"]["tokens"], m[f"{t}_train"]["loss_mask"]):
            ans = [word[int(a)] for a in new[mask.astype(bool)]]
            value = data.MODE_TEXT[old[21]]
            want = (["unanswerable"] if value == "unanswerable" else
                    ["it", "is", *f"{int(value):02d}"] if value in data.MODE_COUNTS else ["it", "is", value])
            assert ans == want + ["<eos>"] and mask[:21].sum() == 0 and (new[len(ans) + 21:] == 0).all()
    old, new = w["reference_test"], m["reference_test"]
    shift = np.where(old["tokens"] >= data.MODE_IMAGE_LO, len(data.MODE_MULTI_WORDS), 0)
    assert (new["tokens"] - old["tokens"] == shift).all() and (new["modality"] == old["modality"]).all()
    assert (m["gqa_test"]["modality"][:, :21] == w["gqa_test"]["modality"][:, :21]).all()
    assert (m["gqa_test"]["modality"][:, 21:] == 0).all()


class Scripted(torch.nn.Module):
    """Logits that put `script[i]` first at the i-th generated position (and an image id second)."""

    def __init__(self, script, q=21):
        super().__init__()
        self.script, self.q, self.prompts = script, q, None

    def forward(self, tokens, route=None, prompt=None):
        logits = torch.zeros(len(tokens), tokens.shape[1], MULTI_VOCAB)
        logits[:, -1, MULTI_LO] = 5.0
        logits[:, -1, self.script[min(tokens.shape[1] - self.q, len(self.script) - 1)]] = 1.0
        return logits


def test_exact_match_needs_the_eos_and_never_decodes_image_ids():
    w = data.mode_multi_answer_world(data.make_mode_world(0, n_pretrain=16, n_train=16, n_test=16))
    b = mode.to_tensors({f: w["scienceqa_test"][f][:1] for f in mode.FIELDS}, "cpu")  # `it is <colour> <eos>`
    it_is_red = b["tokens"][0, 21:24].tolist()
    scheme = mode.scheme_of(mode.Args())

    def score(script):
        return mode.exact_match(Scripted(script), b, scheme, MULTI_LO, False, EOS)

    assert score(it_is_red + [EOS]) == 100.0
    assert score(it_is_red + [it_is_red[-1]]) == 0.0  # the right value, no <eos> within the budget
    assert score(it_is_red[:2] + [EOS]) == 0.0
    assert mode.exact_match(Scripted(it_is_red + [EOS]), b, scheme, MULTI_LO, False, EOS, n=3) == 0.0  # budget
    gen = mode.greedy_decode(Scripted(it_is_red + [EOS]), b, scheme, MULTI_LO, False, 21)
    assert gen.shape == (1, mode.MAX_NEW_TOKENS) and (gen < MULTI_LO).all()  # the image id scored 5 is masked


def test_greedy_decode_equals_teacher_forcing_on_an_overfit_model(monkeypatch):
    w = data.mode_multi_answer_world(data.make_mode_world(0, n_pretrain=16, n_train=16, n_test=16))
    b = mode.to_tensors({f: np.concatenate([w[f"{t}_train"][f][:2] for t in ("textvqa", "vizwiz", "scienceqa")])
                         for f in mode.FIELDS}, "cpu")
    short = {k: F.pad(torch.cat([v[:3, :19], v[:3, 20:]], 1), (0, 1)) for k, v in b.items()}  # <sep> dropped
    b = {k: torch.cat([b[k], short[k]]) for k in b}  # two question lengths in one chunk
    torch.manual_seed(0)
    model = mode.UnifiedLM(MULTI_VOCAB, 32, 2, 4, 64, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(60):
        loss = mode.lm_loss(model(b["tokens"]), b, MULTI_LO)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    scheme = mode.scheme_of(mode.Args(method="seq-lora"))
    allowed = mode.answer_vocab(b, MULTI_VOCAB)
    assert mode.vqa_accuracy(model, b, scheme, MULTI_LO, False, allowed)[1] == 100.0
    calls, greedy_decode = [], mode.greedy_decode

    def spy(model, b, *a):
        calls.append((a[3], len(b["tokens"])))  # (question length, rows)
        return greedy_decode(model, b, *a)

    monkeypatch.setattr(mode, "greedy_decode", spy)
    assert mode.exact_match(model, b, scheme, MULTI_LO, False, EOS) == 100.0
    assert sorted(calls) == [(20, 3), (21, 6)]  # each question decodes from its own end


def test_multi_answers_end_to_end_adds_the_exact_match_matrices(tmp_path):
    res = mode.main(mode.Args(**SMALL, answers="multi", pretrain_cache_dir=str(tmp_path / "c"),
                              out_dir=str(tmp_path / "o")))
    assert set(res["matrices"]) == set(mode.MATRICES) and "answers=multi" in res["variant"]
    assert {"acc_exact", "forgetting_exact", "bwt_exact_official_routing"} <= set(res["summary"])
    assert res["matrices"]["acc_exact"] == res["matrices"]["acc_open"]  # greedy exact match = teacher-forced argmax


def test_exported_world_modality_is_derived_from_the_ids_and_a_wrong_row_is_named(tmp_path):
    d = tmp_path / "w"
    data.export_mode_world(str(d), 0, n_pretrain=16, n_train=16, n_test=16)
    meta, st = data.load_mode_dir(str(d), 32)
    assert meta["image_ids"] == list(range(data.MODE_IMAGE_LO, data.MODE_VOCAB)) and meta["boi_id"] == 3
    for name in data.MODE_STREAMS:
        derived = np.isin(st[name]["tokens"], meta["image_ids"] + [meta["boi_id"], meta["eoi_id"]])
        assert np.array_equal(derived, st[name]["modality"])
    w = dict(np.load(d / "gqa_test.npz"))
    w["modality"][7, 0] = 1
    np.savez(d / "gqa_test.npz", **w)
    with pytest.raises(data.DataError, match="gqa_test.npz: row 7: 'modality' differs"):
        data.load_mode_dir(str(d), 32)


def test_data_dir_eos_id_scores_exact_match_and_bad_ends_are_named(tmp_path):
    w = data.mode_multi_answer_world(data.make_mode_world(0, n_pretrain=32, n_train=32, n_test=16))
    d, lo, eos = tmp_path / "m", MULTI_LO, EOS
    d.mkdir()
    meta = {"vocab_size": MULTI_VOCAB, "image_token_ranges": [[lo, MULTI_VOCAB]], "tasks": ["gqa", "vizwiz"],
            "boi_id": 3, "eoi_id": 4, "pad_id": 0, "eos_id": eos}
    (d / "meta.json").write_text(json.dumps(meta))
    for name in ["pretrain", "reference_train", "reference_test", "gqa_train", "gqa_test", "vizwiz_train",
                 "vizwiz_test"]:
        np.savez(d / f"{name}.npz", **{f: w[name][f] for f in mode.FIELDS})
    res = mode.main(mode.Args(data_dir=str(d), d_model=32, n_layers=1, d_ff=64, pretrain_steps=5, steps_per_task=3,
                              n_test=16, pretrain_cache_dir=str(tmp_path / "c"), out_dir=str(tmp_path / "o"),
                              log_every=1000))
    assert "acc_exact" in res["matrices"] and len(res["matrices"]["acc_exact"]) == 3
    st = dict(np.load(d / "gqa_test.npz"))
    st["tokens"][5, st["loss_mask"][5].nonzero()[0][-1]] = 7  # the answer no longer ends with eos
    np.savez(d / "gqa_test.npz", **st)
    with pytest.raises(data.DataError, match="gqa_test.npz: row 5: the answer must end with its only eos_id"):
        data.load_mode_dir(str(d), 32)
    st["tokens"][5, st["loss_mask"][5].nonzero()[0][-1]], st["tokens"][6, 21] = eos, 0
    np.savez(d / "gqa_test.npz", **st)
    with pytest.raises(data.DataError, match="gqa_test.npz: row 6: a target token is pad_id 0"):
        data.load_mode_dir(str(d), 32)


def test_resume_of_a_run_from_before_a_flag_existed_takes_its_default(tmp_path, capsys):
    run = tmp_path / "run"
    args = mode.Args(out_dir=str(run), num_tasks=2)
    common.open_run(args, "x", "mode")
    stored = json.loads((run / "args.json").read_text())
    for new_flag in ("backbone", "eval_batch_size", "dist"):  # added after such a run started
        stored.pop(new_flag)
    (run / "args.json").write_text(json.dumps(stored))
    common.save_checkpoint(str(run), "mode", args, 1, 2, {})
    assert common._check_resume(mode.Args(out_dir=str(run), num_tasks=2, resume=str(run)), "mode")["done"] == 1
    with pytest.raises(SystemExit) as e:
        common._check_resume(mode.Args(out_dir=str(run), num_tasks=2, resume=str(run), eval_batch_size=4), "mode")
    assert e.value.code == 2 and "eval_batch_size (4 != 512)" in capsys.readouterr().err
