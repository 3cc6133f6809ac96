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
five tasks with the base frozen and experts on the MLP gate/up/down projections only (as the official code places them).


Usage:
    python mode.py                          # MoDE (T-MoE + V-Adapter + KD)
    python mode.py --method seq-lora        # baselines: seq-lora, moe-lora (modality-coupled), tmoe-only,
                                            #   cl-moe, dualprompt, model-tailor (below); --moe-split-rank
    python mode.py --no-kd                  # ablations: --no-kd, --no-text-moe, --no-visual-adapter (= tmoe-only)
    python mode.py --data-dir my_tasks/     # your own tokenised streams (format below)
    python mode.py --world shared-visual    # a world whose five tasks all need the image path (below)
    python mode.py --resume runs/RUN_NAME   # continue a killed run from its last completed task
    python mode.py --data-dir my_tasks/ --save-samples 8   # also save 8 sampled images' token ids per row
    python mode.py --backbone hf --hf-tiny-random                     # transformers' Chameleon, random, tiny
    python mode.py --backbone hf --hf-model /models/Anole-7b-v0.1-hf --data-dir my_tasks/ --dtype bfloat16
    torchrun --nproc_per_node 8 mode.py --backbone hf --hf-model ... --data-dir ... --dist ddp   # or fsdp

Metrics (row 0 = the pre-trained model, row k = after task k; R[k][j] = accuracy on task j, percent;
R is closed-set: the argmax is taken over task j's answer vocabulary = the target ids of its train split,
as VQA classifiers score over a dataset's answer list. R_open takes it over all text ids; with single-token
answers, open scoring mostly measures which answer *type* the last task left (every method loses it),
closed-set scoring whether the old skill survives. Both are logged; acc_open, bwt_open, forgetting_open
are the same formulas on R_open):
    acc         ACC = mean_j R[T][j]                                      (final average accuracy)
    bwt         BWT = mean_{j<T-1} (R[T][j] - R[j+1][j])                  (intra-modal, GEM)
    forgetting  F   = mean_{j<T-1} (max_{j+1<=l<=T-1} R[l][j] - R[T][j])  (intra-modal, Chaudhry)
    aia, fwt    AIA = mean_{k=1..T} mean_{j<k} R[k][j]; FWT = mean_{j>=1} (R[j][j] - R[0][j]) (vs the pre-trained)
    gen_nll     teacher-forced NLL (nats/code) of held-out reference image codes given the prompt
    gen_match   exact-attribute match: share of sampled images (temperature 1, the same Gumbel noise at
                every row) that are well-formed (one background code, one colour code, colour cells = one
                of the 8 shape masks exactly) with the prompt's colour and shape (built-in data only)
    gen_drop    100 * (gen_match[0] - gen_match[T]), percent points (inter-modal forgetting);
                gen_drop_max = the largest 100 * (gen_match[0] - gen_match[k]) over k >= 1
    grad_cos    mean over checks of cos(grad L_task, grad L_gen) on all trainable adapter parameters; the
                text-side / image-side cosines and <g_t, g_v> are logged too
    forgetting_share_{image,text}_path  where the forgetting flows: after the last task the experts as applied at
                image (text) tokens are restored to their state right after task j and task j is rescored;
                share = sum_j (restored_j - R[T][j]) / sum_j (R[j+1][j] - R[T][j]), j < T-1 (None if nothing lost)
An understanding sample is correct when the argmax (closed-set or open) equals every answer token.
--answers multi (built-in data): answers become `it is <value> <eos>` (counts as two digit tokens,
the night answer `unanswerable <eos>`; 13 new text ids, the image codes move up), every answer token a target;
rows then also hold acc_exact (and _official_routing): greedy decoding of --eval-max-new-tokens (8) after the question,
image ids masked, generated tokens routed as text, correct when the decode up to and including the first <eos>
equals the answer, as the paper scores VQA. Summary keys acc_exact, bwt_exact, forgetting_exact. acc_exact equals
acc_open here by construction (a deterministic greedy decode reproduces every teacher-forced argmax up to the
first error, under the same text mask and routing); it is kept as the paper's protocol and as that check. The headline
stays closed-set single-token (--answers single, the default), decided before any comparison: it is the only
scoring here that does not saturate (open forgetting is 84-93 points for every method, closed-set 50-60), it
separates the old skill from the last task's answer-type prior that no compared method claims to address, and
it has the seed history of the primary arms; exact match is logged as a secondary measure (no seed sweep uses it).
Every row is scored under two routings without retraining: E1 = the true token modality (the paper's design,
the headline: acc*, bwt*, forgetting*) and E2 = every token to the text experts, as the official evaluation
code does (the same keys with the suffix _official_routing). Without routing (seq-lora, moe-lora) E1 = E2.

--world shared-visual (built-in data; data.py MODE_SV_*): every image also has an orientation of its mask
(identity, h-flip, v-flip, rot180; the 8 masks regenerated so that all 32 variants differ in >= 3 cells), drawn
independently and named in no caption or prompt, so pre-training learns to choose it, like the background. Five
tasks share the skill "locate the foreground cells": top-bottom (the half with more foreground: top / bottom),
left-right (left / right), top-left (is that cell foreground: yes / no), orientation (its name) and top-row (the
colour if the top row has foreground, else the shape); odd mask sizes leave no ties. The 15 new text ids (those
words, then the <q:task> tokens) follow the 40 of the default world, whose ids are unchanged; the image codes move
up by 15. gen_match accepts any orientation of the prompted shape. The run name carries the world where it
otherwise says "tiny", the variant `world=shared-visual`; --answers multi is not available there.

Outputs in runs/{run_name}/: args.json, cmd.txt, results.json (matrices acc, acc_open and their
_official_routing twins; generation metrics, gradient checks, the expert scheme under "extra"), metrics.csv,
checkpoint.pt after every task (deleted at the end unless --save-model). A run whose loss turns NaN/inf stops
with exit code 1 and writes no results.json; bad arguments or data exit 2 before anything is written.
--save-samples K adds samples_{pretrained,after_TASK}.npz: codes int32 [K, n_codes], the image token ids `sample_image`
draws (fixed noise) for the first K reference_test prompts; n_codes = meta.json "image_seq_len", else the reference's.

--data-dir format: meta.json {"vocab_size": V, "image_token_start": I, "tasks": [names]} (ids >= I are
image codes) and one .npz per stream: pretrain, reference_train, reference_test, <task>_train,
<task>_test, each with int arrays tokens [N, L] (L <= --max-len, trailing pad allowed), modality [N, L]
(1 = image span token, routed to the V-Adapter) and loss_mask [N, L] (1 = target token). gen_match and
gen_drop need the built-in image oracle and are None there; gen_nll is still reported. meta.json may instead
give "image_token_ranges": [[lo, hi), ...] (Anole: [[4, 8196]]) and "boi_id", "eoi_id", "eos_id", "pad_id";
with boi_id and eoi_id every modality array must equal the one derived from the ids (image ids, <boi>, <eoi>);
no target may be pad_id; with eos_id every task answer ends with its only eos_id and is also scored by greedy
exact match (acc_exact, as --answers multi).
data.export_mode_world(DIR) writes the built-in world in this format.

--backbone hf (pip install "transformers>=4.43"): transformers' own ChameleonForConditionalGeneration, from
--hf-model DIR (local files only; meta.json must match its vocabulary) or --hf-tiny-random (sized by --d-model
etc., pre-trained like the tiny model). The same ExpertLinear wraps every decoder layer's mlp.gate/up/down_proj
and reads the route from a shared holder; logits = lm_head(hidden states) (the upstream forward sets image ids
to the dtype minimum); each routed pass runs forward and backward before the route changes (with gradient
checkpointing the backward recomputes the MLPs under the route set then). Base in --dtype, experts in float32;
greedy decoding and image sampling with a KV cache. Under torchrun (--dist ddp|fsdp, gloo or nccl) every rank
draws the same global batch and takes its rows, losses are divided by the global target count; DDP ranks split
the evaluation rows and reduce the means (FSDP2: every rank evaluates every row); rank 0 alone writes;
checkpoints hold the experts.
dualprompt stays on the tiny backbone (prefix attention); cl-moe and model-tailor run without FSDP2.

Deviations from the paper:
    - tiny model and synthetic world instead of Anole-7B, CoIN and LAION; CLIP/FID -> gen_nll, gen_match;
    - single-token answers scored teacher-forced (not 60-token greedy decoding);
    - steps-based schedule (160 steps/task, not 1 epoch), lr 2e-3, batch 32; AdamW, warmup + cosine
      restarted per task;
    - KD over the full (tiny) image vocabulary, no top-256 truncation; the teacher is the model with
      experts bypassed (as in the code). Official-code switches (off by default): temperature applied twice
      (--official-kd-double-temperature), KD mean over all positions (--official-kd-all-positions);
    - the paper's equation numbers could not be read (only its abstract was available), so markers name
      the equation (Eq. (T-MoE), Eq. (KD), ...) following the paper's forms.

