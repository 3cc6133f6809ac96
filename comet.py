"""COMET: Continual Cross-Modal Generalization with a CMoE-Adapter and Pseudo-Modality Replay.

Paper: Xia, Huang, Fang, Zhao. "Continual Cross-Modal Generalization", arXiv 2504.00561 (COMET).
Base model: CMG / DCID, Xia et al., "Achieving Cross Modal Generalization with Multimodal Unified
Representation", NeurIPS 2023 (github.com/haihuangcode/CMG; read, not copied; spec in shared/specs/comet.md).

Idea. DCID maps paired modalities onto one shared discrete codebook: per-modality semantic encoders Phi_m,
an EMA vector quantiser updated with both modalities (MM-EMA), a cross-modal code-matching loss (CMCM),
CLUB mutual-information minimisation between semantic and modality-specific (Psi_m) features, Cross-CPC
between the modalities' sequences and reconstruction decoders. COMET learns it in stages, one bimodal pair
per stage, bridged by a mediator modality (text): VT -> AT -> IT, so video and audio are never paired. It
adds (i) a Continual MoE Adapter between Phi_m and the quantiser: 6 experts, each a common Linear plus one
Linear per modality, a softmax router, a load-balancing loss, and EWC on the common and activated specific
layers; (ii) an expanding codebook (copy K1 codes, append K2 per stage) and Pseudo-Modality Replay: the
mediator's nearest codes in the frozen previous codebook form a third "pseudo-modality" sequence that joins
Cross-CPC, pulling the new modality onto the codes the old modalities use (positions that fall on new codes
get weight exp(-gamma), default 0). Downstream, a classifier trained on one modality's codes is tested on
another modality's codes (zero-shot cross-modal generalization).

Usage:
    python comet.py                                  # VT -> AT -> IT on the built-in benchmark, full COMET
    python comet.py --order AT VT IT                 # the paper's second order
    python comet.py --no-pmr                         # Table 6: --no-pmr --no-moe --no-gate-loss --no-ewc --no-specific-layers
    python comet.py --no-comet                       # continual DCID (fixed codebook, no adapter, no replay)
    python comet.py --no-comet --k1 64               # same-capacity DCID control (COMET ends with 32+16+16 codes)
    python comet.py --joint --no-comet               # non-continual oracle: all pairs in one stage
    python comet.py --data-dir feats/                # real features {vt,at,it,va}_{train,test}.npz, ia_test.npz

Metrics (after every stage; row 0 = untrained model). Percent unless noted.
    cls X->Y   accuracy of a classifier (Linear -> max over T -> Linear) trained on modality X's quantised
               codes (va_train) and tested on Y's codes (va_test): the AVE analog; X->X = within-modality
    loc X->Y   F1 = 2PR/(P+R) of a per-step classifier (Linear -> Linear, BCE, threshold 0.5) over all
               step x class cells (background included): the AVVP analog
    ret XY     R@1/5/10 for X->Y and Y->X (cosine of the time-mean quantised vectors, ties in expectation,
               common.recall_at_k); avg = mean of the 6 numbers. Seen pairs VT/AT/IT, unseen VA/IA
    va_acc     mean(cls V->A, cls A->V) after the last stage; va_f1 likewise; va_avg = mean of the 4
    vt_forgetting  ret VT avg right after the VT stage - after the last stage
    seen_forgetting  common.forgetting of the stage x stage seen-pair matrix (Chaudhry et al.)
    multi_share share of all K codes used by >= 2 modalities (used = >= `use_threshold` of that modality's
               probe tokens); code_agree = % of va_test pairs whose most frequent video and audio codes
               are equal (CMG's equal_num); perplexity = exp(entropy of code usage) (not %);
               gate_entropy = mean over modalities of the entropy of the mean gate vector (nats; log 6 = 1.79)

Deviations and assumptions (spec = shared/specs/comet.md; paper-silent choices are the spec's [assumption]s):
  1. Sizes scaled for CPU (spec 5.2): D = 32, 1 transformer layer, Psi = Linear+ReLU to 16, linear decoders,
     K1 = 32, K2 = 16, batch 64, Adam 1e-3, clip 1.0, float32; every size is a flag. Inputs are
     pre-extracted [N, T, d] sequences; video has no 7x7 spatial map and text no BERT/BiLSTM front end.
  2. MM-EMA (Eq. 3) as the paper writes it: one joint update with a parameter-free cross-attention partner
     r^b = softmax(z^a z^bT / sqrt D) z^b; `--ema-partner aligned` is the released code's same-index partner.
     Counts start at 1 (not 0) so unused codes stay put; Laplace smoothing as in the code.
  3. Dead-code reset after `reset_after` idle batches to an active code + U(+-1/128); from stage 2 on only
     new codes (index >= K_prev) are reset (spec 2.3.5), DCID resets anywhere.
  4. Adapter: residual z~ = z + sum_j G_j (C_j z + S_{j,m} z), router on the time-mean (one gate vector per
     sample), init N(0, 0.01) so it starts as the identity; VQ, CMCM, CLUB and CPC all use z~.
  5. EWC: empirical Fisher = mean squared gradient of (commit + cmcm + cpc) over `fisher_batches` batches at
     the end of each stage, normalised to mean 1 over its nonzero entries, accumulated over stages; it
     protects the router too; lambda = 10 (not given in the paper).
  6. PMR: P_t = nearest code over [frozen previous codebook ; current new codes] to the mediator's feature
     (no distance threshold); P gets its own CPC stream (6 cross terms at 1.0, 3 self at 0.1); weight
     exp(-gamma) per sample on every term involving P, read at the predicted step t+1.
  7. --no-pmr keeps the expanding codebook and restricted reset (only the pseudo-modality stream is removed);
     --no-moe removes the adapter and with it gate, EWC and specific layers (as in Table 6).
  8. CPC: 1-layer LSTM (paper; the code has 2), 1 prediction step. CLUB: 3 inner Adam steps (code: 5).
     AVVP's extra ExpLogLoss is omitted; downstream heads are trained full batch for `cls_steps` steps
     from a seeded init (spec 5.4.4), test sets are separate samples (CMG's ave.py tests on train videos).
  9. Always runs on CPU: the model is CPU-sized and --cuda is ignored (the run prints whether CUDA exists).
"""

