"""COMET: Continual Cross-Modal Generalization with a CMoE-Adapter and Pseudo-Modality Replay.

Paper: Xia, Huang, Fang, Zhao. "Continual Cross-Modal Generalization", arXiv 2504.00561 (COMET).
Base model: CMG / DCID, Xia et al., "Achieving Cross Modal Generalization with Multimodal Unified
Representation", NeurIPS 2023 (github.com/haihuangcode/CMG; read, not copied).

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
    python comet.py --no-pmr                         # Table 6 ablations: --no-pmr, --no-moe, --no-gate-loss, ...
    python comet.py --no-pmr --no-expand             # "w/o PM (paper scope)": fixed codebook, no replay
    python comet.py --pmr-assign union               # PMR variants: --pmr-assign union|teacher, --pmr-mediator frozen
    python comet.py --no-comet                       # continual DCID (fixed codebook, no adapter, no replay)
    python comet.py --no-comet --k1 64               # same-capacity DCID control (COMET ends with 32+16+16 codes)
    python comet.py --joint --no-comet               # non-continual oracle: all pairs in one stage
    python comet.py --order VT ST AT                 # the segmentation experiments' order (built-in speech)
    python comet.py --avvp-loss bce+explog           # per-step heads with CMG's ExpLogLoss beside BCE
    python comet.py --data-dir feats/                # real features {vt,at,it,st,va}_{train,test}.npz, ia_test.npz,
                                                     # avvp_test.npz
                                                     # (each stage trains >= --min-steps-per-stage 300 steps)
    python comet.py --resume runs/RUN                # continue a killed run from its last completed stage

Metrics (after every stage; row 0 = untrained model). Percent unless noted.
    cls X->Y   accuracy of a classifier (Linear -> max over T -> Linear) trained on modality X's quantised
               codes (va_train) and tested on Y's codes (va_test): the AVE analog; X->X = within-modality
    loc X->Y   F1 = 2PR/(P+R) of a per-step classifier (Linear -> Linear, BCE, threshold 0.5) over all
               step x class cells (background included): the AVVP analog
    xds X->Y   AVE -> AVVP (CMG's ave_avvp): a per-step classifier trained on X's codes of va_train, its F1 on
               Y's codes of the other data set avvp_test (shorter events, per-modality step labels)
    ret XY     R@1/5/10 for X->Y and Y->X (cosine of the time-mean quantised vectors, ties in expectation,
               common.recall_at_k); avg = mean of the 6 numbers. Seen pairs VT/AT/IT (ST), unseen VA/IA;
               every item of {pair}_test is a candidate (VA: va_test, 8 x n_per_class; extra.ret_candidates)
    va_acc     mean(cls V->A, cls A->V) after the last stage; va_f1, va_xds likewise; va_avg = mean of cls and loc
               (4 numbers, va_avg_s{k}: after stage k); va_avg6 = the paper's "Avg.", mean of cls, loc and xds
               (6 numbers, va_avg6_s{k})
    vt_forgetting  ret VT avg right after the VT stage - after the last stage
    seen_forgetting  common.forgetting of the stage x stage seen-pair matrix (Chaudhry et al.); seen_aia and
               seen_fwt: its average incremental R-avg and forward transfer (common.py's docstring)
    multi_share share of all K codes used by >= 2 modalities (used = >= `use_threshold` of that modality's
               probe tokens); code_agree = % of va_test pairs whose most frequent video and audio codes
               are equal (CMG's equal_num); perplexity = exp(entropy of code usage) (not %);
               gate_entropy = mean over modalities of the entropy of the mean gate vector (nats; log 6 = 1.79)

Outputs (common.results_envelope): `tasks` = the stages; `matrices` = the stage pairs' retrieval
(ret_avg, ret_r{1,5,10}_{fwd,bwd}; a --joint stage scores the mean over its pairs); `extra` holds per-row
series: `retrieval` (every pair, unseen VA/IA included), `downstream` (cls_acc, loc_f1, va_avg, xds_f1,
va_avg6), `diagnostics`, `ret_candidates`, `train_steps`, and per stage from stage 2 on: `pmr_old_share` and
`pmr_cpc_share` (per epoch: share of pseudo positions on old teacher codes; share of the Cross-CPC loss from the
terms with P) and `pmr_tau` (the threshold rule's tau_k); `summary` is flat. Exit codes: 0 done, 1 diverged (a
non-finite loss stops the run at the end of its epoch, naming stage, epoch and term; no results.json), 2 bad input
or hyperparameter (nothing written).

Seeds (paired across configurations): every module is initialised from its own seed
common.derive_seed(seed, "init/<module>"); at the start of stage k the batch order, the CLUB negatives and
CPC steps, the Fisher batches, dead-code resets, new codes and dropout restart from (seed, stream, k); the
evaluation heads use fixed derived seeds. Within one seed, configurations share everything they have in common.

Deviations and assumptions (where the paper is silent, the choice is stated here):
  1. Sizes scaled for CPU: D = 32, 1 transformer layer, Psi = Linear+ReLU to 16, linear decoders,
     K1 = 32, K2 = 16, batch 64, Adam 1e-3, clip 1.0, float32; every size is a flag. With --data-dir a stage
     trains max(--epochs, ceil(--min-steps-per-stage / steps per epoch)) epochs so that a few hundred pairs are
     not left at chance; the built-in benchmark always trains --epochs. Inputs are
     pre-extracted [N, T, d] sequences; video has no 7x7 spatial map and text no BERT/BiLSTM front end.
  2. MM-EMA (Eq. 3) as the paper writes it: one joint update with a parameter-free cross-attention partner
     r^b = softmax(z^a z^bT / sqrt D) z^b; `--official-aligned-partner` is the released code's same-index
     partner. Counts start at 1 (not 0) so unused codes stay put; Laplace smoothing as in the code.
  3. Dead-code reset after `reset_after` idle batches to an active code + U(+-1/128); from stage 2 on only
     new codes (index >= K_prev) are reset (the old codes stay the teacher's), DCID (and --no-expand) resets anywhere.
  4. Adapter: residual z~ = z + sum_j G_j (C_j z + S_{j,m} z), router on the time-mean (one gate vector per
     sample), init N(0, 0.01) so it starts as the identity; VQ, CMCM, CLUB and CPC all use z~.
  5. EWC: empirical Fisher = mean squared gradient of (commit + cmcm + cpc) over `fisher_batches` batches at
     the end of each stage, normalised to mean 1 over its nonzero entries, accumulated over stages; it
     protects the router too; lambda = 10 (not given in the paper).
  6. PMR: P_t = the teacher code (frozen previous codebook) nearest to the mediator's feature if its squared
     distance is <= tau_k, else the nearest new code ("if a code matching the semantics ... can be found in V1";
     the paper gives no rule). tau_k = the --pmr-quantile 0.95 quantile of stage k-1's own quantisation distances
     (every step of stage k-1's training captions to its nearest end-of-stage code, eval mode), fixed at the start
     of stage k, chosen before any V<->A result: only this rule asks whether V1 holds
     a match without letting the live new codes decide. --pmr-assign union (nearest over [teacher ; new codes],
     the rule of the first version) and teacher (always the nearest teacher code) are the alternatives. The mediator
     feature is the live one (the paper's "current B-modal sequence"); --pmr-mediator frozen uses a copy of
     Phi_text + adapter from the end of stage k-1. P gets its own CPC stream (6 cross terms at 1.0, 3 self at
     0.1); weight exp(-gamma) per sample on every term involving P, read at the predicted step t+1.
  7. --no-pmr keeps the expanding codebook and restricted reset (only the pseudo-modality stream is removed);
     --no-expand keeps one codebook of k1 codes (replay from its frozen copy); --no-moe removes the adapter
     and with it gate, EWC and specific layers (as in Table 6), so those switches are refused beside it.
  8. CPC: 1-layer LSTM (paper; the code has 2), 1 prediction step. CLUB: 3 inner Adam steps (code: 5).
     Per-step heads use BCE (--avvp-loss bce+explog adds CMG's ExpLogLoss); downstream heads are trained full
     batch for `cls_steps` steps from a seeded init, scored once at the end (CMG reports the best epoch on the test
     set), test sets are separate samples (CMG's ave.py tests on train videos).
  9. Runs on CUDA when available and --cuda (the model is CPU-sized; only CPU runs are promised
     bit-identical across a --resume). There the dead-code reset is masked (reset_dead_masked: same rule, its own
     device generator, no host sync per step), so CUDA and CPU runs draw different resets.
 10. Speech (--order VT ST AT): a built-in speech modality renders the caption's token plan step by step (speech
     step t says text token t); real speech features must be time-aligned to the caption's T steps. The paper's
     Table 5 task (Ref-YouTube-VOS segmentation with ReferFormer) is out of scope.
"""

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Literal, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import common
import data