Baselines (section "baselines"; designed from their official code; same
loop, batches, steps and fresh-per-task AdamW as the other methods unless said; all coupled, so E2 = E1):
    cl-moe        CL-MoE (ECNU-ICALK/CL-MoE a9eff1c) as released: moe-lora's layout on all tokens, each training
                  forward counts per expert the tokens whose top-2 includes it (top-1/top-2 ties not counted);
                  after task k >= 2, before row k: expert e = a * old + (1 - a) * new for its A and B separately,
                  old = the post-merge experts after task k-1, a = 1 - m for experts in the old task's top list
                  only, else m (--clmoe-momentum 0.7, --clmoe-top 8); routers from the new model. Deviations:
                  Kaiming-uniform A and full rank per expert, as moe-lora (the release: normal(0, 0.01), rank
                  split over experts = --moe-split-rank); counts from every training forward, not its sampling at
                  wall-clock second 30; the merge is applied as intended (the release's key test matches no PEFT
                  key, so its merged checkpoint equals the new one); no dual task/instance router (absent from
                  the release). Rows k are post-merge, so R[k][k] is below the just-trained accuracy.
    dualprompt    DualPrompt (google-research/l2p configs; mechanics as in JH-LEE-KR/dualprompt-pytorch) on the
                  frozen decoder: prefix tuning (learned key/value prefixes, uniform(-1, 1)) with a G-prefix on
                  --dp-g-layers (0) and one E-prefix per task on --dp-e-layers (1, 2), lengths 5; explicit mask:
                  every token sees every prefix slot, then the causal triangle. The query is the frozen model's
                  final normed hidden state at the last input position (<q:task>, <boi>; prefix-free, experts
                  bypassed); task k trains E-prefix k (initialised from E-prefix k-1) with the pull constraint
                  -1.0 * cos(key_k, query); evaluation selects per sample the top-1 key by cosine among the tasks
                  trained so far (row 0 is prefix-free); generation selects once from the prompt and keeps it.
                  Adam (AdamW, weight decay 0), constant --dp-lr 0.03, clip 1.0, fresh per task. Deviations:
                  decoder-only mapping of the ViT layers (2/12, 3/12 -> 1/4, 2/4); per-sample selection, not the
                  port's batch-majority vote (a single-task test batch would make it an oracle); keys not yet
                  trained are not candidates; no class mask (closed-set scoring instead). No per-token adapters:
                  path attribution is None; dp_selection_acc (extra) = the share selecting the task's own prefix.
    model-tailor  Model Tailor (didizhu-zju/Model-Tailor e24dafe): seq-lora, then after each task, block by block
                  with earlier blocks tailored, H = 2/n sum x x^T over --tailor-samples 128 sequences of the task
                  just trained (non-pad positions), damped by 1% of its mean diagonal; per 128-column block the
                  --tailor-keep 10% most important entries of W_ft - W_pre are kept (score 0.8 z(|dW|) +
                  0.2 z(W^2 / U_ii^2), or --tailor-score obs), the rest reverted to W_pre column by column with
                  OBS compensation on the later columns, SparseGPT's sign W -= err U by default (the release's
                  W += err U with --official-tailor-sign; it adds output error on correlated inputs, see tests).
                  The result is a frozen dense patch on the base (in the checkpoint), the LoRA restarts (A
                  re-drawn, B = 0). Deviations: all layers are tailored (the release: layers 20-31 of 32); each
                  block keeps exactly floor(10% of its entries) (the release thresholds a sorted score with <=,
                  which can differ by an entry or by ties); the projector reset has no counterpart here.
    --moe-split-rank  every text mixture (moe-lora, cl-moe, tmoe-only, MoDE's T-MoE) gives each expert rank
                  lora_rank / num_experts with scale lora_alpha / lora_rank, as CoIN's and CL-MoE's tuners do:
                  the experts' parameters equal seq-lora's (the routers come on top).
"""

import hashlib
import inspect
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro

import common
import data


@dataclass
class Args:
    """MoDE (NeurIPS 2025) on a tiny unified multimodal model: continual VQA tuning with modality-decoupled
    experts and distillation, reporting intra-modal (VQA accuracy) and inter-modal (image generation) forgetting."""

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
    """directory of tokenised streams (format in the module docstring); default: the built-in synthetic world"""
    n_train: int = 2048
    """built-in data: training sequences per task (and in the reference stream)"""
    n_test: int = 256
    """built-in data: held-out sequences per task (and in the reference test stream)"""
    world: Literal["default", "shared-visual"] = "default"
    """built-in data: default (CoIN-shaped tasks on colour, shape, background) or shared-visual (module docstring)"""
    gen_samples: int = 128
    """prompts sampled for the exact-attribute match (built-in data)"""
    save_samples: int = 0
    """K > 0: samples_{pretrained,after_TASK}.npz, image token ids sampled for the first K reference_test prompts"""
    pretrain_cache_dir: str = "runs/mode_pretrained"
    """where the pre-trained model is cached (keyed by a hash of the pre-training config, seed and data)"""
    pretrain_steps: int = 1000
    """pre-training steps (captioning + text-to-image, all parameters)"""
    pretrain_batch_size: int = 64
    """pre-training batch size (mixed captioning / text-to-image sequences)"""
    pretrain_lr: float = 2e-3
    """pre-training peak learning rate (5% warmup, cosine decay)"""
    pretrain_max_grad_norm: float = 1.0
    """gradient-norm clipping during pre-training"""
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
    answers: Literal["single", "multi"] = "single"
    """built-in data: single-token answers (headline) or `it is <value> <eos>` scored by greedy exact match too"""
    backbone: Literal["tiny", "hf"] = "tiny"
    """tiny = the built-in decoder; hf = transformers' Chameleon / Anole classes (pip install "transformers>=4.43")"""
    hf_model: Optional[str] = None
    """--backbone hf: local directory of a Chameleon / Anole checkpoint (config.json + weights); no downloads"""
    hf_tiny_random: bool = False
    """--backbone hf: a random Chameleon sized by --d-model/--n-layers/--n-heads/--d-ff, pre-trained as the tiny one"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """--backbone hf: dtype of the frozen base (auto = bfloat16 on CUDA, float32 on CPU); experts stay float32"""
    gradient_checkpointing: bool = False
    """--backbone hf: recompute each decoder layer in backward (non-reentrant) to save activation memory"""
    dist: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """--backbone hf under torchrun: data parallel (auto = ddp when WORLD_SIZE > 1); nccl on CUDA, gloo on CPU"""
    eval_max_new_tokens: int = 8
    """--answers multi: greedy decoding budget of the exact-match scoring (both backbones; hf: with a KV cache)"""
    eval_batch_size: int = 512
    """sequences per evaluation forward (the hf backbone with a real model's vocabulary: a few)"""

    # Algorithm specific arguments
    method: Literal["mode", "seq-lora", "moe-lora", "tmoe-only", "cl-moe", "dualprompt", "model-tailor"] = "mode"
    """mode | seq-lora (one shared LoRA) | moe-lora (shared LoRA experts) | tmoe-only (image tokens un-adapted) |
    cl-moe | dualprompt | model-tailor (baselines, module docstring)"""
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
    max_grad_norm: float = 10.0
    """gradient-norm clipping of the adapters (official code: 10)"""
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
    official_kd_double_temperature: bool = False
    """official code: logits divided by tau twice (effective tau^2), scale still tau^2"""
    official_kd_all_positions: bool = False
    """official code: KD averaged over all positions instead of the image-code targets"""
    conflict_every: int = 40
    """measure the task/generation gradient cosine every this many steps (0 = never)"""
    conflict_batch_size: int = 64
    """sequences per stream for the gradient-conflict measurement"""
    log_every: int = 100
    """print a progress line every this many steps"""

    # Baselines (defaults from the official code, never tuned on results)
    moe_split_rank: bool = False
    """every text mixture splits --lora-rank over its experts, scale alpha / lora_rank (CoIN coinmoelora.py)"""
    clmoe_momentum: float = 0.7
    """CL-MoE: merged expert = m * old + (1 - m) * new after each task (CL-MoE params.py:32-36)"""
    clmoe_top: int = 8
    """CL-MoE: experts kept in a task's usage list, most used first (CL-MoE statistic.py:57-62)"""
    dp_g_layers: Tuple[int, ...] = (0,)
    """DualPrompt: layers with the G-prefix (l2p cifar100_dualprompt.py: [0, 1] of 12)"""
    dp_e_layers: Tuple[int, ...] = (1, 2)
    """DualPrompt: layers with the E-prefix (l2p cifar100_dualprompt.py: [2, 3, 4] of 12)"""
    dp_g_length: int = 5
    """DualPrompt: G-prefix length (l2p cifar100_dualprompt.py)"""
    dp_e_length: int = 5
    """DualPrompt: E-prefix length (l2p cifar100_dualprompt.py)"""
    dp_lr: float = 0.03
    """DualPrompt: constant Adam learning rate, fresh per task (l2p cifar100_dualprompt.py)"""
    dp_max_grad_norm: float = 1.0
    """DualPrompt: gradient-norm clipping (dualprompt-pytorch main.py)"""
    dp_pull: float = 1.0
    """DualPrompt: weight of the pull constraint -cos(key, query) (dualprompt-pytorch engine.py:67-68)"""
    tailor_keep: float = 0.1
    """Model Tailor: share of each block's entries of the change kept (release: sparsity_level 0.9)"""
    tailor_samples: int = 128
    """Model Tailor: calibration sequences from the task just trained (main_model_tailor.py:811)"""
    tailor_damp: float = 0.01
    """Model Tailor: Hessian damping, share of its mean diagonal (sparsegpt.py percdamp)"""
    tailor_score: Literal["official", "obs"] = "official"
    """Model Tailor: official = 0.8 z(|dW|) + 0.2 z(W^2 / U_ii^2) (sparsegpt.py:114-125); obs = dW^2 / U_ii^2"""
    official_tailor_sign: bool = False
    """official code: OBS compensation W += err U (sparsegpt.py:158-169) instead of SparseGPT's W -= err U"""


FIELDS = ("tokens", "modality", "loss_mask")
ABLATIONS = ("kd", "text_moe", "visual_adapter")  # MoDE switches, on by default
OFFICIAL = ("official_kd_double_temperature", "official_kd_all_positions")  # official-code switches, off
BASELINES = ("cl-moe", "dualprompt", "model-tailor")
TAILOR_BLOCK = 128  # columns per block of Model Tailor's mask and lazy compensation (sparsegpt.py blocksize)
MAX_NEW_TOKENS = 8  # default greedy decoding budget (--eval-max-new-tokens; the longest answer has 5 tokens)
VARIANT_FIELDS = ("n_train", "n_test", "gen_samples", "pretrain_steps", "pretrain_batch_size", "pretrain_lr",
                  "pretrain_max_grad_norm", "d_model", "n_layers", "n_heads", "d_ff", "max_len", "num_tasks",
                  "steps_per_task", "batch_size", "lr", "max_grad_norm", "lora_rank", "lora_alpha", "lora_dropout",
                  "num_experts", "kd_lambda", "kd_temperature", "kd_batch_size", "conflict_every",
                  "conflict_batch_size", "clmoe_momentum", "clmoe_top", "dp_g_layers", "dp_e_layers", "dp_g_length",
                  "dp_e_length", "dp_lr", "dp_max_grad_norm", "dp_pull", "tailor_keep", "tailor_samples",
                  "tailor_damp", "tailor_score", "answers", "world", "eval_max_new_tokens")
ROUTINGS = (("", False), ("_official_routing", True))  # (key suffix, every token to the text experts)
MATRICES = ("acc", "acc_open", "acc_official_routing", "acc_open_official_routing", "acc_exact",
            "acc_exact_official_routing")  # the last two with --answers multi only


# ----------------------------------------------------------------------------- helpers
def method_tag(args: Args) -> str:
    """The method plus its non-default switches, '+'-joined: 'mode', 'mode+no-kd', 'seq-lora'."""
    parts = ["moe-split-rank"] if args.moe_split_rank and scheme_of(args)["n_text"] > 1 else []
    parts += ["official-tailor-sign"] if args.method == "model-tailor" and args.official_tailor_sign else []
    if args.method == "mode":  # the MoDE switches do not apply to the baselines
        parts = [f"no-{f}" for f in ABLATIONS if not getattr(args, f)] + [f for f in OFFICIAL if getattr(args, f)] \
            + parts
    return "+".join([args.method] + [p.replace("_", "-") for p in parts])


def config_hash(args: Args, source: str) -> str:
    keys = ["seed", "pretrain_steps", "pretrain_batch_size", "pretrain_lr", "d_model", "n_layers", "n_heads",
            "d_ff", "max_len", "n_train", "n_test"]
    cfg = {k: getattr(args, k) for k in keys}
    if args.pretrain_max_grad_norm != 1.0:  # keeps the keys of caches made before the flag existed
        cfg["pretrain_max_grad_norm"] = args.pretrain_max_grad_norm
    if args.world != "default":  # likewise
        cfg["world"] = args.world
    if args.backbone == "hf":  # --hf-tiny-random
        cfg["backbone"] = "hf-tiny-random"
    blob = json.dumps(cfg | {"source": source, "v": 1}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def to_tensors(stream: Dict[str, np.ndarray], device) -> Dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in stream.items()}


def sample_batch(stream: Dict[str, torch.Tensor], n: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    idx = torch.randint(len(stream["tokens"]), (n,), generator=gen).to(stream["tokens"].device)
    return {k: v[idx] for k, v in stream.items()}


def warmup_cosine(step: int, total: int, warmup: float) -> float:
    w = max(1, int(warmup * total))
    return (step + 1) / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def is_expert(name: str) -> bool:
    """Method state, not the frozen base: experts, routers, Model Tailor's patches, DualPrompt's prompts."""
    return ".A_" in name or ".B_" in name or "router" in name or ".patch" in name or name.startswith("prompts.")


def base_hashes(model: nn.Module) -> Dict[str, str]:
    """sha1 of every frozen base tensor: base_weights_unchanged compares against the pre-trained weights."""
    local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in model.state_dict().items()}  # FSDP2
    return {k: hashlib.sha1(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in local.items() if not is_expert(k)}


# ----------------------------------------------------------------------------- model
class ExpertLinear(nn.Module):
    """A base linear W plus optional modality-routed low-rank experts (on MLP gate/up/down).

    route[b, s] = 0 sends the token to the text side (T-MoE, or one LoRA when it has 1 expert),
    1 to the image side (V-Adapter; no delta when absent); route=None bypasses all experts (teacher).
    restore = (expert tensors of a snapshot, bool [B, S]) gives the selected tokens the snapshot's delta.
    patch (Model Tailor) is a frozen dense weight change on routed tokens; usage (CL-MoE) counts top-2 experts."""

    def __init__(self, d_in: int, d_out: int, base: Optional[nn.Linear] = None, holder=None):
        super().__init__()
        self.base = nn.Linear(d_in, d_out, bias=False) if base is None else base
        self.holder = holder  # hf backbone: the Route every wrapper reads (transformers' MLP passes only x)
        self.n_text, self.image_side, self.restore, self.usage = 0, False, None, None
        self.register_buffer("patch", None)

    def add_experts(self, r: int, alpha: float, dropout: float, n_text: int, image_side: bool,
                    r_text: Optional[int] = None, patch: bool = False):
        d_in, d_out, r_text = self.base.in_features, self.base.out_features, r_text or r
        bound = 1 / math.sqrt(d_in)  # = kaiming_uniform(a=sqrt(5)) as in LoRA; B = 0 -> identity at init
        self.base.weight.requires_grad_(False)
        self.n_text, self.image_side, self.scale, self.drop = n_text, image_side, alpha / r, nn.Dropout(dropout)
        dev = self.base.weight.device  # experts in float32 whatever the base's dtype
        self.A_t = nn.Parameter(torch.empty(n_text, d_in, r_text, device=dev).uniform_(-bound, bound))
        self.B_t = nn.Parameter(torch.zeros(n_text, r_text, d_out, device=dev))
        self.router = nn.Linear(d_in, n_text, bias=False, device=dev) if n_text > 1 else None
        if image_side:
            self.A_v = nn.Parameter(torch.empty(d_in, r, device=dev).uniform_(-bound, bound))
            self.B_v = nn.Parameter(torch.zeros(r, d_out, device=dev))
        if patch:
            self.patch = torch.zeros_like(self.base.weight, dtype=torch.float32)

    def experts(self) -> Dict[str, Optional[torch.Tensor]]:
        if self.n_text == 0:
            return {}
        return {"A_t": self.A_t, "B_t": self.B_t, "router": None if self.router is None else self.router.weight,
                "A_v": self.A_v if self.image_side else None, "B_v": self.B_v if self.image_side else None,
                "patch": self.patch}

    def delta(self, x: torch.Tensor, h: torch.Tensor, route: torch.Tensor, p: dict) -> torch.Tensor:
        # Eq. (T-MoE): y = W h + s * sum_j softmax(W_g h)_j B_j A_j h   (dense soft mixture, fp32 router)
        z = torch.einsum("bsi,eir->bser", h, p["A_t"])
        if p["router"] is not None:
            gate = torch.softmax(F.linear(x, p["router"]).float(), -1)
            if self.usage is not None and self.training:
                self.usage += top2_usage(gate)
            z = z * gate.to(z.dtype).unsqueeze(-1)
        delta = torch.einsum("bser,ero->bso", z, p["B_t"])
        if self.image_side:
            # Eq. (V-Adapter): y = W h + s * B_v A_v h for image tokens; hard routing by token modality
            return torch.where(route.unsqueeze(-1) == 1, h @ p["A_v"] @ p["B_v"], delta)
        return torch.where(route.unsqueeze(-1) == 1, torch.zeros_like(delta), delta)

    def forward(self, x: torch.Tensor, route: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.base(x)
        route = route if self.holder is None else self.holder.value
        if route is None or self.n_text == 0:
            return y
        x = x.to(self.A_t.dtype)  # a bfloat16 base: the experts compute in float32
        h = self.drop(x)
        delta = self.adapted(x, h, route, self.experts())
        if self.restore is not None:  # path attribution only
            snapshot, sel = self.restore
            delta = torch.where(sel.unsqueeze(-1), self.adapted(x, h, route, snapshot), delta)
        return y + delta.to(y.dtype)

    def adapted(self, x, h, route, p: dict) -> torch.Tensor:
        delta = self.scale * self.delta(x, h, route, p)
        if p.get("patch") is None:  # snapshots written before Model Tailor existed have no "patch"
            return delta
        return delta + torch.where(route.unsqueeze(-1) == 0, F.linear(x, p["patch"]), 0.0)  # Model Tailor


def top2_usage(gate: torch.Tensor) -> torch.Tensor:
    """CL-MoE's usage count (clitmoelora.py:404-417): per expert, the tokens whose top-2 experts include it;
    tokens whose top-1 and top-2 weights tie are not counted."""
    w, idx = gate.detach().flatten(0, -2).topk(2, -1)
    return torch.bincount(idx[w[:, 0] > w[:, 1]].flatten(), minlength=gate.shape[-1]).to(gate.dtype)


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, d_ff: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate, self.up, self.down = ExpertLinear(d, d_ff), ExpertLinear(d, d_ff), ExpertLinear(d_ff, d)

    def forward(self, x, route, prefix=None):
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        if prefix is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # DualPrompt prefix tuning: every token sees all prefix slots, then the causal triangle
            pk, pv = prefix.view(B, 2, -1, self.n_heads, D // self.n_heads).permute(1, 0, 3, 2, 4)
            mask = torch.ones(S, pk.shape[2] + S, dtype=torch.bool, device=x.device).tril(pk.shape[2])
            a = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h, route)) * self.up(h, route), route)  # SwiGLU


class UnifiedLM(nn.Module):
    """Decoder-only model over one vocabulary of text ids and image codes (Chameleon-like, tiny)."""

    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, d_ff: int, max_len: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_heads, d_ff) for _ in range(n_layers))
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)
        self.prompts = None  # DualPrompt

    def hidden(self, tokens: torch.Tensor, route=None, prompt=None) -> torch.Tensor:
        """Final normed hidden states; prompt = E-prefix index per sample [B] (DualPrompt; None: no prefixes)."""
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for i, blk in enumerate(self.blocks):
            x = blk(x, route, None if prompt is None else self.prompts.prefix(i, prompt))
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, route: Optional[torch.Tensor] = None, prompt=None) -> torch.Tensor:
        return self.head(self.hidden(tokens, route, prompt))

    def expert_layers(self) -> List[ExpertLinear]:
        return [m for m in self.modules() if isinstance(m, ExpertLinear)]