import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import common
import data

RET_PAIRS = ["VT", "AT", "IT", "VA", "IA"]
LETTER = data.COMET_LETTERS
MEDIATOR = "text"


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
    data_dir: Optional[str] = None
    """folder of real features `{pair}_{split}.npz` (see data.load_comet_npz); default: built-in benchmark"""
    order: List[str] = field(default_factory=lambda: ["VT", "AT", "IT"])
    """the stages, one pair each, every pair with the mediator text (VT, AT, IT)"""
    n_pairs: int = 2000
    """built-in: training pairs per stage"""
    n_per_class: int = 80
    """built-in: V<->A downstream samples per class (8 classes) in va_train and in va_test"""
    n_test: int = 200
    """built-in: pairs per retrieval test set"""
    seq_len: int = 10
    """built-in: T, steps per sequence"""
    sty: float = 2.0
    """built-in: strength of the per-sample nuisance style of video/audio/image"""
    noise: float = 0.45
    """built-in: noise on the hidden semantics"""
    shared: float = 0.3
    """built-in: shared component of the class prototypes (confusability)"""
    dom: float = 1.5
    """built-in: size of the dataset-specific text-domain offset (mediator drift between stages)"""

    # Algorithm specific arguments
    no_comet: bool = False
    """continual DCID baseline: no adapter, no PMR, fixed codebook of k1 codes, reset anywhere"""
    no_pmr: bool = False
    """ablation: no pseudo-modality replay stream (codebook still expands)"""
    no_moe: bool = False
    """ablation: no CMoE-Adapter (hence no gate loss, EWC or specific layers)"""
    no_gate_loss: bool = False
    """ablation: no load-balancing loss"""
    no_ewc: bool = False
    """ablation: no EWC on the adapter"""
    no_specific_layers: bool = False
    """ablation: experts are the common layer only"""
    joint: bool = False
    """oracle: train all pairs of --order together in one (non-continual) stage"""
    epochs: int = 10
    """epochs per stage"""
    batch_size: int = 64
    """pairs per batch (in-batch negatives for CPC and CMCM)"""
    lr: float = 1e-3
    """Adam learning rate of the main network"""
    clip: float = 1.0
    """global gradient-norm clip"""
    d_model: int = 32
    """semantic / code dimension D (CMG: 256)"""
    n_layers: int = 1
    """transformer layers per semantic encoder (CMG: 2)"""
    n_heads: int = 2
    """attention heads (CMG: 4)"""
    d_ffn: int = 64
    """transformer feed-forward width (CMG: 1024)"""
    d_spec: int = 16
    """modality-specific feature dimension (Psi_m output)"""
    k1: int = 32
    """codebook size of the first stage (CMG: 400)"""
    k2: int = 16
    """codes appended at every later stage (COMET)"""
    beta: float = 0.25
    """commitment weight (CMG code: 2*beta self + beta partner)"""
    ema_decay: float = 0.99
    """codebook EMA decay"""
    ema_partner: Literal["attention", "aligned"] = "attention"
    """MM-EMA partner: 'attention' (paper, parameter-free cross-attention) or 'aligned' (CMG code)"""
    reset_after: int = 100
    """re-initialise a code after this many batches without use"""
    club_steps: int = 3
    """inner Adam steps of the CLUB approximation nets per batch (CMG: 5)"""
    club_lr: float = 1e-3
    """learning rate of the CLUB nets"""
    cpc_self_weight: float = 0.1
    """weight of same-modality CPC terms (cross-modal terms have 1.0)"""
    n_experts: int = 6
    """experts of the CMoE-Adapter"""
    gate_weight: float = 1.0
    """weight of the load-balancing loss"""
    ewc_lambda: float = 10.0
    """EWC strength lambda (Fisher normalised to mean 1)"""
    fisher_batches: int = 10
    """batches for the empirical Fisher at the end of a stage"""
    pmr_new_weight: float = 0.0
    """PMR weight exp(-gamma) of positions that fall on new codes (0 = gamma inf = masked; 0.368 = gamma 1)"""
    cls_steps: int = 200
    """full-batch Adam steps of each downstream head"""
    cls_lr: float = 5e-3
    """learning rate of the downstream heads"""
    use_threshold: float = 0.01
    """a modality 'uses' a code if it gets at least this share of the modality's probe tokens"""


