"""mode.py --backbone hf on a tiny random Chameleon (transformers' own classes, CPU): wrappers on the MLP only,
identity at init and teacher bypass, routing isolation, logits vs the upstream forward, KD, gradient checkpointing,
KV-cached decoding and sampling, every method end to end, bf16, resume, local weights and meta.json ids, bad
input, and DDP / FSDP2 under torchrun (gloo)."""

import copy
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import mode

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(backbone="hf", hf_tiny_random=True, d_model=32, n_layers=2, n_heads=4, d_ff=64, lora_rank=4,
             lora_dropout=0.0)
RUN = dict(SMALL, n_train=64, n_test=16, gen_samples=8, pretrain_steps=10, steps_per_task=3, num_tasks=2,
           batch_size=8, kd_batch_size=8, log_every=1000)
LO = data.MODE_IMAGE_LO


def hf_model(method="mode", perturb=0.0, **kw):
    """A tiny random Chameleon with the method's experts (each perturbed by N(0, perturb) when asked), parallelized."""
    args = mode.Args(**(SMALL | kw), method=method)
    torch.manual_seed(0)
    model = mode.tiny_chameleon(args, data.MODE_VOCAB, LO, data.MODE_SPECIAL)
    plain = copy.deepcopy(model.hf)  # before any expert: the upstream model
    scheme = mode.scheme_of(args)
    mode.add_experts(model, args, scheme)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if perturb and p.requires_grad:
                p.add_(torch.randn_like(p) * perturb)
    mode.parallelize(model, args)
    return model, plain, args, scheme


def streams(n=32):
    w = data.make_mode_world(0, n_pretrain=n, n_train=n, n_test=n)
    return {k: mode.to_tensors({f: v[f] for f in mode.FIELDS}, "cpu") for k, v in w.items()}


def upstream_logits(hf, tokens):
    return hf.lm_head(hf.model(input_ids=tokens).last_hidden_state)


def grads(model):
    return {n: mode.full_tensor(p.grad).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def step1_grads(dist="none", gradient_checkpointing=False, one_backward=False):
    """Expert gradients of one MoDE step (task CE + KD) on perturbed experts; one_backward = the wrong variant."""
    model, _, args, scheme = hf_model(perturb=0.05, dist=dist, gradient_checkpointing=gradient_checkpointing)
    S, g = streams(), torch.Generator().manual_seed(3)
    tb, rb = mode.sample_batch(S["gqa_train"], 8, g), mode.sample_batch(S["reference_train"], 8, g)
    model.train()
    if one_backward:
        mode.task_step_loss(model, tb, rb, scheme, args, LO)[0].backward()
    else:
        mode.hf_step(model, tb, rb, scheme, args, LO)
    return grads(model)


def max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ----------------------------------------------------------------------------- model
def test_experts_wrap_exactly_the_mlp_projections():
    model, _, _, _ = hf_model()
    wrapped = {n for n, m in model.named_modules() if isinstance(m, mode.ExpertLinear)}
    assert wrapped == {f"hf.model.layers.{i}.mlp.{p}" for i in range(2) for p in mode.HF_MLP}
    assert all(".mlp." in n and not n.endswith("base") for n, p in model.named_parameters() if p.requires_grad)
    assert all(not p.requires_grad for n, p in model.named_parameters() if not mode.is_expert(n))
    assert all(len(dict(m.named_parameters())) > 1 for m in model.expert_layers())  # experts were added


def test_identity_at_init_and_teacher_bypass_equal_the_unwrapped_model():
    S = streams()
    b = S["gqa_test"]
    model, plain, _, scheme = hf_model()
    model.eval()
    with torch.no_grad():
        ref = upstream_logits(plain, b["tokens"])
        assert torch.equal(model(b["tokens"], mode.route_for(b, scheme, "task")), ref)
        assert torch.equal(model(b["tokens"], None), ref)
        model2, _, _, _ = hf_model(perturb=0.05)
        model2.eval()
        assert not torch.allclose(model2(b["tokens"], mode.route_for(b, scheme, "task")), ref)
        assert torch.equal(model2(b["tokens"], None), ref)  # teacher = experts bypassed


def test_routing_text_and_image_tokens_reach_only_their_experts():
    model, _, _, _ = hf_model(perturb=0.05)
    text, image = mode.split_params(model)
    tokens = torch.randint(0, LO, (4, 12))
    for route_value, zero_side, live_side in ((0, image, text), (1, text, image)):
        model.zero_grad()
        model(tokens, torch.full_like(tokens, route_value)).square().mean().backward()
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in zero_side)
        assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in live_side)


