"""Small leaf helpers shared by dns.py, comet.py and mode.py: seeding, validation, run outputs, resume, CL metrics,
and the table command.

Continual-learning metrics use a (T+1) x T matrix R, where R[k][j] is the score on entry (task) j
after training step k. Row 0 is the evaluation before any training. Entry j is trained at step j+1,
so its "just trained" value is R[j+1][j]. Entries a metric does not apply to hold None. All averages
are task-weighted: every entry counts once, whatever its number of test samples.

    final average  ACC  = mean_j R[T][j]
    backward transfer BWT = mean_{j < T-1} (R[T][j] - R[j+1][j])          (GEM; denominator = #entries)
    forgetting      F   = mean_{j < T-1} (max_{j+1 <= l <= T-1} R[l][j] - R[T][j])   (Chaudhry et al.)
    average incremental accuracy AIA = mean_{k=1..T} mean_{j < k} R[k][j]         (over the trained entries)
    forward transfer FWT = mean_{j >= 1} (R[j][j] - R[0][j])   (row 0, the untrained model, as the baseline;
                      GEM uses a randomly initialised model instead)
    R@K (one query) = probability that the true partner is among the top K when ties are broken
                      uniformly at random = clip((K - g) / (e + 1), 0, 1), g = #candidates scored strictly
                      higher, e = #other candidates with exactly the same score.

Table command (reads every results.json under the folders, one row per configuration, mean ± std over seeds):
    python common.py table results/dns --metrics acc bwt_acc r10 --paired-with vanilla
"""

import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import tyro

Matrix = List[List[Optional[float]]]
SCHEMA = 1
# Fields that may differ between a run and its --resume (outputs, threads, logging): anything else must match.
RESUME_FREE = {"resume", "out_dir", "num_threads", "track", "wandb_project_name", "wandb_entity", "tensorboard",
               "plot", "save_model", "log_every"}
EXTRAS = (("track", "wandb"), ("tensorboard", "tensorboard"), ("plot", "matplotlib"))


# ----------------------------------------------------------------------------- seeding, device, errors
def seed_everything(seed: int, torch_deterministic: bool = True) -> torch.Generator:
    """Seed python, numpy and torch (and deterministic algorithms if asked); return a generator for shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    if torch_deterministic and torch.cuda.is_available():  # CPU kernels are deterministic; the call costs 2 s there
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose ('init/text', 'batches', 'replay', ...) that depends only on (seed, purpose)."""
    return int(hashlib.sha256(f"{seed}:{purpose}".encode()).hexdigest()[:16], 16) & (2**63 - 1)


def set_threads(num_threads: int) -> None:
    """torch intra-op threads (0 = torch default)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def pick_device(cuda: bool) -> torch.device:
    """CUDA when available and asked for, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and cuda else "cpu")


def die(message: str, code: int = 2):
    """Print a clear error to stderr and exit (code 2 = bad input, 1 = diverged); nothing else is written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def require(ok: bool, flag: str, problem: str) -> None:
    """Validation: exit 2 with 'error: --flag: problem' unless ok."""
    if not ok:
        die(f"--{flag.replace('_', '-')}: {problem}")


def check_extras(args) -> None:
    """--track / --tensorboard / --plot need their package: exit 2 with the pip command before anything is written."""
    for flag, module in EXTRAS:
        if getattr(args, flag, False) and importlib.util.find_spec(module) is None:
            die(f"--{flag} needs the optional package '{module}': pip install {module}")


def stop_if_diverged(terms: Dict[str, object], where: str) -> None:
    """Exit 1 naming `where` and the first non-finite term (values: floats or tensors, e.g. per-epoch sums)."""
    for name, v in terms.items():
        value = float(v)
        if not math.isfinite(value):
            print(f"error: training diverged at {where}: {name} = {value}; no results written", file=sys.stderr)
            raise SystemExit(1)


def require_finite(x, metric: str, where: str = "") -> None:
    """Metrics refuse non-finite input: ValueError naming the metric and the row/step."""
    t = torch.as_tensor(x)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{metric}: {int((~torch.isfinite(t)).sum())} non-finite input values (NaN or inf)"
                         + (f" at {where}" if where else ""))


# ----------------------------------------------------------------------------- names, tags, run dir, resume
def tag(args, fields: Sequence[str], defaults) -> str:
    """Sorted 'k=v' pairs, joined by ',', of the given fields whose value differs from the defaults ('' = none)."""
    out = []
    for f in sorted(fields):
        v, d = getattr(args, f), getattr(defaults, f)
        if _jsonable(v) != _jsonable(d):  # a tuple default read back from args.json is a list
            out.append(f"{f}={' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}")
    return ",".join(out)


def data_tag(data_dir: Optional[str]) -> str:
    """'builtin' or the data folder's base name."""
    return os.path.basename(os.path.normpath(data_dir)) if data_dir else "builtin"