# ----------------------------------------------------------------------------- small helpers
def st_quantize(z, codes):
    """Straight-through estimator: forward = codes, backward = identity to z."""
    return z + (codes - z).detach()


def sq_dist(z, codes):
    """Squared L2 distances [..., K] between vectors z [..., D] and codes [K, D]."""
    return (z * z).sum(-1, keepdim=True) - 2 * z @ codes.t() + (codes * codes).sum(-1)


def entropy(p):
    p = p / p.sum()
    return float(-(p * torch.log(p.clamp_min(1e-12))).sum())


# ----------------------------------------------------------------------------- CMG / DCID base model
class Codebook(nn.Module):
    """EMA vector quantiser shared by all modalities; codes are buffers, not parameters."""

    def __init__(self, k: int, dim: int, decay: float, eps: float = 1e-5):
        super().__init__()
        self.decay, self.eps = decay, eps
        self.register_buffer("embed", torch.empty(k, dim).uniform_(-1 / k, 1 / k))
        self.register_buffer("count", torch.ones(k))
        self.register_buffer("weight", self.embed.clone())
        self.register_buffer("idle", torch.zeros(k))

    def assign(self, z):
        return sq_dist(z.detach(), self.embed).argmin(-1)

    @torch.no_grad()
    def ema_update(self, feats: List[torch.Tensor], idxs: List[torch.Tensor]):
        """Eq. (3) MM-EMA: N_i <- g N_i + (1-g) sum_m n_i^m; o_i <- g o_i + (1-g) sum_m sum_{j:m->i} (z^m_j + r_j)/2;
        e_i = o_i / N_i. `feats` already hold (z^m + r^partner)/2."""
        K = self.embed.shape[0]
        n, s = torch.zeros(K), torch.zeros_like(self.embed)
        for f, i in zip(feats, idxs):
            onehot = F.one_hot(i.reshape(-1), K).float()
            n, s = n + onehot.sum(0), s + onehot.t() @ f.reshape(-1, f.shape[-1])
        self.count.mul_(self.decay).add_(n, alpha=1 - self.decay)
        total = self.count.sum()
        self.count.copy_((self.count + self.eps) / (total + K * self.eps) * total)  # Laplace smoothing
        self.weight.mul_(self.decay).add_(s, alpha=1 - self.decay)
        self.embed.copy_(self.weight / self.count[:, None])
        self.idle.add_(1)
        self.idle[n > 0] = 0

    @torch.no_grad()
    def reset_dead(self, after: int, start: int = 0, noise: float = 1 / 128) -> int:
        """Re-initialise codes idle for > `after` batches (only indices >= start) to an active code + noise."""
        dead = self.idle > after
        dead[:start] = False
        active = torch.nonzero(self.idle < max(after // 3, 1)).flatten()
        if not dead.any() or len(active) == 0:
            return 0
        src = active[torch.randint(len(active), (int(dead.sum()),))]
        self.embed[dead] = self.embed[src] + torch.empty_like(self.embed[src]).uniform_(-noise, noise)
        self.weight[dead] = self.embed[dead] * self.count[dead, None]
        self.idle[dead] = 0
        return int(dead.sum())

    @torch.no_grad()
    def expand(self, k2: int):
        """COMET: keep the old codes bit-identical and append k2 new ones."""
        K, D = self.embed.shape
        new = torch.empty(k2, D).uniform_(-1 / (K + k2), 1 / (K + k2))
        self.embed = torch.cat([self.embed, new])
        self.weight = torch.cat([self.weight, new])
        self.count = torch.cat([self.count, torch.ones(k2)])
        self.idle = torch.cat([self.idle, torch.zeros(k2)])


def partner(za, zb, mode: str):
    """r^b for query z^a: parameter-free cross-attention (paper) or the same-index vector (CMG code)."""
    if mode == "aligned":
        return zb
    att = torch.softmax(za @ zb.transpose(1, 2) / za.shape[-1] ** 0.5, -1)
    return att @ zb


def commit_loss(z, e_self, e_partner, beta):
    """CMG Eq. (8) with the code's weights: 2*beta ||z - sg(e_self)||^2 + beta ||z - sg(e_partner)||^2."""
    return 2 * beta * F.mse_loss(z, e_self.detach()) + beta * F.mse_loss(z, e_partner.detach())


def cmcm_loss(za, zb, codes):
    """L_cmcm: p_t = softmax_k(-||z_t - e_k||), p = mean_t p_t; S_ij = p^a_i.log p^b_j + p^b_i.log p^a_j; InfoNCE."""
    pa = torch.softmax(-sq_dist(za, codes).clamp_min(1e-12).sqrt(), -1).mean(1)
    pb = torch.softmax(-sq_dist(zb, codes).clamp_min(1e-12).sqrt(), -1).mean(1)
    S = pa @ torch.log(pb + 1e-10).t() + pb @ torch.log(pa + 1e-10).t()
    return 0.5 * F.cross_entropy(S, torch.arange(len(S)))


class CLUB(nn.Module):
    """Eq. (1) temporal CLUB: q(y|x) = N(mu(x), exp(logvar(x))) between quantised x and specific y."""

    def __init__(self, x_dim: int, y_dim: int, hidden: int):
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))
        self.logvar = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim), nn.Tanh())

    def loglik(self, x, y):
        mu, lv = self.mu(x), self.logvar(x)
        return (-((mu - y) ** 2) / lv.exp() - lv).sum(-1).mean() / 2

    def mi_est(self, x, y, perm):
        """E_p(x,y)[log q(y|x)] - E_p(x)E_p(y)[log q(y|x)], negatives from a batch permutation."""
        mu, var = self.mu(x), self.logvar(x).mean(1).exp()
        pos = -((mu - y) ** 2).mean(1) / var
        neg = -((mu - y[perm]) ** 2).mean(1) / var
        return (pos - neg).sum(-1).mean() / 2


