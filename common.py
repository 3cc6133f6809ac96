"""Small leaf helpers shared by dns.py, comet.py and mode.py: seeding, device, run outputs, CL metrics.

Continual-learning metrics use a (T+1) x T matrix R, where R[k][j] is the score on entry (task) j
after training step k. Row 0 is the evaluation before any training. Entry j is trained at step j+1,
so its "just trained" value is R[j+1][j]. Entries a metric does not apply to hold None. All averages
are task-weighted: every entry counts once, whatever its number of test samples.

    final average  ACC  = mean_j R[T][j]
    backward transfer BWT = mean_{j < T-1} (R[T][j] - R[j+1][j])          (GEM; denominator = #entries)
    forgetting      F   = mean_{j < T-1} (max_{j+1 <= l <= T-1} R[l][j] - R[T][j])   (Chaudhry et al.)
    R@K (one query) = probability that the true partner is among the top K when ties are broken
                      uniformly at random = clip((K - g) / (e + 1), 0, 1), g = #candidates scored strictly
                      higher, e = #other candidates with exactly the same score.
"""

import csv
import json
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

Matrix = List[List[Optional[float]]]


# ----------------------------------------------------------------------------- seeding, device, errors
def seed_everything(seed: int, torch_deterministic: bool = True) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator for data shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    return torch.Generator().manual_seed(seed)


def pick_device(cuda: bool) -> torch.device:
    """CUDA when available and asked for, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and cuda else "cpu")


def die(message: str, code: int = 2):
    """Print a clear error to stderr and exit (code 2 = bad input); nothing else is written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


# ----------------------------------------------------------------------------- run outputs
def make_run_dir(args, run_name: str) -> str:
    """Create runs/{run_name} (or args.out_dir), write args.json and cmd.txt, return the path."""
    run_dir = args.out_dir or os.path.join("runs", run_name)
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, "args.json"), {k: v for k, v in vars(args).items()})
    with open(os.path.join(run_dir, "cmd.txt"), "w") as f:
        f.write(" ".join(sys.argv) + "\n")
    return run_dir


def write_json(path: str, obj) -> None:
    """Write JSON atomically (tmp file + rename) so a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def write_metrics_csv(path: str, matrices: Dict[str, Matrix], entry_names: Sequence[str]) -> None:
    """One row per (row k, entry j, metric) with a value: columns row, after_step, entry, metric, value."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "after_step", "entry", "metric", "value"])
        for metric, R in matrices.items():
            for k, row in enumerate(R):
                for j, v in enumerate(row):
                    if v is not None:
                        w.writerow([k, "init" if k == 0 else entry_names[k - 1], entry_names[j], metric, f"{v:.6f}"])


def maybe_tracker(args, run_name: str):
    """W&B run when args.track (imported lazily), else None."""
    if not args.track:
        return None
    import wandb  # optional dependency

    return wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name, config=vars(args))


def format_matrix(R: Matrix, row_names: Sequence[str], col_names: Sequence[str], width: int = 7) -> str:
    """Fixed-width text table of a metric matrix; '-' where not applicable."""
    head = " " * 14 + "".join(f"{c[:width - 1]:>{width}}" for c in col_names)
    lines = [head]
    for name, row in zip(row_names, R):
        cells = "".join(f"{'-':>{width}}" if v is None else f"{v:>{width}.1f}" for v in row)
        lines.append(f"{name[:13]:<14}{cells}")
    return "\n".join(lines)


class Stopwatch:
    """Accumulates seconds spent in a block: `with sw: ...`; `sw.total`."""

    def __init__(self):
        self.total = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self._t0


# ----------------------------------------------------------------------------- continual-learning metrics
def _entries(R: Matrix, exclude_last: bool) -> List[int]:
    T = len(R[0])
    return [j for j in range(T - 1 if exclude_last else T) if R[-1][j] is not None and R[j + 1][j] is not None]


def final_average(R: Matrix) -> Optional[float]:
    """ACC = mean over entries j with a value of R[T][j]; None if no entry has one."""
    vals = [v for v in R[-1] if v is not None]
    return float(np.mean(vals)) if vals else None


def backward_transfer(R: Matrix) -> Optional[float]:
    """BWT = mean over entries j < T-1 of R[T][j] - R[j+1][j] (final minus just-trained); None if none."""
    js = _entries(R, exclude_last=True)
    return float(np.mean([R[-1][j] - R[j + 1][j] for j in js])) if js else None


def forgetting(R: Matrix) -> Optional[float]:
    """F = mean over entries j < T-1 of max_{j+1<=l<=T-1} R[l][j] - R[T][j] (can be < 0 with positive transfer)."""
    T = len(R[0])
    js = _entries(R, exclude_last=True)
    vals = [max(R[l][j] for l in range(j + 1, T)) - R[-1][j] for j in js]
    return float(np.mean(vals)) if vals else None


def recall_at_k(scores: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> List[float]:
    """R@K in percent for a square score matrix whose diagonal holds the true pairs (rows = queries).

    Ties are broken uniformly at random, in expectation: a query with g strictly higher and e equally
    scored other candidates counts clip((K - g) / (e + 1), 0, 1).
    """
    true = scores.diagonal().unsqueeze(1)
    greater = (scores > true).sum(1).double()
    equal = (scores == true).sum(1).double() - 1.0
    return [float(((k - greater) / (equal + 1)).clamp(0, 1).mean() * 100) for k in ks]