class Prompts(nn.Module):
    """DualPrompt's prefixes (dualprompt-pytorch prompt.py:38-60): a G-prefix shared by all tasks, a pool of
    E-prefixes (one per task) and their keys, all uniform(-1, 1); each prefix is a key and a value sequence."""

    def __init__(self, n_tasks: int, d: int, g_layers, e_layers, g_len: int, e_len: int):
        super().__init__()
        self.g_layers, self.e_layers, self.task = list(g_layers), list(e_layers), None  # task: the one in training
        self.g = nn.Parameter(torch.empty(len(self.g_layers), 2, g_len, d).uniform_(-1, 1))
        self.e = nn.Parameter(torch.empty(n_tasks, len(self.e_layers), 2, e_len, d).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(n_tasks, d).uniform_(-1, 1))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # tasks trained so far

    def prefix(self, layer: int, sel: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, 2, L, d] key/value prefix of one layer for E-prefix indices sel [B], or None."""
        parts = [self.g[self.g_layers.index(layer)].expand(len(sel), -1, -1, -1)] if layer in self.g_layers else []
        parts += [self.e[sel, self.e_layers.index(layer)]] if layer in self.e_layers else []
        return torch.cat(parts, 2) if parts else None


# ----------------------------------------------------------------------------- losses
def is_image_id(ids: torch.Tensor, image_lo) -> torch.Tensor:
    """image_lo: the first image id (image codes are the vocabulary's tail) or a bool table [V] (meta.json's
    image_token_ranges, e.g. Anole's codes 4..8195 inside the vocabulary)."""
    return ids >= image_lo if isinstance(image_lo, int) else image_lo[ids]


def image_columns(image_lo):
    """Index of the image-code columns of a logit tensor (a slice for a tail, else the bool table)."""
    return slice(image_lo, None) if isinstance(image_lo, int) else image_lo


def restrict_logits(logits: torch.Tensor, targets: torch.Tensor, image_lo) -> torch.Tensor:
    """Modality logit mask (as the code's train-text / train-image modes): a text target is scored over
    text ids only, an image-code target over image codes only."""
    vocab_is_image = is_image_id(torch.arange(logits.shape[-1], device=logits.device), image_lo)
    return logits.masked_fill(vocab_is_image != is_image_id(targets, image_lo).unsqueeze(-1), float("-inf"))


def lm_loss(logits: torch.Tensor, batch: Dict[str, torch.Tensor], image_lo, denom: Optional[float] = None):
    # Eq. (CE): next-token cross-entropy on the target tokens only (answers, or image codes)
    targets, mask = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:].bool()
    logits = restrict_logits(logits[:, :-1], targets, image_lo)
    if denom is None:
        return F.cross_entropy(logits[mask], targets[mask])
    return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum") / denom  # hf: global count (D6)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, batch: Dict[str, torch.Tensor], image_lo,
            tau: float, double_tau: bool = False, all_positions: bool = False, denom: Optional[float] = None):
    # Eq. (KD): L_KD = tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau)) over the image vocabulary
    div, cols = tau * tau if double_tau else tau, image_columns(image_lo)
    log_s = F.log_softmax(student[:, :-1, cols].float() / div, -1)
    log_t = F.log_softmax(teacher[:, :-1, cols].float() / div, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    mask = torch.ones_like(kl, dtype=torch.bool) if all_positions else batch["loss_mask"][:, 1:].bool()
    return tau * tau * (kl[mask].mean() if denom is None else kl[mask].sum() / denom)



# ----------------------------------------------------------------------------- the method's continual pieces
def scheme_of(args: Args) -> dict:
    """Expert layout of each method: text experts, image side, coupled (all tokens on the text side), KD."""
    if args.method == "seq-lora":
        return dict(n_text=1, image_side=False, coupled=True, kd=False)
    if args.method == "moe-lora":
        return dict(n_text=args.num_experts, image_side=False, coupled=True, kd=False)
    if args.method == "tmoe-only":
        return dict(n_text=args.num_experts, image_side=False, coupled=False, kd=False)
    if args.method in BASELINES:  # CL-MoE: moe-lora's layout (CoIN's); Model Tailor: seq-lora's; DualPrompt: none
        return dict(n_text={"cl-moe": args.num_experts, "dualprompt": 0, "model-tailor": 1}[args.method],
                    image_side=False, coupled=True, kd=False)
    n_text = args.num_experts if args.text_moe else 1
    return dict(n_text=n_text, image_side=args.visual_adapter, coupled=False, kd=args.kd and args.visual_adapter)


def route_for(batch: Dict[str, torch.Tensor], scheme: dict, stream: str, official: bool = False) -> torch.Tensor:
    """METHOD LOGIC: routing by token modality. 'task' = understanding sequences (true modality ids);
    'gen' = the reference / text-to-image stream, every token (prompt too) to the V-Adapter (as coded);
    'eval' with official=True = every token to the text experts (the official evaluation code, E2)."""
    m = batch["modality"]
    if scheme["coupled"] or (stream == "eval" and official):
        return torch.zeros_like(m)
    return torch.ones_like(m) if stream == "gen" else m


def add_experts(model: UnifiedLM, args: Args, scheme: dict, n_tasks: int = 1) -> List[nn.Parameter]:
    """Freeze every base weight, insert experts on the MLP gate/up/down (DualPrompt: a prompt pool of n_tasks);
    return the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    n, split = scheme["n_text"], args.moe_split_rank and scheme["n_text"] > 1
    for layer in model.expert_layers() if n > 0 else []:
        layer.add_experts(args.lora_rank, args.lora_alpha, args.lora_dropout, n, scheme["image_side"],
                          r_text=args.lora_rank // n if split else None, patch=args.method == "model-tailor")
    if args.method == "dualprompt":
        model.prompts = Prompts(n_tasks, model.tok.embedding_dim, args.dp_g_layers,
                                args.dp_e_layers, args.dp_g_length, args.dp_e_length).to(model.tok.weight.device)
    return [p for p in model.parameters() if p.requires_grad]


def split_params(model: UnifiedLM):
    """(text-side parameters: T-MoE / shared LoRA + routers / DualPrompt's prompts, image-side: V-Adapter)."""
    text, image = [] if model.prompts is None else list(model.prompts.parameters()), []
    for layer in model.expert_layers() if model.prompts is None else []:
        text += [layer.A_t, layer.B_t] + (list(layer.router.parameters()) if layer.router is not None else [])
        image += [layer.A_v, layer.B_v] if layer.image_side else []
    return text, image


def run(model, batch: Dict[str, torch.Tensor], route) -> torch.Tensor:
    """The model on a batch, with DualPrompt's prefixes where the model has them (`prompt_for`)."""
    return model(batch["tokens"], route, prompt_for(model, batch["tokens"], query_pos(batch)))


def query_pos(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The last input position before the first target (<q:task> for VQA, <boi> for text-to-image)."""
    return batch["loss_mask"][:, 1:].int().argmax(1)


def kd_student(model, ref_batch, scheme, kd_gen: Optional[torch.Generator]) -> torch.Tensor:
    """The student's reference forward; with kd_gen its dropout masks come from a stream of their own, so the
    global RNG (the task forward's dropout) advances exactly as in a method without KD (paired seeds)."""
    route = route_for(ref_batch, scheme, "gen")
    if kd_gen is None:
        return model(ref_batch["tokens"], route)
    dev = ref_batch["tokens"].device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(int(torch.randint(2**62, (), generator=kd_gen)))
        return model(ref_batch["tokens"], route)


def task_step_loss(model, task_batch, ref_batch, scheme, args, image_lo, kd_gen=None):
    """Eq. (L_total): L = L_CE(task) + lambda * L_KD(reference); KD reaches only the V-Adapter."""
    ce = lm_loss(run(model, task_batch, route_for(task_batch, scheme, "task")), task_batch, image_lo)
    kd = torch.zeros((), device=ce.device)
    if model.prompts is not None:  # DualPrompt's pull constraint on the trained task's key
        return ce - args.dp_pull * pull_cosine(model, task_batch["tokens"], query_pos(task_batch)), ce, kd
    if scheme["kd"]:
        with torch.no_grad():
            teacher = model(ref_batch["tokens"], None)  # frozen pre-trained model = experts bypassed
        student = kd_student(model, ref_batch, scheme, kd_gen)
        kd = kd_loss(student, teacher, ref_batch, image_lo, args.kd_temperature,
                     args.official_kd_double_temperature, args.official_kd_all_positions)
    return ce + args.kd_lambda * kd, ce, kd


def _flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else 0.0


def gradient_conflict(model, task_batch, ref_batch, scheme, image_lo) -> dict:
    """Eq. (dL_v): a text step changes L_gen by -eta <g_t, g_v> + O(eta^2); log cos(g_t, g_v) on all trainable
    adapter parameters and on each side (the T-MoE's g_v is exactly 0 when decoupled)."""
    was_training = model.training
    model.eval()
    text, image = split_params(model)
    params = text + image
    l_t = lm_loss(run(model, task_batch, route_for(task_batch, scheme, "task")), task_batch, image_lo)
    l_v = lm_loss(run(model, ref_batch, route_for(ref_batch, scheme, "gen")), ref_batch, image_lo)
    g_t, g_v = _flat_grad(l_t, params), _flat_grad(l_v, params)
    model.train(was_training)
    n_text = sum(p.numel() for p in text)
    return {"cos": _cos(g_t, g_v), "cos_text_side": _cos(g_t[:n_text], g_v[:n_text]),
            "cos_image_side": _cos(g_t[n_text:], g_v[n_text:]) if image else None,
            "dot": float(g_t @ g_v), "gen_grad_norm": float(g_v.norm()),
            "gen_grad_norm_text_side": float(g_v[:n_text].norm())}


# ----------------------------------------------------------------------------- baselines
def before_task(model: UnifiedLM, args: Args, k: int) -> None:
    """CL-MoE starts task k's usage counts; DualPrompt trains E-prefix k, initialised from E-prefix k-1 (the
    shared-pool option; keys are not copied; dualprompt-pytorch engine.py:184-204)."""
    if args.method == "cl-moe":
        for layer in model.expert_layers():
            layer.usage = torch.zeros(layer.n_text, device=layer.base.weight.device)
    if args.method == "dualprompt":
        model.prompts.task = k
        if k > 0:
            with torch.no_grad():
                model.prompts.e[k] = model.prompts.e[k - 1]


def after_task(model: UnifiedLM, args: Args, streams, k: int, task: str, gens, state: dict, snapshots) -> None:
    """Post-task step of each baseline, before row k is scored: CL-MoE's merge, DualPrompt's key release,
    Model Tailor's tailoring. `state` holds what later tasks need (checkpointed)."""
    if args.method == "cl-moe":
        usage = sum(layer.usage for layer in model.expert_layers())
        if dist.is_initialized():  # DDP: every rank counted its own rows
            dist.all_reduce(usage)
        state["usage"].append(usage.cpu())
        for layer in model.expert_layers():
            layer.usage = None
        if k > 0:
            clmoe_merge(model.expert_layers(), snapshots[-1], state["usage"][-2], state["usage"][-1],
                        args.clmoe_momentum, args.clmoe_top)
    if args.method == "dualprompt":
        model.prompts.task = None
        model.prompts.seen.fill_(k + 1)
    if args.method == "model-tailor":
        calib = sample_batch(streams[f"{task}_train"], args.tailor_samples, gens["tailor"])
        tailor_model(model, calib, args, common.derive_seed(args.seed, f"init/tailor/{k}"))


# CL-MoE (ECNU-ICALK/CL-MoE as released: moe-lora's layout, usage counts, momentum merge of the expert weights)
def top_experts(usage: torch.Tensor, m: int) -> set:
    """The m most used experts with a nonzero count (statistic.py:29-64)."""
    return {int(e) for e in usage.argsort(descending=True, stable=True)[:m] if usage[e] > 0}


@torch.no_grad()
def clmoe_merge(layers, old: List[dict], usage_old, usage_new, momentum: float, m: int) -> None:
    """Eq. (CL-MoE merge, params.py:21-46, as intended): expert e = a * old + (1 - a) * new with a = 1 - momentum
    for experts only the old task used, else momentum; A and B merged separately; routers stay new."""
    top_old, top_new = top_experts(usage_old, m), top_experts(usage_new, m)
    for layer, snap in zip(layers, old):
        for e in range(layer.n_text):
            a = 1 - momentum if e in top_old and e not in top_new else momentum
            for name in ("A_t", "B_t"):
                p = getattr(layer, name)
                p[e] = a * snap[name][e] + (1 - a) * p[e]


# DualPrompt (google-research/l2p configs; mechanics as in JH-LEE-KR/dualprompt-pytorch)
@torch.no_grad()
def dp_query(model: UnifiedLM, tokens: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """The frozen pre-trained model's final normed hidden state at the last input position (prefix-free, experts
    bypassed, no dropout; dualprompt-pytorch engine.py:49-56 takes the [cls] feature)."""
    return model.hidden(tokens)[torch.arange(len(tokens), device=tokens.device), q_pos]


def prompt_for(model: UnifiedLM, tokens: torch.Tensor, q_pos: torch.Tensor) -> Optional[torch.Tensor]:
    """E-prefix index per sample: the task in training, else the key most similar to the query (top-1, per sample)
    among the tasks trained so far; None without prompts or before the first task (row 0 is prefix-free)."""
    p = model.prompts
    if p is None or (p.task is None and int(p.seen) == 0):
        return None
    if p.task is not None:
        return torch.full((len(tokens),), p.task, dtype=torch.long, device=tokens.device)
    q, keys = dp_query(model, tokens, q_pos), p.keys[: int(p.seen)].detach()
    return F.cosine_similarity(q.unsqueeze(1), keys.unsqueeze(0), dim=-1).argmax(1)


def pull_cosine(model: UnifiedLM, tokens: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """Pull constraint (dualprompt-pytorch prompt.py:136-141): mean cos(key of the task in training, query)."""
    key = model.prompts.keys[model.prompts.task]
    return F.cosine_similarity(key.unsqueeze(0), dp_query(model, tokens, q_pos), dim=-1).mean()


@torch.no_grad()
def dp_selection_acc(model: UnifiedLM, stream: Dict[str, torch.Tensor], j: int) -> Optional[float]:
    """Percent of task j's test sequences whose query selects E-prefix j (None before the first task)."""
    sel = prompt_for(model, stream["tokens"], query_pos(stream))
    return None if sel is None else 100.0 * float((sel == j).float().mean())


# Model Tailor (didizhu-zju/Model-Tailor as released: sparse compensated patch of the change after each task)
def obs_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """U = upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; dead inputs get H_ii = 1 (sparsegpt.py:44-87)."""
    H = H.clone()
    dead = H.diag() == 0
    H[dead, dead] = 1.0
    H += damp * H.diag().mean() * torch.eye(len(H), dtype=H.dtype, device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def z_row(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-12)


def tailor_keep_mask(w: torch.Tensor, w_pre: torch.Tensor, u_diag: torch.Tensor, keep: float, score: str):
    """Bool mask of the exactly floor(keep * numel) most important entries of one block (sparsegpt.py:114-125):
    official = 0.8 z_row(|W - W_pre|) + 0.2 z_row(W^2 / U_ii^2); obs = (W - W_pre)^2 / U_ii^2."""
    d = w - w_pre
    s = 0.8 * z_row(d.abs()) + 0.2 * z_row(w ** 2 / u_diag ** 2) if score == "official" else d ** 2 / u_diag ** 2
    mask = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
    mask[s.flatten().topk(math.floor(keep * s.numel() + 1e-9)).indices] = True
    return mask.view_as(s)


def tailor_linear(w_pre, w_ft, H, keep: float, sign: float = -1.0, damp: float = 0.01, score: str = "official",
                  block: int = TAILOR_BLOCK) -> torch.Tensor:
    """Model Tailor's weight of one linear (sparsegpt.py fasterprune as released), in float64: per block of columns
    keep the most important `keep` share of the change, revert the rest to W_pre column by column and move each
    column's error onto the later columns by OBS (sign -1: SparseGPT's W -= err U; +1: the release's +=; 0: none)."""
    W, W0, U = w_ft.double().clone(), w_pre.double(), obs_factor(H.double(), damp)
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        kept = tailor_keep_mask(W[:, i1:i2], W0[:, i1:i2], U.diag()[i1:i2], keep, score)
        err = torch.zeros_like(W[:, i1:i2])
        for i in range(i1, i2):
            q = torch.where(kept[:, i - i1], W[:, i], W0[:, i])
            err[:, i - i1] = (W[:, i] - q) / U[i, i]
            W[:, i] = q
            W[:, i + 1:i2] += sign * err[:, i - i1, None] * U[i, i + 1:i2]
        W[:, i2:] += sign * err @ U[i1:i2, i2:]
    return W.to(w_ft.dtype)


def layer_inputs(model: UnifiedLM, layers: List[ExpertLinear], tokens: torch.Tensor, route) -> List[torch.Tensor]:
    """The inputs each of `layers` receives in one forward of `tokens` (forward hooks)."""
    seen = []

    def hook(module, inputs, output):
        seen.append((module, inputs[0]))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        model(tokens, route)
    finally:
        for h in handles:
            h.remove()
    return [next(x for m, x in seen if m is layer) for layer in layers]


@torch.no_grad()
def tailor_model(model: UnifiedLM, calib: Dict[str, torch.Tensor], args: Args, init_seed: int) -> None:
    """Model Tailor after a task (main_model_tailor.py:879-934), block by block with earlier blocks tailored:
    H = 2/n sum x x^T over the non-pad calibration positions, the merged weight tailored, the result kept as
    the frozen patch, then the LoRA restarts (A re-drawn from init_seed, B = 0)."""
    was_training, g = model.training, torch.Generator().manual_seed(init_seed)
    model.eval()
    route, valid = torch.zeros_like(calib["tokens"]), calib["tokens"] != 0
    sign = 1.0 if args.official_tailor_sign else -1.0
    experts = model.expert_layers()
    for layers in (experts[i:i + 3] for i in range(0, len(experts), 3)):  # one block's gate, up, down
        for layer, x in zip(layers, layer_inputs(model, layers, calib["tokens"], route)):
            x = x[valid].double()
            w_pre = layer.base.weight + layer.patch
            w_ft = w_pre + layer.scale * (layer.A_t[0] @ layer.B_t[0]).T
            w_new = tailor_linear(w_pre, w_ft, 2 * x.T @ x / len(x), args.tailor_keep, sign, args.tailor_damp,
                                  args.tailor_score)
            layer.patch.copy_(w_new - layer.base.weight)
            bound = 1 / math.sqrt(layer.base.in_features)
            layer.A_t.copy_(torch.empty(layer.A_t.shape).uniform_(-bound, bound, generator=g))
            layer.B_t.zero_()
    model.train(was_training)


# ----------------------------------------------------------------------------- evaluation
def answer_vocab(stream: Dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    """Bool [vocab]: the ids that appear as targets in a task's train split (its answer vocabulary)."""
    allowed = torch.zeros(vocab, dtype=torch.bool, device=stream["tokens"].device)
    allowed[stream["tokens"][:, 1:][stream["loss_mask"][:, 1:].bool()]] = True
    return allowed


def expert_snapshot(model: UnifiedLM) -> List[dict]:
    """A copy of every layer's expert tensors (path attribution restores them per token)."""
    return [{k: None if v is None else full_tensor(v.detach()).clone() for k, v in layer.experts().items()}
            for layer in model.expert_layers()]


@contextmanager
def restoring(model: UnifiedLM, restore, modality: torch.Tensor):
    """restore = (snapshot, path): tokens of modality `path` (1 image, 0 text, None all) use the snapshot's experts."""
    layers = model.expert_layers() if restore is not None else []
    if restore is not None:
        snapshot, path = restore
        sel = torch.ones_like(modality, dtype=torch.bool) if path is None else modality == path
        for layer, p in zip(layers, snapshot):
            layer.restore = (p, sel)
    try:
        yield
    finally:
        for layer in layers:
            layer.restore = None


@torch.no_grad()
def vqa_accuracy(model, stream, scheme, image_lo, official, allowed, chunk=512, where="", restore=None):
    """(closed-set, open) percent of sequences whose every target token is the argmax over the target's
    modality: closed-set restricts it to the `allowed` ids (the task's answer vocabulary), open does not.
    official=True routes every token to the text experts (E2); restore: see `restoring`. Non-finite logits raise
    ValueError."""
    closed, open_, stream = [], [], eval_rows(stream, model)
    for i in range(0, len(stream["tokens"]), chunk):
        b = {k: v[i:i + chunk] for k, v in stream.items()}
        with restoring(model, restore, b["modality"]):
            raw = run(model, b, route_for(b, scheme, "eval", official))[:, :-1]
        common.require_finite(raw, "vqa accuracy logits", where)
        targets, mask = b["tokens"][:, 1:], b["loss_mask"][:, 1:].bool()
        logits = restrict_logits(raw, targets, image_lo)
        open_.append(((logits.argmax(-1) == targets) | ~mask).all(1))
        closed.append(((logits.masked_fill(~allowed, float("-inf")).argmax(-1) == targets) | ~mask).all(1))
    return tuple(rank_mean(100.0 * float(torch.cat(c).float().mean()), len(stream["tokens"])) for c in (closed, open_))


@torch.no_grad()
def generation_nll(model, stream, scheme, image_lo, chunk=512, where="") -> float:
    """Teacher-forced NLL (nats per image code) of the reference images; non-finite logits raise ValueError."""
    tot, n, stream = 0.0, 0, eval_rows(stream, model)
    for i in range(0, len(stream["tokens"]), chunk):
        b = {k: v[i:i + chunk] for k, v in stream.items()}
        logits = run(model, b, route_for(b, scheme, "gen"))
        common.require_finite(logits, "gen_nll logits", where)
        k = int(b["loss_mask"][:, 1:].sum())
        tot, n = tot + float(lm_loss(logits, b, image_lo)) * k, n + k
    return rank_mean(tot / n, n)


def kv_cache(model):
    """A KV cache for decoding with the hf backbone (transformers' DynamicCache); the tiny model recomputes."""
    return hf_module().DynamicCache() if isinstance(model, HFLM) else None


def next_logits(model, seq: torch.Tensor, route: torch.Tensor, prompt=None, cache=None) -> torch.Tensor:
    """Logits [B, V] of the token after seq; with a KV cache only the tokens it has not seen are fed (each keeps
    the route it was encoded with)."""
    if cache is None:
        return model(seq, route, prompt)[:, -1]
    seen = cache.get_seq_length()
    return model(seq[:, seen:], route[:, seen:], None, cache)[:, -1]


@torch.no_grad()
def sample_image(model, prompts: torch.Tensor, n_codes: int, scheme, image_lo, gumbel, special: dict,
                 what: str = "image sampling", where="") -> Tuple[torch.Tensor, torch.Tensor]:
    """The BOI/EOI state machine of image sampling (both backbones; hf: with a KV cache): <boi> is appended to
    prompts that do not end with it (forced, not sampled), then n_codes image ids are sampled (temperature 1, the
    argmax of the logits over the image ids, the vocabulary's tail or a table inside it, plus Gumbel noise; every
    token routed as 'gen'), then <eoi> is appended (forced). gumbel: noise [N, n_codes, number of image ids] or a
    torch.Generator that draws it step by step. Returns (codes [N, n_codes], the whole sequences). DualPrompt's
    prefix is selected once, at the last prompt position (<boi>). Non-finite logits raise ValueError."""
    boi, eoi, seq = special.get("boi_id"), special.get("eoi_id"), prompts
    ends = prompts[:, -1] == boi if boi is not None else torch.ones(len(prompts), dtype=torch.bool)
    assert bool(ends.all() or not ends.any()), "prompts end with <boi> all or none (group them)"
    if not bool(ends.all()):
        seq = F.pad(prompts, (0, 1), value=boi)
    last = torch.full((len(seq),), seq.shape[1] - 1, device=seq.device)
    sel, cache, cols, ids = prompt_for(model, seq, last), kv_cache(model), image_columns(image_lo), None
    for i in range(n_codes):
        route = route_for({"modality": torch.ones_like(seq)}, scheme, "gen")
        logits = next_logits(model, seq, route, sel, cache)
        ids = torch.arange(logits.shape[-1], device=seq.device)[cols] if ids is None else ids
        logits = logits[:, cols]
        common.require_finite(logits, f"{what} logits", where)
        noise = gumbel[:, i] if isinstance(gumbel, torch.Tensor) else \
            -torch.log(-torch.log(torch.rand(logits.shape, generator=gumbel).clamp_min(1e-20))).to(seq.device)
        seq = torch.cat([seq, ids[(logits + noise).argmax(-1, keepdim=True)]], 1)
    codes = seq[:, seq.shape[1] - n_codes:]
    return codes, seq if eoi is None else F.pad(seq, (0, 1), value=eoi)


@torch.no_grad()
def generation_match(model, prompts, attrs, gumbel, scheme, image_lo, where="") -> float:
    """Sample 16 image codes per prompt (`sample_image`: temperature 1, fixed Gumbel noise; the prompts end with
    <boi>) and read them with the oracle of the world; attrs = (colour, shape[, world]) of the prompts."""
    world = attrs[2] if len(attrs) > 2 else "default"
    mine = eval_rows({"prompts": prompts, "colour": attrs[0], "shape": attrs[1], "gumbel": gumbel}, model)
    prompts, attrs, gumbel = mine["prompts"], (mine["colour"], mine["shape"]), mine["gumbel"]
    codes, _ = sample_image(model, prompts, gumbel.shape[1], scheme, image_lo, gumbel, data.MODE_SPECIAL,
                            "gen_match", where)
    codes = codes - image_lo + data.MODE_WORLDS[world][2]  # --answers multi shifts the ids
    ok, col, shp = data.mode_read_image(codes.cpu().numpy(), world)
    return rank_mean(float(np.mean(ok & (col == attrs[0]) & (shp == attrs[1]))), len(prompts))


def save_samples(model, probe, scheme, image_lo, special, args: Args, run_dir, label: str) -> None:
    """--save-samples: the probe's images sampled with `sample_image` (the same Gumbel noise at every row; prompts of
    one length and <boi> ending together; every rank samples all) -> run_dir/samples_{label}.npz, int32 [K, n_codes]."""
    if probe is None:
        return
    model.eval()
    g = torch.Generator().manual_seed(common.derive_seed(args.seed, "eval/samples"))
    device = next(model.parameters()).device
    codes = np.zeros((len(probe["q"]), probe["n_codes"]), np.int32)
    for group in np.unique(probe["group"]):
        rows = probe["group"] == group
        q = int(probe["q"][rows][0])
        c, _ = sample_image(model, torch.as_tensor(probe["tokens"][rows, :q], device=device), probe["n_codes"],
                            scheme, image_lo, g, special, "sampled image", label)
        codes[rows] = c.cpu().numpy()
    model.train()
    if is_writer():
        np.savez(os.path.join(run_dir, f"samples_{label}.npz"), codes=codes)


def evaluate(model, streams, tasks, answers, scheme, image_lo, gen_probe, where="", eos=None,
             max_new: int = MAX_NEW_TOKENS, chunk: int = 512) -> dict:
    """One row: (closed-set, open) accuracy per task under both routings (answers[t] = t's answer vocabulary),
    greedy exact match when eos is given (--answers multi), and the generation metrics."""
    model.eval()
    row = {}
    for suffix, official in ROUTINGS:
        acc = [vqa_accuracy(model, streams[f"{t}_test"], scheme, image_lo, official, answers[t], chunk, f"{where} {t}")
               for t in tasks]
        row["acc" + suffix], row["acc_open" + suffix] = [a[0] for a in acc], [a[1] for a in acc]
        if eos is not None:
            row["acc_exact" + suffix] = [exact_match(model, streams[f"{t}_test"], scheme, image_lo, official, eos,
                                                     chunk, f"{where} {t}", max_new) for t in tasks]
    if model.prompts is not None:
        row["dp_selection_acc"] = [dp_selection_acc(model, streams[f"{t}_test"], j) for j, t in enumerate(tasks)]
    row["gen_nll"] = generation_nll(model, streams["reference_test"], scheme, image_lo, chunk, where)
    row["gen_match"] = generation_match(model, *gen_probe, scheme, image_lo, where) if gen_probe else None
    model.train()
    return row


@torch.no_grad()
def greedy_decode(model, b: Dict[str, torch.Tensor], scheme, image_lo: int, official: bool, q: int, where="",
                  n: int = MAX_NEW_TOKENS):
    """n greedy tokens after the first q tokens; image ids masked (the official inference-text mask), generated
    tokens routed as text; DualPrompt's prefix selected once from the question; hf: with a KV cache."""
    seq, mod, cache = b["tokens"][:, :q], b["modality"][:, :q], kv_cache(model)
    prompt = prompt_for(model, seq, torch.full((len(seq),), q - 1, device=seq.device))
    for _ in range(n):
        logits = next_logits(model, seq, route_for({"modality": mod}, scheme, "eval", official), prompt, cache)
        is_img = is_image_id(torch.arange(logits.shape[-1], device=seq.device), image_lo)
        common.require_finite(logits[:, ~is_img], "exact match logits", where)
        nxt = logits.masked_fill(is_img, float("-inf")).argmax(-1, keepdim=True)
        seq, mod = torch.cat([seq, nxt], 1), F.pad(mod, (0, 1))
    return seq[:, q:]


def exact_match(model, stream, scheme, image_lo, official, eos, chunk=512, where="", n=MAX_NEW_TOKENS) -> float:
    """Percent of sequences whose greedy decode of n tokens, up to and including the first <eos>, equals the answer
    (which ends with its only <eos>; a right value without <eos> in n tokens is wrong)."""
    hits, stream = [], eval_rows(stream, model)
    for i in range(0, len(stream["tokens"]), chunk):
        c = {k: v[i:i + chunk] for k, v in stream.items()}
        starts = query_pos(c) + 1
        for q in starts.unique().tolist():  # questions of one length decode together
            b = {k: v[starts == q] for k, v in c.items()}
            target, mask = b["tokens"][:, q:], b["loss_mask"][:, q:].bool()
            assert bool((target[mask] == eos).sum() == len(target)), "every answer ends with one <eos>"
            gen = greedy_decode(model, b, scheme, image_lo, official, q, where, n)
            gen = F.pad(gen, (0, target.shape[1]), value=-1)
            hits.append(((gen[:, :target.shape[1]] == target) | ~mask).all(1))
    return rank_mean(100.0 * float(torch.cat(hits).float().mean()), len(stream["tokens"]))


def path_attribution(model, streams, tasks, answers, scheme, image_lo, snapshots, R, chunk: int = 512) -> dict:
    """Where the forgetting flows (E1, closed-set): after the last task, the experts as applied at image (or text)
    tokens are restored to their state right after task j, and task j is scored; 'both' restores every token.
    None for DualPrompt (no per-token adapters)."""
    if scheme["n_text"] == 0:
        return None
    model.eval()
    old = range(len(tasks) - 1)
    out = {"lost": [R[j + 1][j] - R[-1][j] for j in old]}
    for name, path in (("image", 1), ("text", 0), ("both", None)):
        out[f"restored_{name}"] = [vqa_accuracy(model, streams[f"{tasks[j]}_test"], scheme, image_lo, False,
                                                answers[tasks[j]], chunk, restore=(snapshots[j], path))[0]
                                   for j in old]
    model.train()
    return out


def forgetting_share(attr: dict, R, path: str) -> Optional[float]:
    """Sum_j (restored_j - R[T][j]) / Sum_j (R[j+1][j] - R[T][j]) over j < T-1; None when nothing was lost."""
    if attr is None:
        return None
    lost = sum(attr["lost"])
    return None if lost <= 0 else sum(r - R[-1][j] for j, r in enumerate(attr[f"restored_{path}"])) / lost


# ----------------------------------------------------------------- hf backbone (transformers' Chameleon / Anole)
HF_PIP = 'pip install "transformers>=4.43"'
HF_MLP = ("gate_proj", "up_proj", "down_proj")
NOT_SHARDED = ("cl-moe", "model-tailor")  # their after-task steps edit whole expert tensors: not under FSDP2


class Route:
    """The route every ExpertLinear of an HFLM reads: LongTensor [B, S] (0 text side, 1 image side) or None."""

    def __init__(self):
        self.value = None


@dataclass
class Dist:
    """Data parallelism of an HFLM: kind (none | ddp | fsdp), rank, world size and the module training passes go
    through (DDP's wrapper; FSDP2 shards the model in place)."""
    kind: str = "none"
    rank: int = 0
    world: int = 1
    net: Optional[nn.Module] = None


class HFLM(nn.Module):
    """transformers' ChameleonForConditionalGeneration behind UnifiedLM's call model(tokens, route): each decoder
    layer's mlp.gate/up/down_proj wrapped in an ExpertLinear; logits = lm_head(final hidden states), since the
    upstream .logits set every image id to finfo.min. The route stays set after a forward (`hf_step`)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf, self.holder, self.prompts, self.dist = hf, Route(), None, Dist()
        for layer in hf.model.layers:
            for name in HF_MLP:
                old = getattr(layer.mlp, name)
                setattr(layer.mlp, name, ExpertLinear(old.in_features, old.out_features, old, self.holder))
        self.cache_kw = "cache" if "cache" in inspect.signature(hf.model.forward).parameters else "past_key_values"

    def forward(self, tokens: torch.Tensor, route=None, prompt=None, cache=None) -> torch.Tensor:
        assert prompt is None, "DualPrompt runs on the tiny backbone only"
        self.holder.value = route
        kw = {"use_cache": cache is not None} | ({self.cache_kw: cache} if cache is not None else {})
        return self.hf.lm_head(self.hf.model(input_ids=tokens, **kw).last_hidden_state)

    def expert_layers(self) -> List[ExpertLinear]:
        return [m for m in self.modules() if isinstance(m, ExpertLinear)]


def hf_module():
    """transformers, imported only for --backbone hf; without it (or its Chameleon): exit 2 with the pip command."""
    try:
        import transformers  # optional extra
    except ImportError:
        common.die(f"--backbone hf needs the optional package transformers (Chameleon classes): {HF_PIP}")
    if not hasattr(transformers, "ChameleonForConditionalGeneration"):
        common.die(f"--backbone hf: transformers {transformers.__version__} has no Chameleon classes: {HF_PIP}")
    return transformers


def chameleon_vocabulary(image_ids: List[int], vocab: int, boi: int, eoi: int) -> Dict[str, int]:
    """Token names in Chameleon's convention: image code k is IMGIMG<digits of k as letters A-J>Z, BOI is
    <racm3:break>, EOI <eoss>; transformers derives the image ids from these names."""
    names = {"IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in str(k)) + "Z": i for k, i in enumerate(image_ids)}
    special = {n: i for n, i in (("<racm3:break>", boi), ("<eoss>", eoi)) if i is not None}
    taken = set(image_ids) | set(special.values())
    return names | {f"<text{i}>": i for i in range(vocab) if i not in taken} | special


def tiny_chameleon(args: Args, vocab: int, image_lo, special: Dict[str, int]) -> "HFLM":
    """--hf-tiny-random: a Chameleon sized like the tiny model; its (unused) VQ encoder as small as GroupNorm(32)
    allows."""
    tf = hf_module()
    image_ids = is_image_id(torch.arange(vocab), image_lo).nonzero().flatten().tolist()
    vq = dict(embed_dim=4, num_embeddings=len(image_ids), latent_channels=4, resolution=16, base_channels=32,
              channel_multiplier=[1], num_res_blocks=1)
    cfg = tf.ChameleonConfig(
        vocab_size=vocab, hidden_size=args.d_model, intermediate_size=args.d_ff, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads, max_position_embeddings=args.max_len,
        vocabulary_map=chameleon_vocabulary(image_ids, vocab, special["boi_id"], special["eoi_id"]), vq_config=vq)
    return HFLM(tf.ChameleonForConditionalGeneration(cfg))


def load_chameleon(args: Args, device) -> "HFLM":
    """--hf-model DIR: transformers' own classes, local files only (validate_hf checked DIR before)."""
    tf = hf_module()
    os.environ["HF_HUB_OFFLINE"] = "1"
    kw = {"dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype": hf_dtype(args, device)}
    hf = tf.ChameleonForConditionalGeneration.from_pretrained(args.hf_model, local_files_only=True, **kw)
    c = hf.config
    print(f"loaded {args.hf_model}: hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
          f"{c.num_attention_heads} heads, intermediate {c.intermediate_size}, vocab {c.vocab_size}")
    return HFLM(hf).to(device)


def hf_dtype(args: Args, device) -> torch.dtype:
    auto = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return auto if args.dtype == "auto" else getattr(torch, args.dtype)


def dist_kind(args: Args) -> str:
    if args.dist != "auto":
        return args.dist
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"


def init_dist(args: Args) -> None:
    """Join the torchrun process group (nccl on CUDA, gloo otherwise) unless --dist none."""
    if dist_kind(args) == "none" or dist.is_initialized():
        return
    cuda = args.cuda and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


def is_writer() -> bool:
    """Only rank 0 (or a single process) writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def full_tensor(v: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: every rank calls it); other tensors as they are."""
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def parallelize(model: "HFLM", args: Args) -> None:
    """Gradient checkpointing (non-reentrant: the reentrant form fails with a frozen base), then DDP or FSDP2
    (every decoder layer, then the root)."""
    if args.gradient_checkpointing and hasattr(model.hf, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.hf.activation_checkpointing_enable({"use_reentrant": False})
    elif args.gradient_checkpointing:
        model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kind = dist_kind(args)
    model.dist = Dist(kind, *((dist.get_rank(), dist.get_world_size()) if kind != "none" else (0, 1)), model)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model.dist.net = DistributedDataParallel(model, broadcast_buffers=False)
    elif kind == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in model.hf.model.layers:
            fully_shard(layer)
        fully_shard(model)


def local_rows(batch: Dict[str, torch.Tensor], d: Dist) -> Dict[str, torch.Tensor]:
    """Rank r's rows [r B / W, (r + 1) B / W) of a global batch that every rank drew alike."""
    n = len(batch["tokens"])
    return {k: v[d.rank * n // d.world:(d.rank + 1) * n // d.world] for k, v in batch.items()}


@contextmanager
def grad_sync(d: Dist, on: bool):
    """Gradients are reduced across ranks in a step's last backward only (DDP no_sync, FSDP2 gradient sync off)."""
    if d.kind == "fsdp":
        d.net.set_requires_gradient_sync(on)
    if d.kind == "ddp" and not on:
        with d.net.no_sync():
            yield
    else:
        yield


def hf_step(model: "HFLM", task_batch, ref_batch, scheme, args: Args, image_lo, kd_gen=None):
    """Eq. (L_total) on the hf backbone, gradients accumulated pass by pass. CRUCIAL: each routed pass runs forward
    and backward with its route unchanged; gradient checkpointing recomputes the MLPs in backward with the route set
    then, so one backward after both passes would silently use the wrong experts. Each rank takes its rows of the
    global batch; losses are sums over its targets / (global target count / world), as DDP and FSDP average."""
    d = model.dist
    tb = local_rows(task_batch, d)
    with grad_sync(d, not scheme["kd"]):
        ce = lm_loss(d.net(tb["tokens"], route_for(tb, scheme, "task")), tb, image_lo,
                     float(task_batch["loss_mask"][:, 1:].sum()) / d.world)
        ce.backward()
    kd = torch.zeros((), device=ce.device)
    if scheme["kd"]:
        rb = local_rows(ref_batch, d)
        with torch.no_grad():
            teacher = model(rb["tokens"], None)  # frozen pre-trained model = experts bypassed
        n_ref = ref_batch["loss_mask"][:, 1:].numel() if args.official_kd_all_positions \
            else ref_batch["loss_mask"][:, 1:].sum()
        with grad_sync(d, True):
            kd = kd_loss(kd_student(d.net, rb, scheme, kd_gen), teacher, rb, image_lo, args.kd_temperature,
                         args.official_kd_double_temperature, args.official_kd_all_positions, float(n_ref) / d.world)
            (args.kd_lambda * kd).backward()
    model.holder.value = None
    ce, kd = ce.detach(), kd.detach()
    return ce + args.kd_lambda * kd, ce, kd


def model_state(model) -> dict:
    """What checkpoints hold: the tiny model's whole state; of the hf backbone the method's tensors only (experts,
    routers, patches), whole (FSDP2 shards them)."""
    if not isinstance(model, HFLM):
        return model.state_dict()
    return {k: full_tensor(v).detach().cpu() for k, v in model.state_dict().items() if is_expert(k)}


def all_ranks(flag: bool) -> bool:
    """flag on every rank (FSDP2: each rank checks its own shard)."""
    if not dist.is_initialized():
        return flag
    return bool(reduced([float(flag)], dist.ReduceOp.MIN)[0])


def eval_rows(rows: Dict[str, object], model) -> Dict[str, object]:
    """DDP: this rank's rows r::W of an evaluation batch (every value has N rows). FSDP2 needs every rank in every
    forward, so there (and with fewer than W rows) each rank takes all rows."""
    d, n = getattr(model, "dist", None), len(next(iter(rows.values())))
    if d is None or d.kind != "ddp" or n < d.world:
        return rows
    return {k: v[d.rank::d.world] for k, v in rows.items()}


def rank_mean(value: float, weight: float) -> float:
    """The mean of per-rank means weighted by the rows (or targets) each rank scored; one process: value."""
    if not dist.is_initialized():
        return value
    total, n = reduced([value * weight, weight], dist.ReduceOp.SUM)
    return total / n


def reduced(values: List[float], op) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def validate_hf(args: Args) -> None:
    """--backbone hf and --dist checks (exit 2 naming the flag, before anything is written)."""
    if args.backbone == "tiny":
        for f, bad in (("hf_model", args.hf_model is not None), ("hf_tiny_random", args.hf_tiny_random),
                       ("dtype", args.dtype != "auto"), ("gradient_checkpointing", args.gradient_checkpointing),
                       ("dist", dist_kind(args) != "none")):
            common.require(not bad, f, "needs --backbone hf" + (" (auto = ddp under torchrun)" if f == "dist" else ""))
        return
    hf_module()
    common.require((args.hf_model is not None) != args.hf_tiny_random, "hf_model",
                   "--backbone hf needs exactly one of --hf-model DIR and --hf-tiny-random")
    common.require(args.method != "dualprompt", "method",
                   "dualprompt needs the tiny decoder's attention (prefix keys/values); not on --backbone hf")
    common.require(not (args.gradient_checkpointing and args.method == "cl-moe"), "gradient_checkpointing",
                   "cl-moe counts expert usage in every training forward; the recomputation would count it twice")
    if args.hf_model is not None:
        validate_hf_dir(args)
    validate_dist(args)


def validate_hf_dir(args: Args) -> None:
    cfg = os.path.join(args.hf_model, "config.json")
    common.require(os.path.isdir(args.hf_model), "hf_model", f"{args.hf_model} is not a directory")
    try:
        with open(cfg) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        common.die(f"--hf-model: cannot read {cfg} ({e})")
    common.require(model_type == "chameleon", "hf_model", f"{cfg}: model_type {model_type!r}, expected 'chameleon'")
    common.require(args.data_dir is not None, "data_dir",
                   "--hf-model needs --data-dir in the model's own token ids (the built-in world has 52 ids)")


def check_hf_vocab(args: Args, vocab: int, image_lo, special: dict) -> None:
    """--hf-model: meta.json must describe the model's vocabulary: its size, the image ids (the IMGIMG names) and
    BOI / EOI (<racm3:break> / <eoss>) where given. Exit 2 before anything is written."""
    with open(os.path.join(args.hf_model, "config.json")) as f:
        cfg = json.load(f)
    names = cfg.get("vocabulary_map") or {}
    image = sorted(i for n, i in names.items() if n.startswith("IMGIMG"))
    ours = is_image_id(torch.arange(vocab), image_lo).nonzero().flatten().tolist()
    common.require(cfg.get("vocab_size") == vocab, "data_dir",
                   f"meta.json vocab_size {vocab} != {cfg.get('vocab_size')} of --hf-model")
    common.require(image == ours, "data_dir", f"meta.json image ids ({len(ours)} from {ours[0]}) differ from the "
                   f"{len(image)} IMGIMG tokens of --hf-model" + (f" (from {image[0]})" if image else ""))
    for key, name in (("boi_id", "<racm3:break>"), ("eoi_id", "<eoss>")):
        common.require(special.get(key) in (None, names.get(name)), "data_dir",
                       f"meta.json {key} {special.get(key)} != the id of {name} in --hf-model ({names.get(name)})")
    print(f"--hf-model vocabulary: {vocab} ids, image ids {image[0]}..{image[-1]} ({len(image)})")


def validate_dist(args: Args) -> None:
    kind, world = dist_kind(args), int(os.environ.get("WORLD_SIZE", "1"))
    if kind == "none":
        return
    common.require("RANK" in os.environ, "dist", f"{kind} runs under torchrun (torchrun --nproc_per_node N mode.py)")
    common.require(args.resume is None, "resume", "not with --dist ddp/fsdp")
    for f in ("batch_size", "kd_batch_size"):
        common.require(getattr(args, f) % world == 0, f, f"must be divisible by the {world} ranks")
    if kind == "fsdp":
        common.require(args.method not in NOT_SHARDED, "method", f"{args.method} runs with --dist ddp or none")
        common.require(args.conflict_every == 0, "conflict_every",
                       "must be 0 with --dist fsdp (the gradient check differentiates w.r.t. unsharded parameters)")
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            common.die(f"--dist: fsdp needs torch.distributed.fsdp.fully_shard (torch {torch.__version__} lacks it)")


# ----------------------------------------------------------------------------- pre-training
def pretrain(model: UnifiedLM, stream, args: Args, image_lo: int, gen: torch.Generator, loggers: dict) -> None:
    """Full-parameter pre-training on captioning (image -> text) + text-to-image: the 'UMGM' before CL."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.01)
    total, t0 = torch.zeros((), device=stream["tokens"].device), time.perf_counter()
    for step in range(args.pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = args.pretrain_lr * warmup_cosine(step, args.pretrain_steps, 0.05)
        b = sample_batch(stream, args.pretrain_batch_size, gen)
        loss = lm_loss(model(b["tokens"], None), b, image_lo)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.pretrain_max_grad_norm)
        opt.step()
        total += loss.detach()  # device-side sum: non-finite once any step was
        log = (step + 1) % args.log_every == 0 or step + 1 == args.pretrain_steps
        if log or total.device.type == "cpu":
            common.stop_if_diverged({"loss": total}, f"pretrain step {step + 1}")
        if log:
            dt = time.perf_counter() - t0
            print(f"pretrain step {step + 1}/{args.pretrain_steps} loss {loss.item():.4f} "
                  f"{dt:.1f}s ({(step + 1) / dt:.1f} steps/s)", flush=True)
            common.log_scalars(loggers, {"pretrain/loss": loss.item()}, step + 1)


def new_model(args: Args, vocab: int, device, image_lo=None, special=None):
    torch.manual_seed(args.seed)
    if args.backbone == "hf":
        return tiny_chameleon(args, vocab, image_lo, special).to(device)
    return UnifiedLM(vocab, args.d_model, args.n_layers, args.n_heads, args.d_ff, args.max_len).to(device)


def load_or_pretrain(args: Args, vocab: int, streams, image_lo, device, source: str, loggers: dict, special=None):
    """Return (pre-trained model, seconds spent pre-training (0 when loaded), cache path)."""
    path = os.path.join(args.pretrain_cache_dir, f"{config_hash(args, source)}.pt")
    model = new_model(args, vocab, device, image_lo, special)
    if os.path.isfile(path):
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        print(f"loaded pre-trained model from {path}")
        return model, 0.0, path
    sw = common.Stopwatch()
    with sw:
        g = torch.Generator().manual_seed(args.seed + 1)  # kept (with the init seed): cached models stay valid
        pretrain(model, streams["pretrain"], args, image_lo, g, loggers)
    if is_writer():
        os.makedirs(args.pretrain_cache_dir, exist_ok=True)
        torch.save(model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
    print(f"pre-trained in {sw.total:.1f}s, cached at {path}")
    return model, sw.total, path


def build(args: Args, np_streams, streams, vocab: int, image_lo, device, scheme: dict, ckpt, loggers,
          n_tasks: int, special=None):
    """The pre-trained model with the method's experts: (model, trainable, base hashes, pretrain s, cache path).
    --resume: the checkpoint's full weights and stored hashes, so the pre-training cache is not needed (hf: the
    checkpoint holds the experts only; the base comes from --hf-model or the cache)."""
    if args.hf_model is not None:
        model, pretrain_s, cache = load_chameleon(args, device), 0.0, os.path.abspath(args.hf_model)
    elif ckpt is None or args.backbone == "hf":
        pre = np_streams["pretrain"]  # the cache key covers the pre-training data itself, not just its path
        source = hashlib.sha1(b"".join(np.ascontiguousarray(pre[f]).tobytes() for f in FIELDS)).hexdigest()
        model, pretrain_s, cache = load_or_pretrain(args, vocab, streams, image_lo, device, source, loggers, special)
    else:
        model, pretrain_s, cache = new_model(args, vocab, device), ckpt["timing"]["pretrain"], ckpt["pretrain_cache"]
    if args.backbone == "hf":
        model.hf.to(hf_dtype(args, device))
    # TRY NOT TO MODIFY: the frozen base + experts of the chosen method
    torch.manual_seed(common.derive_seed(args.seed, "init/experts"))
    trainable = add_experts(model, args, scheme, n_tasks)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=args.backbone == "tiny")
        pretrain_s = ckpt["timing"]["pretrain"]
    if args.backbone == "hf":
        parallelize(model, args)
        trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaced them by DTensors
    base = base_hashes(model) if ckpt is None else ckpt["base_sha1"]
    print(f"method {method_tag(args)} {scheme}: {sum(p.numel() for p in trainable)} trainable / "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    return model, trainable, base, pretrain_s, cache


def generation_probe(args: Args, np_streams, streams, vocab: int, image_lo: int, device):
    """Fixed prompts + Gumbel noise (built-in data): every row samples with the same randomness."""
    if args.data_dir is not None:
        return None
    ref, n = np_streams["reference_test"], min(args.gen_samples, len(np_streams["reference_test"]["tokens"]))
    g = torch.Generator().manual_seed(common.derive_seed(args.seed, "eval/gumbel"))
    noise = torch.rand(n, 16, vocab - image_lo, generator=g)
    return (streams["reference_test"]["tokens"][:n, :5], (ref["colour"][:n], ref["shape"][:n], args.world),
            (-torch.log(-torch.log(noise.clamp_min(1e-20)))).to(device))


def sample_probe(args: Args, np_streams, image_lo, special) -> Optional[dict]:
    """--save-samples K: the first K reference_test rows, the first target position q of each (its prompt is
    tokens[:q]) and n_codes (meta.json image_seq_len, else the most image-id targets in a row). Exit 2 when a
    sampled sequence (prompt, <boi> if missing, codes, <eoi>) would exceed --max-len."""
    if not args.save_samples:
        return None
    ref = np_streams["reference_test"]
    tokens, mask = ref["tokens"][: args.save_samples], ref["loss_mask"][: args.save_samples].astype(bool)
    is_img = is_image_id(torch.as_tensor(tokens), image_lo).numpy()
    n_codes = int((is_img & mask).sum(1).max())
    if args.data_dir is not None:
        with open(os.path.join(args.data_dir, "meta.json")) as f:
            n_codes = json.load(f).get("image_seq_len", n_codes)
    common.require(isinstance(n_codes, int) and n_codes >= 1, "data_dir",
                   f"meta.json image_seq_len must be an int >= 1, or the reference images need codes (got {n_codes})")
    q = mask[:, 1:].argmax(1) + 1
    boi = tokens[np.arange(len(q)), q - 1] != special["boi_id"] if special["boi_id"] is not None else 0  # forced
    longest = int((q + boi).max()) + n_codes + (special["eoi_id"] is not None)
    common.require(longest <= args.max_len, "save_samples",
                   f"sampled sequences would have {longest} tokens > --max-len {args.max_len}")
    return {"tokens": tokens, "q": q, "group": 2 * q + boi, "n_codes": n_codes}  # prompts sampled together


# ----------------------------------------------------------------------------- continual training
def generators(seed: int, gen: torch.Generator) -> Dict[str, torch.Generator]:
    """Common random numbers: one generator per purpose, seeded from (seed, purpose), so every method draws the
    same task batches whatever else it samples (KD batches and their dropout, gradient checks, tailoring)."""
    gens = {"batches": gen.manual_seed(common.derive_seed(seed, "batches"))}
    purposes = ("reference", "conflict", "tailor")
    return gens | {p: torch.Generator().manual_seed(common.derive_seed(seed, p)) for p in purposes}


def train_task(model, trainable, streams, k: int, task: str, scheme, args: Args, image_lo: int, gens, loggers,
               conflicts: list) -> None:
    """METHOD LOGIC: one adapter set carried across tasks; optimizer and schedule restarted per task
    (DualPrompt: its official constant lr and clipping; AdamW with weight decay 0 is Adam)."""
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    dp = args.method == "dualprompt"
    sums, t0 = torch.zeros(3, device=streams[f"{task}_train"]["tokens"].device), time.perf_counter()
    for step in range(args.steps_per_task):
        for g in opt.param_groups:
            g["lr"] = args.dp_lr if dp else args.lr * warmup_cosine(step, args.steps_per_task, 0.1)
        tb = sample_batch(streams[f"{task}_train"], args.batch_size, gens["batches"])
        rb = sample_batch(streams["reference_train"], args.kd_batch_size, gens["reference"]) if scheme["kd"] else None
        opt.zero_grad(set_to_none=True)
        if isinstance(model, HFLM):  # a backward per routed pass, data parallel
            loss, ce, kd = hf_step(model, tb, rb, scheme, args, image_lo, gens["reference"])
        else:
            loss, ce, kd = task_step_loss(model, tb, rb, scheme, args, image_lo, gens["reference"])
            loss.backward()
        nn.utils.clip_grad_norm_(trainable, args.dp_max_grad_norm if dp else args.max_grad_norm)
        opt.step()
        sums += torch.stack([loss, ce, kd]).detach()  # device-side sums: no host sync per step on a GPU
        log = (step + 1) % args.log_every == 0 or step + 1 == args.steps_per_task
        if log or sums.device.type == "cpu":
            common.stop_if_diverged(dict(zip(("loss", "ce", "kd"), sums)), f"task {k + 1} ({task}) step {step + 1}")
        if args.conflict_every and (step + 1) % args.conflict_every == 0:
            n, cg = args.conflict_batch_size, gens["conflict"]
            c = gradient_conflict(model, sample_batch(streams[f"{task}_train"], n, cg),
                                  sample_batch(streams["reference_train"], n, cg), scheme, image_lo)
            conflicts.append({"task": task, "step": step + 1, **c})
        if log:
            dt = time.perf_counter() - t0
            print(f"task {k + 1} {task} step {step + 1}/{args.steps_per_task} loss {loss.item():.4f} "
                  f"ce {ce.item():.4f} kd {kd.item():.5f} {dt:.1f}s ({(step + 1) / dt:.1f} steps/s)", flush=True)
            common.log_scalars(loggers, {"losses/loss": loss.item(), "losses/ce": ce.item(), "losses/kd": kd.item(),
                                         "charts/learning_rate": opt.param_groups[0]["lr"]},
                               global_step(args, k, step + 1))


def global_step(args: Args, k: int, step: int) -> int:
    """One TensorBoard/W&B time line: pre-training steps, then step `step` of task k (0-based)."""
    return args.pretrain_steps + k * args.steps_per_task + step


def report_row(label: str, r: dict, loggers: dict, step: int) -> None:
    print(f"{label}: acc {['%.1f' % a for a in r['acc']]} open {['%.1f' % a for a in r['acc_open']]} "
          f"official routing {['%.1f' % a for a in r['acc_official_routing']]} gen_nll {r['gen_nll']:.4f} "
          f"gen_match {r['gen_match']}" + (f" exact {['%.1f' % a for a in r['acc_exact']]}" if "acc_exact" in r
                                            else ""), flush=True)
    common.log_scalars(loggers, {f"charts/{key}": float(np.mean(r[key])) for key in MATRICES if key in r}
                       | {"charts/gen_nll": r["gen_nll"], "charts/gen_match": r["gen_match"]}, step)


# ----------------------------------------------------------------------------- results
def _mean_or_none(conflicts: list, key: str) -> Optional[float]:
    vals = [c[key] for c in conflicts if c[key] is not None]
    return float(np.mean(vals)) if vals else None


def summarize(rows: List[dict], conflicts: list, attr: dict) -> Dict[str, Optional[float]]:
    """Flat summary: CL metrics of the four matrices, generation drop, path shares, gradient conflict means."""
    s = {}
    for suffix, _ in ROUTINGS:
        for kind in ("", "_open", "_exact") if "acc_exact" in rows[0] else ("", "_open"):
            R = [r[f"acc{kind}{suffix}"] for r in rows]
            s[f"acc{kind}{suffix}"] = common.final_average(R)
            s[f"bwt{kind}{suffix}"] = common.backward_transfer(R)
            s[f"forgetting{kind}{suffix}"] = common.forgetting(R)
            s[f"aia{kind}{suffix}"] = common.average_incremental_accuracy(R)
            s[f"fwt{kind}{suffix}"] = common.forward_transfer(R)
    gm, gn = [r["gen_match"] for r in rows], [r["gen_nll"] for r in rows]
    drops = None if gm[0] is None else [100.0 * (gm[0] - v) for v in gm[1:]]
    s |= {"gen_drop": drops[-1] if drops else None, "gen_drop_max": max(drops) if drops else None,
          "gen_nll_increase": gn[-1] - gn[0], "gen_match_pre": gm[0], "gen_match_final": gm[-1]}
    R = [r["acc"] for r in rows]
    s |= {f"forgetting_share_{p}_path": forgetting_share(attr, R, p) for p in ("image", "text")}
    names = {"grad_cos": "cos", "grad_cos_text_side": "cos_text_side", "grad_cos_image_side": "cos_image_side",
             "grad_dot": "dot", "gen_grad_norm": "gen_grad_norm", "gen_grad_norm_text_side": "gen_grad_norm_text_side"}
    return s | {k: _mean_or_none(conflicts, v) for k, v in names.items()}


def print_results(rows, tasks, summary, timing) -> None:
    names = ["pre-trained"] + [f"after {t}" for t in tasks]
    for suffix, title in (("", "true modality routing (E1, headline)"),
                          ("_official_routing", "official routing (E2)")):
        for kind, what in (("", "closed-set (task answer vocabulary)"), ("_open", "open (all text ids)"),
                           ("_exact", "greedy exact match (--answers multi)")):
            if f"acc{kind}" not in rows[0]:
                continue
            R = [r[f"acc{kind}{suffix}"] for r in rows]
            print(f"accuracy, {what}, {title}:\n" + common.format_matrix(R, names, tasks))
    print(f"gen_nll  {['%.4f' % r['gen_nll'] for r in rows]}\ngen_match {[r['gen_match'] for r in rows]}")
    print("summary", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))
    print("time_s", json.dumps({k: round(v, 1) for k, v in timing.items()}))


# ----------------------------------------------------------------------------- main
def load_data(args: Args):
    """(streams as numpy, task names (the first --num-tasks), vocab size, first image id or a bool table [V] of image
    ids (image_token_ranges not at the vocabulary's end), special ids {boi_id, eoi_id, pad_id}); bad data: exit 2."""
    try:
        if args.data_dir is None:
            streams = data.make_mode_world(args.seed, n_train=args.n_train, n_test=args.n_test, world=args.world)
            (tasks, vocab, image_lo), special = data.MODE_WORLDS[args.world], data.MODE_SPECIAL
            if args.answers == "multi":
                streams = data.mode_multi_answer_world(streams)
                vocab, image_lo = vocab + len(data.MODE_MULTI_WORDS), image_lo + len(data.MODE_MULTI_WORDS)
        else:
            meta, streams = data.load_mode_dir(args.data_dir, args.max_len)
            tasks, vocab, image_lo, special = meta["tasks"], meta["vocab_size"], meta["image_token_start"], meta
            if meta["image_ids"] != list(range(image_lo, vocab)):
                image_lo = torch.zeros(vocab, dtype=torch.bool)
                image_lo[meta["image_ids"]] = True
    except data.DataError as e:
        common.die(str(e))
    common.require(args.num_tasks <= len(tasks), "num_tasks", f"must be in [0, {len(tasks)}] (got {args.num_tasks})")
    return streams, list(tasks[: args.num_tasks or len(tasks)]), vocab, image_lo, special


def backbone_tag(args: Args) -> str:
    """The results' backbone: tiny, hf-tiny-random or hf-<weights dir>."""
    if args.backbone == "tiny":
        return "tiny"
    return "hf-tiny-random" if args.hf_tiny_random else "hf-" + os.path.basename(os.path.normpath(args.hf_model))


def run_slot(args: Args) -> str:
    """The run name's backbone slot: the backbone, with a non-default world in its place (tiny) or after it (hf)."""
    tag = backbone_tag(args)
    if args.world == "default":
        return tag
    return args.world if tag == "tiny" else f"{tag}-{args.world}"


def validate(args: Args) -> None:
    """Every hyperparameter check, before anything is written: exit 2 with 'error: --flag: problem'."""
    for f in ("steps_per_task", "batch_size", "pretrain_batch_size", "kd_batch_size", "conflict_batch_size",
              "lora_rank", "num_experts", "n_train", "n_test", "gen_samples", "d_model", "n_layers", "n_heads",
              "d_ff", "max_len", "log_every", "eval_max_new_tokens", "eval_batch_size"):
        common.require(getattr(args, f) >= 1, f, f"must be >= 1 (got {getattr(args, f)})")
    for f in ("pretrain_steps", "num_tasks", "kd_lambda", "conflict_every", "num_threads", "save_samples"):
        common.require(getattr(args, f) >= 0, f, f"must be >= 0 (got {getattr(args, f)})")
    for f in ("lr", "pretrain_lr", "kd_temperature", "max_grad_norm", "pretrain_max_grad_norm", "lora_alpha"):
        common.require(getattr(args, f) > 0, f, f"must be > 0 (got {getattr(args, f)})")
    common.require(0 <= args.lora_dropout < 1, "lora_dropout", f"must be in [0, 1) (got {args.lora_dropout})")
    common.require(args.d_model % args.n_heads == 0, "n_heads", f"must divide --d-model {args.d_model}")
    validate_baselines(args)
    validate_hf(args)
    common.require(args.answers == "single" or args.data_dir is None, "answers",
                   "multi needs the built-in data (its answers are rewritten as `it is <value> <eos>`)")
    common.require(args.world in data.MODE_WORLDS, "world",
                   f"must be one of {', '.join(data.MODE_WORLDS)} (got {args.world})")
    common.require(args.world == "default" or args.data_dir is None, "world",
                   f"{args.world} is a built-in world; it cannot be combined with --data-dir")
    common.require(args.answers == "single" or args.world == "default", "answers",
                   f"multi is only available in the default world (got --world {args.world})")
    need = data.MODE_QUESTION_LEN + max(5, args.eval_max_new_tokens - 1)  # the answers; the decoded positions
    common.require(args.answers == "single" or args.max_len >= need, "max_len",
                   f"must be >= {need} with --answers multi and --eval-max-new-tokens "
                   f"{args.eval_max_new_tokens} (got {args.max_len})")
    common.require(args.data_dir is not None or args.max_len >= 24, "max_len",
                   f"must be >= 24 for the built-in data (its sequences have 24 tokens; got {args.max_len})")


def validate_baselines(args: Args) -> None:
    for f in ("clmoe_top", "dp_g_length", "dp_e_length", "tailor_samples"):
        common.require(getattr(args, f) >= 1, f, f"must be >= 1 (got {getattr(args, f)})")
    for f in ("dp_lr", "dp_max_grad_norm", "tailor_damp"):
        common.require(getattr(args, f) > 0, f, f"must be > 0 (got {getattr(args, f)})")
    common.require(args.dp_pull >= 0, "dp_pull", f"must be >= 0 (got {args.dp_pull})")
    for f in ("clmoe_momentum", "tailor_keep"):
        common.require(0 <= getattr(args, f) <= 1, f, f"must be in [0, 1] (got {getattr(args, f)})")
    for f in ("dp_g_layers", "dp_e_layers") if args.method == "dualprompt" else ():
        v = getattr(args, f)
        common.require(len(set(v)) == len(v) and all(0 <= i < args.n_layers for i in v), f,
                       f"must be distinct layers in [0, --n-layers {args.n_layers}) (got {list(v)})")
    common.require(not args.moe_split_rank or args.lora_rank % args.num_experts == 0, "moe_split_rank",
                   f"needs --lora-rank {args.lora_rank} divisible by --num-experts {args.num_experts}")


def save_after_task(model, args: Args, run_dir, k: int, task: str, T: int, state: dict) -> None:
    """The checkpoint after task k (and model_after_{task}.pt with --save-model); only rank 0 writes."""
    weights = model_state(model)  # FSDP2: a collective, on every rank
    if not is_writer():
        return
    if args.save_model:
        torch.save({"model": weights, "task": k + 1, "args": vars(args)},
                   os.path.join(run_dir, f"model_after_{task}.pt"))
    common.save_checkpoint(run_dir, "mode", args, k + 1, T, {"model": weights, **state})


def run_timing(pretrain_s: float, train_sw, eval_sw, t_start: float) -> dict:
    """timing_s so far: pre-training, training, evaluation, and wall time since the start (resumes included)."""
    return {"pretrain": pretrain_s, "train": train_sw.total, "eval": eval_sw.total,
            "total": time.perf_counter() - t_start}


def assemble_results(args: Args, model, trainable, rows, tasks, conflicts, attr, state, cache, base_sha1, summary,
                     timing, name: str, device) -> dict:
    """The results envelope of a finished run (every rank computes it; rank 0 writes it)."""
    gnll, gmatch = [r["gen_nll"] for r in rows], [r["gen_match"] for r in rows]
    extra = {"gen_nll": gnll, "gen_match": gmatch, "grad_conflict": conflicts, "path_attribution": attr,
             "scheme": scheme_of(args), "clmoe_usage": [u.tolist() for u in state["usage"]] or None,
             "dp_selection_acc": [r["dp_selection_acc"] for r in rows] if model.prompts is not None else None,
             "pretrain_cache": cache, "trainable_params": sum(p.numel() for p in trainable),
             "base_weights_unchanged": all_ranks(base_hashes(model) == base_sha1)}
    return common.results_envelope(
        script="mode", method=method_tag(args), variant=common.tag(args, VARIANT_FIELDS, Args()),
        data=common.data_tag(args.data_dir), backbone=backbone_tag(args), seed=args.seed, run_name=name, args=args,
        device=device, tasks=tasks, matrices={m: [r[m] for r in rows] for m in MATRICES if m in rows[0]}, extra=extra,
        summary=summary, timing_s=timing)


def main(args: Args) -> dict:
    # TRY NOT TO MODIFY: setup
    validate(args)
    common.check_extras(args)
    np_streams, tasks, vocab, image_lo, special = load_data(args)
    if args.hf_model is not None:
        check_hf_vocab(args, vocab, image_lo, special)
    samples = sample_probe(args, np_streams, image_lo, special)
    init_dist(args)
    gen = common.seed_everything(args.seed, args.torch_deterministic)
    common.set_threads(args.num_threads)
    device = common.pick_device(args.cuda)
    image_lo = image_lo if isinstance(image_lo, int) else image_lo.to(device)
    name = common.run_name("mode", method_tag(args), common.data_tag(args.data_dir), run_slot(args), args.seed)
    run_dir, ckpt = common.open_run(args, name, "mode") if is_writer() else (None, None)  # only rank 0 writes
    loggers = common.open_loggers(args, name, run_dir, None if ckpt is None else global_step(args, ckpt["done"], 1)) \
        if is_writer() else {}
    print(f"run {name} -> {run_dir} (device: {device})")
    gens = generators(args.seed, gen)
    t_start = time.perf_counter() - (ckpt["timing"]["total"] if ckpt else 0.0)

    streams = {k: to_tensors({f: v[f] for f in FIELDS}, device) for k, v in np_streams.items()}
    scheme = scheme_of(args)
    model, trainable, base_sha1, pretrain_s, cache = build(args, np_streams, streams, vocab, image_lo, device,
                                                           scheme, ckpt, loggers, len(tasks), special)
    gen_probe = generation_probe(args, np_streams, streams, vocab, image_lo, device)
    answers = {t: answer_vocab(streams[f"{t}_train"], vocab) for t in tasks}  # closed-set scoring, fixed per run
    eos = data.MODE_IMAGE_LO + data.MODE_MULTI_WORDS.index("<eos>") if args.answers == "multi" else special["eos_id"]
    train_sw, eval_sw, T = common.Stopwatch(), common.Stopwatch(), len(tasks)
    if ckpt is None:
        row0 = evaluate(model, streams, tasks, answers, scheme, image_lo, gen_probe, "row 0", eos,
                        args.eval_max_new_tokens, args.eval_batch_size)
        rows, conflicts, snapshots, done = [row0], [], [], 0
        state = {"usage": []}  # what the baselines carry across tasks (CL-MoE's usage counts)
        report_row("pre-trained", rows[0], loggers, global_step(args, 0, 0))
        save_samples(model, samples, scheme, image_lo, special, args, run_dir, "pretrained")
    else:
        rows, conflicts, done, state = ckpt["rows"], ckpt["conflicts"], ckpt["done"], ckpt["method_state"]
        snapshots = [[{k: None if v is None else v.to(device) for k, v in layer.items()} for layer in snap]
                     for snap in ckpt["snapshots"]]
        train_sw.total, eval_sw.total = ckpt["timing"]["train"], ckpt["timing"]["eval"]
        common.restore_rng(ckpt["rng"], gens)  # last: nothing after it may draw before training
        print(f"resumed {run_dir} after task {done}/{T}")
    for k in range(done, T):
        task = tasks[k]
        before_task(model, args, k)
        with train_sw:
            train_task(model, trainable, streams, k, task, scheme, args, image_lo, gens, loggers, conflicts)
            after_task(model, args, streams, k, task, gens, state, snapshots)
        snapshots.append(expert_snapshot(model))  # the experts right after task k, for the path attribution
        with eval_sw:
            rows.append(evaluate(model, streams, tasks, answers, scheme, image_lo, gen_probe, f"row {k + 1}", eos,
                                 args.eval_max_new_tokens, args.eval_batch_size))
            save_samples(model, samples, scheme, image_lo, special, args, run_dir, f"after_{task}")
        report_row(f"after {task}", rows[-1], loggers, global_step(args, k + 1, 0))
        timing = run_timing(pretrain_s, train_sw, eval_sw, t_start)
        save_after_task(model, args, run_dir, k, task, T, {
            "rng": common.rng_state(gens), "rows": rows, "conflicts": conflicts, "snapshots": snapshots,
            "method_state": state, "base_sha1": base_sha1, "pretrain_cache": cache, "timing": timing})

    # ------------------------------------------------------------------------- results
    with eval_sw:
        attr = path_attribution(model, streams, tasks, answers, scheme, image_lo, snapshots, [r["acc"] for r in rows],
                                args.eval_batch_size)
    summary = summarize(rows, conflicts, attr)
    timing = run_timing(pretrain_s, train_sw, eval_sw, t_start)
    print_results(rows, tasks, summary, timing)
    res = assemble_results(args, model, trainable, rows, tasks, conflicts, attr, state, cache, base_sha1, summary,
                           timing, name if ckpt is None else os.path.basename(os.path.normpath(run_dir)), device)
    if is_writer():
        series = {"gen_nll": {"t2i": res["extra"]["gen_nll"]}, "gen_match": {"t2i": res["extra"]["gen_match"]}}
        common.write_results(run_dir, res, series=series)
        common.log_scalars(loggers, {f"summary/{k}": v for k, v in summary.items()}, global_step(args, T, 0))
        if args.plot:
            common.plot_matrix(run_dir, res["matrices"]["acc"], res["rows"], tasks,
                               "accuracy, closed-set (E1), percent")
        common.close_loggers(loggers)
        common.finish_run(run_dir, args.save_model)
    if dist.is_initialized():
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    main(tyro.cli(Args, default=common.resume_defaults(Args)))