def test_logits_equal_upstream_except_image_ids():
    model, plain, _, _ = hf_model()
    tokens = torch.randint(0, data.MODE_VOCAB, (3, 20))
    with torch.no_grad():
        up, ours = plain(input_ids=tokens).logits, model(tokens, None)
    assert torch.equal(up[..., :LO], ours[..., :LO])
    assert bool((up[..., LO:] == torch.finfo(up.dtype).min).all()) and bool((ours[..., LO:] > -1e4).all())


def test_kd_is_zero_with_fresh_experts_and_positive_after_perturbing_the_v_adapter():
    S = streams()
    model, _, args, scheme = hf_model()
    model.eval()
    _, _, kd = mode.hf_step(model, S["gqa_train"], S["reference_train"], scheme, args, LO)
    assert kd.abs() < 1e-6
    with torch.no_grad():
        for layer in model.expert_layers():
            layer.B_v.normal_(0, 0.1)
    _, _, kd = mode.hf_step(model, S["gqa_train"], S["reference_train"], scheme, args, LO)
    assert kd > 1e-4


def test_gradient_checkpointing_keeps_the_route_fixed_per_pass():
    ref = step1_grads()
    assert max_diff(step1_grads(gradient_checkpointing=True), ref) < 1e-6
    assert max_diff(step1_grads(one_backward=True), ref) < 1e-6  # without checkpointing the order does not matter
    assert max_diff(step1_grads(gradient_checkpointing=True, one_backward=True), ref) > 1e-3  # the bug it prevents


def test_cached_greedy_decoding_equals_recomputing_the_sequence():
    model, _, _, scheme = hf_model(perturb=0.1)
    model.eval()
    b = {k: v[:6] for k, v in streams()["gqa_test"].items()}
    full, mod = b["tokens"][:, :21], b["modality"][:, :21]
    got = mode.greedy_decode(model, b, scheme, LO, False, 21, n=5)
    assert mode.kv_cache(model) is not None
    with torch.no_grad():
        for _ in range(5):
            route = torch.nn.functional.pad(mod, (0, full.shape[1] - 21))
            full = torch.cat([full, model(full, route)[:, -1, :LO].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, full[:, 21:]) and bool((got < LO).all())


class Uncached(torch.nn.Module):
    """The same model without the HFLM type: decoding recomputes the whole sequence each step."""

    def __init__(self, model):
        super().__init__()
        self.m, self.prompts = model, None

    def forward(self, *a):
        return self.m(*a)


def test_cached_image_sampling_draws_the_same_codes(monkeypatch):
    model, _, _, scheme = hf_model(perturb=0.1)
    model.eval()
    ref = streams()["reference_test"]
    probe = (ref["tokens"][:8, :5], (np.zeros(8), np.zeros(8)), -torch.log(-torch.log(torch.rand(8, 16, 12))))
    codes, read = [], data.mode_read_image

    def spy(c, world="default"):
        codes.append(c)
        return read(c, world)

    monkeypatch.setattr(data, "mode_read_image", spy)
    for m in (model, Uncached(model)):
        mode.generation_match(m, *probe, scheme, LO)
    assert np.array_equal(codes[0], codes[1]) and len(set(codes[0].flatten())) > 1


def test_cached_sampling_with_image_ids_inside_the_vocabulary_equals_recomputing():
    """The BOI/EOI state machine on Anole's layout (codes 5..16 inside the vocabulary, <boi> 3 forced, <eoi> 4)."""
    table = torch.zeros(data.MODE_VOCAB, dtype=torch.bool)
    table[5:17] = True
    args, special = mode.Args(**SMALL), {"boi_id": 3, "eoi_id": 4}
    torch.manual_seed(0)
    model, scheme = mode.tiny_chameleon(args, data.MODE_VOCAB, table, special), mode.scheme_of(args)
    mode.add_experts(model, args, scheme)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1) if p.requires_grad else None
    model.eval()
    prompts = torch.randint(17, data.MODE_VOCAB, (5, 4))
    out = [mode.sample_image(m, prompts, 9, scheme, table, torch.Generator().manual_seed(2), special)
           for m in (model, Uncached(model))]
    (codes, seq), (codes2, seq2) = out
    assert torch.equal(seq, seq2) and seq.shape == (5, 4 + 1 + 9 + 1) and (seq[:, 4] == 3).all()
    assert (seq[:, -1] == 4).all() and bool(table[codes].all()) and len(set(codes.flatten().tolist())) > 1


