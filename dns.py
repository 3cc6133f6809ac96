"""DNS: Dual-side Null-space gradient projection for continual multimodal contrastive learning.

Paper: Liu, Xia, Ng, Chua. "Continual Multimodal Contrastive Learning", NeurIPS 2025, arXiv 2503.14963.
Official code: github.com/Xiaohao-Liu/CMCL (read, not copied).

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

Baselines (the paper's table; one section below, defaults from each method's reference code, untuned here):
vanilla (sequential fine-tuning), GEM (QP projection against episodic-memory gradients), DER / DER++ (reservoir
replay with stored outputs; + replayed contrastive term), EWC (Fisher penalty), Co2L (asymmetric contrastive +
instance-wise relation distillation), C-FLAT (flatness-aware update around vanilla), CILA (Co2L with an adaptive
distillation weight). Every method trains only the step's two linears with the same loop, data and batch order.

Usage:
    python dns.py --backbone languagebind                  # 11 steps on the built-in synthetic benchmark
    python dns.py --backbone imagebind --method ewc        # vanilla dns gem der derpp ewc co2l cflat cila
    python dns.py --data-dir features_storage/ --backbone imagebind   # the official CMCL .h5 cache, read as it is
    python dns.py --data-dir my_feats/ --steps digits:image-caption digits:audio-caption   # .npz, any modality names
    python dns.py --official-one-sided --official-cov-bug --official-float32  # official behaviour (see Args)
    python dns.py --resume runs/dns__dns__builtin__imagebind__1__1764420000   # continue a killed run
    python common.py table runs/ --metrics acc bwt_acc r1 r5 r10 bwt_r10 --paired-with vanilla

Metrics. R[k][j] = score on step j's test split after step k (k = 0 is the untrained backbone, entry j is
trained at step j+1, T = #steps). Acc entries: datasets with labels whose pair contains text (zero-shot,
class-name prototypes through the text linear, argmax of dot products over all classes). Recall entries:
all others but UCF101 (as in the official code), R@K averaged over A->B and B->A and over 5 seeded random
subsets of <= 1000 test pairs; ties count in expectation under random tie-breaking (common.recall_at_k).
    Acc     = mean_{j in Acc} R_acc[T][j]
    BWT_A   = mean_{j in Acc, j < T-1} (R_acc[T][j] - R_acc[j+1][j])
    R@K     = mean_{j in Recall} R_K[T][j]
    BWT_R10 = mean_{j in Recall, j < T-1} (R_10[T][j] - R_10[j+1][j])
    aia_acc = mean_{k=1..T} mean_{j in Acc, j < k} R_acc[k][j]   (average incremental accuracy; not in the paper)
    fwt_acc = mean_{j in Acc, j >= 1} (R_acc[j][j] - R_acc[0][j])  (forward transfer vs the backbone; not in the paper)
All in percent; task-weighted (each entry counts once). stored_bytes = memory kept between steps (replay buffers
counted as float32 copies of the stored features, DER's outputs, EWC's Fisher and anchors, DNS's float64 moments).

Equation markers name the equations (Eq. (DNS), Eq. (InfoNCE), ...): the paper text available here is a
summary without equation numbers. Where the official code and the paper differ, flags expose the code.
"""

import copy
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Literal, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import common
import data


@dataclass
class Args:
    """DNS (NeurIPS 2025) and the paper's baselines: continual alignment of modality pairs on frozen backbone
    features, 11 steps, Acc / R@K / BWT. Built-in synthetic benchmark by default; --data-dir for real features."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (every generator is derived from it with common.derive_seed)"""
    torch_deterministic: bool = True
    """if toggled, deterministic algorithms (cudnn; torch.use_deterministic_algorithms on CUDA, CPU already is)"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases (pip install wandb)"""
    wandb_project_name: str = "continual-multimodal"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    tensorboard: bool = False
    """if toggled, log losses and metrics to TensorBoard in the run dir (pip install tensorboard)"""
    plot: bool = False
    """if toggled, write acc_matrix.png and acc_curves.png into the run dir (pip install matplotlib)"""
    save_model: bool = False
    """keep checkpoint.pt and write model_after_{task}.pt after every task"""
    out_dir: Optional[str] = None
    """output directory (None = runs/{run_name})"""
    resume: Optional[str] = None
    """continue the run in this run dir from its last completed task (args must match its args.json)"""
    num_threads: int = 1
    """torch intra-op CPU threads (0 = torch default)"""

    # Benchmark arguments
    backbone: Literal["imagebind", "languagebind", "unibind"] = "imagebind"
    """frozen backbone whose features are used (sets dim, feature scales and the default lambda_min)"""
    data_dir: Optional[str] = None
    """folder of real features: `{dataset}_{split}.npz` or the official `{dataset}_{split}_{backbone}.h5` cache"""
    steps: Optional[List[str]] = None
    """training steps `dataset:modA-modB` in order (default: the paper's 11 steps)"""
    bench_scale: float = 0.1
    """built-in benchmark size relative to the real datasets (1.0 = paper-sized train/test splits)"""
    embed_dim: Optional[int] = None
    """shared embedding dim D (None = the largest feature dim)"""
    epochs: int = 5
    """epochs per task (DNS step)"""
    batch_size: int = 64
    """training batch size"""
    eval_batch_size: int = 4096
    """batch size for projecting test features"""
    retrieval_subsets: int = 5
    """random test subsets per retrieval evaluation"""
    retrieval_subset_size: int = 1000
    """pairs per retrieval subset (whole split when smaller)"""

    # Algorithm specific arguments
    method: Literal["dns", "vanilla", "gem", "der", "derpp", "ewc", "co2l", "cflat", "cila"] = "dns"
    """dns = dual-side null-space projection; vanilla = sequential fine-tuning; the others: the paper's baselines"""
    lr: float = 1e-4
    """AdamW learning rate (paper: 1e-4; the official code forces 1e-3 for LanguageBind)"""
    weight_decay: float = 1e-3
    """AdamW weight decay, on weights only"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip (after GEM's projection, before DNS's)"""
    temperature: float = 1.0
    """contrastive temperature (the official code uses 1: the feature norms set the sharpness)"""
    lambda_min: Optional[float] = None
    """absolute eigenvalue threshold of the projectors (None = paper: 0.01 ImageBind/UniBind, 1e-4 LanguageBind)"""
    lambda_out: Optional[float] = None
    """absolute threshold of the left (partner-output) projector (None = its numerical span, see SPAN_RTOL)"""
    official_one_sided: bool = False
    """official code: left projector = identity once a modality is seen (threshold 0 keeps every direction)"""
    official_cov_bug: bool = False
    """official code: accumulate covariances from the dataset's first two modalities, not the pair's"""
    official_float32: bool = False
    """official code: moments and their decomposition in float32 (default float64; about 2x faster statistics)"""
    buffer_size: int = 500
    """replay budget in pairs for gem/der/derpp/co2l/cila (mammoth, Co2L and CILA report 200/500)"""
    replay_batch_size: int = 64
    """replayed pairs per batch for der/derpp/co2l/cila (mammoth: minibatch_size = batch_size)"""
    gem_margin: float = 0.5
    """GEM memory_strength gamma (GEM run_experiments.sh; mammoth models/gem.py --gamma)"""
    der_alpha: Optional[float] = None
    """DER logit-matching weight (None = 0.3 der, 0.2 derpp: mammoth best_args seq-cifar10, buffer 500)"""
    der_beta: float = 0.5
    """DER++ replayed-contrastive weight (mammoth best_args seq-cifar10, buffer 500)"""
    ewc_lambda: float = 10.0
    """EWC penalty weight (mammoth ewc_on seq-cifar10 e_lambda; the Fisher scales with feature norm^2)"""
    co2l_distill: float = 1.0
    """Co2L weight of the instance-wise relation distillation (Co2L main.py distill_power)"""
    co2l_current_temp: float = 0.4
    """Co2L current temperature relative to --temperature (Co2L: 0.2 / tau 0.5)"""
    co2l_past_temp: float = 0.02
    """Co2L past temperature relative to --temperature (Co2L: 0.01 / tau 0.5)"""
    cila_kappa: float = 1.0
    """CILA balancing coefficient of the adaptive distillation weight (value not published)"""
    cflat_rho: float = 0.2
    """C-Flat perturbation radius rho (C-Flat main.py)"""
    cflat_lambda: float = 0.2
    """C-Flat first-order flatness weight lambda (C-Flat main.py)"""


