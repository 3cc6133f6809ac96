"""Behavioural tests for mode.py (MoDE): routing, frozen base, identity init, KD, overfitting, end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import tyro

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
    base = {k: v.clone() for k, v in model.state_dict().items() if ".A_" not in k and ".B_" not in k and "router" not in k}
    experts = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        loss, _, _ = mode.task_step_loss(model, mode.sample_batch(S["gqa_train"], 16, g),
                                         mode.sample_batch(S["reference_train"], 16, g), scheme, args, data.MODE_IMAGE_LO)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in base.items())
    assert all(not torch.equal(a, p) for a, p in zip(experts, trainable))


# ----------------------------------------------------------------------------- losses
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


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Tiny pre-training once, then MoDE, MoDE without KD and seq-lora from the same pre-trained model."""
    tmp = tmp_path_factory.mktemp("mode")
    cache = str(tmp / "cache")
    run = lambda name, **kw: mode.main(mode.Args(**{**TINY, "pretrain_cache_dir": cache, "out_dir": str(tmp / name), **kw}))
    out = {"mode": run("mode"), "nokd": run("nokd", kd=False), "seq": run("seq", method="seq-lora")}
    return tmp, cache, out


def test_end_to_end_inter_modal_forgetting(e2e):
    _, _, out = e2e
    s = {k: v["summary"] for k, v in out.items()}
    assert out["mode"]["gen_match"][0] > 0.8  # the pre-trained model generates well
    assert all(v["base_weights_unchanged"] for v in s.values())
    assert s["seq"]["gen_drop"] > 10 and s["nokd"]["gen_drop"] > 10  # shared / un-anchored adapters damage generation
    assert abs(s["mode"]["gen_drop"]) < 5 and s["mode"]["gen_drop"] < s["seq"]["gen_drop"]
    assert s["mode"]["gen_nll_increase"] < s["nokd"]["gen_nll_increase"]
    assert s["mode"]["gen_grad_norm_text_side"] == 0.0 and s["seq"]["gen_grad_norm_text_side"] > 0
    # seq-lora also forgets earlier understanding tasks: the answer type (open) and, less, the skill (closed-set)
    assert s["seq"]["forgetting_open"] > 20 and s["seq"]["forgetting"] > 5
    assert s["seq"]["forgetting_open"] > s["seq"]["forgetting"]
    R = out["seq"]["acc_matrix"]
    assert max(R[j + 1][j] for j in range(len(R[0]))) > 50  # tasks are learnt at all


def test_end_to_end_outputs_and_determinism(e2e):
    tmp, cache, out = e2e
    res = json.load(open(tmp / "mode" / "results.json"))
    assert {"acc", "bwt", "gen_drop", "grad_cos"} <= set(res["summary"])
    assert len(res["acc_matrix"]) == TINY["num_tasks"] + 1 and os.path.isfile(tmp / "mode" / "metrics.csv")
    again = mode.main(mode.Args(**{**TINY, "pretrain_cache_dir": cache, "out_dir": str(tmp / "again"), "kd": False}))
    assert again["timing"]["pretrain_s"] == 0.0  # loaded from the cache
    for key in ("acc_matrix", "gen_nll", "gen_match", "grad_conflict"):
        assert again[key] == out["nokd"][key]


def test_subprocess_smoke(e2e, tmp_path):
    _, cache, _ = e2e
    cmd = [sys.executable, "mode.py", "--d-model", "48", "--n-layers", "2", "--d-ff", "96", "--n-train", "512",
           "--n-test", "96", "--gen-samples", "96", "--pretrain-steps", "500", "--pretrain-lr", "4e-3", "--seed", "0",
           "--pretrain-cache-dir", cache, "--method", "moe-lora", "--steps-per-task", "5", "--num-tasks", "2",
           "--out-dir", str(tmp_path / "out")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "loaded pre-trained model" in p.stdout
    res = json.load(open(tmp_path / "out" / "results.json"))
    assert res["method"] == "moe-lora" and res["tasks"] == ["scienceqa", "textvqa"]
    assert [len(r) for r in res["acc_matrix"]] == [2, 2, 2] and [len(r) for r in res["acc_open_matrix"]] == [2, 2, 2]
    assert all(c >= o for rc, ro in zip(res["acc_matrix"], res["acc_open_matrix"]) for c, o in zip(rc, ro))


def test_data_dir_roundtrip_runs(tmp_path):
    w = data.make_mode_world(0, n_pretrain=64, n_train=64, n_test=32)
    d = tmp_path / "tasks"
    d.mkdir()
    json.dump({"vocab_size": data.MODE_VOCAB, "image_token_start": data.MODE_IMAGE_LO, "tasks": ["gqa", "vizwiz"]},
              open(d / "meta.json", "w"))
    for name in ["pretrain", "reference_train", "reference_test", "gqa_train", "gqa_test", "vizwiz_train", "vizwiz_test"]:
        np.savez(d / f"{name}.npz", **{f: w[name][f] for f in ("tokens", "modality", "loss_mask")})
    res = mode.main(mode.Args(data_dir=str(d), d_model=32, n_layers=1, d_ff=64, pretrain_steps=5, steps_per_task=3,
                              pretrain_cache_dir=str(tmp_path / "c"), out_dir=str(tmp_path / "o"), log_every=1000))
    assert res["tasks"] == ["gqa", "vizwiz"] and res["summary"]["gen_drop"] is None
    assert len(res["gen_nll"]) == 3 and np.isfinite(res["gen_nll"]).all()


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
    "shape mismatch": (lambda m, a: a["pretrain"].__setitem__("modality", a["pretrain"]["modality"][:, :5]), "share one"),
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


def test_bad_arguments_exit_2_before_writing(tmp_path):
    for kw in (dict(steps_per_task=0), dict(num_tasks=9), dict(data_dir=str(tmp_path / "nope"))):
        with pytest.raises(SystemExit) as e:
            mode.main(mode.Args(out_dir=str(tmp_path / "out"), **kw))
        assert e.value.code == 2 and not (tmp_path / "out").exists()


def test_tyro_parses_methods_and_ablations():
    a = tyro.cli(mode.Args, args=["--method", "seq-lora", "--no-kd", "--no-text-moe", "--seed", "3"])
    assert (a.method, a.kd, a.text_moe, a.visual_adapter, a.seed) == ("seq-lora", False, False, True, 3)
    assert mode.scheme_of(a) == dict(n_text=1, image_side=False, coupled=True, kd=False)
    assert mode.scheme_of(mode.Args(visual_adapter=False))["kd"] is False
    with pytest.raises(SystemExit) as e:
        tyro.cli(mode.Args, args=["--method", "nope"], console_outputs=False)
    assert e.value.code == 2