def test_ddp_evaluation_takes_every_rank_s_own_rows_and_fsdp_all_rows():
    model, _, _, _ = hf_model()
    rows = {"tokens": torch.arange(10), "colour": torch.arange(10) * 2}
    model.dist = mode.Dist("ddp", 1, 4, None)
    assert mode.eval_rows(rows, model)["colour"].tolist() == [2, 10, 18]
    assert mode.eval_rows({"tokens": torch.arange(3)}, model)["tokens"].tolist() == [0, 1, 2]  # fewer than W rows
    model.dist = mode.Dist("fsdp", 1, 4, None)
    assert mode.eval_rows(rows, model) is rows and mode.rank_mean(0.25, 3) == 0.25  # one process: as it is


def test_image_id_table_gives_the_same_losses_as_the_first_image_id():
    S = streams()
    b, z = S["reference_test"], torch.randn(32, 24, data.MODE_VOCAB)
    table = torch.arange(data.MODE_VOCAB) >= LO
    assert torch.equal(mode.lm_loss(z, b, LO), mode.lm_loss(z, b, table))
    z2 = z + torch.randn_like(z)
    assert torch.equal(mode.kd_loss(z2, z, b, LO, 2.0), mode.kd_loss(z2, z, b, table, 2.0))


# ----------------------------------------------------------------------------- end to end, bad input
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.mark.parametrize("method", ["mode", "seq-lora", "moe-lora", "tmoe-only", "cl-moe", "model-tailor"])
def test_every_method_end_to_end(tmp_path, cache, method):
    res = mode.main(mode.Args(**RUN, method=method, pretrain_cache_dir=cache, out_dir=str(tmp_path / "o")))
    assert res["backbone"] == "hf-tiny-random" and res["extra"]["base_weights_unchanged"] is True
    assert (tmp_path / "o" / "results.json").exists() and len(res["matrices"]["acc"]) == 3


def test_bfloat16_checkpointing_and_multi_answers_end_to_end(tmp_path, cache, monkeypatch):
    seen, budgets, parallelize, next_logits = [], [], mode.parallelize, mode.next_logits

    def spy(model, args):
        seen.append(model)
        parallelize(model, args)

    def cache_spy(model, seq, route, prompt=None, cache=None):
        budgets.append((seq.shape[1], cache.get_seq_length()))
        return next_logits(model, seq, route, prompt, cache)

    monkeypatch.setattr(mode, "parallelize", spy)
    monkeypatch.setattr(mode, "next_logits", cache_spy)
    res = mode.main(mode.Args(**RUN, dtype="bfloat16", gradient_checkpointing=True, answers="multi",
                              eval_max_new_tokens=5, pretrain_cache_dir=cache, out_dir=str(tmp_path / "o"),
                              save_model=True))
    assert max(n for n, _ in budgets) == 21 + 4  # --eval-max-new-tokens 5: the question, then 4 tokens fed back
    assert all(seen in (0, n - 1) for n, seen in budgets) and any(seen for _, seen in budgets)  # one new token a step
    assert res["extra"]["base_weights_unchanged"] is True and "acc_exact" in res["matrices"]
    dtypes = {n: p.dtype for n, p in seen[0].named_parameters()}
    assert {d for n, d in dtypes.items() if not mode.is_expert(n)} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if mode.is_expert(n)} == {torch.float32}
    assert seen[0].hf.model.gradient_checkpointing and mode.hf_dtype(mode.Args(), "cpu") == torch.float32
    state = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["model"]
    assert state and all(mode.is_expert(k) and v.dtype == torch.float32 for k, v in state.items())
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if ".B_" in k)  # the experts trained