class CrossCPC(nn.Module):
    """Eq. (2) Cross-CPC: one LSTM + one step predictor per stream; every stream predicts every stream's
    next step with in-batch negatives (cross-modal weight 1, self weight `self_w`)."""

    def __init__(self, streams: List[str], dim: int):
        super().__init__()
        self.lstm = nn.ModuleDict({s: nn.LSTM(dim, dim, batch_first=True) for s in streams})
        self.pred = nn.ModuleDict({s: nn.Linear(dim, dim) for s in streams})

    def forward(self, seqs: Dict[str, torch.Tensor], t: int, self_w: float, p_weight=None):
        B = next(iter(seqs.values())).shape[0]
        preds = {a: self.pred[a](self.lstm[a](z[:, : t + 1])[0][:, -1]) for a, z in seqs.items()}
        loss = 0.0
        for a in seqs:
            for b in seqs:
                logp = torch.log_softmax(seqs[b][:, t + 1] @ preds[a].t(), 1).diagonal()  # rows = targets
                w = torch.full((B,), 1.0 if a != b else self_w)
                if "P" in (a, b) and p_weight is not None:
                    w = w * p_weight[:, t + 1]  # PMR: new-code positions get exp(-gamma)
                loss = loss - (w * logp).sum() / B
        return loss


class CMoEAdapter(nn.Module):
    """Eq. (4) MoE(x) = sum_j G_j(x) E_j(x), G = softmax(W_g x); E_j = common C_j + specific S_{j,m}."""

    def __init__(self, mods: List[str], dim: int, n_experts: int, specific: bool):
        super().__init__()
        self.router = nn.Linear(dim, n_experts)
        self.common_w = nn.Parameter(0.01 * torch.randn(n_experts, dim, dim))
        self.common_b = nn.Parameter(torch.zeros(n_experts, dim))
        self.spec_w = nn.ParameterDict({m: nn.Parameter(0.01 * torch.randn(n_experts, dim, dim)) for m in mods} if specific else {})
        self.spec_b = nn.ParameterDict({m: nn.Parameter(torch.zeros(n_experts, dim)) for m in mods} if specific else {})

    def forward(self, z, m: str):
        g = torch.softmax(self.router(z.mean(1)), -1)  # [B, O], one gate vector per sample
        w, b = self.common_w, self.common_b
        if m in self.spec_w:  # modality m activates only its own specific layer
            w, b = w + self.spec_w[m], b + self.spec_b[m]
        # experts are linear, so sum_j g_j (W_j z + b_j) = (sum_j g_j W_j) z + sum_j g_j b_j
        w_mix, b_mix = torch.einsum("bo,oij->bij", g, w), g @ b
        return z + torch.einsum("btj,bij->bti", z, w_mix) + b_mix[:, None], g


def gate_balance_loss(g):
    """Eq. (5) L_gate = 1/U sum_j (L_j / I - 1)^2, L_j = sum_i G_ij, I = B / U."""
    B, U = g.shape
    return ((g.sum(0) / (B / U) - 1) ** 2).mean()


def ewc_penalty(named: Dict[str, torch.Tensor], fisher: Dict[str, torch.Tensor], star: Dict[str, torch.Tensor], lam: float):
    """Eq. (6) L_EWC = sum_i lambda/2 F_i (theta_i - theta*_i)^2."""
    return sum((lam / 2 * fisher[n] * (p - star[n]) ** 2).sum() for n, p in named.items() if n in fisher)


class Decoder(nn.Module):
    """Reconstruction from the quantised vector and the modality-specific feature (CMG decoder, linear)."""

    def __init__(self, dim: int, d_spec: int, d_out: int):
        super().__init__()
        self.q = nn.Linear(dim, d_spec)
        self.out = nn.Linear(2 * d_spec, d_out)

    def forward(self, q, y):
        return self.out(torch.cat([self.q(q), y], -1))


class CometModel(nn.Module):
    """Phi_m (Linear + transformer over time), Psi_m, decoders, CLUB nets, Cross-CPC streams, adapter, codebook."""

    def __init__(self, args: Args, dims: Dict[str, int], use_moe: bool):
        super().__init__()
        D = args.d_model

        def phi(d):
            layers = [nn.TransformerEncoderLayer(D, args.n_heads, args.d_ffn, 0.1, batch_first=True) for _ in range(args.n_layers)]
            return nn.Sequential(nn.Linear(d, D), *layers)

        self.phi = nn.ModuleDict({m: phi(d) for m, d in dims.items()})
        self.psi = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, args.d_spec), nn.ReLU()) for m, d in dims.items()})
        self.dec = nn.ModuleDict({m: Decoder(D, args.d_spec, d) for m, d in dims.items()})
        self.club = nn.ModuleDict({m: CLUB(D, args.d_spec, D) for m in dims})
        self.cpc = CrossCPC(list(dims) + ["P"], D)
        self.adapter = CMoEAdapter(list(dims), D, args.n_experts, not args.no_specific_layers) if use_moe else None
        self.codebook = Codebook(args.k1, D, args.ema_decay)

    def encode(self, m: str, x):
        z, g = self.phi[m](x), None
        if self.adapter is not None:
            z, g = self.adapter(z, m)
        return z, g