RET_PAIRS = ["VT", "AT", "IT", "VA", "IA", "ST"]
RET_KEYS = ["avg"] + [f"r{k}_{d}" for d in ("fwd", "bwd") for k in (1, 5, 10)]
LETTER = data.COMET_LETTERS
MEDIATOR = "text"
COMET_SWITCHES = ("pmr", "expand", "moe", "gate_loss", "ewc", "specific_layers")  # only with --comet
ADAPTER_SWITCHES = ("gate_loss", "ewc", "specific_layers")  # only with --moe
PMR_LOGS = ("pmr_old_share", "pmr_cpc_share")  # per epoch, from stage 2 on, when the P stream exists
AUX_TERMS = ("club_nll",) + PMR_LOGS  # logged per epoch beside the losses, not part of the loss


@dataclass
class Args:
    """COMET (arXiv 2504.00561): learn one shared discrete code space over stages VT -> AT -> IT (one modality
    pair per stage, bridged by text) with a CMoE-Adapter, an expanding codebook and Pseudo-Modality Replay;
    after every stage score zero-shot V<->A transfer, cross-modal retrieval and code sharing. --no-comet runs
    the continual DCID baseline. Writes args.json, results.json and metrics.csv to the run dir."""

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
    data_dir: Optional[str] = None
    """folder of real features `{pair}_{split}.npz` (see data.load_comet_npz); default: built-in benchmark"""
    order: List[str] = field(default_factory=lambda: ["VT", "AT", "IT"])
    """the stages, one pair each, every pair with the mediator text (VT, AT, IT, ST = speech)"""
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
    """built-in: shared component of the class prototypes (confusability), in [0, 1]"""
    dom: float = 1.5
    """built-in: size of the dataset-specific text-domain offset (mediator drift between stages)"""

    # Algorithm specific arguments
    comet: bool = True
    """COMET; --no-comet = continual DCID baseline: no adapter, no PMR, fixed codebook of k1 codes, reset anywhere"""
    pmr: bool = True
    """pseudo-modality replay stream (--no-pmr: ablation; the codebook still expands)"""
    expand: bool = True
    """expanding codebook with reset restricted to new codes (--no-expand: fixed codebook of k1 codes)"""
    moe: bool = True
    """CMoE-Adapter (--no-moe: ablation, hence no gate loss, EWC or specific layers)"""
    gate_loss: bool = True
    """load-balancing loss of the adapter's router (--no-gate-loss: ablation)"""
    ewc: bool = True
    """EWC on the adapter (--no-ewc: ablation)"""
    specific_layers: bool = True
    """modality-specific expert layers (--no-specific-layers: experts are the common layer only)"""
    joint: bool = False
    """oracle: train all pairs of --order together in one (non-continual) stage"""
    official_aligned_partner: bool = False
    """MM-EMA partner as in the CMG code (same-index vector) instead of the paper's cross-attention"""
    epochs: int = 10
    """epochs per task (COMET stage)"""
    min_steps_per_stage: int = 300
    """--data-dir only: a stage trains max(epochs, ceil(this / steps per epoch)) epochs (0 = off; built-in: unused)"""
    batch_size: int = 64
    """pairs per batch (in-batch negatives for CPC and CMCM)"""
    lr: float = 1e-3
    """Adam learning rate of the main network"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    d_model: int = 32
    """semantic / code dimension D (CMG: 256)"""
    n_layers: int = 1
    """transformer layers per semantic encoder (CMG: 2)"""
    n_heads: int = 2
    """attention heads, must divide d_model (CMG: 4)"""
    d_ff: int = 64
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
    """codebook EMA decay, in (0, 1)"""
    reset_after: int = 100
    """re-initialise a code after this many batches without use"""
    club_steps: int = 3
    """inner Adam steps of the CLUB approximation nets per batch (CMG: 5)"""
    club_lr: float = 1e-3
    """learning rate of the CLUB nets"""
    cpc_self_weight: float = 0.1
    """weight of same-modality CPC terms (cross-modal terms have 1.0)"""
    num_experts: int = 6
    """experts of the CMoE-Adapter"""
    gate_weight: float = 1.0
    """weight of the load-balancing loss"""
    ewc_lambda: float = 10.0
    """EWC strength lambda (Fisher normalised to mean 1)"""
    fisher_batches: int = 10
    """batches for the empirical Fisher at the end of a stage"""
    pmr_new_weight: float = 0.0
    """PMR weight exp(-gamma) of positions that fall on new codes (0 = gamma inf = masked; 0.368 = gamma 1)"""
    pmr_assign: Literal["threshold", "teacher", "union"] = "threshold"
    """PMR code: teacher code if within tau_k else nearest new code | always teacher | nearest of [teacher; new]"""
    pmr_quantile: float = 0.95
    """threshold rule: tau_k = this quantile of stage k-1's mediator-to-nearest-code squared distances, in (0, 1]"""
    pmr_mediator: Literal["live", "frozen"] = "live"
    """PMR mediator features: the live Phi_text (+adapter) or its frozen copy from the end of the previous stage"""
    avvp_loss: Literal["bce", "bce+explog"] = "bce"
    """loss of the per-step heads (loc, xds): BCE, or BCE + CMG's ExpLogLoss (learnable per-class alpha, init 0.1)"""
    cls_steps: int = 200
    """full-batch Adam steps of each downstream head"""
    cls_lr: float = 5e-3
    """learning rate of the downstream heads"""
    use_threshold: float = 0.01
    """a modality 'uses' a code if it gets at least this share of the modality's probe tokens, in (0, 1]"""


INFRA_FIELDS = ("exp_name", "seed", "torch_deterministic", "cuda", "track", "wandb_project_name", "wandb_entity",
                "tensorboard", "plot", "save_model", "out_dir", "resume", "num_threads")
METHOD_FIELDS = ("comet",) + COMET_SWITCHES + ("joint", "official_aligned_partner")
# results' `variant`: every other non-default algorithm/benchmark field (data_dir is the envelope's `data`)
VARIANT_FIELDS = ("order", "n_pairs", "n_per_class", "n_test", "seq_len", "sty", "noise", "shared", "dom", "epochs",
                  "min_steps_per_stage", "batch_size", "lr", "max_grad_norm", "d_model", "n_layers", "n_heads", "d_ff",
                  "d_spec", "k1", "k2", "beta", "ema_decay", "reset_after", "club_steps", "club_lr", "cpc_self_weight",
                  "num_experts", "gate_weight", "ewc_lambda", "fisher_batches", "pmr_new_weight", "pmr_assign",
                  "pmr_quantile", "pmr_mediator", "avvp_loss", "cls_steps", "cls_lr", "use_threshold")


# ----------------------------------------------------------------------------- small helpers
def st_quantize(z, codes):
    """Straight-through estimator: forward = codes, backward = identity to z."""
    return z + (codes - z).detach()


def sq_dist(z, codes):
    """Squared L2 distances [..., K] between vectors z [..., D] and codes [K, D]."""
    return (z * z).sum(-1, keepdim=True) - 2 * z @ codes.t() + (codes * codes).sum(-1)


