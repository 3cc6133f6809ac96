"""DNS: Dual-side Null-space gradient projection for continual multimodal contrastive learning.

Paper: Liu, Xia, Ng, Chua. "Continual Multimodal Contrastive Learning", NeurIPS 2025, arXiv 2503.14963.
Official code: github.com/Xiaohao-Liu/CMCL (read, not copied; spec in shared/specs/dns.md).

Idea. A frozen modality-binding backbone (ImageBind / LanguageBind / UniBind) gives pre-extracted features;
one trainable Linear per modality (identity init) is aligned with a contrastive loss, one modality pair per
step, over 11 steps. Training pair (A, B) changes the old alignment scores (W_A x_A)^T (W_B x_B) of earlier
steps. DNS keeps them (to first order) by projecting each weight gradient on both sides:
    dW_m = G_m - P_out[m] G_m P_in[m]                                            # Eq. (DNS), Thm. 4
P_in[m] projects onto the span of m's old *input* features, P_out[m] onto the span of the old *projected
features of m's partners*. Both come from uncentered second moments accumulated at the end of each step
(no data replay). P_in is truncated at the paper's absolute eigenvalue threshold lambda_min (the
null-space approximation); P_out keeps the numerical span of the old partner features by default
(--lambda-out sets an absolute threshold; see README for why and what lambda_min there costs). Then for old pairs
(W_B x_B)^T dW_A x_A = 0, so the first-order change of every old score vanishes; only the O(eta^2) cross
term (and AdamW's per-coordinate rescaling, weight decay and the unprojected bias) remain.

Usage:
    python dns.py --backbone languagebind                  # 11 steps on the built-in synthetic benchmark
    python dns.py --backbone imagebind --method vanilla    # same loop, no projection
    python dns.py --data-dir feats/ --steps ucf101:text-video esc50:text-audio
    python dns.py --official-one-sided --official-cov-bug  # the official code's behaviour (spec 3.4, 8.1)
    python dns.py --bench-scale 1.0                        # paper-sized synthetic data (timing)

Metrics. R[k][j] = score on step j's test split after step k (k = 0 is the untrained backbone, entry j is
trained at step j+1, T = #steps). Acc entries: datasets with labels whose pair contains text (zero-shot,
class-name prototypes through the text linear, argmax of dot products over all classes). Recall entries:
all others but UCF101 (as in the official code), R@K averaged over A->B and B->A and over 5 seeded random
subsets of <= 1000 test pairs; ties count in expectation under random tie-breaking (common.recall_at_k).
    Acc     = mean_{j in Acc} R_acc[T][j]
    BWT_A   = mean_{j in Acc, j < T-1} (R_acc[T][j] - R_acc[j+1][j])
    R@K     = mean_{j in Recall} R_K[T][j]
    BWT_R10 = mean_{j in Recall, j < T-1} (R_10[T][j] - R_10[j+1][j])
All in percent; task-weighted (each entry counts once).

Equation markers name the equations (Eq. (DNS), Eq. (InfoNCE), ...): the paper text available here is a
summary without equation numbers. Where the official code and the paper differ, flags expose the code.
"""