# ----------------------------------------------------------------------------- COMET continual pieces
@torch.no_grad()
def pseudo_modality(z_med, teacher, new_codes, new_weight: float):
    """PMR: nearest code of every mediator step in [frozen previous codebook ; current new codes];
    returns the pseudo sequence P [B, T, D] and per-position weights (1 old code, exp(-gamma) new code)."""
    U = torch.cat([teacher, new_codes])
    j = sq_dist(z_med, U).argmin(-1)
    w = torch.where(j < len(teacher), torch.ones_like(j, dtype=torch.float), torch.full_like(j, new_weight, dtype=torch.float))
    return U[j], w


def pair_losses(model: CometModel, args: Args, x: Dict[str, torch.Tensor], pmr, update: bool, club_opt=None):
    """All DCID (+COMET) losses of one bimodal batch; `update` runs MM-EMA and the CLUB inner steps."""
    cb, (c, b) = model.codebook, list(x)
    z, g, idx, e = {}, {}, {}, {}
    for m in (c, b):
        z[m], g[m] = model.encode(m, x[m])
        idx[m] = cb.assign(z[m])
        e[m] = cb.embed[idx[m]]
    q = {m: st_quantize(z[m], e[m]) for m in (c, b)}
    L = {"commit": commit_loss(z[c], e[c], e[b], args.beta) + commit_loss(z[b], e[b], e[c], args.beta)}
    L["cmcm"] = cmcm_loss(z[c], z[b], cb.embed.clone())  # clone: MM-EMA updates embed in place
    if update:  # Eq. (3): both modalities, each mixed with its cross-modal partner
        feats = [(z[c] + partner(z[c], z[b], args.ema_partner)) / 2, (z[b] + partner(z[b], z[c], args.ema_partner)) / 2]
        cb.ema_update([f.detach() for f in feats], [idx[c], idx[b]])
    y = {m: model.psi[m](x[m]) for m in (c, b)}
    if update:  # alternating optimisation: fit q(y|x) on detached inputs first
        for _ in range(args.club_steps):
            club_opt.zero_grad()
            (-sum(model.club[m].loglik(q[m].detach(), y[m].detach()) for m in (c, b))).backward()
            club_opt.step()
    perm = torch.randperm(len(x[c]))
    L["mi"] = sum(model.club[m].mi_est(q[m], y[m], perm) for m in (c, b))
    L["recon"] = sum(F.mse_loss(model.dec[m](q[m], y[m]), x[m]) for m in (c, b))
    seqs, p_weight = {c: z[c], b: z[b]}, None
    if pmr is not None:  # METHOD LOGIC: pseudo-modality stream from the frozen previous codebook
        teacher, k_prev = pmr
        seqs["P"], p_weight = pseudo_modality(z[MEDIATOR], teacher, cb.embed[k_prev:], args.pmr_new_weight)
    t = int(torch.randint(1, x[c].shape[1] - 1, ()))
    L["cpc"] = model.cpc(seqs, t, args.cpc_self_weight, p_weight)
    if model.adapter is not None and not args.no_gate_loss:
        L["gate"] = args.gate_weight * sum(gate_balance_loss(g[m]) for m in (c, b))
    return L


def ewc_named(model: CometModel) -> Dict[str, torch.Tensor]:
    """Parameters under EWC: router, common layers and specific layers (F = 0 until a modality is activated)."""
    return dict(model.adapter.named_parameters()) if model.adapter is not None else {}


def compute_fisher(model: CometModel, args: Args, batches, pmr) -> Dict[str, torch.Tensor]:
    """Empirical Fisher: mean squared gradient of (commit + cmcm + cpc), normalised to mean 1 (nonzero entries)."""
    named = ewc_named(model)
    fisher = {n: torch.zeros_like(p) for n, p in named.items()}
    model.eval()
    for x in batches:
        L = pair_losses(model, args, x, pmr, update=False)
        grads = torch.autograd.grad(L["commit"] + L["cmcm"] + L["cpc"], list(named.values()), allow_unused=True)
        for n, gr in zip(named, grads):
            if gr is not None:
                fisher[n] += gr.detach() ** 2 / len(batches)
    model.train()
    nz = torch.cat([f[f > 0] for f in fisher.values()])
    return {n: f / nz.mean() for n, f in fisher.items()} if len(nz) else fisher


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def quantize_all(model: CometModel, m: str, x: np.ndarray, bs: int = 512):
    """Frozen encoder -> (code vectors [N, T, D], code indices [N, T], gates [N, O] or None)."""
    q, idx, gs = [], [], []
    for i in range(0, len(x), bs):
        z, g = model.encode(m, torch.from_numpy(x[i : i + bs]))
        j = model.codebook.assign(z)
        q.append(model.codebook.embed[j]), idx.append(j), gs.append(g)
    return torch.cat(q), torch.cat(idx), (torch.cat(gs) if gs[0] is not None else None)