def run_name(script: str, method: str, data: str, backbone: Optional[str], seed: int) -> str:
    """{script}__{method+switches}__{data}__{backbone}__{seed}__{time}."""
    return f"{script}__{method}__{data}__{backbone or '-'}__{seed}__{int(time.time())}"


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def resume_defaults(args_cls, argv: Optional[Sequence[str]] = None):
    """With `--resume RUN_DIR` on the command line: the stored args as tyro defaults (only retyped flags differ)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = None
    for i, a in enumerate(argv):
        if a == "--resume" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--resume="):
            path = a.split("=", 1)[1]
    if path is None:
        return None
    stored = _read_stored_args(path)
    unknown = sorted(set(stored) - set(args_cls.__dataclass_fields__))
    if unknown:
        die(f"--resume: {path}/args.json has fields this script does not know: {', '.join(unknown)}")
    return args_cls(**stored)


def _read_stored_args(run_dir: str) -> dict:
    path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(path):
        die(f"--resume: {path} not found (not a run directory)")
    with open(path) as f:
        return json.load(f)


def open_run(args, name: str, script: str) -> Tuple[str, Optional[dict]]:
    """New run: create the run dir (args.out_dir or runs/{name}), write args.json and cmd.txt; return (dir, None).
    --resume RUN_DIR: check the args against RUN_DIR/args.json and load its checkpoint; return (dir, checkpoint)."""
    if args.resume:
        return args.resume, _check_resume(args, script)
    run_dir = args.out_dir or os.path.join("runs", name)
    unfinished = not os.path.isfile(os.path.join(run_dir, "results.json"))
    if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")) and unfinished:
        die(f"--out-dir: {run_dir} holds an unfinished run (checkpoint.pt); continue it with --resume {run_dir}")
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, "args.json"), vars(args))
    with open(os.path.join(run_dir, "cmd.txt"), "w") as f:
        f.write(" ".join(sys.argv) + "\n")
    return run_dir, None


def _check_resume(args, script: str) -> dict:
    stored, now = _read_stored_args(args.resume), _jsonable(vars(args))
    stored = _jsonable(vars(type(args)())) | stored  # a flag added after the run started: its default
    diff = [f"{k} ({now.get(k)!r} != {stored.get(k)!r})" for k in sorted(set(stored) | set(now))
            if k not in RESUME_FREE and now.get(k) != stored.get(k)]
    if diff:
        die(f"--resume: args differ from {args.resume}/args.json in {', '.join(diff)}")
    path = os.path.join(args.resume, "checkpoint.pt")
    if not os.path.isfile(path):
        done = os.path.isfile(os.path.join(args.resume, "results.json"))
        die(f"--resume: {path} not found" + (" (the run is complete: results.json exists)" if done else ""))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("schema") != SCHEMA or ckpt.get("script") != script:
        die(f"--resume: {path} is not a schema-{SCHEMA} {script}.py checkpoint")
    with open(os.path.join(args.resume, "cmd.txt"), "a") as f:
        f.write("resume: " + " ".join(sys.argv) + "\n")
    return ckpt


def atomic_write(path: str, write_fn, mode: str = "w") -> None:
    """Write via a temp file in the same folder, fsync, then rename: a crash leaves the old or the new file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, mode) as f:
        write_fn(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """Strict JSON (NaN/inf rejected), written atomically."""
    text = json.dumps(obj, indent=2, allow_nan=False, default=str)
    atomic_write(path, lambda f: f.write(text))


def rng_state(gens: Dict[str, torch.Generator]) -> dict:
    """Every RNG: python, numpy (as tensors, so torch.load(weights_only=True) works), torch, CUDA, named generators."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "gens": {k: g.get_state() for k, g in gens.items()}}


def restore_rng(state: dict, gens: Dict[str, torch.Generator]) -> None:
    """Inverse of rng_state (call it last when resuming, after everything that draws during setup)."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in gens.items():
        g.set_state(state["gens"][k])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(run_dir: str, script: str, args, done: int, total: int, state: dict) -> None:
    """checkpoint.pt = {schema, script, args, done (#completed tasks), **state}, written atomically."""
    buf = io.BytesIO()
    torch.save({"schema": SCHEMA, "script": script, "args": _jsonable(vars(args)), "done": done, **state}, buf)
    atomic_write(os.path.join(run_dir, "checkpoint.pt"), lambda f: f.write(buf.getvalue()), mode="wb")
    print(f"checkpoint {done}/{total}", flush=True)


def finish_run(run_dir: str, keep_checkpoint: bool) -> None:
    """After results.json: remove checkpoint.pt unless --save-model."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not keep_checkpoint and os.path.isfile(path):
        os.remove(path)


# ----------------------------------------------------------------------------- loggers (optional extras)
def open_loggers(args, name: str, run_dir: str, purge_step: Optional[int] = None) -> dict:
    """{'wandb': run or None, 'tb': SummaryWriter or None}; packages imported only when asked for."""
    loggers = {"wandb": None, "tb": None}
    if args.track:
        import wandb  # optional extra

        run_id = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]
        loggers["wandb"] = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=name,
                                      config=vars(args), id=run_id, resume="allow")
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # optional extra

        loggers["tb"] = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)
    return loggers


def log_scalars(loggers: dict, scalars: Dict[str, Optional[float]], step: int) -> None:
    """Log the non-None scalars to W&B and TensorBoard (keys like 'losses/contrastive', 'charts/acc')."""
    vals = {k: float(v) for k, v in scalars.items() if v is not None}
    if loggers.get("wandb"):
        loggers["wandb"].log(vals, step=step)
    if loggers.get("tb"):
        for k, v in vals.items():
            loggers["tb"].add_scalar(k, v, step)


def close_loggers(loggers: dict) -> None:
    if loggers.get("wandb"):
        loggers["wandb"].finish()
    if loggers.get("tb"):
        loggers["tb"].close()


def plot_matrix(run_dir: str, R: Matrix, row_names: Sequence[str], col_names: Sequence[str], title: str) -> None:
    """acc_matrix.png (heat map: rows = after task, columns = task) and acc_curves.png (one line per task)."""
    import matplotlib  # optional extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(col_names), 1 + 0.45 * len(row_names)))
    im = ax.imshow(a, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(col_names)), col_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=7)
    ax.set_xlabel("task")
    ax.set_ylabel("after task")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "acc_matrix.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, c in enumerate(col_names):
        ax.plot(range(len(row_names)), a[:, j], marker="o", label=c)
    ax.set_xticks(range(len(row_names)), row_names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(title, fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "acc_curves.png"), dpi=120)
    plt.close("all")


# ----------------------------------------------------------------------------- results envelope
def env_info(device) -> dict:
    """Versions and hardware: per-seed numbers can differ across machines with the same code."""
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    gpu = torch.cuda.get_device_name(0) if torch.device(device).type == "cuda" else None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__, "cpu": cpu,
            "gpu": gpu, "device": str(device), "git": git}


def results_envelope(*, script: str, method: str, variant: str, data: str, backbone: Optional[str], seed: int,
                     run_name: str, args, device, tasks: Sequence[str], matrices: Dict[str, Matrix], extra: dict,
                     summary: Dict[str, Optional[float]], timing_s: dict) -> dict:
    """The one results.json layout of all three scripts (schema 1; README "Outputs")."""
    T = len(tasks)
    for k, R in matrices.items():
        if len(R) != T + 1 or any(len(row) != T for row in R):
            raise ValueError(f"matrix {k}: expected {T + 1} x {T}")
    for k, v in summary.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"summary {k}: {v!r} is not a finite number or null")
    return {"schema": SCHEMA, "script": script, "method": method, "variant": variant, "data": data,
            "backbone": backbone, "seed": seed, "run_name": run_name, "args": _jsonable(vars(args)),
            "env": env_info(device), "tasks": list(tasks), "rows": ["init"] + list(tasks), "matrices": matrices,
            "extra": extra, "summary": summary, "timing_s": timing_s}


def write_results(run_dir: str, res: dict, series: Optional[Dict[str, Dict[str, list]]] = None) -> None:
    """results.json (strict JSON) and metrics.csv: one line per non-null matrix cell and per value of each
    per-row series {metric: {entry: [value per row]}} (e.g. MoDE's generation metrics under entry 't2i')."""
    write_json(os.path.join(run_dir, "results.json"), res)
    ident = [res["script"], res["method"], res["variant"], res["seed"]]
    lines = [["script", "method", "variant", "seed", "row", "after", "entry", "metric", "value"]]
    cells = [(metric, res["tasks"][j], k, v) for metric, R in res["matrices"].items()
             for k, row in enumerate(R) for j, v in enumerate(row)]
    cells += [(metric, entry, k, v) for metric, by_entry in (series or {}).items()
              for entry, vals in by_entry.items() for k, v in enumerate(vals)]
    for metric, entry, k, v in cells:
        if v is not None:
            lines.append(ident + [k, res["rows"][k], entry, metric, f"{v:.6f}"])
    atomic_write(os.path.join(run_dir, "metrics.csv"), lambda f: csv.writer(f).writerows(lines))


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


def _check_matrix(R: Matrix, metric: str) -> None:
    for k, row in enumerate(R):
        for j, v in enumerate(row):
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{metric}: non-finite value {v} at row {k}, entry {j}")


def final_average(R: Matrix) -> Optional[float]:
    """ACC = mean over entries j with a value of R[T][j]; None if no entry has one."""
    _check_matrix(R, "final average")
    vals = [v for v in R[-1] if v is not None]
    return float(np.mean(vals)) if vals else None


def backward_transfer(R: Matrix) -> Optional[float]:
    """BWT = mean over entries j < T-1 of R[T][j] - R[j+1][j] (final minus just-trained); None if none."""
    _check_matrix(R, "backward transfer")
    js = _entries(R, exclude_last=True)
    return float(np.mean([R[-1][j] - R[j + 1][j] for j in js])) if js else None


def forgetting(R: Matrix) -> Optional[float]:
    """F = mean over entries j < T-1 of max_{j+1<=l<=T-1} R[l][j] - R[T][j] (can be < 0 with positive transfer)."""
    _check_matrix(R, "forgetting")
    T = len(R[0])
    js = _entries(R, exclude_last=True)
    vals = [max(R[l][j] for l in range(j + 1, T)) - R[-1][j] for j in js]
    return float(np.mean(vals)) if vals else None


def average_incremental_accuracy(R: Matrix) -> Optional[float]:
    """AIA = mean over rows k = 1..T of the mean over trained entries j < k with a value of R[k][j]; None if none."""
    _check_matrix(R, "average incremental accuracy")
    rows = [[v for v in R[k][:k] if v is not None] for k in range(1, len(R))]
    means = [float(np.mean(r)) for r in rows if r]
    return float(np.mean(means)) if means else None


def forward_transfer(R: Matrix) -> Optional[float]:
    """FWT = mean over entries j >= 1 of R[j][j] - R[0][j] (score just before training on j minus row 0, the
    untrained model; GEM's b_j is a random-init model instead); None if no entry has both values."""
    _check_matrix(R, "forward transfer")
    vals = [R[j][j] - R[0][j] for j in range(1, len(R[0])) if R[j][j] is not None and R[0][j] is not None]
    return float(np.mean(vals)) if vals else None


def recall_at_k(scores: torch.Tensor, ks: Sequence[int] = (1, 5, 10), where: str = "") -> List[float]:
    """R@K in percent for a square score matrix whose diagonal holds the true pairs (rows = queries).

    Ties are broken uniformly at random, in expectation: a query with g strictly higher and e equally
    scored other candidates counts clip((K - g) / (e + 1), 0, 1). Non-finite scores raise ValueError.
    """
    require_finite(scores, "R@K scores", where)
    true = scores.diagonal().unsqueeze(1)
    greater = (scores > true).sum(1).double()
    equal = (scores == true).sum(1).double() - 1.0
    return [float(((k - greater) / (equal + 1)).clamp(0, 1).mean() * 100) for k in ks]


# ----------------------------------------------------------------------------- the table command
def load_results(dirs: Sequence[str]) -> List[Tuple[str, dict]]:
    """(path, results) for every schema results.json under the folders (others skipped with a warning)."""
    found = []
    for d in dirs:
        if not os.path.isdir(d):
            die(f"table: {d} is not a folder")
        for root, _, files in sorted(os.walk(d)):
            if "results.json" in files:
                path = os.path.join(root, "results.json")
                with open(path) as f:
                    res = json.load(f)
                if res.get("schema") != SCHEMA:
                    print(f"warning: {path} has no schema {SCHEMA} envelope; skipped", file=sys.stderr)
                    continue
                found.append((path, res))
    if not found:
        die(f"table: no results.json under {' '.join(dirs)}")
    return found


def _metric_value(res: dict, metric: str) -> Optional[float]:
    """A summary key; time_<k> = seconds in timing_s[k]; just_trained_<m> = mean of R[k][k-1] of matrix m."""
    if metric.startswith("time_") and metric[5:] in res.get("timing_s", {}):
        v = res["timing_s"][metric[5:]]
        return float(sum(v)) if isinstance(v, list) else v
    if metric.startswith("just_trained_") and metric[13:] in res.get("matrices", {}):
        R = res["matrices"][metric[13:]]
        diag = [R[k][k - 1] for k in range(1, len(R)) if R[k][k - 1] is not None]
        return float(np.mean(diag)) if diag else None
    return res["summary"].get(metric)


GROUP_KEYS = ("script", "method", "variant", "data", "backbone")


def group_runs(found: List[Tuple[str, dict]]) -> Dict[tuple, Dict[int, dict]]:
    """{(script, method, variant, data, backbone): {seed: results}}; a repeated seed exits 2 naming both files."""
    groups, paths = {}, {}
    for path, res in found:
        key = tuple(res.get(k) for k in GROUP_KEYS)
        g = groups.setdefault(key, {})
        if res["seed"] in g:
            die(f"table: seed {res['seed']} of {'/'.join(map(str, key))} appears twice: {paths[key, res['seed']]}"
                f" and {path}")
        g[res["seed"]] = res
        paths[key, res["seed"]] = path
    for key, g in groups.items():
        versions = {r.get("env", {}).get("torch") for r in g.values()}
        if len(versions) > 1:
            print(f"warning: {'/'.join(map(str, key))} mixes torch versions {sorted(map(str, versions))}",
                  file=sys.stderr)
    return groups


def mean_std_cell(vals: List[Optional[float]], digits: int, per_seed: bool = False) -> str:
    """'mean ± std' (ddof 1) over the non-null values; one value alone; '(n=k)' when some are null; '–' if none."""
    xs = [v for v in vals if v is not None]
    if not xs:
        return "–"
    fmt = ",.0f" if all(isinstance(v, int) for v in xs) else f".{digits}f"  # counts (bytes) print as integers
    cell = f"{xs[0]:{fmt}}" if len(xs) == 1 else f"{np.mean(xs):{fmt}} ± {np.std(xs, ddof=1):{fmt}}"
    if len(xs) < len(vals):
        cell += f" (n={len(xs)})"
    if per_seed and len(vals) > 1:
        cell += " (" + ", ".join("–" if v is None else f"{v:.{digits}f}" for v in vals) + ")"
    return cell


def paired_cell(x: Dict[int, Optional[float]], ref: Dict[int, Optional[float]], digits: int,
                test: bool = False) -> str:
    """Per-seed differences x_s - ref_s over seeds both have: 'mean ± s.e. (k/n)', k = #differences > 0;
    test: then '[95 % t-interval] p=<exact sign-flip p>'."""
    d = [x[s] - ref[s] for s in sorted(set(x) & set(ref)) if x[s] is not None and ref[s] is not None]
    if len(d) < 2:
        return "–"
    se = np.std(d, ddof=1) / math.sqrt(len(d))
    cell = f"{np.mean(d):+.{digits}f} ± {se:.{digits}f} ({sum(v > 0 for v in d)}/{len(d)})"
    if test:
        lo, hi, p = paired_test(d)
        cell += f" [{lo:+.{digits}f}, {hi:+.{digits}f}] p={p:.3f}"
    return cell


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t (table up to df 30, Cornish-Fisher expansion beyond)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_test(d: List[float]) -> Tuple[float, float, float]:
    """95 % t-interval of the mean difference and the exact two-sided sign-flip permutation p (all 2^n flips)."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    if n > 20:
        die(f"table: --test enumerates 2^n sign flips; {n} paired seeds is too many (at most 20)")
    half = t975(n - 1) * np.std(d, ddof=1) / math.sqrt(n)
    signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
    flipped = np.abs((signs * d).mean(axis=1))
    p = float(np.mean(flipped >= abs(d.mean()) - 1e-12))
    return float(d.mean() - half), float(d.mean() + half), p


def table(dirs: tyro.conf.Positional[List[str]], metrics: Optional[List[str]] = None, paired_with: Optional[str] = None,
          only: Optional[str] = None, per_seed: bool = False, digits: int = 2, out: Optional[str] = None,
          paired_only: bool = False, test: bool = False) -> str:
    """Markdown table over every results.json under DIRS: one row per (script, method, variant, data, backbone),
    cells mean ± std over seeds (n = seed count); --paired-with METHOD[:VARIANT] adds the per-seed differences
    against that configuration (same script, data and backbone; seeds matched by value) as mean ± s.e. (k/n).

    Args:
        dirs: folders searched recursively for results.json
        metrics: summary keys, time_<k> (seconds in timing_s[k]), just_trained_<m> (mean diagonal of matrix m)
        paired_with: reference configuration METHOD or METHOD:VARIANT for paired differences
        only: keep only configurations whose script/method/variant/data/backbone contains this text
        per_seed: append the per-seed values to each cell
        digits: decimals
        out: also write the table to this file
        paired_only: with --paired-with, print only the paired differences
        test: with --paired-with, add each difference's 95 % t-interval and exact sign-flip p
    """
    if not dirs:
        die("table: give at least one folder of runs")
    groups = group_runs(load_results(dirs))
    if only:
        groups = {k: g for k, g in groups.items() if only in "/".join(map(str, k))}
    keys = sorted(groups, key=lambda k: tuple(str(v) for v in k))
    metrics = metrics or list(dict.fromkeys(m for g in groups.values() for r in g.values() for m in r["summary"]))
    shown = [i for i, name in enumerate(GROUP_KEYS) if name == "method" or len({k[i] for k in keys}) > 1]
    head = [GROUP_KEYS[i] for i in shown] + ["seeds"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        g = groups[k]
        seeds = sorted(g)
        cells = [mean_std_cell([_metric_value(g[s], m) for s in seeds], digits, per_seed) for m in metrics]
        lines.append("| " + " | ".join([str(k[i]) or "(defaults)" for i in shown] + [str(len(seeds))] + cells) + " |")
    if paired_with:
        paired = _paired_lines(groups, keys, shown, metrics, paired_with, digits, test)
        lines = paired if paired_only else lines + [""] + paired
    text = "\n".join(lines)
    if out:
        atomic_write(out, lambda f: f.write(text + "\n"))
    print(text)
    return text


def _paired_lines(groups, keys, shown, metrics, paired_with: str, digits: int, test: bool) -> List[str]:
    method, _, variant = paired_with.partition(":")
    head = [GROUP_KEYS[i] for i in shown] + ["paired seeds"] + [f"Δ {m} vs {paired_with}" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        ref_key = (k[0], method, variant, k[3], k[4])
        if k == ref_key or ref_key not in groups:
            continue
        g, ref = groups[k], groups[ref_key]
        n = len(set(g) & set(ref))
        cells = [paired_cell({s: _metric_value(r, m) for s, r in g.items()},
                             {s: _metric_value(r, m) for s, r in ref.items()}, digits, test) for m in metrics]
        lines.append("| " + " | ".join([str(k[i]) or "(defaults)" for i in shown] + [str(n)] + cells) + " |")
    if len(lines) == 2:
        die(f"table: --paired-with {paired_with}: no configuration with that method/variant to pair against")
    return lines


if __name__ == "__main__":
    tyro.extras.subcommand_cli_from_dict({"table": table})