PAPER_LAMBDA_MIN = {"imagebind": 1e-2, "languagebind": 1e-4, "unibind": 1e-2}
SPAN_RTOL = 1e-6  # default left projector: eigenvalues > SPAN_RTOL * largest = the span of old partner features
REPLAY = ("gem", "der", "derpp", "co2l", "cila")
# Fields that define an experiment's variant (the run's `variant` lists the non-default ones).
VARIANT_FIELDS = ("steps", "bench_scale", "embed_dim", "epochs", "batch_size", "retrieval_subsets",
                  "retrieval_subset_size", "lr", "weight_decay", "max_grad_norm", "temperature", "lambda_min",
                  "lambda_out", "buffer_size", "replay_batch_size", "gem_margin", "der_alpha", "der_beta", "ewc_lambda",
                  "co2l_distill", "co2l_current_temp", "co2l_past_temp", "cila_kappa", "cflat_rho", "cflat_lambda")


# ----------------------------------------------------------------------------- helpers
def validate(args: Args) -> None:
    """Every hyperparameter checked before anything is written (exit 2 naming the flag)."""
    for f in ("epochs", "batch_size", "eval_batch_size", "retrieval_subsets", "retrieval_subset_size",
              "replay_batch_size"):
        common.require(getattr(args, f) >= 1, f, f"must be >= 1, got {getattr(args, f)}")
    for f in ("lr", "max_grad_norm", "temperature", "bench_scale", "co2l_current_temp", "co2l_past_temp"):
        common.require(getattr(args, f) > 0, f, f"must be > 0, got {getattr(args, f)}")
    for f in ("weight_decay", "buffer_size", "gem_margin", "der_beta", "ewc_lambda", "co2l_distill", "cila_kappa",
              "cflat_rho", "cflat_lambda", "num_threads", "lambda_min", "lambda_out", "der_alpha"):
        v = getattr(args, f)
        common.require(v is None or (v >= 0 and math.isfinite(v)), f, f"must be >= 0, got {v}")
    common.require(args.embed_dim is None or args.embed_dim >= 1, "embed_dim", f"must be >= 1, got {args.embed_dim}")
    common.require(args.resume is None or os.path.isdir(args.resume), "resume", f"{args.resume} is not a folder")


def method_tag(args: Args) -> str:
    """The method plus its non-default official-code switches, '+'-joined."""
    flags = [f.replace("_", "-") for f in ("official_one_sided", "official_cov_bug", "official_float32")
             if getattr(args, f)]
    return "+".join([args.method] + flags)


def load_data(args: Args):
    """(steps, datasets) from --data-dir or the built-in benchmark; exit 2 on bad input."""
    try:
        steps = data.parse_dns_steps(args.steps if args.steps else data.DNS_PAPER_STEPS)
        if args.data_dir:
            return steps, data.load_dns_features(args.data_dir, steps, args.backbone)
        for ds, a, b in steps:
            if ds in data.DNS_DATASETS and not {a, b} <= set(data.DNS_DATASETS[ds][0]):
                raise data.DataError(f"--steps: built-in dataset '{ds}' has modalities {data.DNS_DATASETS[ds][0]}, "
                                     f"not {a}-{b}")
        print(f"Using the built-in synthetic benchmark ({args.backbone}-like features, scale {args.bench_scale}); "
              "pass --data-dir for real features.")
        return steps, data.make_dns_benchmark(args.backbone, steps, seed=args.seed, scale=args.bench_scale)
    except data.DataError as e:
        common.die(str(e))


def to_torch(datasets: Dict[str, dict], device) -> Dict[str, dict]:
    def conv(a):
        return None if a is None else torch.as_tensor(a, device=device)

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


def official_cov_pair(train: Dict[str, torch.Tensor], a: str, b: str) -> Tuple[str, str]:
    """Official code: the dataset's first two modalities (global order), filed under the pair's names."""
    first = list(train)[:2]  # the loaders store modalities in data.dns_modality_order
    return first[0], first[1]


def lambda_in(args: Args) -> float:
    """The right projector's eigenvalue threshold: --lambda-min, else the paper's value for the backbone."""
    return args.lambda_min if args.lambda_min is not None else PAPER_LAMBDA_MIN[args.backbone]


def linear_decay(i: int, n: int) -> float:
    return 1.0 - i / n


