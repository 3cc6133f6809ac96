"""MoDE: Modality-Decoupled Experts + knowledge distillation for a continually tuned unified multimodal model.

Paper: "Mitigating Intra- and Inter-modal Forgetting in Continual Learning of Unified Multimodal Models",
Xiwen Wei, Mustafa Munir, Radu Marculescu, NeurIPS 2025, arXiv 2512.03125
(official code: github.com/Christina200/MoDE-official).

A unified multimodal generative model (UMGM) answers questions about images (image -> text) and generates
images (text -> image codes) with one autoregressive decoder over one vocabulary. Tuning it continually on
understanding tasks forgets earlier tasks (intra-modal forgetting) and also damages image generation, which
was never trained (inter-modal forgetting): with adapters shared by both modalities, a text-loss step moves
the generation loss by -eta <g_t, g_v> + O(eta^2). MoDE freezes the base and decouples the trainable
parameters by token modality: text tokens go through a text mixture of LoRA experts (T-MoE), image tokens
through one visual LoRA (V-Adapter), routed by the token's true modality (not learned). The T-MoE then gets
no gradient from the generation loss at all; the V-Adapter, still reached through the image tokens of
the VQA inputs, is anchored by distilling the frozen pre-trained model on a text-to-image reference stream.

Here the UMGM is a tiny Chameleon-like decoder (RMSNorm, causal attention, SwiGLU MLP) over a synthetic
world (data.py, MoDE section): 4x4 grids of image codes (a shape mask in a colour on a background), captions,
text-to-image prompts and five single-token VQA tasks shaped like the paper's CoIN order (ScienceQA ->
TextVQA -> ImageNet -> GQA -> VizWiz): different question types (a task token just before the answer),
partly overlapping answer vocabularies.
It is pre-trained on captioning + text-to-image (cached under --pretrain-cache-dir), then tuned on the
five tasks with the base frozen and experts on the MLP gate/up/down projections only (spec section 4).

Usage:
    python mode.py                          # MoDE (T-MoE + V-Adapter + KD)
    python mode.py --method seq-lora        # baselines: seq-lora, moe-lora (modality-coupled), tmoe-only
    python mode.py --no-kd                  # ablations: --no-kd, --no-text-moe, --no-visual-adapter (= tmoe-only)
    python mode.py --data-dir my_tasks/     # your own tokenised streams (format below)

Metrics (row 0 = the pre-trained model, row k = after task k; R[k][j] = accuracy on task j, percent;
R is closed-set: the argmax is taken over task j's answer vocabulary = the target ids of its train split,
as VQA classifiers score over a dataset's answer list. R_open takes it over all text ids; with single-token
answers, open scoring mostly measures which answer *type* the last task left (every method loses it),
closed-set scoring whether the old skill survives. Both are logged; acc_open, bwt_open, forgetting_open
are the same formulas on R_open):
    acc         ACC = mean_j R[T][j]                                      (final average accuracy)
    bwt         BWT = mean_{j<T-1} (R[T][j] - R[j+1][j])                  (intra-modal, GEM)
    forgetting  F   = mean_{j<T-1} (max_{j+1<=l<=T-1} R[l][j] - R[T][j])  (intra-modal, Chaudhry)
    gen_nll     teacher-forced NLL (nats/code) of held-out reference image codes given the prompt
    gen_match   exact-attribute match: share of sampled images (temperature 1, the same Gumbel noise at
                every row) that are well-formed (one background code, one colour code, colour cells = one
                of the 8 shape masks exactly) with the prompt's colour and shape (built-in data only)
    gen_drop    100 * (gen_match[0] - gen_match[T]), percent points (inter-modal forgetting)
    grad_cos    mean over checks of cos(grad L_task, grad L_gen) on all trainable adapter parameters; the
                text-side / image-side cosines and <g_t, g_v> are logged too (spec section 3)
An understanding sample is correct when the argmax (closed-set or open) equals every answer token.

--data-dir format: meta.json {"vocab_size": V, "image_token_start": I, "tasks": [names]} (ids >= I are
image codes) and one .npz per stream: pretrain, reference_train, reference_test, <task>_train,
<task>_test, each with int arrays tokens [N, L] (L <= --max-len, trailing pad allowed), modality [N, L]
(1 = image span token, routed to the V-Adapter) and loss_mask [N, L] (1 = target token). gen_match and
gen_drop need the built-in image oracle and are None there; gen_nll is still reported.

Deviations from the paper/spec (spec section 8.7 design):
    - tiny model and synthetic world instead of Anole-7B, CoIN and LAION; CLIP/FID -> gen_nll, gen_match;
    - single-token answers scored teacher-forced (not 60-token greedy decoding);
    - steps-based schedule (160 steps/task, not 1 epoch), lr 2e-3, batch 32; AdamW, warmup + cosine
      restarted per task;
    - KD over the full (tiny) image vocabulary, no top-256 truncation; the teacher is the model with
      experts bypassed (as in the code). Quirk flags (off by default) reproduce the official code: VQA
      evaluation routing every token to the T-MoE, temperature applied twice, KD mean over all positions;
    - the paper's equation numbers could not be read (only its abstract was available), so markers name
      the equation (Eq. (T-MoE), Eq. (KD), ...) following the forms in spec sections 3-5.
"""

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
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
    data_dir: Optional[str] = None
    """directory of tokenised streams (format in the module docstring); default: the built-in synthetic world"""
    n_train: int = 2048
    """built-in data: training sequences per task (and in the reference stream)"""
    n_test: int = 256
    """built-in data: held-out sequences per task (and in the reference test stream)"""
    gen_samples: int = 128
    """prompts sampled for the exact-attribute match (built-in data)"""
    pretrain_cache_dir: str = "runs/mode_pretrained"
    """where the pre-trained model is cached (keyed by a hash of the pre-training config, seed and data)"""
    pretrain_steps: int = 1000
    """pre-training steps (captioning + text-to-image, all parameters)"""
    pretrain_batch_size: int = 64
    """pre-training batch size (mixed captioning / text-to-image sequences)"""
    pretrain_lr: float = 2e-3
    """pre-training peak learning rate (5% warmup, cosine decay)"""
    d_model: int = 128
    """model width"""
    n_layers: int = 4
    """decoder layers"""
    n_heads: int = 4
    """attention heads"""
    d_ff: int = 256
    """SwiGLU hidden width"""
    max_len: int = 32
    """maximum sequence length (learned positions)"""
    num_tasks: int = 0
    """use only the first N tasks of the sequence (0 = all)"""

    # Algorithm specific arguments
    method: Literal["mode", "seq-lora", "moe-lora", "tmoe-only"] = "mode"
    """mode | seq-lora (one shared LoRA) | moe-lora (shared LoRA experts) | tmoe-only (image tokens un-adapted)"""
    kd: bool = True
    """MoDE: distil the frozen pre-trained model into the V-Adapter on the reference stream"""
    text_moe: bool = True
    """MoDE: text side is a mixture of experts (off: a single text LoRA)"""
    visual_adapter: bool = True
    """MoDE: image tokens get the V-Adapter (off: un-adapted, which makes KD a no-op)"""
    steps_per_task: int = 160
    """optimizer steps per continual task"""
    batch_size: int = 32
    """task batch size"""
    lr: float = 2e-3
    """peak learning rate of the adapters (10% warmup, cosine; restarted per task)"""
    grad_clip: float = 10.0
    """gradient-norm clipping (official code: 10)"""
    lora_rank: int = 8
    """rank r of every expert"""
    lora_alpha: float = 16.0
    """LoRA alpha (scaling alpha / r)"""
    lora_dropout: float = 0.05
    """dropout on the expert input"""
    num_experts: int = 4
    """text experts in the T-MoE (and in moe-lora)"""
    kd_lambda: float = 0.3
    """weight lambda of the KD loss"""
    kd_temperature: float = 2.0
    """KD temperature tau"""
    kd_batch_size: int = 32
    """reference-stream sequences per step for KD"""
    quirk_eval_routing: bool = False
    """official-code quirk: VQA evaluation routes every token (image tokens too) to the T-MoE"""
    quirk_kd_double_temperature: bool = False
    """official-code quirk: logits divided by tau twice (effective tau^2), scale still tau^2"""
    quirk_kd_all_positions: bool = False
    """official-code quirk: KD averaged over all positions instead of the image-code targets"""
    conflict_every: int = 40
    """measure the task/generation gradient cosine every this many steps (0 = never)"""
    conflict_batch_size: int = 64
    """sequences per stream for the gradient-conflict measurement"""
    log_every: int = 100
    """print a progress line every this many steps"""