import os
import time
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import common
import data


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (controls data, init, shuffling, evaluation subsets)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases (imported lazily)"""
    wandb_project_name: str = "continual-multimodal"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """whether to save the model (and method state) to `runs/{run_name}` after every step"""
    out_dir: Optional[str] = None
    """output directory (default: runs/{run_name})"""
    num_threads: int = 1
    """torch intra-op CPU threads (0 = torch default)"""

    # Benchmark arguments
    backbone: Literal["imagebind", "languagebind", "unibind"] = "imagebind"
    """frozen backbone whose features are used (sets dim, feature scales and the default lambda_min)"""
    data_dir: Optional[str] = None
    """folder of real features `{dataset}_{train,test}.npz`; default: the built-in synthetic benchmark"""
    steps: Optional[List[str]] = None
    """training steps `dataset:modA-modB` in order (default: the paper's 11 steps)"""
    bench_scale: float = 0.1
    """built-in benchmark size relative to the real datasets (1.0 = paper-sized train/test splits)"""
    embed_dim: Optional[int] = None
    """shared embedding dim D (default: the largest feature dim)"""
    epochs: int = 5
    """epochs per step"""
    batch_size: int = 64
    """training batch size"""
    eval_batch_size: int = 4096
    """batch size for projecting test features"""

    # Algorithm specific arguments
    method: Literal["dns", "vanilla"] = "dns"
    """dns = dual-side null-space projection; vanilla = sequential fine-tuning with the same loop"""
    lr: float = 1e-4
    """AdamW learning rate (paper: 1e-4; the official code forces 1e-3 for LanguageBind)"""
    weight_decay: float = 1e-3
    """AdamW weight decay, on weights only"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip, applied before the projection"""
    temperature: float = 1.0
    """contrastive temperature (the official code uses 1: the feature norms set the sharpness)"""
    lambda_min: Optional[float] = None
    """absolute eigenvalue threshold of the projectors (default: paper, 0.01 ImageBind/UniBind, 1e-4 LanguageBind)"""
    lambda_out: Optional[float] = None
    """absolute threshold of the left (partner-output) projector (default: its numerical span, see SPAN_RTOL)"""
    official_one_sided: bool = False
    """official code: left projector = identity once a modality is seen (threshold 0 keeps every direction)"""
    official_cov_bug: bool = False
    """official code: accumulate covariances from the dataset's first two modalities, not the pair's (spec 8.1)"""
    retrieval_subsets: int = 5
    """random test subsets per retrieval evaluation"""
    retrieval_subset_size: int = 1000
    """pairs per retrieval subset (whole split when smaller)"""


PAPER_LAMBDA_MIN = {"imagebind": 1e-2, "languagebind": 1e-4, "unibind": 1e-2}
SPAN_RTOL = 1e-6  # default left projector: eigenvalues > SPAN_RTOL * largest = the span of old partner features


# ----------------------------------------------------------------------------- helpers
def load_benchmark(args: Args):
    """(steps, datasets) from --data-dir or the built-in benchmark; raises data.DataError on bad input."""
    steps = data.parse_dns_steps(args.steps if args.steps else data.DNS_PAPER_STEPS)
    if args.data_dir:
        return steps, data.load_dns_features(args.data_dir, steps)
    for ds, a, b in steps:
        if ds in data.DNS_DATASETS and not {a, b} <= set(data.DNS_DATASETS[ds][0]):
            raise data.DataError(f"--steps: built-in dataset '{ds}' has modalities {data.DNS_DATASETS[ds][0]}, not {a}-{b}")
    return steps, data.make_dns_benchmark(args.backbone, steps, seed=args.seed, scale=args.bench_scale)


def to_torch(datasets: Dict[str, dict], device) -> Dict[str, dict]:
    conv = lambda a: None if a is None else torch.as_tensor(a, device=device)
    return {ds: {sp: {"feats": {m: conv(a) for m, a in s["feats"].items()}, "label": conv(s["label"]),
                      "class_text": conv(s["class_text"])} for sp, s in v.items()} for ds, v in datasets.items()}


def linear_init(d_in: int, d_out: int, gen: torch.Generator) -> nn.Linear:
    """Linear(d_in, d_out) with bias 0 and identity weight (seeded orthogonal when d_in != d_out)."""
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        if d_in == d_out:
            lin.weight.copy_(torch.eye(d_out))
        else:
            q, _ = torch.linalg.qr(torch.randn(max(d_in, d_out), min(d_in, d_out), generator=gen))
            lin.weight.copy_(q if d_out > d_in else q.T)
        lin.bias.zero_()
    return lin


# ----------------------------------------------------------------------------- model and loss
def build_model(dims: Dict[str, int], embed_dim: int, gen: torch.Generator) -> nn.ModuleDict:
    """One trainable Linear(d_m, D) per modality; no normalisation anywhere (spec 2.1)."""
    return nn.ModuleDict({m: linear_init(d, embed_dim, gen) for m, d in dims.items()})


def contrastive_loss(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE A->B on raw dot products: CE(Z_A Z_B^T / tau, diagonal) (one direction, as in the official code)."""
    logits = za @ zb.T / temperature  # Eq. (InfoNCE)
    return F.cross_entropy(logits, torch.arange(len(za), device=za.device))


# ----------------------------------------------------------------------------- DNS: statistics, projectors, projection
@dataclass
class DNSState:
    """Per-modality uncentered second moments of own inputs (c_in) and of partners' projected features (c_out);
    a modality is 'seen' (spec 3.2) once it has a c_in entry."""

    c_in: Dict[str, torch.Tensor]
    c_out: Dict[str, torch.Tensor]
    n_bar: int = 0


def update_covariance(state: DNSState, xa, xb, wa, wb, a: str, b: str) -> None:
    """End of step (spec 3.3): running uncentered moments with the global sample count n_bar, float64."""
    xa, xb, wa, wb = xa.double(), xb.double(), wa.double(), wb.double()
    n_new = state.n_bar + len(xa)
    keep = state.n_bar / n_new
    sa, sb = xa.T @ xa / n_new, xb.T @ xb / n_new
    for m, s_own, w_partner, s_partner in ((a, sa, wb, sb), (b, sb, wa, sa)):
        d_in, d_out = s_own.shape[0], w_partner.shape[0]
        # Eq. (recursive uncentered covariance): C <- C * n_bar / n_new + X^T X / n_new
        state.c_in[m] = state.c_in.get(m, torch.zeros(d_in, d_in, dtype=torch.float64, device=xa.device)) * keep + s_own
        c_prev = state.c_out.get(m, torch.zeros(d_out, d_out, dtype=torch.float64, device=xa.device))
        state.c_out[m] = c_prev * keep + w_partner @ s_partner @ w_partner.T  # partner's projected features
    state.n_bar = n_new


def make_projector(c: torch.Tensor, threshold: Optional[float]):
    """P = U_k U_k^T over the eigenvectors of PSD c (float64 eigh) with eigenvalue > threshold
    (threshold None: > SPAN_RTOL * the largest eigenvalue, i.e. the numerical span of c).

    Stored as (basis, False), or as (basis of the complement, True) when that is smaller, so applying
    P costs O(d^2 min(k, d-k)) instead of O(d^3).
    """
    evals, evecs = torch.linalg.eigh(c)
    if threshold is None:
        threshold = SPAN_RTOL * float(evals[-1].clamp_min(0))
    keep = evals > threshold  # Eq. (truncated SVD): keep eigenvalues > lambda_min
    return (evecs[:, keep].float(), False) if 2 * int(keep.sum()) <= len(keep) else (evecs[:, ~keep].float(), True)


def right_mul(x: torch.Tensor, p) -> torch.Tensor:
    """x P."""
    u, complement = p
    xp = (x @ u) @ u.T
    return x - xp if complement else xp


def left_mul(p, x: torch.Tensor) -> torch.Tensor:
    """P x."""
    u, complement = p
    px = u @ (u.T @ x)
    return x - px if complement else px


def build_projectors(state: DNSState, m: str, lam_in: float, lam_out: Optional[float], one_sided: bool):
    """Start of step (spec 3.4): (P_out or None = identity, P_in); None if m was never seen (no projection)."""
    if m not in state.c_in:  # never seen
        return None
    p_out = None if one_sided else make_projector(state.c_out[m], lam_out)
    return p_out, make_projector(state.c_in[m], lam_in)


def project_gradient(g: torch.Tensor, proj) -> torch.Tensor:
    """Eq. (DNS): G - P_out G P_in (P_out = I under the official one-sided behaviour). Reference form."""
    if proj is None:
        return g
    p_out, p_in = proj
    g_in = right_mul(g, p_in)
    return g - (g_in if p_out is None else left_mul(p_out, g_in))


def project_gradient_factored(g: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, coef: float, proj) -> torch.Tensor:
    """Eq. (DNS) for a Linear, whose weight gradient is G = coef * Delta^T X (Delta = dL/dz, coef = the clip factor):
    G - coef * (P_out Delta^T)(X P_in). Same value as project_gradient(g, proj), O(B d^2) instead of O(d^3)."""
    if proj is None:
        return g
    p_out, p_in = proj
    left = delta.T if p_out is None else left_mul(p_out, delta.T)
    return g - coef * left @ right_mul(x, p_in)


# ----------------------------------------------------------------------------- one continual step
def train_step(model: nn.ModuleDict, a: str, b: str, xa, xb, proj: dict, args: Args, gen, proj_sw) -> List[float]:
    """Train the pair's two linears for args.epochs with a fresh AdamW + linear decay; project weight grads (DNS)."""
    params = list(model[a].parameters()) + list(model[b].parameters())  # others keep grad None: no update, no decay
    opt = torch.optim.AdamW([{"params": [model[a].weight, model[b].weight], "weight_decay": args.weight_decay},
                             {"params": [model[a].bias, model[b].bias], "weight_decay": 0.0}], lr=args.lr)
    n_updates = args.epochs * ((len(xa) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / n_updates)  # linear decay to 0
    losses = []
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(xa), generator=gen).to(xa.device).split(args.batch_size):
            x = {a: xa[idx], b: xb[idx]}
            z = {a: model[a](x[a]), b: model[b](x[b])}
            loss = contrastive_loss(z[a], z[b], args.temperature)  # a regulariser or replay term would be added here
            opt.zero_grad(set_to_none=True)
            projected = [m for m in (a, b) if proj.get(m) is not None]
            for m in projected:
                z[m].retain_grad()  # Delta = dL/dz, the factor of the weight gradient
            loss.backward()
            norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            coef = min(1.0, args.max_grad_norm / (float(norm) + 1e-6))  # the factor clipping applied
            with proj_sw:  # METHOD LOGIC: Eq. (DNS) on weight gradients, after clipping, before AdamW
                for m in projected:
                    w = model[m].weight
                    w.grad = project_gradient_factored(w.grad, z[m].grad, x[m], coef, proj[m])
            opt.step()
            sched.step()
            losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed(lin: nn.Linear, x: torch.Tensor, bs: int) -> torch.Tensor:
    return torch.cat([lin(x[i : i + bs]) for i in range(0, len(x), bs)])


@torch.no_grad()
def evaluate_entry(model, split, a: str, b: str, has_recall: bool, args: Args, entry_seed: int) -> dict:
    """Zero-shot Acc (if labels, class_text and text in the pair) and R@1/5/10 both directions (if has_recall)."""
    out = {}
    za, zb = embed(model[a], split["feats"][a], args.eval_batch_size), embed(model[b], split["feats"][b], args.eval_batch_size)
    if "text" in (a, b) and split["label"] is not None and split["class_text"] is not None:
        query = zb if a == "text" else za
        protos = model["text"](split["class_text"])
        out["acc"] = float((torch.argmax(query @ protos.T, 1) == split["label"]).float().mean() * 100)
    if has_recall:
        n, size = len(za), min(args.retrieval_subset_size, len(za))
        gen = torch.Generator().manual_seed(entry_seed)
        draws = [torch.randperm(n, generator=gen)[:size] for _ in range(args.retrieval_subsets if n > size else 1)]
        scores = [za[i] @ zb[i].T for i in draws]
        ab = np.mean([common.recall_at_k(s) for s in scores], 0)
        ba = np.mean([common.recall_at_k(s.T) for s in scores], 0)
        out["r_ab"], out["r_ba"] = ab.tolist(), ba.tolist()
    return out


def evaluate(model, steps, datasets, args: Args) -> List[dict]:
    """Every step's test split with the current model (one row of the result matrices)."""
    return [evaluate_entry(model, datasets[ds]["test"], a, b, ds not in data.DNS_ACC_ONLY, args, args.seed * 1000 + j)
            for j, (ds, a, b) in enumerate(steps)]


def fill_row(mats: Dict[str, list], k: int, row: List[dict]) -> None:
    for j, e in enumerate(row):
        mats["acc"][k][j] = e.get("acc")
        for i, key in enumerate(("r1", "r5", "r10")):
            mats[key][k][j] = (e["r_ab"][i] + e["r_ba"][i]) / 2 if "r_ab" in e else None
            mats[key + "_ab"][k][j] = e["r_ab"][i] if "r_ab" in e else None
            mats[key + "_ba"][k][j] = e["r_ba"][i] if "r_ab" in e else None


def summarize(mats: Dict[str, list]) -> Dict[str, Optional[float]]:
    """The paper's table columns (module docstring): Acc, BWT_A, R@1, R@5, R@10, BWT_R10."""
    return {"acc": common.final_average(mats["acc"]), "bwt_acc": common.backward_transfer(mats["acc"]),
            "r1": common.final_average(mats["r1"]), "r5": common.final_average(mats["r5"]),
            "r10": common.final_average(mats["r10"]), "bwt_r10": common.backward_transfer(mats["r10"])}


# ----------------------------------------------------------------------------- main: the continual loop
def main(args: Args) -> dict:
    # TRY NOT TO MODIFY: seeding, device, data (validated before anything is written)
    gen = common.seed_everything(args.seed, args.torch_deterministic)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = common.pick_device(args.cuda)
    if args.data_dir is None:
        print(f"Using the built-in synthetic benchmark ({args.backbone}-like features, scale {args.bench_scale}); "
              "pass --data-dir with {dataset}_{train,test}.npz files for real features.")
    try:
        steps, raw = load_benchmark(args)
    except data.DataError as e:
        common.die(str(e))
    datasets = to_torch(raw, device)
    dims = {m: a.shape[1] for v in datasets.values() for s in v.values() for m, a in s["feats"].items()}
    model = build_model(dims, args.embed_dim or max(dims.values()), gen).to(device)
    lam_in = args.lambda_min if args.lambda_min is not None else PAPER_LAMBDA_MIN[args.backbone]
    lam_out = args.lambda_out  # None: the numerical span of the old partner features (the paper's P~)
    names = [f"{ds}({a}-{b})" for ds, a, b in steps]
    run_name = f"{args.backbone}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = common.make_run_dir(args, run_name)
    tracker = common.maybe_tracker(args, run_name)

    T = len(steps)
    keys = ["acc"] + [k + s for k in ("r1", "r5", "r10") for s in ("", "_ab", "_ba")]
    mats = {k: [[None] * T for _ in range(T + 1)] for k in keys}
    fill_row(mats, 0, evaluate(model, steps, datasets, args))  # row 0: the frozen backbone (identity projections)
    state = DNSState({}, {})
    times = {"train": [], "projection": [], "eval": []}
    for t, (ds, a, b) in enumerate(steps):
        t0, proj_sw = time.perf_counter(), common.Stopwatch()
        train = datasets[ds]["train"]["feats"]
        xa, xb = train[a], train[b]
        # METHOD LOGIC: projectors rebuilt at the start of the step, fixed during it (spec 3.4)
        with proj_sw:
            proj = {m: build_projectors(state, m, lam_in, lam_out, args.official_one_sided) for m in (a, b)} \
                if args.method == "dns" else {}
        losses = train_step(model, a, b, xa, xb, proj, args, gen, proj_sw)
        # METHOD LOGIC: accumulate the step's statistics with the trained weights (spec 3.3)
        if args.method == "dns":
            with proj_sw:
                if args.official_cov_bug:  # official code: the dataset's first two modalities, filed under a, b
                    first = [m for m in data.DNS_MODALITY_ORDER if m in train][:2]
                    xa, xb = train[first[0]], train[first[1]]
                update_covariance(state, xa, xb, model[a].weight.detach(), model[b].weight.detach(), a, b)
        t_train = time.perf_counter() - t0
        t1 = time.perf_counter()
        fill_row(mats, t + 1, evaluate(model, steps, datasets, args))
        times["train"].append(t_train)
        times["projection"].append(proj_sw.total)
        times["eval"].append(time.perf_counter() - t1)
        print(f"step {t + 1:2d}/{T} {names[t]:<24} loss {np.mean(losses):8.4f}  {args.epochs * len(xa) / t_train:8.0f} samples/s"
              f"  train {t_train:6.2f}s (projection {proj_sw.total:.2f}s)  eval {times['eval'][-1]:.2f}s")
        if tracker:
            tracker.log({"loss": float(np.mean(losses)), "step": t + 1, **{k: v for k, v in summarize(mats).items() if v is not None}})
        if args.save_model:
            torch.save({"model": model.state_dict(), "dns": vars(state), "args": vars(args), "step": t + 1},
                       os.path.join(run_dir, "model.pt"))

    summary = summarize(mats)
    row_names = ["init"] + names
    for key, label in (("acc", "zero-shot accuracy (%)"), ("r10", "R@10, mean of both directions (%)")):
        print(f"\n{label}: rows = after step, columns = test entry\n" + common.format_matrix(mats[key], row_names, names))
    print("\n" + "  ".join(f"{k}={'n/a' if v is None else f'{v:.2f}'}" for k, v in summary.items()))
    results = {"summary": summary, "matrices": mats, "steps": names, "method": args.method, "backbone": args.backbone,
               "time_s": {**times, "total": float(sum(times["train"]) + sum(times["eval"]))}}
    common.write_json(os.path.join(run_dir, "results.json"), results)
    common.write_metrics_csv(os.path.join(run_dir, "metrics.csv"), mats, names)
    if tracker:
        tracker.finish()
    print(f"results written to {run_dir}")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