# ----------------------------------------------------------------------------- model and loss
def build_model(dims: Dict[str, int], embed_dim: int, seed: int) -> nn.ModuleDict:
    """One trainable Linear(d_m, D) per modality, each seeded on its own; no normalisation anywhere."""
    gens = {m: torch.Generator().manual_seed(common.derive_seed(seed, f"init/{m}")) for m in dims}
    return nn.ModuleDict({m: linear_init(d, embed_dim, gens[m]) for m, d in sorted(dims.items())})


def contrastive_loss(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE A->B on raw dot products: CE(Z_A Z_B^T / tau, diagonal) (one direction, as in the official code)."""
    logits = za @ zb.T / temperature  # Eq. (InfoNCE)
    return F.cross_entropy(logits, torch.arange(len(za), device=za.device))


def pair_loss(model: nn.ModuleDict, a: str, b: str, x: Dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    return contrastive_loss(model[a](x[a]), model[b](x[b]), temperature)


# ----------------------------------------------------------------------------- DNS: statistics, projectors, projection
@dataclass
class DNSState:
    """Per-modality uncentered second moments of own inputs (c_in) and of partners' projected features (c_out);
    a modality is 'seen' (projected from then on) once it has a c_in entry."""

    c_in: Dict[str, torch.Tensor]
    c_out: Dict[str, torch.Tensor]
    n_bar: int = 0


def gram(x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """X^T X in float64 (--official-float32: float32), computed once per training split and modality."""
    xd = x.to(dtype)
    return xd.T @ xd


def update_covariance(state: DNSState, ga, gb, n: int, wa, wb, a: str, b: str) -> None:
    """End of step: running uncentered moments with the global sample count n_bar, in the grams' dtype
    (ga, gb: the step's X^T X of a and b; n: its number of pairs)."""
    wa, wb = wa.to(ga.dtype), wb.to(ga.dtype)
    n_new = state.n_bar + n
    keep = state.n_bar / n_new
    sa, sb = ga / n_new, gb / n_new
    for m, s_own, w_partner, s_partner in ((a, sa, wb, sb), (b, sb, wa, sa)):
        d_in, d_out = s_own.shape[0], w_partner.shape[0]
        # Eq. (recursive uncentered covariance): C <- C * n_bar / n_new + X^T X / n_new
        state.c_in[m] = state.c_in.get(m, torch.zeros(d_in, d_in, dtype=ga.dtype, device=ga.device)) * keep + s_own
        c_prev = state.c_out.get(m, torch.zeros(d_out, d_out, dtype=ga.dtype, device=ga.device))
        state.c_out[m] = c_prev * keep + w_partner @ s_partner @ w_partner.T  # partner's projected features
    state.n_bar = n_new


def make_projector(c: torch.Tensor, threshold: Optional[float]):
    """P = U_k U_k^T over the eigenvectors of PSD c (eigh in c's dtype) with eigenvalue > threshold
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
    """Start of step, fixed during it: (P_out or None = identity, P_in); None if m was never seen (no projection)."""
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


def project_gradient_factored(g: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, coef, proj) -> torch.Tensor:
    """Eq. (DNS) for a Linear, whose weight gradient is G = coef * Delta^T X (Delta = dL/dz, coef = the clip factor):
    G - coef * (P_out Delta^T)(X P_in), subtracted in place. Same value as project_gradient(g, proj) at O(B d^2),
    or O(k d^2) when P_in = U U^T has rank k < B: G - coef * ((P_out Delta^T)(X U)) U^T."""
    if proj is None:
        return g
    p_out, p_in = proj
    left = coef * (delta.T if p_out is None else left_mul(p_out, delta.T))
    u, complement = p_in
    if not complement and u.shape[1] < x.shape[0]:
        return g.addmm_(left @ (x @ u), u.T, alpha=-1)
    return g.addmm_(left, right_mul(x, p_in), alpha=-1)


# ----------------------------------------------------------------------------- baselines
# The paper's comparison table: GEM, DER, DER++, EWC, Co2L, C-FLAT, CILA (README: defaults, sources, deviations).
@dataclass
class CLState:
    """Baseline state between steps. Buffer entries are (step, row) indices into the held train features."""

    pairs: List[Tuple[str, str]]  # (a_k, b_k) per started step
    feats: List[Dict[str, torch.Tensor]]  # train features per started step (references, never checkpointed)
    slot_step: torch.Tensor  # DER reservoir: int64 [S], -1 = empty
    slot_row: torch.Tensor  # int64 [S]
    slot_z: torch.Tensor  # [S, 2, D]: outputs of (a_k, b_k) at insertion
    n_seen: int = 0
    memory: Dict[int, torch.Tensor] = field(default_factory=dict)  # gem/co2l/cila: step -> rows (balanced)
    ewc: List[dict] = field(default_factory=list)  # per past step: {"step", "fisher": {p: F}, "star": {p: theta*}}
    old: Dict[str, nn.Linear] = field(default_factory=dict)  # co2l/cila: frozen copies of the active linears
    hist: List[Tuple[float, float]] = field(default_factory=list)  # cila: (mean IRD, mean asym) per step >= 1
    log: Dict[str, list] = field(default_factory=dict)  # per-step diagnostics


PERSISTED = ("slot_step", "slot_row", "slot_z", "n_seen", "memory", "ewc", "hist", "log")


def new_cl_state(size: int, embed_dim: int, device) -> CLState:
    return CLState([], [], torch.full((size,), -1, dtype=torch.long, device=device),
                   torch.zeros(size, dtype=torch.long, device=device), torch.zeros(size, 2, embed_dim, device=device))


def side(model: nn.ModuleDict, m: str, x: torch.Tensor, active) -> torch.Tensor:
    """f_m(x); under no_grad when m is not trained this step (its linear stays bit-identical, grad None)."""
    if m in active:
        return model[m](x)
    with torch.no_grad():
        return model[m](x)


def eligible(st: CLState, k: int, a: str, b: str) -> bool:
    return bool({a, b} & set(st.pairs[k]))


def replay_groups(st: CLState, steps: torch.Tensor, rows: torch.Tensor) -> List[tuple]:
    """Split replayed entries into per-step groups: (k, rows, positions in the draw)."""
    out = []
    for k in torch.unique(steps).tolist():
        pos = (steps == k).nonzero().flatten()
        out.append((k, rows[pos], pos))
    return out


def reservoir_add(st: CLState, t: int, rows: torch.Tensor, za: torch.Tensor, zb: torch.Tensor, gen) -> None:
    """DER: reservoir sampling over the stream (mammoth buffer.py), storing pre-step outputs z*."""
    size = len(st.slot_step)
    if size == 0:
        return
    n = st.n_seen + torch.arange(len(rows))
    j = torch.where(n < size, n, (torch.rand(len(rows), generator=gen) * (n + 1).double()).long())
    for i in (j < size).nonzero().flatten().tolist():  # in stream order: later items may overwrite earlier ones
        st.slot_step[j[i]], st.slot_row[j[i]] = t, rows[i]
        st.slot_z[j[i], 0], st.slot_z[j[i], 1] = za[i], zb[i]
    st.n_seen += len(rows)


def reservoir_draw(st: CLState, a: str, b: str, size: int, gen) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform draw without replacement from the filled slots whose pair shares a modality with (a, b)."""
    steps = torch.tensor([k for k in range(len(st.pairs)) if eligible(st, k, a, b)], dtype=torch.long)
    ok = torch.isin(st.slot_step.cpu(), steps).nonzero().flatten()  # empty slots hold -1: never eligible
    pick = ok[torch.randperm(len(ok), generator=gen)[:size]].to(st.slot_step.device)
    return pick, st.slot_step[pick], st.slot_row[pick]


def memory_draw(st: CLState, a: str, b: str, size: int, gen) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uniform draw from the balanced memories of eligible steps: (steps, rows)."""
    ks = [k for k in sorted(st.memory) if eligible(st, k, a, b)]
    if not ks:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    steps = torch.cat([torch.full((len(st.memory[k]),), k) for k in ks])
    rows = torch.cat([st.memory[k].cpu() for k in ks])
    pick = torch.randperm(len(rows), generator=gen)[:size]
    return steps[pick], rows[pick]


def balanced_update(st: CLState, t: int, n_rows: int, size: int, gen) -> None:
    """GEM/Co2L/CILA, end of step t: every stored step keeps size // (t+1) pairs, step t adds a random subset."""
    share = size // (t + 1)
    for k in st.memory:
        st.memory[k] = st.memory[k][:share]
    st.memory[t] = torch.randperm(n_rows, generator=gen)[:share]


def der_terms(model, st: CLState, a: str, b: str, args: Args, gen) -> Dict[str, torch.Tensor]:
    """DER: MSE between current and stored outputs on the active sides of replayed slots; DER++ adds the replayed
    contrastive loss on a second, independent draw (mammoth derpp.py)."""
    out = {}
    pick, steps, rows = reservoir_draw(st, a, b, args.replay_batch_size, gen)
    if len(pick) and der_alpha(args) > 0:
        pred, target = [], []
        for k, r, pos in replay_groups(st, steps, rows):
            for s, m in enumerate(st.pairs[k]):
                if m in (a, b):
                    pred.append(model[m](st.feats[k][m][r]))
                    target.append(st.slot_z[pick[pos], s])
        out["der"] = F.mse_loss(torch.cat(pred), torch.cat(target))  # DER Eq. (logit matching), outputs here
    if args.method == "derpp" and args.der_beta > 0:
        _, steps, rows = reservoir_draw(st, a, b, args.replay_batch_size, gen)
        if len(steps):
            out["derpp"] = replay_contrastive(model, st, steps, rows, (a, b), args.temperature)
    return out


def replay_contrastive(model, st: CLState, steps, rows, active, temperature: float) -> torch.Tensor:
    """Sum_k (n_k / n) l(f_{a_k}(X_{a_k}), f_{b_k}(X_{b_k})) over the replayed steps' groups (groups of 1 give 0)."""
    total = 0.0
    for k, r, _ in replay_groups(st, steps, rows):
        if len(r) >= 2:
            ak, bk = st.pairs[k]
            z_a, z_b = side(model, ak, st.feats[k][ak][r], active), side(model, bk, st.feats[k][bk][r], active)
            total = total + len(r) / len(rows) * contrastive_loss(z_a, z_b, temperature)
    return torch.as_tensor(total, device=st.slot_z.device) if isinstance(total, float) else total


def der_alpha(args: Args) -> float:
    return args.der_alpha if args.der_alpha is not None else (0.2 if args.method == "derpp" else 0.3)


def ewc_fisher(model, a: str, b: str, xa, xb, args: Args) -> Tuple[dict, dict]:
    """End of step: batch-level empirical Fisher (mean of squared mini-batch gradients, consecutive batches, the
    last partial batch counts as one: Avalanche ewc.py) and the anchors theta*, for the pair's parameters."""
    names = [f"{m}.{p}" for m in (a, b) for p in ("weight", "bias")]
    params = [getattr(model[m], p) for m in (a, b) for p in ("weight", "bias")]
    fisher = [torch.zeros_like(p) for p in params]
    n_batches = 0
    for i in range(0, len(xa), args.batch_size):
        x = {a: xa[i: i + args.batch_size], b: xb[i: i + args.batch_size]}
        for f, g in zip(fisher, torch.autograd.grad(pair_loss(model, a, b, x, args.temperature), params)):
            f.add_(g.detach() ** 2)
        n_batches += 1
    return ({n: f / n_batches for n, f in zip(names, fisher)},
            {n: p.detach().clone() for n, p in zip(names, params)})


def ewc_penalty(model, st: CLState, a: str, b: str) -> torch.Tensor:
    """Sum over past steps and the active parameters they share of F_k (p - theta*_k)^2 (Avalanche 'separate')."""
    total = 0.0
    for entry in st.ewc:
        for n, f in entry["fisher"].items():
            m, p = n.split(".")
            if m in (a, b):
                total = total + (f * (getattr(model[m], p) - entry["star"][n]) ** 2).sum()  # EWC Eq. (penalty)
    return total if torch.is_tensor(total) else torch.zeros((), device=st.slot_z.device)


def ird_loss(s_new: torch.Tensor, s_old: torch.Tensor, t_cur: float, t_past: float) -> torch.Tensor:
    """Instance-wise relation distillation: mean_i sum_j -softmax(S_old / k_p)_ij log softmax(S_new / k_c)_ij
    (cross-modal scores: the diagonal is the positive pair and is kept)."""
    return -(F.softmax(s_old / t_past, 1) * F.log_softmax(s_new / t_cur, 1)).sum(1).mean()  # Co2L Eq. (IRD)


def co2l_terms(model, st: CLState, t: int, a: str, b: str, x, z, args: Args, gen) -> Dict[str, torch.Tensor]:
    """Co2L: asymmetric contrastive (current pairs are the anchors; replayed partners of modality b are extra
    negatives only) and IRD against the frozen start-of-step copy, on the current batch and each replayed group."""
    steps, rows = memory_draw(st, a, b, args.replay_batch_size, gen)
    negs = [side(model, b, st.feats[k][b][r], (a, b)) for k, r, _ in replay_groups(st, steps, rows) if b in st.pairs[k]]
    if negs:
        logits = z[a] @ torch.cat([z[b]] + negs).T / args.temperature  # Co2L Eq. (asymmetric contrastive)
        out = {"contrastive": F.cross_entropy(logits, torch.arange(len(z[a]), device=logits.device))}
    else:
        out = {"contrastive": contrastive_loss(z[a], z[b], args.temperature)}
    if t == 0 or co2l_weight(args, st, t) == 0:
        return out
    t_cur, t_past = args.co2l_current_temp * args.temperature, args.co2l_past_temp * args.temperature
    groups = [(len(x[a]), z[a] @ z[b].T, st.old[a](x[a]) @ st.old[b](x[b]).T)]
    for k, r, _ in replay_groups(st, steps, rows):
        ak, bk = st.pairs[k]
        xa_k, xb_k = st.feats[k][ak][r], st.feats[k][bk][r]
        old_a, old_b = (st.old.get(ak, model[ak]), st.old.get(bk, model[bk]))
        with torch.no_grad():
            s_old = old_a(xa_k) @ old_b(xb_k).T
        groups.append((len(r), side(model, ak, xa_k, (a, b)) @ side(model, bk, xb_k, (a, b)).T, s_old))
    n_tot = sum(n for n, _, _ in groups)
    out["ird"] = sum(n / n_tot * ird_loss(s, s_old.detach(), t_cur, t_past) for n, s, s_old in groups)
    return out


def co2l_weight(args: Args, st: CLState, t: int) -> float:
    """Co2L: distill_power. CILA: max(distill_power, kappa * sum past mean IRD / sum past mean asym) for t >= 2."""
    if args.method != "cila" or t < 2 or not st.hist:
        return args.co2l_distill
    ird, asym = (sum(h[i] for h in st.hist) for i in (0, 1))
    return max(args.co2l_distill, args.cila_kappa * ird / asym) if asym > 0 else args.co2l_distill  # CILA lambda_t


def gem_dual(P: torch.Tensor, q: torch.Tensor, lo: float, sweeps: int = 500, tol: float = 1e-12) -> torch.Tensor:
    """argmin_{v >= lo} 1/2 v^T P v + q^T v by exact cyclic coordinate descent (P is K x K, PD; float64, CPU)."""
    v = torch.full_like(q, lo)
    for _ in range(sweeps):
        change = 0.0
        for i in range(len(q)):
            new = max(lo, float(v[i] - (P[i] @ v + q[i]) / P[i, i]))
            change = max(change, abs(new - float(v[i])))
            v[i] = new
        if change < tol:
            break
    return v


def gem_project(params: List[torch.Tensor], mem_grads: torch.Tensor, margin: float, eps: float = 1e-3) -> bool:
    """GEM: if the batch gradient g conflicts with a memory gradient, replace it by g + G^T v* (the QP's dual
    solution, GEM model/gem.py); returns whether it projected."""
    g = torch.cat([p.grad.flatten() for p in params])
    dots = mem_grads @ g  # GEM Eq. (constraints): <g, g_k> >= 0 for every memory k
    if float(dots.min()) >= 0:
        return False
    G = mem_grads.double().cpu()
    P = G @ G.T + eps * torch.eye(len(G), dtype=torch.float64)
    v = gem_dual(P, dots.double().cpu(), margin)  # GEM Eq. (dual QP)
    new = g + (G.T @ v).to(g)  # GEM: g~ = G^T v* + g
    for p, chunk in zip(params, new.split([p.numel() for p in params])):
        p.grad.copy_(chunk.view_as(p))
    return True


def gem_memory_grads(model, st: CLState, a: str, b: str, params, temperature: float) -> Optional[torch.Tensor]:
    """Flattened gradient of each eligible past step's loss over its whole memory w.r.t. the active parameters."""
    rows = []
    for k, mem in sorted(st.memory.items()):
        if len(mem) >= 2 and eligible(st, k, a, b):
            ak, bk = st.pairs[k]
            x = st.feats[k]
            loss = contrastive_loss(side(model, ak, x[ak][mem], (a, b)), side(model, bk, x[bk][mem], (a, b)),
                                    temperature)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]))
    return torch.stack(rows) if rows else None