@contextlib.contextmanager
def init_rng(seed: Optional[int], name: str):
    """Paired seeds: build a module from its own derived seed, whatever else the configuration builds
    (seed None = the global RNG, for the unit tests)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(common.derive_seed(seed, f"init/{name}"))
        yield


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A small CPU tensor on dev; to CUDA through pinned memory without a host sync (plain .to() syncs)."""
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t


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
        n, s = torch.zeros(K, device=self.embed.device), torch.zeros_like(self.embed)
        for f, i in zip(feats, idxs):
            onehot = F.one_hot(i.reshape(-1), K).float()
            n, s = n + onehot.sum(0), s + onehot.t() @ f.reshape(-1, f.shape[-1])
        self.count.mul_(self.decay).add_(n, alpha=1 - self.decay)
        total = self.count.sum()
        self.count.copy_((self.count + self.eps) / (total + K * self.eps) * total)  # Laplace smoothing
        self.weight.mul_(self.decay).add_(s, alpha=1 - self.decay)
        self.embed.copy_(self.weight / self.count[:, None])
        self.idle.add_(1)
        self.idle.masked_fill_(n > 0, 0)  # not idle[n > 0] = 0: boolean indexing syncs on CUDA

    @torch.no_grad()
    def reset_dead(self, after: int, start: int = 0, noise: float = 1 / 128, g=None) -> int:
        """Re-initialise codes idle for > `after` batches (only indices >= start) to an active code + noise;
        draws from the CPU generator g (None = global RNG). On CUDA: reset_dead_masked, g on the device."""
        if self.embed.is_cuda:
            return self.reset_dead_masked(after, start, noise, g)
        dead = self.idle > after
        dead[:start] = False
        active = torch.nonzero(self.idle < max(after // 3, 1)).flatten()
        if not dead.any() or len(active) == 0:
            return 0
        n, dev = int(dead.sum()), self.embed.device
        src = active[torch.randint(len(active), (n,), generator=g).to(dev)]
        shift = ((torch.rand(n, self.embed.shape[1], generator=g) * 2 - 1) * noise).to(dev)
        self.embed[dead] = self.embed[src] + shift
        self.weight[dead] = self.embed[dead] * self.count[dead, None]
        self.idle[dead] = 0
        return int(dead.sum())

    @torch.no_grad()
    def reset_dead_masked(self, after: int, start: int = 0, noise: float = 1 / 128, g=None) -> torch.Tensor:
        """reset_dead without host synchronisation: every code draws an active source and a shift from g (a generator
        on the codebook's device), torch.where keeps them for dead codes only; returns the count as a 0-d tensor."""
        (K, D), dev = self.embed.shape, self.embed.device
        active = self.idle < max(after // 3, 1)
        dead = (self.idle > after) & (torch.arange(K, device=dev) >= start) & active.any()
        w = torch.where(active.any(), active.float(), 1.0)  # all-zero weights are invalid; then no code is dead
        src = torch.multinomial(w, K, replacement=True, generator=g)  # K > 1 draws with replacement: no sync
        shift = (torch.rand(K, D, generator=g, device=dev) * 2 - 1) * noise
        self.embed.copy_(torch.where(dead[:, None], self.embed[src] + shift, self.embed))
        self.weight.copy_(torch.where(dead[:, None], self.embed * self.count[:, None], self.weight))
        self.idle.masked_fill_(dead, 0)
        return dead.sum()

    @torch.no_grad()
    def expand(self, k2: int, g=None):
        """COMET: keep the old codes bit-identical and append k2 new ones U(-1/K', 1/K') (CPU generator g)."""
        (K, D), dev = self.embed.shape, self.embed.device
        new = ((torch.rand(k2, D, generator=g) * 2 - 1) / (K + k2)).to(dev)
        self.embed = torch.cat([self.embed, new])
        self.weight = torch.cat([self.weight, new])
        self.count = torch.cat([self.count, torch.ones(k2, device=dev)])
        self.idle = torch.cat([self.idle, torch.zeros(k2, device=dev)])

    def resize_like(self, state: Dict[str, torch.Tensor], prefix: str = "codebook."):
        """Resume: give the buffers the shapes of a stored (expanded) codebook before load_state_dict."""
        for name in ("embed", "count", "weight", "idle"):
            setattr(self, name, torch.empty(state[prefix + name].shape, device=self.embed.device))


def partner(za, zb, aligned: bool):
    """r^b for query z^a: parameter-free cross-attention (paper) or the same-index vector (CMG code)."""
    if aligned:
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
    return 0.5 * F.cross_entropy(S, torch.arange(len(S), device=S.device))


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

    def __init__(self, streams: List[str], dim: int, seed: Optional[int] = None):
        super().__init__()
        self.lstm, self.pred = nn.ModuleDict(), nn.ModuleDict()
        for s in streams:
            with init_rng(seed, f"cpc/{s}"):
                self.lstm[s], self.pred[s] = nn.LSTM(dim, dim, batch_first=True), nn.Linear(dim, dim)

    def forward(self, seqs: Dict[str, torch.Tensor], t: int, self_w: float, p_weight=None):
        """Returns (loss, the part of it from the terms that involve the pseudo stream P)."""
        B = next(iter(seqs.values())).shape[0]
        preds = {a: self.pred[a](self.lstm[a](z[:, : t + 1])[0][:, -1]) for a, z in seqs.items()}
        loss, loss_p = 0.0, 0.0
        for a in seqs:
            for b in seqs:
                logp = torch.log_softmax(seqs[b][:, t + 1] @ preds[a].t(), 1).diagonal()  # rows = targets
                w = torch.full((B,), 1.0 if a != b else self_w, device=preds[a].device)
                if "P" in (a, b) and p_weight is not None:
                    w = w * p_weight[:, t + 1]  # PMR: new-code positions get exp(-gamma)
                term = (w * logp).sum() / B
                loss = loss - term
                if "P" in (a, b):
                    loss_p = loss_p - term
        return loss, loss_p


class CMoEAdapter(nn.Module):
    """Eq. (4) MoE(x) = sum_j G_j(x) E_j(x), G = softmax(W_g x); E_j = common C_j + specific S_{j,m}."""

    def __init__(self, mods: List[str], dim: int, num_experts: int, specific: bool, seed: Optional[int] = None):
        super().__init__()
        O = num_experts
        with init_rng(seed, "adapter/router"):
            self.router = nn.Linear(dim, O)
        with init_rng(seed, "adapter/common"):
            self.common_w = nn.Parameter(0.01 * torch.randn(O, dim, dim))
        self.common_b = nn.Parameter(torch.zeros(O, dim))
        self.spec_w, self.spec_b = nn.ParameterDict(), nn.ParameterDict()
        for m in mods if specific else []:
            with init_rng(seed, f"adapter/spec/{m}"):
                self.spec_w[m] = nn.Parameter(0.01 * torch.randn(O, dim, dim))
            self.spec_b[m] = nn.Parameter(torch.zeros(O, dim))

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


def ewc_penalty(named: Dict[str, torch.Tensor], fisher: Dict[str, torch.Tensor], star: Dict[str, torch.Tensor],
                lam: float):
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
        D, s = args.d_model, args.seed
        self.phi, self.psi, self.dec, self.club = (nn.ModuleDict() for _ in range(4))
        for m, d in dims.items():  # every module from its own seed: paired across configurations
            with init_rng(s, f"phi/{m}"):
                layers = [nn.TransformerEncoderLayer(D, args.n_heads, args.d_ff, 0.1, batch_first=True)
                          for _ in range(args.n_layers)]
                self.phi[m] = nn.Sequential(nn.Linear(d, D), *layers)
            with init_rng(s, f"psi/{m}"):
                self.psi[m] = nn.Sequential(nn.Linear(d, args.d_spec), nn.ReLU())
            with init_rng(s, f"dec/{m}"):
                self.dec[m] = Decoder(D, args.d_spec, d)
            with init_rng(s, f"club/{m}"):
                self.club[m] = CLUB(D, args.d_spec, D)
        self.cpc = CrossCPC(list(dims) + ["P"], D, s)
        self.adapter = CMoEAdapter(list(dims), D, args.num_experts, args.specific_layers, s) if use_moe else None
        with init_rng(s, "codebook"):
            self.codebook = Codebook(args.k1, D, args.ema_decay)

    def encode(self, m: str, x):
        z, g = self.phi[m](x), None
        if self.adapter is not None:
            z, g = self.adapter(z, m)
        return z, g


# ----------------------------------------------------------------------------- COMET continual pieces
class FrozenMediator:
    """--pmr-mediator frozen: eval-mode, gradient-free copy of Phi_text and the adapter at the end of stage k-1.
    A plain object, not a submodule, so neither Adam, EWC, the checkpoint nor model.train() sees it."""

    def __init__(self, model: CometModel):
        self.phi = copy.deepcopy(model.phi[MEDIATOR]).eval().requires_grad_(False)
        self.adapter = None if model.adapter is None else copy.deepcopy(model.adapter).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x):
        z = self.phi(x)
        return z if self.adapter is None else self.adapter(z, MEDIATOR)[0]


class Replay(NamedTuple):
    """PMR state of one stage k >= 2, fixed at its start from the end-of-stage-(k-1) model."""

    teacher: torch.Tensor
    """frozen copy of the previous codebook (K_prev codes)"""
    k_prev: int
    """index of the first new code in the live codebook"""
    tau: Optional[float] = None
    """threshold rule: the matching radius tau_k (squared L2)"""
    frozen: Optional[FrozenMediator] = None
    """--pmr-mediator frozen: the frozen mediator encoder"""


@torch.no_grad()
def calibrate_tau(model: CometModel, text: np.ndarray, q: float, bs: int = 512) -> float:
    """METHOD LOGIC: tau_k = q-quantile, over all steps of stage k-1's training captions, of the squared L2 distance
    of the mediator's feature (eval mode) to its nearest code in the end-of-stage codebook."""
    model.eval()
    dev, d = model.codebook.embed.device, []
    for i in range(0, len(text), bs):
        z, _ = model.encode(MEDIATOR, torch.from_numpy(text[i : i + bs]).to(dev))
        d.append(sq_dist(z, model.codebook.embed).min(-1).values.flatten())
    model.train()
    return float(np.quantile(torch.cat(d).double().cpu().numpy(), q))


@torch.no_grad()
def pseudo_modality(z_med, teacher, new_codes, new_weight: float, assign: str = "union", tau: Optional[float] = None):
    """PMR: one code per mediator step (Sec. 3.3). union: nearest in [teacher ; new codes]; teacher: nearest teacher
    code; threshold: nearest teacher code if its squared distance <= tau, else nearest new code (without new codes:
    the teacher code at weight 0). Returns P [B, T, D], per-position weights (1 on teacher codes, exp(-gamma)
    otherwise) and the mask of positions on teacher codes."""
    if assign == "union":  # --pmr-assign union: the new codes compete with the teacher
        U = torch.cat([teacher, new_codes])
        j = sq_dist(z_med, U).argmin(-1)
        P, old = U[j], j < len(teacher)
    else:
        d_t, j_t = sq_dist(z_med, teacher).min(-1)
        P, old = teacher[j_t], (torch.ones_like(j_t, dtype=torch.bool) if assign == "teacher" else d_t <= tau)
        if len(new_codes):
            P = torch.where(old[..., None], P, new_codes[sq_dist(z_med, new_codes).argmin(-1)])
    w_off = new_weight if len(new_codes) else 0.0
    w = torch.where(old, torch.ones_like(old, dtype=torch.float), torch.full_like(old, w_off, dtype=torch.float))
    return P, w, old


def pair_losses(model: CometModel, args: Args, x: Dict[str, torch.Tensor], pmr, update: bool, club_opt=None,
                rng=None):
    """All DCID (+COMET) losses of one bimodal batch; `update` runs MM-EMA and the CLUB inner steps; the CLUB
    negatives and the CPC step come from the CPU generator rng (None = global RNG); pmr is a Replay or None. Returns
    (losses, aux): aux = CLUB fit loss of the last inner step (0 without update) and, with PMR, the share of pseudo
    positions on old (teacher) codes and the share of the CPC loss from the P terms."""
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
        al = args.official_aligned_partner
        feats = [(z[c] + partner(z[c], z[b], al)) / 2, (z[b] + partner(z[b], z[c], al)) / 2]
        cb.ema_update([f.detach() for f in feats], [idx[c], idx[b]])
    y = {m: model.psi[m](x[m]) for m in (c, b)}
    club_nll = torch.zeros((), device=z[c].device)
    if update:  # alternating optimisation: fit q(y|x) on detached inputs first
        for _ in range(args.club_steps):
            club_opt.zero_grad()
            club_nll = -sum(model.club[m].loglik(q[m].detach(), y[m].detach()) for m in (c, b))
            club_nll.backward()
            club_opt.step()
    perm = to_device(torch.randperm(len(x[c]), generator=rng), z[c].device)
    L["mi"] = sum(model.club[m].mi_est(q[m], y[m], perm) for m in (c, b))
    L["recon"] = sum(F.mse_loss(model.dec[m](q[m], y[m]), x[m]) for m in (c, b))
    seqs, p_weight, aux = {c: z[c], b: z[b]}, None, {"club_nll": club_nll.detach()}
    if pmr is not None:  # METHOD LOGIC: pseudo-modality stream from the frozen previous codebook
        z_med = z[MEDIATOR] if pmr.frozen is None else pmr.frozen(x[MEDIATOR])
        seqs["P"], p_weight, old = pseudo_modality(z_med, pmr.teacher, cb.embed[pmr.k_prev :], args.pmr_new_weight,
                                                   args.pmr_assign, pmr.tau)
        aux["pmr_old_share"] = old.float().mean()
    t = int(torch.randint(1, x[c].shape[1] - 1, (), generator=rng))
    L["cpc"], cpc_p = model.cpc(seqs, t, args.cpc_self_weight, p_weight)
    if pmr is not None:
        aux["pmr_cpc_share"] = (cpc_p / L["cpc"].clamp_min(1e-12)).detach()
    if model.adapter is not None and args.gate_loss:
        L["gate"] = args.gate_weight * sum(gate_balance_loss(g[m]) for m in (c, b))
    return L, aux


def ewc_named(model: CometModel) -> Dict[str, torch.Tensor]:
    """Parameters under EWC: router, common layers and specific layers (F = 0 until a modality is activated)."""
    return dict(model.adapter.named_parameters()) if model.adapter is not None else {}


def compute_fisher(model: CometModel, args: Args, batches, pmr, rng=None) -> Dict[str, torch.Tensor]:
    """Empirical Fisher: mean squared gradient of (commit + cmcm + cpc), normalised to mean 1 (nonzero entries)."""
    named = ewc_named(model)
    fisher = {n: torch.zeros_like(p) for n, p in named.items()}
    model.eval()
    for x in batches:
        L, _ = pair_losses(model, args, x, pmr, update=False, rng=rng)
        grads = torch.autograd.grad(L["commit"] + L["cmcm"] + L["cpc"], list(named.values()), allow_unused=True)
        for n, gr in zip(named, grads):
            if gr is not None:
                fisher[n] += gr.detach() ** 2 / len(batches)
    model.train()
    nz = torch.cat([f[f > 0] for f in fisher.values()])
    return {n: f / nz.mean() for n, f in fisher.items()} if len(nz) else fisher


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def quantize_all(model: CometModel, m: str, x: np.ndarray, where: str = "", bs: int = 512):
    """Frozen encoder -> (code vectors [N, T, D], code indices [N, T], gates [N, O] or None); non-finite raises."""
    q, idx, gs = [], [], []
    for i in range(0, len(x), bs):
        z, g = model.encode(m, torch.from_numpy(x[i : i + bs]).to(model.codebook.embed.device))
        common.require_finite(z, f"{m} embeddings", where)
        j = model.codebook.assign(z)
        q.append(model.codebook.embed[j]), idx.append(j), gs.append(g)
    q = torch.cat(q)
    common.require_finite(q, f"{m} code vectors", where)
    return q, torch.cat(idx), (torch.cat(gs) if gs[0] is not None else None)


def explog_loss(logits, targets, alpha):
    """CMG's AVVP ExpLogLoss: -mean over steps of sum_c y_c log softmax(logits)_c exp(-alpha_c), alpha learnable."""
    return -(targets * torch.log_softmax(logits, -1) * torch.exp(-alpha)).sum(-1).mean()


def train_head(feats, targets, n_out: int, per_step: bool, args: Args, seed: int, where: str = ""):
    """Full-batch Adam on a Linear -> (max over T) -> Linear head from a seeded init; CE or per-step BCE (with
    --avvp-loss bce+explog plus the ExpLogLoss, its alpha = head.alpha in the same Adam, as CMG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.Linear(feats.shape[-1], feats.shape[-1]), nn.Linear(feats.shape[-1], n_out))
    head = head.to(feats.device)
    explog = per_step and args.avvp_loss == "bce+explog"
    if explog:
        head.register_parameter("alpha", nn.Parameter(torch.full((n_out,), 0.1, device=feats.device)))
    opt = torch.optim.Adam(head.parameters(), lr=args.cls_lr)
    for _ in range(args.cls_steps):
        if per_step:
            logits = head(feats)
            loss = F.binary_cross_entropy_with_logits(logits, targets)
            if explog:
                loss = loss + explog_loss(logits, targets, head.alpha)
        else:
            loss = F.cross_entropy(head[1](head[0](feats).amax(1)), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    common.stop_if_diverged({"head loss": loss.detach()}, where)
    return head


def accuracy(logits, targets, where: str = "") -> float:
    """Percent of argmax predictions equal to the targets; non-finite logits raise ValueError."""
    common.require_finite(logits, "accuracy", where)
    return float((logits.argmax(-1) == targets).float().mean() * 100)


def f1_score(logits, targets, where: str = "") -> float:
    """Localisation F1 (percent) over all cells at threshold 0.5; non-finite logits raise ValueError."""
    common.require_finite(logits, "localisation F1", where)
    pred = (torch.sigmoid(logits) > 0.5).float()
    tp, p, t = (pred * targets).sum(), pred.sum(), targets.sum()
    prec, rec = float(tp / p) if p > 0 else 0.0, float(tp / t) if t > 0 else 0.0
    return 100 * 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0


def downstream(model: CometModel, args: Args, dd: Dict[str, dict], where: str = "") -> Dict[str, Dict[str, float]]:
    """AVE analog (classification), AVVP analog (per-step localisation) and AVE -> AVVP (the localiser trained on
    va_train, tested on the other data set avvp_test), both directions + within."""
    q = {(s, m): quantize_all(model, m, dd[f"va_{s}"][m], where)[0]
         for s in ("train", "test") for m in ("video", "audio")}
    dev = model.codebook.embed.device
    ytr, yte = (torch.from_numpy(dd[f"va_{s}"]["label"]).to(dev) for s in ("train", "test"))
    n_cls = int(ytr.max()) + 1
    out = {"cls": {}, "loc": {}, "xds": {}}
    for k, (src, tgt) in enumerate((("video", "audio"), ("audio", "video"))):
        at = f"{where}, {src} classifier"
        head = train_head(q["train", src], ytr, n_cls, False, args, common.derive_seed(args.seed, f"head/cls/{k}"), at)
        with torch.no_grad():
            for m in (tgt, src):
                logits = head[1](head[0](q["test", m]).amax(1))
                out["cls"][f"{src[0].upper()}->{m[0].upper()}"] = accuracy(logits, yte, at)
        if "step_label" in dd["va_train"] and "step_label" in dd["va_test"]:
            at = f"{where}, {src} localiser"
            onehot = [step_onehot(dd[f"va_{s}"]["step_label"], n_cls, dev) for s in ("train", "test")]
            seed = common.derive_seed(args.seed, f"head/loc/{k}")
            head = train_head(q["train", src], onehot[0], n_cls + 1, True, args, seed, at)
            with torch.no_grad():
                out["loc"][f"{src[0].upper()}->{tgt[0].upper()}"] = f1_score(head(q["test", tgt]), onehot[1], at)
        if "avvp_test" in dd and "step_label" in dd["va_train"]:
            out["xds"][f"{src[0].upper()}->{tgt[0].upper()}"] = cross_dataset_f1(model, args, dd, q["train", src],
                                                                                   n_cls, k, tgt, where)
    return out


def step_onehot(step_label: np.ndarray, n_cls: int, dev):
    """Per-step targets [N, T, n_cls + 1]: column 0 = background (step label -1), column c + 1 = class c."""
    return F.one_hot(torch.from_numpy(step_label) + 1, n_cls + 1).float().to(dev)


def cross_dataset_f1(model: CometModel, args: Args, dd: Dict[str, dict], feats, n_cls: int, k: int, tgt: str,
                     where: str = "") -> float:
    """AVE -> AVVP (CMG's ave_avvp): a localiser trained on va_train's source-modality codes and step labels (its own
    seed), tested on avvp_test's target-modality codes against that modality's own step labels."""
    at = f"{where}, cross-dataset localiser"
    head = train_head(feats, step_onehot(dd["va_train"]["step_label"], n_cls, feats.device), n_cls + 1, True, args,
                      common.derive_seed(args.seed, f"head/xds/{k}"), at)
    qt = quantize_all(model, tgt, dd["avvp_test"][tgt], where)[0]
    with torch.no_grad():
        return f1_score(head(qt), step_onehot(dd["avvp_test"][f"step_label_{tgt}"], n_cls, feats.device), at)


@torch.no_grad()
def retrieval(model: CometModel, dd: Dict[str, dict], where: str = "") -> Dict[str, dict]:
    """Zero-shot R@1/5/10 both ways (cosine of the L2-normalised time-mean quantised vectors): {pair: {RET_KEYS}}."""
    out = {}
    for pair in RET_PAIRS:
        if f"{pair.lower()}_test" not in dd:
            continue
        a, b = (LETTER[c] for c in pair)
        ea, eb = (F.normalize(quantize_all(model, m, dd[f"{pair.lower()}_test"][m], where)[0].mean(1), dim=-1)
                  for m in (a, b))
        fwd = common.recall_at_k(ea @ eb.t(), where=f"{where}, {pair}")
        bwd = common.recall_at_k(eb @ ea.t(), where=f"{where}, {pair}")
        out[pair] = {"avg": float(np.mean(fwd + bwd)), "n": len(ea)}  # n candidates per query
        for d, vals in (("fwd", fwd), ("bwd", bwd)):
            out[pair].update({f"r{k}_{d}": v for k, v in zip((1, 5, 10), vals)})
    return out


@torch.no_grad()
def diagnostics(model: CometModel, args: Args, dd: Dict[str, dict], where: str = "") -> Dict[str, Optional[float]]:
    """Code sharing, same-pair V/A code agreement, perplexity, expert load entropy."""
    probes = {"video": [dd["va_test"]["video"]], "audio": [dd["va_test"]["audio"]], "text": [], "image": [],
              "speech": []}
    for name in ("vt_test", "at_test", "it_test", "ia_test", "st_test"):
        for m in ("text", "image", "speech"):
            if name in dd and m in dd[name]:
                probes[m].append(dd[name][m])
    K = model.codebook.embed.shape[0]
    counts, gate_h, idx = {}, [], {}
    for m, xs in probes.items():
        if xs and m in model.phi:
            _, idx[m], g = quantize_all(model, m, np.concatenate(xs), where)
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


def evaluate(model: CometModel, args: Args, dd: Dict[str, dict], where: str = "") -> dict:
    model.eval()
    out = downstream(model, args, dd, where)
    out["ret"], out["diag"] = retrieval(model, dd, where), diagnostics(model, args, dd, where)
    model.train()
    return out


def va_avg(ev: dict) -> float:
    """Mean of cls V->A, cls A->V and the localisation F1s (when the data has step labels)."""
    return float(np.mean([ev["cls"]["V->A"], ev["cls"]["A->V"]] + list(ev["loc"].values())))


def va_avg6(ev: dict) -> Optional[float]:
    """The paper's "Avg." (Table 1/6): mean of the 6 V<->A numbers, cls, loc and xds both ways; None without all 6."""
    vals = [ev["cls"]["V->A"], ev["cls"]["A->V"]] + list(ev["loc"].values()) + list(ev.get("xds", {}).values())
    return float(np.mean(vals)) if len(vals) == 6 else None


def row_scalars(ev: dict) -> Dict[str, Optional[float]]:
    """One evaluation row as TensorBoard / W&B scalars."""
    out = {f"charts/cls_{k.replace('->', '2')}": v for k, v in ev["cls"].items()}
    out.update({f"charts/{s}_{k.replace('->', '2')}": v for s in ("loc", "xds") for k, v in ev.get(s, {}).items()})
    out.update({f"charts/ret_{p}": r["avg"] for p, r in ev["ret"].items()})
    out.update({f"charts/{k}": v for k, v in ev["diag"].items()})
    out["charts/va_avg"] = va_avg(ev)
    if va_avg6(ev) is not None:
        out["charts/va_avg6"] = va_avg6(ev)
    return out


def stage_table(evals: List[dict], row_names: List[str]) -> str:
    pairs = [p for p in RET_PAIRS if p in evals[-1]["ret"]]
    cols = ["V>A", "A>V", "V>V", "F1va", "F1av", "Xva", "Xav"] + pairs + ["multi", "agree", "ppl", "gateH"]
    rows = []
    for ev in evals:
        r = [ev["cls"].get(k) for k in ("V->A", "A->V", "V->V")]
        r += [ev[s].get(k) if s in ev else None for s in ("loc", "xds") for k in ("V->A", "A->V")]
        r += [ev["ret"][p]["avg"] if p in ev["ret"] else None for p in pairs]
        rows.append(r + [ev["diag"][k] for k in ("multi_share", "code_agree", "perplexity", "gate_entropy")])
    return common.format_matrix(rows, row_names, cols)


# ----------------------------------------------------------------------------- results
def task_ret(ev: dict, pairs: List[str], key: str) -> Optional[float]:
    """A stage's retrieval: its pair's value (the mean over its pairs for a --joint stage)."""
    vals = [ev["ret"][p][key] for p in pairs if p in ev["ret"]]
    if len(vals) < len(pairs):
        return None
    return vals[0] if len(vals) == 1 else float(np.mean(vals))


def build_results(evals: List[dict], stages: List[List[str]]):
    """The envelope's (matrices, extra, summary) and the per-row series for metrics.csv."""
    names = ["+".join(s) for s in stages]
    M = {f"ret_{key}": [[task_ret(ev, pairs, key) for pairs in stages] for ev in evals] for key in RET_KEYS}
    ret = {p: {key: [ev["ret"][p][key] if p in ev["ret"] else None for ev in evals] for key in RET_KEYS}
           for p in RET_PAIRS if p in evals[-1]["ret"]}
    down = {"cls_acc": {d: [ev["cls"][d] for ev in evals] for d in evals[-1]["cls"]},
            "loc_f1": {d: [ev["loc"][d] for ev in evals] for d in evals[-1]["loc"]},
            "va_avg": [va_avg(ev) for ev in evals],
            "xds_f1": {d: [ev.get("xds", {}).get(d) for ev in evals] for d in evals[-1].get("xds", {})},
            "va_avg6": [va_avg6(ev) for ev in evals]}
    extra = {"retrieval": ret, "downstream": down, "diagnostics": {k: [ev["diag"][k] for ev in evals]
                                                                    for k in evals[-1]["diag"]},
             "ret_candidates": {p: evals[-1]["ret"][p]["n"] for p in ret}}
    series = {f"ret_{key}": {p: v[key] for p, v in ret.items() if p not in names} for key in RET_KEYS}
    series.update({"cls_acc": down["cls_acc"], "loc_f1": down["loc_f1"], "va_avg": {"V<->A": down["va_avg"]}})
    series.update({"xds_f1": down["xds_f1"], "va_avg6": {"V<->A": down["va_avg6"]}})
    series.update({k: {"all": v} for k, v in extra["diagnostics"].items()})
    return M, extra, summarize(evals, M, names, extra), series


def summarize(evals: List[dict], M: dict, names: List[str], extra: dict) -> Dict[str, Optional[float]]:
    """Flat {name: number or null}: final V<->A transfer, forgetting, retrieval, diagnostics, va_avg per stage."""
    last, T = evals[-1], len(names)
    vt = extra["retrieval"].get("VT", {}).get("avg")
    vt_stage = names.index("VT") + 1 if "VT" in names else None
    summary = {
        "va_acc": float(np.mean([last["cls"]["V->A"], last["cls"]["A->V"]])),
        "va_f1": float(np.mean(list(last["loc"].values()))) if last["loc"] else None,
        "va_avg": va_avg(last),
        "vv_acc": last["cls"]["V->V"],
        "vt_forgetting": (vt[vt_stage] - vt[-1]) if vt_stage and vt and None not in (vt[vt_stage], vt[-1]) else None,
        "seen_forgetting": common.forgetting(M["ret_avg"]) if T > 1 and None not in M["ret_avg"][-1] else None,
        "seen_aia": common.average_incremental_accuracy(M["ret_avg"]),
        "seen_fwt": common.forward_transfer(M["ret_avg"]),
    }
    summary.update({f"{p.lower()}_ret": last["ret"].get(p, {}).get("avg") for p in ("VT", "VA", "IA")})
    summary.update(last["diag"])
    summary.update({f"va_avg_s{k}": extra["downstream"]["va_avg"][k] for k in range(1, T + 1)})
    xds = list(last.get("xds", {}).values())  # the AVE -> AVVP pair
    summary["va_xds"] = float(np.mean(xds)) if xds else None
    summary["st_ret"] = last["ret"].get("ST", {}).get("avg")
    summary["va_avg6"] = va_avg6(last)
    summary.update({f"va_avg6_s{k}": extra["downstream"]["va_avg6"][k] for k in range(1, T + 1)})
    return summary


# ----------------------------------------------------------------------------- setup, training loop, resume
def validate(args: Args) -> None:
    """Check every argument before anything is written: exit 2 with 'error: --flag: problem'."""
    req = common.require
    req(bool(args.order) and len(set(args.order)) == len(args.order), "order",
        f"pairs must be distinct and non-empty, got {args.order}")
    for p in args.order:
        req(p in data.COMET_PAIRS, "order",
            f"unknown pair '{p}' (choose from {data.COMET_PAIRS}, each with the mediator text)")
    for f in ("epochs", "batch_size", "d_model", "n_layers", "n_heads", "d_ff", "d_spec", "k1", "num_experts",
              "reset_after", "fisher_batches", "cls_steps", "n_pairs", "n_per_class", "n_test"):
        req(getattr(args, f) >= 1, f, f"must be >= 1, got {getattr(args, f)}")
    for f in ("k2", "beta", "cpc_self_weight", "gate_weight", "ewc_lambda", "club_steps", "sty", "noise", "dom",
              "num_threads"):
        req(getattr(args, f) >= 0, f, f"must be >= 0, got {getattr(args, f)}")
    for f in ("lr", "club_lr", "cls_lr", "max_grad_norm"):
        req(getattr(args, f) > 0, f, f"must be > 0, got {getattr(args, f)}")
    req(args.seq_len >= 3, "seq_len", f"must be >= 3 (Cross-CPC predicts t+1 from t in 1..T-2), got {args.seq_len}")
    req(args.d_model % args.n_heads == 0, "n_heads", f"must divide --d-model {args.d_model}, got {args.n_heads}")
    req(0 < args.ema_decay < 1, "ema_decay", f"must be in (0, 1), got {args.ema_decay}")
    req(0 <= args.pmr_new_weight <= 1, "pmr_new_weight", f"must be in [0, 1], got {args.pmr_new_weight}")
    req(0 < args.pmr_quantile <= 1, "pmr_quantile", f"must be in (0, 1], got {args.pmr_quantile}")
    req(args.min_steps_per_stage >= 0, "min_steps_per_stage", f"must be >= 0, got {args.min_steps_per_stage}")
    for f, choices in (("pmr_assign", ("threshold", "teacher", "union")), ("pmr_mediator", ("live", "frozen")),
                       ("avvp_loss", ("bce", "bce+explog"))):
        req(getattr(args, f) in choices, f, f"must be one of {choices}, got {getattr(args, f)}")
    for f in ("pmr_new_weight", "pmr_assign", "pmr_quantile", "pmr_mediator"):
        req((args.comet and args.pmr) or getattr(args, f) == getattr(Args, f), f,
            "needs the pseudo-modality stream; --no-pmr / --no-comet turn it off")
    req(0 < args.use_threshold <= 1, "use_threshold", f"must be in (0, 1], got {args.use_threshold}")
    req(0 <= args.shared <= 1, "shared", f"must be in [0, 1], got {args.shared}")
    for s in COMET_SWITCHES:
        req(args.comet or getattr(args, s), f"no_{s}", "applies only to COMET; --no-comet already turns it off")
    for s in ADAPTER_SWITCHES:
        req(args.moe or getattr(args, s), f"no_{s}", "needs the adapter; --no-moe already turns it off")


def load_data(args: Args) -> Dict[str, dict]:
    """The built-in benchmark or the --data-dir features; bad input exits 2 before anything is written."""
    try:
        if args.data_dir:
            dd = data.load_comet_npz(args.data_dir, args.order)
        else:
            dd = data.comet_benchmark(args.seed, args.n_pairs, args.n_per_class, args.n_test, args.seq_len,
                                      args.sty, args.noise, args.shared, args.dom, speech="ST" in args.order)
    except data.DataError as e:
        common.die(str(e))
    common.require(dd["va_train"]["video"].shape[1] >= 3, "data_dir", "sequences need T >= 3 steps")
    return dd


def method_tag(args: Args) -> str:
    """'comet' or 'dcid', plus the method switches that differ from their default, '+'-joined."""
    parts = ["comet" if args.comet else "dcid"]
    parts += [f"no-{s.replace('_', '-')}" for s in COMET_SWITCHES if not getattr(args, s)]
    parts += [s.replace("_", "-") for s in ("joint", "official_aligned_partner") if getattr(args, s)]
    return "+".join(parts)


def modality_dims(dd: Dict[str, dict]) -> Dict[str, int]:
    dims = {}
    for d in dd.values():
        dims.update({m: a.shape[-1] for m, a in d.items() if a.ndim == 3})
    return {m: dims[m] for m in ("video", "audio", "text", "image", "speech") if m in dims}


def reseed(args: Args, gens: Dict[str, torch.Generator], k: int) -> None:
    """Paired seeds: at the start of stage k every stream restarts from (seed, stream, k), and so does dropout
    (the global RNG), so a switch that acts from stage 2 on leaves stage 1 and every later draw unchanged."""
    for name, g in gens.items():
        g.manual_seed(common.derive_seed(args.seed, f"{name}/{k}"))
    torch.manual_seed(common.derive_seed(args.seed, f"dropout/{k}"))


def begin_stage(model: CometModel, args: Args, k: int, g=None, prev_text: Optional[np.ndarray] = None):
    """METHOD LOGIC: from stage 2 on, freeze the codebook as the PMR teacher (with tau_k from stage k-1's captions
    prev_text, and the frozen mediator, when asked for) and append k2 new codes. Returns (Replay or None, first code
    index the dead-code reset may touch)."""
    if k == 0 or not args.comet:
        return None, 0
    teacher, pmr = model.codebook.embed.clone(), None
    if args.pmr:
        tau = calibrate_tau(model, prev_text, args.pmr_quantile) if args.pmr_assign == "threshold" else None
        pmr = Replay(teacher, len(teacher), tau, FrozenMediator(model) if args.pmr_mediator == "frozen" else None)
    if args.expand:
        model.codebook.expand(args.k2, g)
    return pmr, (len(teacher) if args.expand else 0)


def epoch_plan(args: Args, dd: Dict[str, dict], stages: List[List[str]]) -> List[int]:
    """Epochs of every stage: --epochs, raised with --data-dir to reach --min-steps-per-stage steps (decision C2)."""
    plan = []
    for pairs in stages:
        n_min = min(len(next(iter(dd[f"{p.lower()}_train"].values()))) for p in pairs)
        steps = n_min // min(args.batch_size, n_min)
        plan.append(max(args.epochs, math.ceil(args.min_steps_per_stage / steps) if args.data_dir else 0))
    return plan


def train_stage(model: CometModel, args: Args, train, pmr, reset_from: int, run: dict, club_opt, gens, loggers,
                k: int, name: str, plan: List[int]):
    """plan[k] epochs of Adam on every non-CLUB parameter (fresh per stage); returns (number of steps, {PMR_LOGS
    key: per-epoch values, or None without a P stream})."""
    n_min, dev = min(len(next(iter(t.values()))) for t in train.values()), model.codebook.embed.device
    bs = min(args.batch_size, n_min)
    steps = n_min // bs
    params = [p for n, p in model.named_parameters() if not n.startswith("club.")]  # codes are buffers
    opt, logs = torch.optim.Adam(params, lr=args.lr), {key: [] for key in PMR_LOGS}
    for epoch in range(plan[k]):
        perms = {p: torch.randperm(n_min, generator=gens["shuffle"]).to(dev) for p in train}  # 1 copy/epoch
        sums, t0 = {}, (time.perf_counter(), time.process_time())
        for i in range(steps):
            opt.zero_grad()
            for p in train:  # one pair per stage; all pairs (gradients summed) with --joint
                batch = {m: v[perms[p][i * bs : (i + 1) * bs]] for m, v in train[p].items()}
                L, aux = pair_losses(model, args, batch, pmr, update=True, club_opt=club_opt, rng=gens["step"])
                if run["fisher"] and args.ewc:  # METHOD LOGIC: EWC on the adapter
                    L["ewc"] = ewc_penalty(ewc_named(model), run["fisher"], run["star"], args.ewc_lambda)
                sum(L.values()).backward()  # Sec. 3.4: L = recon + commit + cpc + cmcm + MI + gate (+ EWC)
                for n, v in {**L, **aux}.items():  # device-side sums: one sync per epoch
                    sums[n] = sums.get(n, 0.0) + v.detach() / steps
            nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
            model.codebook.reset_dead(args.reset_after, start=reset_from, g=gens["reset"])
        dt = (time.perf_counter() - t0[0], time.process_time() - t0[1])
        vals = end_epoch(model, sums, loggers, k, name, epoch, plan, dt, steps * len(train) * bs)
        run["time"]["train_cpu"] = run["time"].get("train_cpu", 0.0) + dt[1]
        for key in PMR_LOGS:
            logs[key].append(vals.get(key))
    return steps * plan[k], {key: (v if pmr is not None else None) for key, v in logs.items()}


def end_epoch(model: CometModel, sums: dict, loggers, k: int, name: str, epoch: int, plan: List[int], dt: tuple,
              n_pairs: int) -> Dict[str, float]:
    """Divergence check (exit 1), the epoch's loss line with its (wall, CPU) seconds dt and its scalars (x = epochs
    so far); returns the means."""
    vals = {n: float(v) for n, v in sums.items()}
    common.stop_if_diverged(vals, f"stage {k + 1} ({name}) epoch {epoch + 1}")
    parts = " ".join(f"{n} {v:.3f}" for n, v in vals.items())
    total = sum(v for n, v in vals.items() if n not in AUX_TERMS)
    print(f"[{name}] epoch {epoch + 1}/{plan[k]} loss {total:.3f} ({parts}) K {model.codebook.embed.shape[0]} "
          f"{dt[0]:.1f}s (cpu {dt[1]:.1f}s) {n_pairs / max(dt[0], 1e-9):.0f} pairs/s")
    scalars = {(f"train/{n}" if n in AUX_TERMS else f"losses/{n}"): v for n, v in vals.items()}
    common.log_scalars(loggers, scalars, sum(plan[:k]) + epoch + 1)
    return vals


def update_fisher(model: CometModel, args: Args, train_pair: Dict[str, torch.Tensor], run: dict, g, pmr) -> None:
    """METHOD LOGIC: after the stage, accumulate the Fisher on this stage's data (it is gone afterwards);
    batches and their draws come from the 'fisher' generator g."""
    n_min = len(next(iter(train_pair.values())))
    bs = min(args.batch_size, n_min)
    idx = torch.randperm(n_min, generator=g)
    batches = [{m: v[idx[(i * bs) % n_min :][:bs]] for m, v in train_pair.items()} for i in range(args.fisher_batches)]
    new = compute_fisher(model, args, batches, pmr, g)
    run["fisher"] = {n: run["fisher"].get(n, 0) + f for n, f in new.items()}
    run["star"] = {n: p.detach().clone() for n, p in ewc_named(model).items()}


def save_after_stage(run_dir: str, args: Args, k: int, T: int, model: CometModel, club_opt, run: dict, name: str,
                     gens: dict, task: str) -> None:
    """After stage k: checkpoint.pt (model with its codebook, EWC state, CLUB optimizer, RNGs, rows so far);
    --save-model also writes model_after_{task}.pt."""
    if args.save_model:
        torch.save({"model": model.state_dict(), "fisher": run["fisher"], "star": run["star"]},
                   os.path.join(run_dir, f"model_after_{task}.pt"))
    state = {"model": model.state_dict(), "club_opt": club_opt.state_dict(), "run": run, "run_name": name,
             "rng": common.rng_state(gens)}
    common.save_checkpoint(run_dir, "comet", args, k, T, state)


def restore(ckpt: dict, model: CometModel, club_opt, gens: dict, device) -> dict:
    """Resume: codebook resized to the stored shapes, model, CLUB optimizer, rows; every RNG restored last."""
    model.codebook.resize_like(ckpt["model"])
    model.load_state_dict(ckpt["model"])
    club_opt.load_state_dict(ckpt["club_opt"])
    run = ckpt["run"]
    for key in ("fisher", "star"):
        run[key] = {n: t.to(device) for n, t in run[key].items()}
    common.restore_rng(ckpt["rng"], gens)
    return run


def main(args: Args) -> dict:
    # TRY NOT TO MODIFY: setup
    validate(args)
    common.check_extras(args)
    dd = load_data(args)
    gen = common.seed_everything(args.seed, args.torch_deterministic)
    common.set_threads(args.num_threads)
    device = common.pick_device(args.cuda)
    method, variant = method_tag(args), common.tag(args, VARIANT_FIELDS, Args())
    name = common.run_name("comet", method, common.data_tag(args.data_dir), None, args.seed)
    run_dir, ckpt = common.open_run(args, name, "comet")
    stages = [list(args.order)] if args.joint else [[p] for p in args.order]
    plan = epoch_plan(args, dd, stages)  # logging x-axis: epochs so far
    loggers = common.open_loggers(args, name, run_dir, sum(plan[: ckpt["done"]]) + 1 if ckpt else None)
    print(f"run {name} -> {run_dir} (device: {device})")

    names, T, t0 = ["+".join(s) for s in stages], len(stages), time.perf_counter()
    model = CometModel(args, modality_dims(dd), args.comet and args.moe).to(device)
    club_opt = torch.optim.Adam(model.club.parameters(), lr=args.club_lr)
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, method {method}")
    gens = {"shuffle": gen, **{s: torch.Generator() for s in ("step", "fisher", "expand")}}  # CPU streams
    gens["reset"] = torch.Generator(device)  # on CUDA a device stream: reset_dead_masked draws without syncing
    run = {"fisher": {}, "star": {}, "evals": [], "steps": [0], "time": {"train": 0.0, "eval": 0.0, "total": 0.0},
           **{key: [None] for key in PMR_LOGS + ("pmr_tau",)}}
    if ckpt:  # --resume: everything as a fresh run builds it, then the stored state, RNGs last
        name, run = ckpt["run_name"], restore(ckpt, model, club_opt, gens, device)
    else:
        run["evals"].append(evaluate(model, args, dd, "row 0 (init)"))
        common.log_scalars(loggers, row_scalars(run["evals"][0]), 0)
    total0 = run["time"]["total"]

    for k in range(ckpt["done"] if ckpt else 0, T):
        reseed(args, gens, k)
        prev_text = dd[f"{names[k - 1].lower()}_train"][MEDIATOR] if k else None  # tau_k: stage k-1's captions
        pmr, reset_from = begin_stage(model, args, k, gens["expand"], prev_text)
        train = {p: {LETTER[c]: torch.from_numpy(dd[f"{p.lower()}_train"][LETTER[c]]).to(device) for c in p}
                 for p in stages[k]}
        t1 = time.perf_counter()
        steps, logs = train_stage(model, args, train, pmr, reset_from, run, club_opt, gens, loggers, k, names[k], plan)
        run["steps"].append(steps)
        run["pmr_tau"].append(pmr.tau if pmr is not None else None)
        for key, v in logs.items():
            run[key].append(v)
        if args.comet and args.moe and args.ewc and k < T - 1:
            update_fisher(model, args, train[stages[k][0]], run, gens["fisher"], pmr)
        t2 = time.perf_counter()
        run["evals"].append(evaluate(model, args, dd, f"row {k + 1} (after {names[k]})"))
        run["time"]["train"] += t2 - t1
        run["time"]["eval"] += time.perf_counter() - t2
        run["time"]["total"] = total0 + time.perf_counter() - t0
        print(f"--- after stage {k + 1} ({names[k]}), codes {model.codebook.embed.shape[0]}:")
        print(stage_table(run["evals"], ["init"] + [f"after {n}" for n in names]))
        common.log_scalars(loggers, row_scalars(run["evals"][-1]), sum(plan[: k + 1]))
        save_after_stage(run_dir, args, k + 1, T, model, club_opt, run, name, gens, names[k])

    M, extra, summary, series = build_results(run["evals"], stages)
    extra["train_steps"] = run["steps"]
    extra.update({key: run[key] for key in PMR_LOGS + ("pmr_tau",)})
    run["time"]["total"] = total0 + time.perf_counter() - t0
    res = common.results_envelope(script="comet", method=method, variant=variant, data=common.data_tag(args.data_dir),
                                  backbone=None, seed=args.seed, run_name=name, args=args, device=device, tasks=names,
                                  matrices=M, extra=extra, summary=summary, timing_s=run["time"])
    shown = {k: "–" if summary[k] is None else f"{summary[k]:.1f}" for k in ("va_f1", "vt_forgetting")}
    print(f"summary: va_acc {summary['va_acc']:.1f}  va_f1 {shown['va_f1']}  VT forgetting {shown['vt_forgetting']}  "
          f"train {run['time']['train']:.0f}s ({sum(run['steps'])} steps)")
    common.write_results(run_dir, res, series)  # a diverged or failed run leaves no results.json
    if args.plot:
        common.plot_matrix(run_dir, M["ret_avg"], res["rows"], names, "retrieval R-avg (%) of each stage's pair")
    common.log_scalars(loggers, {f"summary/{k}": v for k, v in summary.items()}, sum(plan))
    common.close_loggers(loggers)
    common.finish_run(run_dir, args.save_model)
    return res


if __name__ == "__main__":
    main(tyro.cli(Args, default=common.resume_defaults(Args)))