# ----------------------------------------------------------------------------- helpers
def config_hash(args: Args, source: str) -> str:
    keys = ["seed", "pretrain_steps", "pretrain_batch_size", "pretrain_lr", "d_model", "n_layers", "n_heads",
            "d_ff", "max_len", "n_train", "n_test"]
    blob = json.dumps({k: getattr(args, k) for k in keys} | {"source": source, "v": 1}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def to_tensors(stream: Dict[str, np.ndarray], device) -> Dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in stream.items()}


def sample_batch(stream: Dict[str, torch.Tensor], n: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    idx = torch.randint(len(stream["tokens"]), (n,), generator=gen).to(stream["tokens"].device)
    return {k: v[idx] for k, v in stream.items()}


def warmup_cosine(step: int, total: int, warmup: float) -> float:
    w = max(1, int(warmup * total))
    return (step + 1) / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


# ----------------------------------------------------------------------------- model
class ExpertLinear(nn.Module):
    """A base linear W plus optional modality-routed low-rank experts (spec section 4).

    route[b, s] = 0 sends the token to the text side (T-MoE, or one LoRA when it has 1 expert),
    1 to the image side (V-Adapter; no delta when absent); route=None bypasses all experts (teacher)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.base = nn.Linear(d_in, d_out, bias=False)
        self.n_text, self.image_side = 0, False

    def add_experts(self, r: int, alpha: float, dropout: float, n_text: int, image_side: bool):
        d_in, d_out = self.base.in_features, self.base.out_features
        bound = 1 / math.sqrt(d_in)  # = kaiming_uniform(a=sqrt(5)) as in LoRA; B = 0 -> identity at init
        self.base.weight.requires_grad_(False)
        self.n_text, self.image_side, self.scale, self.drop = n_text, image_side, alpha / r, nn.Dropout(dropout)
        self.A_t = nn.Parameter(torch.empty(n_text, d_in, r).uniform_(-bound, bound))
        self.B_t = nn.Parameter(torch.zeros(n_text, r, d_out))
        self.router = nn.Linear(d_in, n_text, bias=False) if n_text > 1 else None
        if image_side:
            self.A_v = nn.Parameter(torch.empty(d_in, r).uniform_(-bound, bound))
            self.B_v = nn.Parameter(torch.zeros(r, d_out))

    def forward(self, x: torch.Tensor, route: Optional[torch.Tensor]) -> torch.Tensor:
        y = self.base(x)
        if route is None or self.n_text == 0:
            return y
        h = self.drop(x)
        # Eq. (T-MoE): y = W h + s * sum_j softmax(W_g h)_j B_j A_j h   (dense soft mixture, fp32 router)
        z = torch.einsum("bsi,eir->bser", h, self.A_t)
        if self.router is not None:
            z = z * torch.softmax(self.router(x).float(), -1).to(z.dtype).unsqueeze(-1)
        delta = torch.einsum("bser,ero->bso", z, self.B_t)
        if self.image_side:
            # Eq. (V-Adapter): y = W h + s * B_v A_v h for image tokens; hard routing by token modality
            delta = torch.where(route.unsqueeze(-1) == 1, h @ self.A_v @ self.B_v, delta)
        else:
            delta = torch.where(route.unsqueeze(-1) == 1, torch.zeros_like(delta), delta)
        return y + self.scale * delta


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, d_ff: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate, self.up, self.down = ExpertLinear(d, d_ff), ExpertLinear(d, d_ff), ExpertLinear(d_ff, d)

    def forward(self, x, route):
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h, route)) * self.up(h, route), route)  # SwiGLU


class UnifiedLM(nn.Module):
    """Decoder-only model over one vocabulary of text ids and image codes (Chameleon-like, tiny)."""

    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, d_ff: int, max_len: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_heads, d_ff) for _ in range(n_layers))
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, route: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for blk in self.blocks:
            x = blk(x, route)
        return self.head(self.norm(x))

    def expert_layers(self) -> List[ExpertLinear]:
        return [m for m in self.modules() if isinstance(m, ExpertLinear)]


# ----------------------------------------------------------------------------- losses
def restrict_logits(logits: torch.Tensor, targets: torch.Tensor, image_lo: int) -> torch.Tensor:
    """Modality logit mask (as the code's train-text / train-image modes): a text target is scored over
    text ids only, an image-code target over image codes only."""
    vocab_is_image = torch.arange(logits.shape[-1], device=logits.device) >= image_lo
    return logits.masked_fill(vocab_is_image != (targets >= image_lo).unsqueeze(-1), float("-inf"))


def lm_loss(logits: torch.Tensor, batch: Dict[str, torch.Tensor], image_lo: int) -> torch.Tensor:
    # Eq. (CE): next-token cross-entropy on the target tokens only (answers, or image codes)
    targets, mask = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:].bool()
    logits = restrict_logits(logits[:, :-1], targets, image_lo)
    return F.cross_entropy(logits[mask], targets[mask])


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, batch: Dict[str, torch.Tensor], image_lo: int,
            tau: float, double_tau: bool = False, all_positions: bool = False) -> torch.Tensor:
    # Eq. (KD): L_KD = tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau)) over the image vocabulary
    div = tau * tau if double_tau else tau
    log_s = F.log_softmax(student[:, :-1, image_lo:].float() / div, -1)
    log_t = F.log_softmax(teacher[:, :-1, image_lo:].float() / div, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    mask = torch.ones_like(kl, dtype=torch.bool) if all_positions else batch["loss_mask"][:, 1:].bool()
    return tau * tau * kl[mask].mean()


# ----------------------------------------------------------------------------- the method's continual pieces
def scheme_of(args: Args) -> dict:
    """Expert layout of each method: text experts, image side, coupled (all tokens on the text side), KD."""
    if args.method == "seq-lora":
        return dict(n_text=1, image_side=False, coupled=True, kd=False)
    if args.method == "moe-lora":
        return dict(n_text=args.num_experts, image_side=False, coupled=True, kd=False)
    if args.method == "tmoe-only":
        return dict(n_text=args.num_experts, image_side=False, coupled=False, kd=False)
    n_text = args.num_experts if args.text_moe else 1
    return dict(n_text=n_text, image_side=args.visual_adapter, coupled=False, kd=args.kd and args.visual_adapter)


def route_for(batch: Dict[str, torch.Tensor], scheme: dict, stream: str, quirk_eval: bool = False) -> torch.Tensor:
    """METHOD LOGIC: routing by token modality. 'task' = understanding sequences (true modality ids);
    'gen' = the reference / text-to-image stream, every token (prompt too) to the V-Adapter (as coded)."""
    m = batch["modality"]
    if scheme["coupled"] or (stream == "eval" and quirk_eval):
        return torch.zeros_like(m)
    return torch.ones_like(m) if stream == "gen" else m


def add_experts(model: UnifiedLM, args: Args, scheme: dict) -> List[nn.Parameter]:
    """Freeze every base weight, insert experts on the MLP gate/up/down; return the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.expert_layers():
        layer.add_experts(args.lora_rank, args.lora_alpha, args.lora_dropout, scheme["n_text"], scheme["image_side"])
    return [p for p in model.parameters() if p.requires_grad]


def split_params(model: UnifiedLM):
    """(text-side parameters: T-MoE / shared LoRA + routers, image-side parameters: V-Adapter)."""
    text, image = [], []
    for layer in model.expert_layers():
        text += [layer.A_t, layer.B_t] + (list(layer.router.parameters()) if layer.router is not None else [])
        image += [layer.A_v, layer.B_v] if layer.image_side else []
    return text, image


def task_step_loss(model, task_batch, ref_batch, scheme, args, image_lo):
    """Eq. (L_total): L = L_CE(task) + lambda * L_KD(reference); KD reaches only the V-Adapter."""
    ce = lm_loss(model(task_batch["tokens"], route_for(task_batch, scheme, "task")), task_batch, image_lo)
    kd = torch.zeros((), device=ce.device)
    if scheme["kd"]:
        with torch.no_grad():
            teacher = model(ref_batch["tokens"], None)  # frozen pre-trained model = experts bypassed
        student = model(ref_batch["tokens"], route_for(ref_batch, scheme, "gen"))
        kd = kd_loss(student, teacher, ref_batch, image_lo, args.kd_temperature,
                     args.quirk_kd_double_temperature, args.quirk_kd_all_positions)
    return ce + args.kd_lambda * kd, ce, kd


def _flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def gradient_conflict(model, task_batch, ref_batch, scheme, image_lo) -> dict:
    """Eq. (dL_v): a text step changes L_gen by -eta <g_t, g_v> + O(eta^2); log cos(g_t, g_v) on all trainable
    adapter parameters and on each side (the T-MoE's g_v is exactly 0 when decoupled)."""
    was_training = model.training
    model.eval()
    text, image = split_params(model)
    params = text + image
    l_t = lm_loss(model(task_batch["tokens"], route_for(task_batch, scheme, "task")), task_batch, image_lo)
    l_v = lm_loss(model(ref_batch["tokens"], route_for(ref_batch, scheme, "gen")), ref_batch, image_lo)
    g_t, g_v = _flat_grad(l_t, params), _flat_grad(l_v, params)
    model.train(was_training)
    n_text = sum(p.numel() for p in text)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else 0.0
    return {"cos": cos(g_t, g_v), "cos_text_side": cos(g_t[:n_text], g_v[:n_text]),
            "cos_image_side": cos(g_t[n_text:], g_v[n_text:]) if image else None,
            "dot": float(g_t @ g_v), "gen_grad_norm": float(g_v.norm()),
            "gen_grad_norm_text_side": float(g_v[:n_text].norm())}


# ----------------------------------------------------------------------------- evaluation
def answer_vocab(stream: Dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    """Bool [vocab]: the ids that appear as targets in a task's train split (its answer vocabulary)."""
    allowed = torch.zeros(vocab, dtype=torch.bool, device=stream["tokens"].device)
    allowed[stream["tokens"][:, 1:][stream["loss_mask"][:, 1:].bool()]] = True
    return allowed


@torch.no_grad()
def vqa_accuracy(model, stream, scheme, image_lo, quirk_eval, allowed, chunk=512):
    """(closed-set, open) percent of sequences whose every target token is the argmax over the target's
    modality: closed-set restricts it to the `allowed` ids (the task's answer vocabulary), open does not."""
    closed, open_ = [], []
    for i in range(0, len(stream["tokens"]), chunk):
        b = {k: v[i:i + chunk] for k, v in stream.items()}
        route = route_for(b, scheme, "eval", quirk_eval)
        targets, mask = b["tokens"][:, 1:], b["loss_mask"][:, 1:].bool()
        logits = restrict_logits(model(b["tokens"], route)[:, :-1], targets, image_lo)
        open_.append(((logits.argmax(-1) == targets) | ~mask).all(1))
        closed.append(((logits.masked_fill(~allowed, float("-inf")).argmax(-1) == targets) | ~mask).all(1))
    return tuple(100.0 * float(torch.cat(c).float().mean()) for c in (closed, open_))


@torch.no_grad()
def generation_nll(model, stream, scheme, image_lo, chunk=512) -> float:
    tot, n = 0.0, 0
    for i in range(0, len(stream["tokens"]), chunk):
        b = {k: v[i:i + chunk] for k, v in stream.items()}
        k = int(b["loss_mask"][:, 1:].sum())
        tot, n = tot + float(lm_loss(model(b["tokens"], route_for(b, scheme, "gen")), b, image_lo)) * k, n + k
    return tot / n


@torch.no_grad()
def generation_match(model, prompts, attrs, gumbel, scheme, image_lo) -> float:
    """Sample 16 image codes per prompt (temperature 1, fixed Gumbel noise) and read them with the oracle."""
    seq = prompts.clone()
    for i in range(gumbel.shape[1]):
        route = route_for({"modality": torch.ones_like(seq)}, scheme, "gen")
        logits = model(seq, route)[:, -1, image_lo:]
        seq = torch.cat([seq, (logits + gumbel[:, i]).argmax(-1, keepdim=True) + image_lo], 1)
    ok, col, shp = data.mode_read_image(seq[:, prompts.shape[1]:].cpu().numpy())
    return float(np.mean(ok & (col == attrs[0]) & (shp == attrs[1])))


def evaluate(model, streams, tasks, answers, scheme, image_lo, gen_probe, args) -> dict:
    """One row: (closed-set, open) accuracy per task (answers[t] = its answer vocabulary) and generation."""
    model.eval()
    acc = [vqa_accuracy(model, streams[f"{t}_test"], scheme, image_lo, args.quirk_eval_routing, answers[t])
           for t in tasks]
    row = {"acc": [a[0] for a in acc], "acc_open": [a[1] for a in acc],
           "gen_nll": generation_nll(model, streams["reference_test"], scheme, image_lo),
           "gen_match": generation_match(model, *gen_probe, scheme, image_lo) if gen_probe else None}
    model.train()
    return row


# ----------------------------------------------------------------------------- pre-training
def pretrain(model: UnifiedLM, stream, args: Args, image_lo: int, gen: torch.Generator) -> None:
    """Full-parameter pre-training on captioning (image -> text) + text-to-image: the 'UMGM' before CL."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.01)
    t0 = time.perf_counter()
    for step in range(args.pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = args.pretrain_lr * warmup_cosine(step, args.pretrain_steps, 0.05)
        b = sample_batch(stream, args.pretrain_batch_size, gen)
        loss = lm_loss(model(b["tokens"], None), b, image_lo)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.pretrain_steps:
            dt = time.perf_counter() - t0
            print(f"pretrain step {step + 1}/{args.pretrain_steps} loss {loss.item():.4f} "
                  f"{dt:.1f}s ({(step + 1) / dt:.1f} steps/s)", flush=True)


def load_or_pretrain(args: Args, vocab: int, streams, image_lo: int, device, source: str):
    """Return (pre-trained model, seconds spent pre-training (0 when loaded), cache path)."""
    path = os.path.join(args.pretrain_cache_dir, f"{config_hash(args, source)}.pt")
    torch.manual_seed(args.seed)
    model = UnifiedLM(vocab, args.d_model, args.n_layers, args.n_heads, args.d_ff, args.max_len).to(device)
    if os.path.isfile(path):
        model.load_state_dict(torch.load(path, map_location=device))
        print(f"loaded pre-trained model from {path}")
        return model, 0.0, path
    sw = common.Stopwatch()
    with sw:
        pretrain(model, streams["pretrain"], args, image_lo, torch.Generator().manual_seed(args.seed + 1))
    os.makedirs(args.pretrain_cache_dir, exist_ok=True)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"pre-trained in {sw.total:.1f}s, cached at {path}")
    return model, sw.total, path


# ----------------------------------------------------------------------------- main
def load_data(args: Args):
    """(streams as numpy, task names, vocab size, first image id); raises data.DataError on bad input."""
    if args.data_dir is None:
        return data.make_mode_world(args.seed, n_train=args.n_train, n_test=args.n_test), list(data.MODE_TASKS), \
            data.MODE_VOCAB, data.MODE_IMAGE_LO
    meta, streams = data.load_mode_dir(args.data_dir, args.max_len)
    return streams, meta["tasks"], meta["vocab_size"], meta["image_token_start"]


def select_tasks(args: Args, tasks: List[str]) -> List[str]:
    if args.num_tasks < 0 or args.num_tasks > len(tasks):
        common.die(f"--num-tasks must be in [0, {len(tasks)}] (got {args.num_tasks})")
    return tasks[: args.num_tasks or len(tasks)]


def check_args(args: Args):
    for name in ("steps_per_task", "batch_size", "pretrain_batch_size", "kd_batch_size", "lora_rank", "num_experts",
                 "n_train", "n_test", "gen_samples", "d_model", "n_layers", "n_heads", "log_every"):
        if getattr(args, name) <= 0:
            common.die(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    if args.pretrain_steps < 0 or args.lr <= 0 or args.kd_temperature <= 0 or args.d_model % args.n_heads:
        common.die("need --pretrain-steps >= 0, --lr > 0, --kd-temperature > 0, and --d-model divisible by --n-heads")
    if args.data_dir is None and args.max_len < 24:
        common.die("--max-len must be >= 24 for the built-in data (its sequences have 24 tokens)")


def main(args: Args) -> dict:
    check_args(args)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    try:  # validate all input before anything is written
        np_streams, tasks, vocab, image_lo = load_data(args)
    except data.DataError as e:
        common.die(str(e))
    tasks = select_tasks(args, tasks)
    fields = ("tokens", "modality", "loss_mask")
    pre = np_streams["pretrain"]  # the cache key covers the pre-training data itself, not just its path
    source = hashlib.sha1(b"".join(np.ascontiguousarray(pre[f]).tobytes() for f in fields)).hexdigest()
    benchmark = "synthetic" if args.data_dir is None else os.path.basename(os.path.normpath(args.data_dir))
    run_name = f"{benchmark}__{args.exp_name}__{args.seed}__{int(time.time())}"
    gen = common.seed_everything(args.seed, args.torch_deterministic)
    device = common.pick_device(args.cuda)
    run_dir = common.make_run_dir(args, run_name)
    tracker = common.maybe_tracker(args, run_name)
    streams = {k: to_tensors({f: v[f] for f in fields}, device) for k, v in np_streams.items()}

    model, pretrain_s, cache_path = load_or_pretrain(args, vocab, streams, image_lo, device, source)
    gen_probe = None
    if args.data_dir is None:  # fixed prompts + Gumbel noise: every row samples with the same randomness
        ref, n = np_streams["reference_test"], min(args.gen_samples, len(np_streams["reference_test"]["tokens"]))
        noise = torch.rand(n, 16, vocab - image_lo, generator=torch.Generator().manual_seed(args.seed + 2))
        gen_probe = (streams["reference_test"]["tokens"][:n, :5], (ref["colour"][:n], ref["shape"][:n]),
                     (-torch.log(-torch.log(noise.clamp_min(1e-20)))).to(device))

    # TRY NOT TO MODIFY: the frozen base + experts of the chosen method
    scheme = scheme_of(args)
    torch.manual_seed(args.seed + 3)
    trainable = add_experts(model, args, scheme)
    is_expert = lambda name: ".A_" in name or ".B_" in name or "router" in name
    base_before = {k: v.clone() for k, v in model.state_dict().items() if not is_expert(k)}
    print(f"method {args.method} {scheme}: {sum(p.numel() for p in trainable)} trainable / "
          f"{sum(p.numel() for p in model.parameters())} parameters")

    answers = {t: answer_vocab(streams[f"{t}_train"], vocab) for t in tasks}  # closed-set scoring, fixed per run
    rows = [evaluate(model, streams, tasks, answers, scheme, image_lo, gen_probe, args)]
    r = rows[0]
    print(f"pre-trained: acc {['%.1f' % a for a in r['acc']]} open {['%.1f' % a for a in r['acc_open']]} gen_nll {r['gen_nll']:.4f} gen_match {r['gen_match']}")
    conflicts, train_sw, eval_sw = [], common.Stopwatch(), common.Stopwatch()
    for k, task in enumerate(tasks):
        # METHOD LOGIC: one adapter set carried across tasks; optimizer and schedule restarted per task
        opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
        t0 = time.perf_counter()
        with train_sw:
            for step in range(args.steps_per_task):
                for g in opt.param_groups:
                    g["lr"] = args.lr * warmup_cosine(step, args.steps_per_task, 0.1)
                tb = sample_batch(streams[f"{task}_train"], args.batch_size, gen)
                rb = sample_batch(streams["reference_train"], args.kd_batch_size, gen) if scheme["kd"] else None
                loss, ce, kd = task_step_loss(model, tb, rb, scheme, args, image_lo)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(trainable, args.grad_clip)
                opt.step()
                if args.conflict_every and (step + 1) % args.conflict_every == 0:
                    c = gradient_conflict(model, sample_batch(streams[f"{task}_train"], args.conflict_batch_size, gen),
                                          sample_batch(streams["reference_train"], args.conflict_batch_size, gen),
                                          scheme, image_lo)
                    conflicts.append({"task": task, "step": step + 1, **c})
                if (step + 1) % args.log_every == 0 or step + 1 == args.steps_per_task:
                    dt = time.perf_counter() - t0
                    print(f"task {k + 1}/{len(tasks)} {task} step {step + 1}/{args.steps_per_task} "
                          f"loss {loss.item():.4f} ce {ce.item():.4f} kd {kd.item():.5f} "
                          f"{dt:.1f}s ({(step + 1) / dt:.1f} steps/s)", flush=True)
        with eval_sw:
            rows.append(evaluate(model, streams, tasks, answers, scheme, image_lo, gen_probe, args))
        r = rows[-1]
        print(f"after {task}: acc {['%.1f' % a for a in r['acc']]} open {['%.1f' % a for a in r['acc_open']]} gen_nll {r['gen_nll']:.4f} gen_match {r['gen_match']}")
        if tracker:
            tracker.log({"task": k + 1, "acc_avg": float(np.mean(r["acc"])), "gen_nll": r["gen_nll"],
                         "gen_match": r["gen_match"]})
        if args.save_model:
            torch.save({"experts": {n: p for n, p in model.state_dict().items() if n not in base_before},
                        "task": k + 1, "args": asdict(args)}, os.path.join(run_dir, f"experts_after_{task}.pt"))

    # ------------------------------------------------------------------------- results
    R, R_open = [r["acc"] for r in rows], [r["acc_open"] for r in rows]
    gnll, gmatch = [r["gen_nll"] for r in rows], [r["gen_match"] for r in rows]
    base_ok = all(torch.equal(v, model.state_dict()[k]) for k, v in base_before.items())
    vals = lambda key: [c[key] for c in conflicts if c[key] is not None]
    mean_of = lambda key: float(np.mean(vals(key))) if vals(key) else None
    summary = {
        "acc": common.final_average(R), "bwt": common.backward_transfer(R), "forgetting": common.forgetting(R),
        "acc_open": common.final_average(R_open), "bwt_open": common.backward_transfer(R_open),
        "forgetting_open": common.forgetting(R_open),
        "gen_drop": None if gmatch[0] is None else 100.0 * (gmatch[0] - gmatch[-1]),
        "gen_nll_increase": gnll[-1] - gnll[0], "gen_match_pre": gmatch[0], "gen_match_final": gmatch[-1],
        "grad_cos": mean_of("cos"), "grad_cos_text_side": mean_of("cos_text_side"),
        "grad_cos_image_side": mean_of("cos_image_side"), "grad_dot": mean_of("dot"),
        "gen_grad_norm": mean_of("gen_grad_norm"), "gen_grad_norm_text_side": mean_of("gen_grad_norm_text_side"),
        "trainable_params": sum(p.numel() for p in trainable), "base_weights_unchanged": base_ok,
    }
    timing = {"pretrain_s": pretrain_s, "continual_train_s": train_sw.total, "eval_s": eval_sw.total}
    names = ["pre-trained"] + [f"after {t}" for t in tasks]
    print("accuracy, closed-set (task answer vocabulary):\n" + common.format_matrix(R, names, tasks))
    print("accuracy, open (all text ids):\n" + common.format_matrix(R_open, names, tasks))
    print(f"gen_nll  {['%.4f' % v for v in gnll]}\ngen_match {gmatch}")
    print("summary", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))
    print(f"time: pretrain {pretrain_s:.1f}s, continual training {train_sw.total:.1f}s, "
          f"evaluation {eval_sw.total:.1f}s")
    none_col = lambda vals: [[None] * len(tasks) + [v] for v in vals]
    common.write_metrics_csv(os.path.join(run_dir, "metrics.csv"),
                             {"acc": [r + [None] for r in R], "acc_open": [r + [None] for r in R_open], "gen_nll": none_col(gnll), "gen_match": none_col(gmatch)},
                             tasks + ["t2i"])
    results = {"run_name": run_name, "method": args.method, "scheme": scheme, "tasks": tasks, "acc_matrix": R,
               "acc_open_matrix": R_open,
               "gen_nll": gnll, "gen_match": gmatch, "grad_conflict": conflicts, "summary": summary,
               "timing": timing, "pretrain_cache": cache_path}
    common.write_json(os.path.join(run_dir, "results.json"), results)  # last: a results.json means a complete run
    if tracker:
        tracker.summary.update({k: v for k, v in summary.items() if v is not None})
        tracker.finish()
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