def cflat_backward(params: List[torch.Tensor], loss_fn, rho: float, lam: float) -> torch.Tensor:
    """C-Flat (official optims/c_flat.py step order): g0 at theta, g1 at theta + rho g0/|g0| (SAM), g2 at theta + e12
    (ascent on |grad L|, e12 = rho (g1-g0)/|g1-g0|), g3 at theta + e12 + rho g2/|g2|; grad <- g1 + lam (g3 - g2).
    Parameters are restored exactly (copied back); rho = 0 is the plain gradient."""
    loss = loss_fn()
    if rho == 0:
        loss.backward()
        return loss
    theta = [p.detach().clone() for p in params]

    def grad_at(offset):
        with torch.no_grad():
            for p, t0, e in zip(params, theta, offset):
                p.copy_(t0 + e)
        return torch.autograd.grad(loss_fn(), params)

    def scaled(vs):
        norm = torch.sqrt(sum((v ** 2).sum() for v in vs)) + 1e-12
        return [rho * v / norm for v in vs]

    g0 = torch.autograd.grad(loss, params)
    g1 = grad_at(scaled(g0))
    e12 = scaled([u - w for u, w in zip(g1, g0)])
    g2 = grad_at(e12)
    g3 = grad_at([u + w for u, w in zip(e12, scaled(g2))])
    with torch.no_grad():
        for p, t0, u, v, w in zip(params, theta, g1, g2, g3):
            p.copy_(t0)
            p.grad = u + lam * (w - v)  # C-Flat: g1 + lambda (g3 - g2)
    return loss