def test_eval_batch_size_bounds_every_evaluation_forward(tmp_path, cache, monkeypatch):
    sizes, run = [], mode.run

    def spy(model, batch, route):
        sizes.append(len(batch["tokens"]))
        return run(model, batch, route)

    monkeypatch.setattr(mode, "run", spy)  # the hf training step does not go through run
    mode.main(mode.Args(**RUN, eval_batch_size=5, conflict_every=0, pretrain_cache_dir=cache,
                        out_dir=str(tmp_path / "o")))
    assert max(sizes) == 5 and 1 in sizes  # 16 test rows: 5 + 5 + 5 + 1


BAD = [(dict(method="dualprompt", dp_e_layers=(1,)), "--method"), (dict(hf_tiny_random=False), "--hf-model"),
       (dict(hf_tiny_random=False, hf_model="/nonexistent/anole"), "--hf-model"),
       (dict(gradient_checkpointing=True, method="cl-moe"), "--gradient-checkpointing"),
       (dict(dist="ddp"), "--dist"), (dict(backbone="tiny"), "--hf-tiny-random")]


@pytest.mark.parametrize("overrides,flag", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_hf_arguments_exit_2_before_writing(tmp_path, capsys, overrides, flag):
    with pytest.raises(SystemExit) as e:
        mode.main(mode.Args(**(RUN | overrides), out_dir=str(tmp_path / "o"), pretrain_cache_dir=str(tmp_path / "c")))
    assert e.value.code == 2 and f"error: {flag}: " in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_fsdp_without_the_public_fully_shard_exits_2_with_the_reason(tmp_path, capsys, monkeypatch):
    import torch.distributed.fsdp as fsdp  # torch < 2.6 has it under torch.distributed._composable only

    assert transformers.ChameleonForConditionalGeneration  # its lazy import needs fully_shard: done before
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delattr(fsdp, "fully_shard")
    with pytest.raises(SystemExit) as e:
        mode.main(mode.Args(**RUN, dist="fsdp", conflict_every=0, out_dir=str(tmp_path / "o")))
    assert e.value.code == 2 and "error: --dist: fsdp needs torch.distributed.fsdp" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


TORCHRUN_BAD = [(dict(method="cl-moe", dist="fsdp", conflict_every=0), "--method"),
                (dict(method="model-tailor", dist="fsdp", conflict_every=0), "--method"),
                (dict(dist="fsdp"), "--conflict-every"), (dict(batch_size=7), "--batch-size"),
                (dict(backbone="tiny"), "--dist")]


@pytest.mark.parametrize("overrides,flag", TORCHRUN_BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(TORCHRUN_BAD)])
def test_under_torchrun_bad_combinations_exit_2(tmp_path, capsys, monkeypatch, overrides, flag):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    kw = RUN | {"hf_tiny_random": overrides.get("backbone", "hf") == "hf"} | overrides
    with pytest.raises(SystemExit) as e:
        mode.main(mode.Args(**kw, out_dir=str(tmp_path / "o")))
    assert e.value.code == 2 and f"error: {flag}: " in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_without_transformers_hf_exits_2_with_the_pip_command(tmp_path):
    code = ("import sys; sys.modules['transformers'] = None; import mode, tyro; "
            "mode.validate(mode.Args()); print('tiny ok'); mode.main(tyro.cli(mode.Args))")
    p = subprocess.run([sys.executable, "-c", code, "--backbone", "hf", "--hf-tiny-random", "--out-dir",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and 'pip install "transformers>=4.43"' in p.stderr and not (tmp_path / "o").exists()
    assert "tiny ok" in p.stdout  # the tiny backbone never imports transformers


# ----------------------------------------------------------------------------- distributed (torchrun, gloo)
WORKER = """
import os, sys
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
import torch, torch.distributed as dist, tyro
import mode, test_mode_hf as t
torch.set_num_threads(1)
rank, kind = os.environ["RANK"], sys.argv[1]
dist.init_process_group("gloo")
g = t.step1_grads(kind)
if rank == "0":
    torch.save(g, "grads.pt")
os.makedirs("rank" + rank)
os.chdir("rank" + rank)
mode.main(tyro.cli(mode.Args, args=sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_args(cache: str):
    return dict(RUN, num_tasks=1, conflict_every=0, pretrain_cache_dir=cache, save_model=True)


def cli(kw: dict):
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


DIST_CASES = [("ddp", dict(save_samples=2)), ("fsdp", dict(dtype="bfloat16", gradient_checkpointing=True)),
              ("ddp", dict(method="cl-moe", num_tasks=2))]  # cl-moe: usage counts summed over ranks, then merged


@pytest.mark.parametrize("kind,extra", DIST_CASES, ids=["ddp", "fsdp-bf16-checkpointing", "ddp-cl-moe"])
def test_two_ranks_equal_one_process_and_only_rank_0_writes(tmp_path, cache, kind, extra):
    single = tmp_path / "single"
    mode.main(mode.Args(**(dist_args(cache) | extra), out_dir=str(single)))
    (tmp_path / "worker.py").write_text(WORKER.format(root=ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "worker.py", kind] + cli(dist_args("cache") | extra | {"dist": kind, "out_dir": "out"})  # pre-trains
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    g = max_diff(torch.load(tmp_path / "grads.pt"), step1_grads())
    last = f"model_after_{data.MODE_TASKS[(dist_args(cache) | extra)['num_tasks'] - 1]}.pt"
    w = max_diff(torch.load(tmp_path / "rank0" / "out" / last)["model"], torch.load(single / last)["model"])
    print(f"{kind} {extra}: step-1 gradients max abs diff {g:.3g}, experts after 3 AdamW steps a task {w:.3g}")
    assert g < 1e-6 and w < 1e-4  # decisions M1
    one, two = (json.loads((d / "results.json").read_text()) for d in (single, tmp_path / "rank0" / "out"))
    assert two["matrices"] == one["matrices"]  # ddp: each rank scores its rows, then the means are reduced
    assert two["extra"]["clmoe_usage"] == one["extra"]["clmoe_usage"]  # None but for cl-moe
    assert max(abs(a - b) for a, b in zip(two["extra"]["gen_nll"], one["extra"]["gen_nll"])) < 1e-4
    assert (tmp_path / "rank0" / "out" / "results.json").exists() and os.listdir(tmp_path / "rank0" / "cache")
    assert not os.listdir(tmp_path / "rank1")  # no run dir, no pre-training cache
    if "save_samples" in extra:  # every rank samples every prompt; rank 0 writes
        for d in (single, tmp_path / "rank0" / "out"):
            assert np.load(d / "samples_pretrained.npz")["codes"].shape == (2, 16)
        assert np.array_equal(*(np.load(d / f"samples_after_{data.MODE_TASKS[0]}.npz")["codes"]
                                for d in (single, tmp_path / "rank0" / "out")))


# ----------------------------------------------------------------------------- local weights, --data-dir ids
def test_local_weights_and_exported_world_run_and_a_wrong_vocabulary_exits_2(tmp_path, capsys):
    args = mode.Args(**SMALL)
    torch.manual_seed(0)
    mode.tiny_chameleon(args, data.MODE_VOCAB, LO, data.MODE_SPECIAL).hf.save_pretrained(tmp_path / "w")
    data.export_mode_world(str(tmp_path / "d"), 0, n_pretrain=16, n_train=32, n_test=16)
    kw = dict(RUN, hf_tiny_random=False, hf_model=str(tmp_path / "w"), data_dir=str(tmp_path / "d"), num_tasks=1)
    res = mode.main(mode.Args(**kw, out_dir=str(tmp_path / "o"), pretrain_cache_dir=str(tmp_path / "c")))
    assert res["backbone"] == "hf-w" and res["extra"]["base_weights_unchanged"] is True
    assert res["timing_s"]["pretrain"] == 0.0 and not (tmp_path / "c").exists()  # real weights: no pre-training
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("boi_id", "eoi_id")}  # no modality check: ids only
    json.dump(meta | {"image_token_start": LO + 1, "image_token_ranges": [[LO + 1, data.MODE_VOCAB]]},
              open(tmp_path / "d" / "meta.json", "w"))
    with pytest.raises(SystemExit) as e:
        mode.main(mode.Args(**kw, out_dir=str(tmp_path / "o2")))
    assert e.value.code == 2 and "error: --data-dir: meta.json image ids" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, cache, monkeypatch):
    class Crash(Exception):
        pass

    original, strip = mode.common.save_checkpoint, ("timing_s", "run_name", "args", "env")

    def crash_after_saving(*a, **kw):
        original(*a, **kw)
        raise Crash

    kw = dict(RUN, conflict_every=2, pretrain_cache_dir=cache)
    ref = mode.main(mode.Args(**kw, out_dir=str(tmp_path / "ref")))
    run = str(tmp_path / "killed")
    monkeypatch.setattr(mode.common, "save_checkpoint", crash_after_saving)
    with pytest.raises(Crash):
        mode.main(mode.Args(**kw, out_dir=run))
    monkeypatch.setattr(mode.common, "save_checkpoint", original)
    state = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["model"]
    assert state and all(mode.is_expert(k) for k in state)  # the hf checkpoint holds the experts only
    got = mode.main(mode.Args(**kw, out_dir=run, resume=run))
    assert {k: v for k, v in got.items() if k not in strip} == {k: v for k, v in ref.items() if k not in strip}


@pytest.mark.parametrize("backbone", ["tiny", "hf"])
def test_image_codes_inside_the_vocabulary_run_end_to_end(tmp_path, capsys, backbone):
    """Anole's layout: image codes in the middle of the vocabulary (here ids 5..16), text ids around them; with
    --save-samples the sampled codes are written after every row (and must fit --max-len)."""
    data.export_mode_world(str(tmp_path / "d"), 0, n_pretrain=32, n_train=32, n_test=16)
    old = np.arange(data.MODE_VOCAB)
    new = np.where(old < 5, old, np.where(old >= LO, old - LO + 5, old + data.MODE_VOCAB - LO))
    for f in (tmp_path / "d").glob("*.npz"):
        st = dict(np.load(f))
        np.savez(f, **(st | {"tokens": new[st["tokens"]]}))
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    meta = {k: v for k, v in meta.items() if k != "image_token_start"} | {"image_token_ranges": [[5, 17]]}
    n_codes = 16 if backbone == "tiny" else 5  # the reference images' codes, or meta.json's image_seq_len
    meta |= {"image_seq_len": 5} if backbone == "hf" else {}
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    kw = RUN if backbone == "hf" else {k: v for k, v in RUN.items() if k not in ("backbone", "hf_tiny_random")}
    res = mode.main(mode.Args(**(kw | dict(num_tasks=1)), data_dir=str(tmp_path / "d"), save_samples=3,
                              pretrain_cache_dir=str(tmp_path / "c"), out_dir=str(tmp_path / "o")))
    assert np.isfinite(res["extra"]["gen_nll"]).all() and res["extra"]["base_weights_unchanged"] is True
    assert res["extra"]["gen_nll"][0] < 3.0  # ~ ln 12 = 2.48 over the 12 image ids, not ln 52 = 3.95 over all
    for label in ("pretrained", f"after_{data.MODE_TASKS[0]}"):
        codes = np.load(tmp_path / "o" / f"samples_{label}.npz")["codes"]
        assert codes.dtype == np.int32 and codes.shape == (3, n_codes) and ((codes >= 5) & (codes < 17)).all()
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta | {"image_seq_len": 27}))  # 5 + 27 + <eoi> > 32
    with pytest.raises(SystemExit) as e:
        mode.main(mode.Args(**kw, data_dir=str(tmp_path / "d"), save_samples=3, out_dir=str(tmp_path / "o2"),
                            pretrain_cache_dir=str(tmp_path / "c2")))
    assert e.value.code == 2 and "error: --save-samples: " in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "c2").exists()