def train_head(feats, targets, n_out: int, per_step: bool, args: Args, seed: int):
    """Full-batch Adam on a Linear -> (max over T) -> Linear head from a seeded init; CE or per-step BCE."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = nn.Sequential(nn.Linear(feats.shape[-1], feats.shape[-1]), nn.Linear(feats.shape[-1], n_out))
    opt = torch.optim.Adam(head.parameters(), lr=args.cls_lr)
    for _ in range(args.cls_steps):
        if per_step:
            loss = F.binary_cross_entropy_with_logits(head(feats), targets)
        else:
            loss = F.cross_entropy(head[1](head[0](feats).amax(1)), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def f1_score(logits, targets):
    pred = (torch.sigmoid(logits) > 0.5).float()
    tp, p, t = (pred * targets).sum(), pred.sum(), targets.sum()
    prec, rec = float(tp / p) if p > 0 else 0.0, float(tp / t) if t > 0 else 0.0
    return 100 * 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0


def downstream(model: CometModel, args: Args, dd: Dict[str, dict]) -> Dict[str, Dict[str, float]]:
    """AVE analog (classification) and AVVP analog (per-step localization), both directions + within."""
    q = {(s, m): quantize_all(model, m, dd[f"va_{s}"][m])[0] for s in ("train", "test") for m in ("video", "audio")}
    ytr, yte = (torch.from_numpy(dd[f"va_{s}"]["label"]) for s in ("train", "test"))
    n_cls = int(ytr.max()) + 1
    out = {"cls": {}, "loc": {}}
    for k, (src, tgt) in enumerate((("video", "audio"), ("audio", "video"))):
        head = train_head(q["train", src], ytr, n_cls, False, args, args.seed * 100 + k)
        with torch.no_grad():
            for m in (tgt, src):
                pred = head[1](head[0](q["test", m]).amax(1)).argmax(-1)
                out["cls"][f"{src[0].upper()}->{m[0].upper()}"] = float((pred == yte).float().mean() * 100)
        if "step_label" in dd["va_train"] and "step_label" in dd["va_test"]:
            onehot = [F.one_hot(torch.from_numpy(dd[f"va_{s}"]["step_label"]) + 1, n_cls + 1).float() for s in ("train", "test")]
            head = train_head(q["train", src], onehot[0], n_cls + 1, True, args, args.seed * 100 + 10 + k)
            with torch.no_grad():
                out["loc"][f"{src[0].upper()}->{tgt[0].upper()}"] = f1_score(head(q["test", tgt]), onehot[1])
    return out


@torch.no_grad()
def retrieval(model: CometModel, dd: Dict[str, dict]) -> Dict[str, dict]:
    """Zero-shot R@1/5/10 both ways: cosine of the L2-normalised time-mean quantised vectors."""
    out = {}
    for pair in RET_PAIRS:
        if f"{pair.lower()}_test" not in dd:
            continue
        a, b = (LETTER[c] for c in pair)
        ea, eb = (F.normalize(quantize_all(model, m, dd[f"{pair.lower()}_test"][m])[0].mean(1), dim=-1) for m in (a, b))
        fwd, bwd = common.recall_at_k(ea @ eb.t()), common.recall_at_k(eb @ ea.t())
        out[pair] = {f"{pair[0]}->{pair[1]}": fwd, f"{pair[1]}->{pair[0]}": bwd, "avg": float(np.mean(fwd + bwd))}
    return out


@torch.no_grad()
def diagnostics(model: CometModel, args: Args, dd: Dict[str, dict]) -> Dict[str, Optional[float]]:
    """Code sharing, same-pair V/A code agreement, perplexity, expert load entropy."""
    probes = {"video": [dd["va_test"]["video"]], "audio": [dd["va_test"]["audio"]], "text": [], "image": []}
    for name in ("vt_test", "at_test", "it_test", "ia_test"):
        for m in ("text", "image"):
            if name in dd and m in dd[name]:
                probes[m].append(dd[name][m])
    K = model.codebook.embed.shape[0]
    counts, gate_h, idx = {}, [], {}
    for m, xs in probes.items():
        if xs and m in model.phi:
            _, idx[m], g = quantize_all(model, m, np.concatenate(xs))
            counts[m] = torch.bincount(idx[m].flatten(), minlength=K).float()
            if g is not None:
                gate_h.append(entropy(g.mean(0)))
    used = torch.stack([c / c.sum() >= args.use_threshold for c in counts.values()]).sum(0)
    mode_v, mode_a = idx["video"].mode(1).values, idx["audio"].mode(1).values
    return {
        "multi_share": float((used >= 2).float().mean() * 100),
        "code_agree": float((mode_v == mode_a).float().mean() * 100),
        "perplexity": float(np.exp(entropy(sum(counts.values())))),
        "gate_entropy": float(np.mean(gate_h)) if gate_h else None,
        "n_codes": float(K),
    }


def evaluate(model: CometModel, args: Args, dd: Dict[str, dict]) -> dict:
    model.eval()
    out = downstream(model, args, dd)
    out["ret"], out["diag"] = retrieval(model, dd), diagnostics(model, args, dd)
    model.train()
    return out


def stage_table(evals: List[dict], row_names: List[str]) -> str:
    cols = ["V>A", "A>V", "V>V", "F1va", "F1av", "VT", "AT", "IT", "VA", "IA", "multi", "agree", "ppl", "gateH"]
    rows = []
    for ev in evals:
        r = [ev["cls"].get(k) for k in ("V->A", "A->V", "V->V")] + [ev["loc"].get(k) for k in ("V->A", "A->V")]
        r += [ev["ret"][p]["avg"] if p in ev["ret"] else None for p in RET_PAIRS]
        rows.append(r + [ev["diag"][k] for k in ("multi_share", "code_agree", "perplexity", "gate_entropy")])
    return common.format_matrix(rows, row_names, cols)


# ----------------------------------------------------------------------------- main
def validate(args: Args) -> List[List[str]]:
    """Check the arguments; return the stages (lists of pairs) or exit with code 2."""
    for p in args.order:
        if p not in data.COMET_PAIR_CLASSES:
            common.die(f"--order: unknown pair '{p}' (choose from {list(data.COMET_PAIR_CLASSES)}, each with the mediator text)")
    if len(set(args.order)) != len(args.order) or not args.order:
        common.die(f"--order: pairs must be distinct and non-empty, got {args.order}")
    if args.ema_partner not in ("attention", "aligned"):
        common.die(f"--ema-partner must be 'attention' or 'aligned', got '{args.ema_partner}'")
    for name in ("epochs", "batch_size", "d_model", "k1", "n_experts", "seq_len", "n_pairs", "n_per_class", "n_test"):
        if getattr(args, name) < 1:
            common.die(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 3:
        common.die("--seq-len must be >= 3 (Cross-CPC predicts step t+1 from t in 1..T-2)")
    return [list(args.order)] if args.joint else [[p] for p in args.order]


def main(args: Args) -> dict:
    stages = validate(args)
    try:  # validate all input data before anything is written
        if args.data_dir:
            dd = data.load_comet_npz(args.data_dir, args.order)
        else:
            dd = data.comet_benchmark(args.seed, args.n_pairs, args.n_per_class, args.n_test, args.seq_len,
                                      args.sty, args.noise, args.shared, args.dom)
    except data.DataError as e:
        common.die(str(e))
    if args.seq_len < 3 or dd["va_train"]["video"].shape[1] < 3:
        common.die("sequences need T >= 3 steps")

    # TRY NOT TO MODIFY: seeding, device, run dir, tracker
    gen = common.seed_everything(args.seed, args.torch_deterministic)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = common.pick_device(args.cuda)  # the model is CPU-sized; it always runs on CPU
    run_name = f"{'npz' if args.data_dir else 'synthetic'}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = common.make_run_dir(args, run_name)
    tracker = common.maybe_tracker(args, run_name)
    print(f"run {run_name} -> {run_dir} (device: cpu, cuda available: {device.type == 'cuda'})")

    use_moe = not (args.no_moe or args.no_comet)
    use_pmr, expand = not (args.no_pmr or args.no_comet), not args.no_comet
    dims = {}
    for d in dd.values():
        dims.update({m: a.shape[-1] for m, a in d.items() if a.ndim == 3})
    dims = {m: dims[m] for m in ("video", "audio", "text", "image") if m in dims}
    model = CometModel(args, dims, use_moe)
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, adapter={use_moe}, pmr={use_pmr}, expand={expand}")
    club_params = set(model.club.parameters())
    club_opt = torch.optim.Adam(model.club.parameters(), lr=args.club_lr)
    stage_names = ["+".join(s) for s in stages]
    evals, row_names = [evaluate(model, args, dd)], ["init"] + [f"after {n}" for n in stage_names]
    fisher, star, pmr, reset_from, sw, n_steps = {}, {}, None, 0, common.Stopwatch(), 0

    for k, pairs in enumerate(stages):
        # METHOD LOGIC: before a new stage, freeze the old codebook as the PMR teacher and expand it
        if k > 0 and expand:
            teacher, reset_from = model.codebook.embed.clone(), model.codebook.embed.shape[0]
            model.codebook.expand(args.k2)
            pmr = (teacher, reset_from) if use_pmr else None
        train = {p: {LETTER[c]: torch.from_numpy(dd[f"{p.lower()}_train"][LETTER[c]]) for c in p} for p in pairs}
        n_min = min(len(next(iter(t.values()))) for t in train.values())
        bs = min(args.batch_size, n_min)
        params = [p for p in model.parameters() if p not in club_params]  # fixed during the stage (codes are buffers)
        opt = torch.optim.Adam(params, lr=args.lr)
        for epoch in range(args.epochs):
            perms = {p: torch.randperm(n_min, generator=gen) for p in pairs}
            sums, t0, steps = {}, time.perf_counter(), n_min // bs
            with sw:
                for i in range(steps):
                    opt.zero_grad()
                    for p in pairs:  # one pair per stage; all pairs (gradients summed) with --joint
                        batch = {m: v[perms[p][i * bs : (i + 1) * bs]] for m, v in train[p].items()}
                        L = pair_losses(model, args, batch, pmr, update=True, club_opt=club_opt)
                        if fisher and not args.no_ewc:  # METHOD LOGIC: EWC on the adapter
                            L["ewc"] = ewc_penalty(ewc_named(model), fisher, star, args.ewc_lambda)
                        sum(L.values()).backward()  # Sec. 3.4: L = recon + commit + cpc + cmcm + MI + gate (+ EWC)
                        for n_, v in L.items():
                            sums[n_] = sums.get(n_, 0.0) + float(v.detach()) / steps
                    nn.utils.clip_grad_norm_(params, args.clip)
                    opt.step()
                    model.codebook.reset_dead(args.reset_after, start=reset_from)
            n_steps += steps
            dt = time.perf_counter() - t0
            parts = " ".join(f"{n_} {v:.3f}" for n_, v in sums.items())
            print(f"[{stage_names[k]}] epoch {epoch + 1}/{args.epochs} loss {sum(sums.values()):.3f} ({parts}) "
                  f"K {model.codebook.embed.shape[0]} {dt:.1f}s {steps * len(pairs) * bs / max(dt, 1e-9):.0f} pairs/s")
            if tracker:
                tracker.log({f"train/{n_}": v for n_, v in sums.items()} | {"stage": k, "epoch": epoch})

        # METHOD LOGIC: after the stage, accumulate the Fisher on this stage's data (it is gone afterwards)
        if use_moe and not args.no_ewc and k < len(stages) - 1:
            p0 = pairs[0]
            idx = torch.randperm(n_min, generator=gen)
            batches = [{m: v[idx[(i * bs) % n_min :][:bs]] for m, v in train[p0].items()} for i in range(args.fisher_batches)]
            new = compute_fisher(model, args, batches, pmr)
            fisher = {n: fisher.get(n, 0) + f for n, f in new.items()}
            star = {n: p.detach().clone() for n, p in ewc_named(model).items()}
        evals.append(evaluate(model, args, dd))
        print(f"--- after stage {k + 1} ({stage_names[k]}), codes {model.codebook.embed.shape[0]}:")
        print(stage_table(evals, row_names))
        if args.save_model:
            torch.save({"model": model.state_dict(), "fisher": fisher, "star": star, "args": vars(args)},
                       os.path.join(run_dir, f"{args.exp_name}_stage{k + 1}.pt"))

    # matrices: rows = init + stages; entries = stage pairs, other retrieval pairs, directions, "all"
    dirs = ["V->A", "A->V", "V->V", "A->A"]
    entries = stage_names + [p for p in RET_PAIRS if p not in stage_names] + dirs + ["all"]
    M: Dict[str, common.Matrix] = {}

    def put(metric, row, entry, value):
        M.setdefault(metric, [[None] * len(entries) for _ in evals])[row][entries.index(entry)] = value

    for r, ev in enumerate(evals):
        for pair, v in ev["ret"].items():
            put("ret_avg", r, pair, v["avg"])
            for dname in (f"{pair[0]}->{pair[1]}", f"{pair[1]}->{pair[0]}"):
                for kk, val in zip((1, 5, 10), v[dname]):
                    put(f"ret_r{kk}_{'fwd' if dname[0] == pair[0] else 'bwd'}", r, pair, val)
        for task in ("cls", "loc"):
            for dname, val in ev[task].items():
                put(f"{task}_{'acc' if task == 'cls' else 'f1'}", r, dname, val)
        for kk, val in ev["diag"].items():
            put(kk, r, "all", val)

    last = evals[-1]
    vt_stage = stage_names.index("VT") + 1 if "VT" in stage_names else None
    vt = [ev["ret"].get("VT", {}).get("avg") for ev in evals]
    seen = [[ev["ret"][s]["avg"] if s in ev["ret"] else None for s in stage_names] for ev in evals]
    va4 = [last["cls"]["V->A"], last["cls"]["A->V"]] + list(last["loc"].values())
    summary = {
        "va_acc": float(np.mean([last["cls"]["V->A"], last["cls"]["A->V"]])),
        "va_f1": float(np.mean(list(last["loc"].values()))) if last["loc"] else None,
        "va_avg": float(np.mean(va4)),
        "vv_acc": last["cls"]["V->V"],
        "retrieval": {p: {row_names[r]: ev["ret"][p] for r, ev in enumerate(evals) if p in ev["ret"]} for p in RET_PAIRS},
        "vt_forgetting": (vt[vt_stage] - vt[-1]) if vt_stage and vt[-1] is not None else None,
        "seen_forgetting": common.forgetting(seen) if len(stage_names) > 1 and None not in seen[-1] else None,
        "va_ret": last["ret"].get("VA", {}).get("avg"),
        "ia_ret": last["ret"].get("IA", {}).get("avg"),
        "diag": last["diag"],
        "train_seconds": sw.total,
        "train_steps": n_steps,
    }
    results = {"run_name": run_name, "args": vars(args), "stages": stage_names, "rows": row_names,
               "entries": entries, "matrices": M, "evals": evals, "summary": summary}
    print(f"summary: va_acc {summary['va_acc']:.1f}  va_f1 {summary['va_f1'] or 0:.1f}  VT forgetting "
          f"{summary['vt_forgetting'] if summary['vt_forgetting'] is None else round(summary['vt_forgetting'], 1)}  "
          f"train {sw.total:.0f}s ({n_steps} steps)")
    common.write_metrics_csv(os.path.join(run_dir, "metrics.csv"), M, entries)
    common.write_json(os.path.join(run_dir, "results.json"), results)  # last: a failed run leaves no results.json
    if tracker:
        tracker.log({f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        tracker.finish()
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