def start_step(st: CLState, model, t: int, a: str, b: str, train: Dict[str, torch.Tensor], args: Args) -> None:
    """Before step t: register its pair; Co2L/CILA freeze a copy of the two active linears."""
    st.pairs.append((a, b))
    st.feats.append(train)
    if args.method in ("co2l", "cila"):
        st.old = {m: copy.deepcopy(model[m]).requires_grad_(False) for m in (a, b)}
        st.log.setdefault("distill_weight", []).append(co2l_weight(args, st, t))


def end_step(st: CLState, model, t: int, a: str, b: str, xa, xb, args: Args, mean_terms: dict, gen) -> None:
    """After step t: EWC Fisher and anchors; balanced memories (GEM/Co2L/CILA); CILA loss history; buffer log."""
    if args.method == "ewc" and args.ewc_lambda > 0:
        fisher, star = ewc_fisher(model, a, b, xa, xb, args)
        st.ewc.append({"step": t, "fisher": fisher, "star": star})
    if args.method in ("gem", "co2l", "cila"):
        balanced_update(st, t, len(xa), args.buffer_size, gen)
    if args.method == "cila" and t >= 1 and "ird" in mean_terms:
        st.hist.append((mean_terms["ird"], mean_terms["contrastive"]))
    counts = ([len(st.memory.get(k, ())) for k in range(t + 1)] if st.memory else
              [int((st.slot_step == k).sum()) for k in range(t + 1)])
    st.log.setdefault("buffer_per_step", []).append(counts)


def method_terms(model, st: CLState, t: int, a: str, b: str, x, z, args: Args, gen) -> Dict[str, torch.Tensor]:
    """The loss terms of one batch (unweighted; weights in loss_weights)."""
    if args.method in ("co2l", "cila"):
        return co2l_terms(model, st, t, a, b, x, z, args, gen)
    out = {"contrastive": contrastive_loss(z[a], z[b], args.temperature)}
    if args.method in ("der", "derpp"):
        out.update(der_terms(model, st, a, b, args, gen))
    if args.method == "ewc" and args.ewc_lambda > 0 and st.ewc:
        out["ewc"] = ewc_penalty(model, st, a, b)
    return out


def loss_weights(args: Args, st: CLState, t: int) -> Dict[str, float]:
    return {"contrastive": 1.0, "der": der_alpha(args), "derpp": args.der_beta, "ewc": args.ewc_lambda,
            "ird": co2l_weight(args, st, t)}


def stored_bytes(state: DNSState, st: CLState, steps, datasets) -> Tuple[int, dict]:
    """Memory each method keeps between steps, buffers counted as copies of the stored features (float32)."""
    def row_bytes(k):
        ds, a, b = steps[k]
        f = datasets[ds]["train"]["feats"]
        return 4 * (f[a].shape[1] + f[b].shape[1])

    moments = list(state.c_in.values()) + list(state.c_out.values())
    detail = {"dns_covariances": sum(c.element_size() * c.numel() for c in moments),
              "memory_pairs": sum(len(v) * row_bytes(k) for k, v in st.memory.items()),
              "reservoir_pairs": sum(row_bytes(k) for k in st.slot_step.tolist() if k >= 0),
              "reservoir_outputs": int((st.slot_step >= 0).sum()) * 4 * 2 * st.slot_z.shape[2],
              "ewc": sum(4 * (f.numel() + e["star"][n].numel()) for e in st.ewc for n, f in e["fisher"].items())}
    return sum(detail.values()), detail


# ----------------------------------------------------------------------------- one continual step
def batch_backward(model, t: int, a: str, b: str, x, proj: dict, st: CLState, weights: dict, args: Args,
                   gen_replay, method_sw) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Forward, the method's loss terms, backward (C-Flat: its four passes); GEM then projects the raw gradient."""
    params = [model[a].weight, model[b].weight, model[a].bias, model[b].bias]
    if args.method == "cflat":  # METHOD LOGIC: C-Flat replaces the backward (base method: vanilla)
        with method_sw:
            loss = cflat_backward(params, partial(pair_loss, model, a, b, x, args.temperature), args.cflat_rho,
                                  args.cflat_lambda)
        return {"contrastive": loss}, {}
    z = {a: model[a](x[a]), b: model[b](x[b])}
    with method_sw:
        terms = method_terms(model, st, t, a, b, x, z, args, gen_replay)
    loss = terms["contrastive"]
    for k, v in terms.items():
        if k != "contrastive":
            loss = loss + weights[k] * v
    for m in (a, b):
        if proj.get(m) is not None:
            z[m].retain_grad()  # Delta = dL/dz, the factor of the weight gradient (DNS)
    loss.backward()
    if args.method == "gem" and t > 0:  # METHOD LOGIC: GEM on the raw gradient, before the clip
        with method_sw:
            mem = gem_memory_grads(model, st, a, b, params, args.temperature)
            st.log["gem_batches"][-1] += 1
            st.log["gem_projected"][-1] += int(mem is not None and gem_project(params, mem, args.gem_margin))
    return terms, z


def train_step(model: nn.ModuleDict, t: int, a: str, b: str, xa, xb, proj: dict, st: CLState, args: Args,
               gens: Dict[str, torch.Generator], method_sw, where: str) -> Dict[str, float]:
    """Train the pair's two linears for args.epochs with a fresh AdamW + linear decay; returns the mean loss terms."""
    params = [model[a].weight, model[b].weight, model[a].bias, model[b].bias]  # others keep grad None
    opt = torch.optim.AdamW([{"params": params[:2], "weight_decay": args.weight_decay},
                             {"params": params[2:], "weight_decay": 0.0}], lr=args.lr)
    n_updates = args.epochs * ((len(xa) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(linear_decay, n=n_updates))  # linear decay to 0
    weights = loss_weights(args, st, t)
    st.log.setdefault("gem_batches", []).append(0)
    st.log.setdefault("gem_projected", []).append(0)
    totals, n_batches = {}, 0
    for epoch in range(args.epochs):
        sums = {}
        for idx in torch.randperm(len(xa), generator=gens["batches"]).to(xa.device).split(args.batch_size):
            x = {a: xa[idx], b: xb[idx]}
            opt.zero_grad(set_to_none=True)
            terms, z = batch_backward(model, t, a, b, x, proj, st, weights, args, gens["replay"], method_sw)
            norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            if proj:
                with method_sw:  # METHOD LOGIC: Eq. (DNS) on weight gradients, after clipping, before AdamW
                    coef = (args.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)  # the factor clipping applied
                    for m in (a, b):
                        if proj.get(m) is not None:
                            w = model[m].weight
                            w.grad = project_gradient_factored(w.grad, z[m].grad, x[m], coef, proj[m])
            opt.step()
            sched.step()
            if args.method in ("der", "derpp"):  # METHOD LOGIC: reservoir insert of this batch's pre-step outputs
                with method_sw:
                    reservoir_add(st, t, idx, z[a].detach(), z[b].detach(), gens["replay"])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            n_batches += 1
        common.stop_if_diverged(sums, f"{where} epoch {epoch + 1}")  # one host sync per epoch
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    opt.zero_grad(set_to_none=True)  # no gradient outlives its step
    return {k: v / n_batches for k, v in totals.items()}


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed(lin: nn.Linear, x: torch.Tensor, bs: int) -> torch.Tensor:
    return torch.cat([lin(x[i: i + bs]) for i in range(0, len(x), bs)])


@torch.no_grad()
def evaluate_entry(model, split, a: str, b: str, has_recall: bool, args: Args, entry_seed: int, where: str) -> dict:
    """Zero-shot Acc (if labels, class_text and text in the pair) and R@1/5/10 both directions (if has_recall)."""
    out = {}
    za = embed(model[a], split["feats"][a], args.eval_batch_size)
    zb = embed(model[b], split["feats"][b], args.eval_batch_size)
    if "text" in (a, b) and split["label"] is not None and split["class_text"] is not None:
        query = zb if a == "text" else za
        scores = query @ model["text"](split["class_text"]).T
        common.require_finite(scores, "zero-shot accuracy scores", where)
        out["acc"] = float((torch.argmax(scores, 1) == split["label"]).float().mean() * 100)
    if has_recall:
        n, size = len(za), min(args.retrieval_subset_size, len(za))
        gen = torch.Generator().manual_seed(entry_seed)
        draws = [torch.randperm(n, generator=gen)[:size] for _ in range(args.retrieval_subsets if n > size else 1)]
        scores = [za[i] @ zb[i].T for i in draws]
        out["r_ab"] = np.mean([common.recall_at_k(s, where=where) for s in scores], 0).tolist()
        out["r_ba"] = np.mean([common.recall_at_k(s.T, where=where) for s in scores], 0).tolist()
    return out


def evaluate(model, steps, datasets, args: Args, row: str) -> List[dict]:
    """Every step's test split with the current model (one row of the result matrices)."""
    return [evaluate_entry(model, datasets[ds]["test"], a, b, ds not in data.DNS_ACC_ONLY, args,
                           common.derive_seed(args.seed, f"eval/{j}"), f"row {row}, entry {ds}({a}-{b})")
            for j, (ds, a, b) in enumerate(steps)]


def fill_row(mats: Dict[str, list], k: int, row: List[dict]) -> None:
    for j, e in enumerate(row):
        mats["acc"][k][j] = e.get("acc")
        for i, key in enumerate(("r1", "r5", "r10")):
            mats[key][k][j] = (e["r_ab"][i] + e["r_ba"][i]) / 2 if "r_ab" in e else None
            mats[key + "_ab"][k][j] = e["r_ab"][i] if "r_ab" in e else None
            mats[key + "_ba"][k][j] = e["r_ba"][i] if "r_ab" in e else None


def summarize(mats: Dict[str, list]) -> Dict[str, Optional[float]]:
    """The paper's table columns (module docstring): Acc, BWT_A, R@1, R@5, R@10, BWT_R10; then AIA and FWT of Acc."""
    return {"acc": common.final_average(mats["acc"]), "bwt_acc": common.backward_transfer(mats["acc"]),
            "r1": common.final_average(mats["r1"]), "r5": common.final_average(mats["r5"]),
            "r10": common.final_average(mats["r10"]), "bwt_r10": common.backward_transfer(mats["r10"]),
            "aia_acc": common.average_incremental_accuracy(mats["acc"]),
            "fwt_acc": common.forward_transfer(mats["acc"])}


def row_means(mats: Dict[str, list], k: int) -> Dict[str, Optional[float]]:
    """Mean over the entries of row k (for per-step logging)."""
    out = {}
    for key in ("acc", "r10"):
        vals = [v for v in mats[key][k] if v is not None]
        out[f"charts/{key}_row_mean"] = float(np.mean(vals)) if vals else None
    return out


# ----------------------------------------------------------------------------- results and checkpoints
def assemble_results(args, method, variant, names, mats, times, model, state, st, steps, datasets, device,
                     name) -> dict:
    """The results envelope (README "Outputs"): summary, matrices, per-step method diagnostics, memory, timing."""
    total, detail = stored_bytes(state, st, steps, datasets)
    extra = {"steps": [list(s) for s in steps], "stored_bytes": detail,
             "method_log": {k: v for k, v in st.log.items() if any(x not in (None, 0) for x in v)},
             "effective": {"lambda_in": lambda_in(args), "der_alpha": der_alpha(args)}}
    timing = {**times, "total": float(sum(times["train"]) + sum(times["eval"]) + sum(times["checkpoint"]))}
    return common.results_envelope(
        script="dns", method=method, variant=variant,
        data=common.data_tag(args.data_dir), backbone=args.backbone, seed=args.seed, run_name=name, args=args,
        device=device, tasks=names, matrices=mats, extra=extra, summary={**summarize(mats), "stored_bytes": total},
        timing_s=timing)


def lower_half(c: torch.Tensor) -> torch.Tensor:
    """The lower triangle of a covariance, flattened: all that eigh and the updates read (half the bytes)."""
    return c[torch.ones_like(c, dtype=torch.bool).tril()]


def from_lower_half(v: torch.Tensor) -> torch.Tensor:
    """Inverse of lower_half: the symmetric matrix with that lower triangle."""
    d = int(round(((8 * v.numel() + 1) ** 0.5 - 1) / 2))
    c = torch.zeros(d, d, dtype=v.dtype, device=v.device)
    c[torch.ones_like(c, dtype=torch.bool).tril()] = v
    return c + c.tril(-1).T


def checkpoint_state(model, state: DNSState, st: CLState, mats, times, gens) -> dict:
    """What a resumed run needs (never the training features)."""
    dns_state = {"c_in": {m: lower_half(c) for m, c in state.c_in.items()},
                 "c_out": {m: lower_half(c) for m, c in state.c_out.items()}, "n_bar": state.n_bar}
    return {"model": model.state_dict(), "dns": dns_state,
            "cl": {k: getattr(st, k) for k in PERSISTED}, "mats": mats, "times": times,
            "rng": common.rng_state(gens)}


def restore(ckpt: dict, model, state: DNSState, st: CLState, mats, times, gens, steps, datasets) -> int:
    """Load a checkpoint into the freshly built run (RNGs last); returns the number of completed steps."""
    model.load_state_dict(ckpt["model"])
    state.c_in = {m: from_lower_half(v) for m, v in ckpt["dns"]["c_in"].items()}
    state.c_out = {m: from_lower_half(v) for m, v in ckpt["dns"]["c_out"].items()}
    state.n_bar = ckpt["dns"]["n_bar"]
    for k in PERSISTED:
        setattr(st, k, ckpt["cl"][k])
    for ds, a, b in steps[: ckpt["done"]]:
        st.pairs.append((a, b))
        st.feats.append(datasets[ds]["train"]["feats"])
    mats.update(ckpt["mats"])
    times.update(ckpt["times"])
    common.restore_rng(ckpt["rng"], gens)
    return ckpt["done"]


# ----------------------------------------------------------------------------- main: the continual loop
def main(args: Args) -> dict:
    # TRY NOT TO MODIFY: setup
    validate(args)
    common.check_extras(args)
    steps, raw = load_data(args)
    common.seed_everything(args.seed, args.torch_deterministic)  # every generator below is derived from the seed
    common.set_threads(args.num_threads)
    device = common.pick_device(args.cuda)
    method, variant = method_tag(args), common.tag(args, VARIANT_FIELDS, Args())
    name = common.run_name("dns", method, common.data_tag(args.data_dir), args.backbone, args.seed)
    run_dir, ckpt = common.open_run(args, name, "dns")
    loggers = common.open_loggers(args, name, run_dir, ckpt["done"] * args.epochs if ckpt else None)
    print(f"run {name} -> {run_dir} (device: {device})")

    datasets = to_torch(raw, device)
    dims = {m: a.shape[1] for v in datasets.values() for s in v.values() for m, a in s["feats"].items()}
    embed_dim = args.embed_dim if args.embed_dim is not None else max(dims.values())
    model = build_model(dims, embed_dim, args.seed).to(device)
    gens = {p: torch.Generator().manual_seed(common.derive_seed(args.seed, p)) for p in ("batches", "replay")}
    names = [f"{ds}({a}-{b})" for ds, a, b in steps]
    T = len(steps)
    keys = ["acc"] + [k + s for k in ("r1", "r5", "r10") for s in ("", "_ab", "_ba")]
    mats = {k: [[None] * T for _ in range(T + 1)] for k in keys}
    times = {"train": [], "method": [], "projectors": [], "statistics": [], "eval": [], "checkpoint": []}
    state, st = DNSState({}, {}), new_cl_state(args.buffer_size if args.method in REPLAY else 0, embed_dim, device)
    grams = {}  # DNS: X^T X per (dataset, modality), reused by later steps on the same split
    start = restore(ckpt, model, state, st, mats, times, gens, steps, datasets) if ckpt else 0
    if start == 0:  # row 0: the frozen backbone (identity projections)
        fill_row(mats, 0, evaluate(model, steps, datasets, args, "init"))
    for t in range(start, T):
        ds, a, b = steps[t]
        t0, sw = time.perf_counter(), {k: common.Stopwatch() for k in ("method", "projectors", "statistics")}
        method_sw = sw["method"]  # every method's overhead; DNS's split into projectors and statistics
        train = datasets[ds]["train"]["feats"]
        xa, xb = train[a], train[b]
        with method_sw, sw["projectors"]:  # METHOD LOGIC: projectors rebuilt at the start of the step
            proj = {m: build_projectors(state, m, lambda_in(args), args.lambda_out, args.official_one_sided)
                    for m in (a, b)} if args.method == "dns" else {}
        with method_sw:
            start_step(st, model, t, a, b, train, args)
        where = f"step {t + 1}/{T} ({names[t]})"
        mean_terms = train_step(model, t, a, b, xa, xb, proj, st, args, gens, method_sw, where)
        with method_sw, sw["statistics"]:  # METHOD LOGIC: the step's statistics with the trained weights
            if args.method == "dns":
                ca, cb = official_cov_pair(train, a, b) if args.official_cov_bug else (a, b)
                for m in (ca, cb):
                    if (ds, m) not in grams:
                        grams[(ds, m)] = gram(train[m], torch.float32 if args.official_float32 else torch.float64)
                update_covariance(state, grams[(ds, ca)], grams[(ds, cb)], len(xa), model[a].weight.detach(),
                                  model[b].weight.detach(), a, b)
        with method_sw:
            end_step(st, model, t, a, b, xa, xb, args, mean_terms, gens["replay"])
        t_train = time.perf_counter() - t0
        t1 = time.perf_counter()
        fill_row(mats, t + 1, evaluate(model, steps, datasets, args, names[t]))
        times["eval"].append(time.perf_counter() - t1)
        times["train"].append(t_train)
        for k, v in sw.items():
            times[k].append(v.total)
        print(f"step {t + 1:2d}/{T} {names[t]:<24} loss {mean_terms['contrastive']:8.4f}  "
              f"{args.epochs * len(xa) / t_train:8.0f} samples/s  train {t_train:6.2f}s (method {method_sw.total:.2f}s)"
              f"  eval {times['eval'][-1]:.2f}s", flush=True)
        common.log_scalars(loggers, {**{f"losses/{k}": v for k, v in mean_terms.items()}, **row_means(mats, t + 1)},
                           (t + 1) * args.epochs)
        with common.Stopwatch() as ck:
            common.save_checkpoint(run_dir, "dns", args, t + 1, T,
                                   checkpoint_state(model, state, st, mats, times, gens))
        times["checkpoint"].append(ck.total)
        if args.save_model:
            torch.save(model.state_dict(), os.path.join(run_dir, f"model_after_{t + 1}.pt"))

    results = assemble_results(args, method, variant, names, mats, times, model, state, st, steps, datasets, device,
                               name)
    for key, label in (("acc", "zero-shot accuracy (%)"), ("r10", "R@10, mean of both directions (%)")):
        print(f"\n{label}: rows = after step, columns = test entry\n"
              + common.format_matrix(mats[key], results["rows"], names))
    print("\n" + "  ".join(f"{k}={'n/a' if v is None else f'{v:.2f}'}" for k, v in results["summary"].items()))
    common.write_results(run_dir, results)
    if args.plot:
        common.plot_matrix(run_dir, mats["acc"], results["rows"], names, "zero-shot accuracy (%)")
    common.finish_run(run_dir, keep_checkpoint=args.save_model)
    common.close_loggers(loggers)
    print(f"results written to {run_dir}")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args, default=common.resume_defaults(Args)))
