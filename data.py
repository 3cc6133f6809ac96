"""Small dataset builders and loaders: the built-in synthetic benchmarks and the real-feature readers.

Leaf functions only. Every loader raises DataError with a message that names the file and the problem;
the method scripts turn it into a clear error and exit code 2 before anything is written.

Contents (section: what -> used by)
    shared: DataError, check_finite, read_npz                                          -> all three
    DNS:    DNS_* constants, parse_dns_steps, make_dns_benchmark, dns_modality_order,
            check_dns_arrays, load_dns_split (.npz), read_h5_rows, dns_h5_labels,
            load_dns_h5_split (official CMCL .h5), load_dns_features                   -> dns.py
    COMET:  comet_benchmark (built from comet_world, comet_sample, comet_avvp_sample),
            load_comet_npz                                                             -> comet.py
    MoDE:   MODE_WORLDS, make_mode_world (built from mode_sequences), mode_multi_answer_world,
            mode_read_image, load_mode_dir, export_mode_world                          -> mode.py
"""

import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


class DataError(ValueError):
    """Bad input data: the message names the file (or argument) and the problem."""


def check_finite(name: str, arr: np.ndarray) -> None:
    """Reject NaN / inf values with a message naming the array."""
    if not np.isfinite(arr).all():
        raise DataError(f"{name}: {int((~np.isfinite(arr)).sum())} non-finite values (NaN or inf)")


def read_npz(path: str, hint: str = "") -> Dict[str, np.ndarray]:
    """Every array of a .npz file, read without pickle; DataError naming the file otherwise
    (hint: what it should hold)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found" + (f" ({hint})" if hint else ""))
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # bad zip, pickled object arrays, ...
        raise DataError(f"{path}: cannot read as .npz without pickle ({e})") from e


# ============================================================================= DNS (dns.py)
# Global modality order of the official code (datasets store modalities sorted by it).
DNS_MODALITY_ORDER = ["vision", "text", "audio", "thermal", "depth", "imu", "video", "tactile", "point"]
DNS_BACKBONE_DIM = {"imagebind": 1024, "languagebind": 768, "unibind": 1024}
# Paper's 11 steps (dataset:modA-modB), in the official training order.
DNS_PAPER_STEPS = [
    "ucf101:text-video", "esc50:text-audio", "nyudv2:vision-depth", "clotho:text-audio",
    "vggsound_s:text-audio", "vggsound_s:text-video", "vggsound_s:audio-video",
    "tvl:vision-tactile", "tvl:text-tactile", "tvl:vision-text", "llvip:vision-thermal",
]
# dataset -> (modalities, #classes (0 = pairs/captions only), approx. real train size, test size)
DNS_DATASETS = {
    "ucf101": (["text", "video"], 101, 9537, 3783),
    "esc50": (["text", "audio"], 50, 1600, 400),
    "nyudv2": (["vision", "text", "depth"], 27, 47584, 654),
    "clotho": (["text", "audio"], 0, 2893, 1045),
    "vggsound_s": (["text", "audio", "video"], 300, 10001, 2001),
    "tvl": (["vision", "text", "tactile"], 0, 40000, 4000),  # approx.: SSVTP + HCT
    "llvip": (["vision", "thermal"], 0, 12025, 3463),
}
DNS_ACC_ONLY = {"ucf101"}  # the official evaluation computes no retrieval for UCF101
# Norm of the stored (raw) backbone features per modality: ImageBind/UniBind scale the
# L2-normalised outputs by a per-modality logit scale; LanguageBind multiplies non-text by exp(logit_scale).
_IB_SCALE = {"vision": 1.0, "video": 1.0, "tactile": 1.0, "text": 100.0, "audio": 20.0, "depth": 5.0, "thermal": 10.0}
_LB_SCALE = {m: (1.0 if m == "text" else 100.0) for m in _IB_SCALE}
DNS_FEATURE_SCALE = {"imagebind": _IB_SCALE, "languagebind": _LB_SCALE, "unibind": _IB_SCALE}
DNS_MODALITY_NAME = r"[A-Za-z0-9_]+"  # .npz data may name modalities freely; `text` gives zero-shot prototypes
DNS_SPLIT_EXTRA = ("label", "class_names", "class_text")  # the non-modality arrays of a split
# Official cache: datasets whose text row is the class name, so labels follow from the class prototypes
DNS_H5_LABELLED = ("ucf101", "esc50", "vggsound_s")


def parse_dns_steps(items: Sequence[str]) -> List[Tuple[str, str, str]]:
    """Parse `dataset:modA-modB` items into (dataset, modA, modB); modality names: letters, digits, underscore."""
    steps = []
    for item in items:
        m = re.fullmatch(rf"([^:\s]+):({DNS_MODALITY_NAME})-({DNS_MODALITY_NAME})", item)
        if m is None:
            raise DataError(f"--steps item '{item}': expected 'dataset:modA-modB', e.g. 'esc50:text-audio' "
                            "(modality names: letters, digits, underscore)")
        ds, a, b = m.groups()
        if a == b:
            raise DataError(f"--steps item '{item}': a step needs two different modalities")
        steps.append((ds, a, b))
    if not steps:
        raise DataError("--steps: no steps given")
    return steps


def _orth(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """n x k matrix with orthonormal columns (seeded)."""
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q[:, :k]


def make_dns_benchmark(backbone: str, steps: Sequence[Tuple[str, str, str]], seed: int = 0, scale: float = 0.1,
                       dim: Optional[int] = None, latent: int = 64, subspace: int = 16, gap: float = 0.55,
                       shift: float = 1.5, within: float = 0.7, noise: float = 0.8, pair_clusters: int = 100,
                       pair_within: float = 0.3, noise_dim: int = 64
                       ) -> Dict[str, dict]:
    """Synthetic stand-in for a backbone's pre-extracted features on the paper's datasets.

    Every sample has a semantic latent h (dim `latent`); each dataset draws h from its own `subspace`-dim
    slice of the latent space (slices overlap across datasets) around a class centre: the real classes
    where the dataset has labels, else `pair_clusters` hidden clusters (similar captions / scenes, which
    make retrieval ambiguous). Modality m of dataset ds renders h as
        x = s_m * normalize(U_m D_{m,ds} h + mu_{m,ds} + noise),
    U_m = the modality's basis (a shared joint-space basis plus a modality gap, so identity projections
    already align modalities partly), D_{m,ds} = a dataset-specific distortion near identity (the domain
    shift that makes re-training a shared modality forget), mu = a domain offset, s_m = the backbone's
    feature scale (DNS_FEATURE_SCALE), noise = isotropic in a `noise_dim`-dim subspace specific to (m, ds), so
    every dataset's features occupy a low-rank, partly dataset-specific subspace, as real backbone
    features do (they are not isotropic). Class-labelled text is the class name: one noise-free vector per class,
    which is also the zero-shot prototype. Train sizes = the real datasets' sizes times `scale`, test sizes
    times sqrt(scale) (so retrieval keeps a realistic number of candidates); floors 128 / 64.
    Returns {dataset: {"train": split, "test": split}}, split = {"feats": {mod: float32 [N, d]},
    "label": int64 [N] or None, "class_text": float32 [C, d] or None}.
    """
    if backbone not in DNS_BACKBONE_DIM:
        raise DataError(f"unknown backbone '{backbone}' (known: {', '.join(DNS_BACKBONE_DIM)})")
    d = dim or DNS_BACKBONE_DIM[backbone]
    rng = np.random.default_rng([seed, list(DNS_BACKBONE_DIM).index(backbone)])
    joint = _orth(rng, d, latent)
    U = {m: np.linalg.qr(joint + gap * rng.standard_normal((d, latent)) / np.sqrt(d))[0] for m in DNS_MODALITY_ORDER}
    out = {}
    for ds in dict.fromkeys(s[0] for s in steps):
        if ds not in DNS_DATASETS:
            raise DataError(f"dataset '{ds}' is not in the built-in benchmark ({', '.join(DNS_DATASETS)}); "
                            "pass --data-dir")
        mods, n_cls, n_train, n_test = DNS_DATASETS[ds]
        V = _orth(rng, latent, subspace)
        centres = (V @ rng.standard_normal((subspace, n_cls or pair_clusters)) / np.sqrt(subspace)).T
        render = {m: (np.eye(latent) + shift * rng.standard_normal((latent, latent)) / np.sqrt(latent),
                      0.3 * rng.standard_normal(d) / np.sqrt(d), _orth(rng, d, noise_dim)) for m in mods}

        def feats(m, h, eps):
            D, mu, E = render[m]
            x = h @ D.T @ U[m].T + mu + eps * rng.standard_normal((len(h), noise_dim)) @ E.T / np.sqrt(noise_dim)
            return (DNS_FEATURE_SCALE[backbone][m] * x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

        out[ds] = {}
        for split, n in (("train", max(128, round(n_train * scale))),
                         ("test", max(64, round(n_test * min(1.0, scale ** 0.5))))):
            y = rng.integers(0, len(centres), n)
            h = (centres[y] + (within if n_cls else pair_within) * rng.standard_normal((n, subspace)) @ V.T
                 / np.sqrt(subspace))
            split_feats = {m: feats(m, h, noise) for m in mods if not (m == "text" and n_cls)}
            class_text = None
            if n_cls and "text" in mods:  # text = class name: one vector per class, also the prototype
                class_text = feats("text", centres, 0.0)
                split_feats["text"] = class_text[y]
            out[ds][split] = {"feats": split_feats, "label": y if n_cls else None, "class_text": class_text}
    return out


def dns_modality_order(names: Sequence[str]) -> List[str]:
    """Modality names in the global order of the official code; free (.npz) names after them, sorted."""
    return [m for m in DNS_MODALITY_ORDER if m in names] + sorted(set(names) - set(DNS_MODALITY_ORDER))


def check_dns_arrays(path: str, z: Dict[str, np.ndarray], needed: Sequence[str]) -> dict:
    """Validate the arrays of one split (read from .npz or .h5) into {"feats", "label", "class_text"}."""
    unknown = [k for k in z if k not in DNS_SPLIT_EXTRA and not re.fullmatch(DNS_MODALITY_NAME, k)]
    if unknown:
        raise DataError(f"{path}: unknown array(s) {unknown} (expected modality names of letters, digits and "
                        f"underscore, or {list(DNS_SPLIT_EXTRA)})")
    for m in needed:
        if m not in z:
            raise DataError(f"{path}: missing modality array '{m}' (has {sorted(z)})")
    feats = {}
    for m in dns_modality_order([k for k in z if k not in DNS_SPLIT_EXTRA]):
        a = z[m]
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
            raise DataError(f"{path}: array '{m}' must be float [N, d], got {a.dtype} {list(a.shape)}")
        check_finite(f"{path}: array '{m}'", a)
        feats[m] = a.astype(np.float32)
    lengths = {m: len(a) for m, a in feats.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{path}: arrays of different lengths {lengths} (row i of every array is one paired sample)")
    n = next(iter(lengths.values()))
    if n == 0:
        raise DataError(f"{path}: empty split (0 samples)")
    label, class_text = z.get("label"), z.get("class_text")
    if class_text is not None:
        if "text" not in feats or class_text.ndim != 2 or class_text.shape[1] != feats["text"].shape[1]:
            d_text = feats["text"].shape[1] if "text" in feats else "no text array"
            raise DataError(f"{path}: class_text has shape {list(class_text.shape)}, "
                            f"expected [C, {d_text}] (the text dim)")
        check_finite(f"{path}: class_text", class_text)
        class_text = class_text.astype(np.float32)
    if label is not None:
        if label.shape != (n,) or not np.issubdtype(label.dtype, np.integer):
            raise DataError(f"{path}: label must be int [{n}], got {label.dtype} {list(label.shape)}")
        n_cls = len(class_text) if class_text is not None else len(z["class_names"]) if "class_names" in z else None
        if label.min() < 0 or (n_cls is not None and label.max() >= n_cls):
            raise DataError(f"{path}: label out of range [{label.min()}, {label.max()}] for {n_cls} classes")
        label = label.astype(np.int64)
    return {"feats": feats, "label": label, "class_text": class_text}


def load_dns_split(path: str, needed: Sequence[str]) -> dict:
    """Read and validate one `{dataset}_{split}.npz` file (format in README, section DNS)."""
    return check_dns_arrays(path, read_npz(path), needed)


def read_h5_rows(path: str) -> Tuple[List[str], np.ndarray]:
    """(sorted keys, stacked values) of an HDF5 file holding one root dataset per key, as the CMCL cache does."""
    try:
        import h5py  # optional extra: only the official .h5 cache needs it
    except ImportError as e:
        raise DataError(f"{path}: reading the official .h5 feature cache needs h5py: pip install h5py") from e
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            groups = [k for k in keys if not isinstance(f[k], h5py.Dataset)]
            if groups:
                raise DataError(f"{path}: group key(s) {groups[:3]} (a '/' in a sample id?); "
                                "expected one root dataset per sample")
            rows = [np.asarray(f[k][()]) for k in keys]
    except OSError as e:
        raise DataError(f"{path}: cannot read as HDF5 ({e})") from e
    shapes = sorted({r.shape for r in rows})
    if len(shapes) != 1:
        raise DataError(f"{path}: " + (f"datasets of different shapes {shapes[:3]}" if shapes else "no datasets"))
    return keys, np.stack(rows)


def dns_h5_labels(path: str, keys: Sequence[str], text: np.ndarray, class_path: str) -> Dict[str, np.ndarray]:
    """Labels of an official-cache split: the class prototype equal to each sample's text row, else ImageBind's
    key field `{id}__{name}__tensor(k)`; class names sorted (the official label order), prototypes in that order."""
    if not os.path.isfile(class_path):
        raise DataError(f"{class_path}: file not found (class prototypes, needed for the labels of {path})")
    names, protos = read_h5_rows(class_path)
    if protos.ndim != 2 or protos.shape[1] != text.shape[1]:
        raise DataError(f"{class_path}: prototypes have shape {list(protos.shape)}, expected [C, {text.shape[1]}]")
    t, c = text.astype(np.float64), protos.astype(np.float64)
    dist2 = (t * t).sum(1)[:, None] - 2 * t @ c.T + (c * c).sum(1)[None]
    label = dist2.argmin(1)
    dist = np.sqrt(np.maximum(dist2[np.arange(len(t)), label], 0.0))
    if not (dist <= 1e-3 * np.linalg.norm(c[label], axis=1)).all():
        fields = [k.rsplit("__", 2) for k in keys]
        if any(len(f) != 3 or f[1] not in names for f in fields):
            raise DataError(f"{path}: cannot recover labels: text rows match no class prototype of {class_path} "
                            "and the keys carry no known class name (ImageBind keys '{id}__{name}__tensor(k)')")
        label = np.array([names.index(f[1]) for f in fields])
    return {"label": label.astype(np.int64), "class_names": np.array(names), "class_text": protos}


def load_dns_h5_split(path: str, ds: str, needed: Sequence[str], class_path: str) -> dict:
    """Read and validate one split of the official CMCL cache (`{ds}_{split}_{backbone}.h5`): sorted sample keys,
    value [n_modalities, d] with rows = the dataset's modalities in the global order (DNS_DATASETS[ds][0])."""
    if ds not in DNS_DATASETS:
        raise DataError(f"{path}: dataset '{ds}' is none of the official datasets ({', '.join(DNS_DATASETS)}), "
                        "so its row order is unknown; convert it to .npz")
    keys, x = read_h5_rows(path)
    mods = DNS_DATASETS[ds][0]
    if x.ndim != 3 or x.shape[1] != len(mods):
        raise DataError(f"{path}: samples have shape {list(x.shape[1:])}, expected [{len(mods)}, d] (rows {mods})")
    z = {m: x[:, i] for i, m in enumerate(mods)}
    if ds in DNS_H5_LABELLED:  # nyudv2 skipped: its step has no text side and its class file may hold vision rows
        z.update(dns_h5_labels(path, keys, z["text"], class_path))
    return check_dns_arrays(path, z, needed)


def load_dns_features(data_dir: str, steps: Sequence[Tuple[str, str, str]], backbone: Optional[str] = None
                      ) -> Dict[str, dict]:
    """Load every dataset in `steps`, per split `{ds}_{split}.npz`, else the official CMCL cache
    `{ds}_{split}_{backbone}.h5` (+ `{ds}_class_{backbone}.h5`); same layout as the builder."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: --data-dir is not a directory")
    out, dims = {}, {}
    for ds in dict.fromkeys(s[0] for s in steps):
        needed = sorted({m for s in steps if s[0] == ds for m in s[1:]})
        out[ds] = {}
        for split in ("train", "test"):
            where = os.path.join(data_dir, f"{ds}_{split}.npz")
            h5 = os.path.join(data_dir, f"{ds}_{split}_{backbone}.h5")
            if os.path.isfile(where) or not backbone:
                out[ds][split] = load_dns_split(where, needed)
            elif os.path.isfile(h5):
                class_path = os.path.join(data_dir, f"{ds}_class_{backbone}.h5")
                out[ds][split], where = load_dns_h5_split(h5, ds, needed, class_path), h5
            else:
                raise DataError(f"{where}: file not found, nor the official cache file {h5}")
            for m, a in out[ds][split]["feats"].items():
                if dims.setdefault(m, (a.shape[1], where))[0] != a.shape[1]:
                    raise DataError(f"{where}: modality '{m}' has dim {a.shape[1]} but {dims[m][0]} in {dims[m][1]}")
    return out


# ============================================================================= COMET (comet.py)
# Built-in world: pre-extracted feature sequences [N, T, d_m] rendered from shared hidden
# class semantics through one fixed random nonlinear "renderer" per modality.
COMET_DIMS = {"video": 64, "audio": 32, "text": 48, "image": 64, "speech": 40}
COMET_LETTERS = {"V": "video", "A": "audio", "T": "text", "I": "image", "S": "speech"}
COMET_PAIR_CLASSES = {"VT": (0, 12), "AT": (4, 16), "IT": (8, 20)}  # overlapping, never revisited
COMET_ST_CLASSES = (2, 14)  # speech-text (VT -> ST -> AT order): overlaps VT and AT, text stays the bridge
COMET_PAIRS = list(COMET_PAIR_CLASSES) + ["ST"]
COMET_VA_CLASSES = (4, 12)  # the only classes both video and audio ever see (each through text)
COMET_IA_CLASSES = (8, 16)
COMET_N_CLASSES, COMET_D_LAT, COMET_D_STY = 20, 16, 8
_COMET_BASE = ("video", "audio", "text", "image")  # drawn from the world's first stream, in this order


def comet_pair_modalities(name: str) -> List[str]:
    """'vt_train' -> ['video', 'text'] (file/dataset name to its modalities); 'avvp_test' -> ['video', 'audio']."""
    pair = name.split("_")[0].upper()
    return ["video", "audio"] if pair == "AVVP" else [COMET_LETTERS[c] for c in pair]


def comet_world(seed: int, shared: float = 0.3, dom: float = 1.5, hidden: int = 64) -> dict:
    """Class prototypes u_c = s*b + (1-s)*g_c, background/filler prototypes, per-dataset text-domain
    offsets delta_k and one fixed renderer (W1, W2) per modality; all from `seed`. Speech (renderer and the
    ST text domain) comes from its own stream, so the other modalities are the same with or without it."""
    rng = np.random.default_rng([seed, 0])
    d_in = COMET_D_LAT + COMET_D_STY
    world = {
        "proto": (shared * rng.standard_normal(COMET_D_LAT)
                  + (1 - shared) * rng.standard_normal((COMET_N_CLASSES, COMET_D_LAT))),
        "bg": rng.standard_normal(COMET_D_LAT),
        "filler": rng.standard_normal((3, COMET_D_LAT)),
        "domain": {p: dom * rng.standard_normal(COMET_D_STY) for p in COMET_PAIR_CLASSES},
        "render": {},
    }
    for m in _COMET_BASE:
        world["render"][m] = (rng.standard_normal((d_in, hidden)) / np.sqrt(d_in),
                              rng.standard_normal((hidden, COMET_DIMS[m])) / np.sqrt(hidden))
    rng = np.random.default_rng([seed, 0, 1])
    world["render"]["speech"] = (rng.standard_normal((d_in, hidden)) / np.sqrt(d_in),
                                 rng.standard_normal((hidden, COMET_DIMS["speech"])) / np.sqrt(hidden))
    world["domain"]["ST"] = dom * rng.standard_normal(COMET_D_STY)
    return world


def _comet_render(world: dict, rng, m: str, s: np.ndarray, style: np.ndarray) -> np.ndarray:
    """Modality m's features of hidden semantics s [n, T, d_lat] and style [n, 1, d_sty], plus 0.05 noise."""
    n, T = s.shape[:2]
    w1, w2 = world["render"][m]
    h = np.tanh(np.concatenate([s, np.broadcast_to(style, (n, T, COMET_D_STY))], -1) @ w1)
    return (h @ w2 + 0.05 * rng.standard_normal((n, T, w2.shape[1]))).astype(np.float32)


def comet_sample(world: dict, rng, mods: Sequence[str], y: np.ndarray, T: int, sty: float, noise: float,
                 domain: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Paired samples of class y: video/audio get a shared event window (background elsewhere), text is
    caption-like (class token w.p. 0.7 else filler, style 0.3*n + delta_domain), image is static, speech says
    the caption: with speech, one token plan (class or filler per step) is drawn first and both text and speech
    render it, so speech step t carries text token t (speech: noise `noise`, speaker style `sty`).
    A per-pair instance offset (0.5*N(0,I)) is shared by both members, so instance retrieval is possible."""
    n = len(y)
    inst = 0.5 * rng.standard_normal((n, 1, COMET_D_LAT))
    start, length = rng.integers(0, 5, n), rng.integers(5, 11, n)
    t = np.arange(T)[None]
    event = (t >= start[:, None]) & (t < (start + length)[:, None])
    cls = world["proto"][y][:, None] + inst  # [n, 1, d_lat]
    out = {"label": y.astype(np.int64), "event": event}
    plan = None
    if "speech" in mods:  # the caption's token plan, shared by text and speech
        plan = (rng.random((n, T, 1)) < 0.7, world["filler"][rng.integers(0, 3, (n, T))])
    for m in mods:
        eps = rng.standard_normal((n, T, COMET_D_LAT))
        if m in ("video", "audio"):
            s = np.where(event[..., None], cls, world["bg"]) + noise * eps
        elif m == "image":
            s = np.broadcast_to(cls, (n, T, COMET_D_LAT)) + noise * eps
        elif plan is not None:  # text or speech of a speech-text pair
            s = np.where(plan[0], cls, plan[1]) + (noise if m == "speech" else 0.2) * eps
        else:  # text
            filler = world["filler"][rng.integers(0, 3, (n, T))]
            s = np.where(rng.random((n, T, 1)) < 0.7, cls, filler) + 0.2 * eps
        style = rng.standard_normal((n, 1, COMET_D_STY))
        style = 0.3 * style + world["domain"][domain] if m == "text" else sty * style
        out[m] = _comet_render(world, rng, m, s, style)
    return out


def comet_avvp_sample(world: dict, rng, y: np.ndarray, T: int, sty: float, noise: float,
                      lo: int = 0) -> Dict[str, np.ndarray]:
    """AVVP analog for the cross-dataset (AVE -> AVVP) localisation: video/audio pairs of world class y (label
    y - lo) with shorter events (2..5 steps) and modality-specific windows (the audio window shifted by -1..1
    steps), so each modality has its own step labels step_label_video / step_label_audio (-1 = background)."""
    n = len(y)
    inst = 0.5 * rng.standard_normal((n, 1, COMET_D_LAT))
    length = rng.integers(2, min(6, T + 1), n)  # events of 2..5 steps, at most T
    start = rng.integers(0, T - length + 1)
    shift = rng.integers(-1, 2, n)
    t = np.arange(T)[None]
    cls = world["proto"][y][:, None] + inst
    out = {"label": (y - lo).astype(np.int64)}
    for m, s0 in (("video", start), ("audio", np.clip(start + shift, 0, T - length))):
        event = (t >= s0[:, None]) & (t < (s0 + length)[:, None])
        s = np.where(event[..., None], cls, world["bg"]) + noise * rng.standard_normal((n, T, COMET_D_LAT))
        out[m] = _comet_render(world, rng, m, s, sty * rng.standard_normal((n, 1, COMET_D_STY)))
        out[f"step_label_{m}"] = np.where(event, out["label"][:, None], -1)
    return out


def comet_benchmark(seed: int, n_pairs: int = 2000, n_per_class: int = 80, n_test: int = 200, T: int = 10,
                    sty: float = 2.0, noise: float = 0.45, shared: float = 0.3, dom: float = 1.5,
                    speech: bool = False) -> Dict[str, dict]:
    """All COMET datasets, keyed like the npz files: {vt,at,it}_{train,test}, va_{train,test}, ia_test, avvp_test
    (and st_{train,test} with speech). va_* and avvp_test hold 8 balanced classes (labels 0..7, step labels
    -1 = background); each dataset has its own random stream, so changing one size, or adding speech or
    avvp_test, leaves the others unchanged."""
    world = comet_world(seed, shared=shared, dom=dom)
    data = {}
    for i, (pair, (lo, hi)) in enumerate(COMET_PAIR_CLASSES.items()):
        mods = comet_pair_modalities(pair)
        for j, (split, n) in enumerate((("train", n_pairs), ("test", n_test))):
            rng = np.random.default_rng([seed, 1, i, j])
            data[f"{pair.lower()}_{split}"] = comet_sample(world, rng, mods, rng.integers(lo, hi, n),
                                                           T, sty, noise, pair)
    lo, hi = COMET_VA_CLASSES
    for j, split in enumerate(("train", "test")):
        rng = np.random.default_rng([seed, 2, j])
        d = comet_sample(world, rng, ["video", "audio"], rng.permutation(np.repeat(np.arange(lo, hi), n_per_class)),
                         T, sty, noise)
        d["label"] = d["label"] - lo
        d["step_label"] = np.where(d["event"], d["label"][:, None], -1)
        data[f"va_{split}"] = d
    rng = np.random.default_rng([seed, 3])
    data["ia_test"] = comet_sample(world, rng, ["image", "audio"], rng.integers(*COMET_IA_CLASSES, n_test),
                                   T, sty, noise)
    rng = np.random.default_rng([seed, 4])
    data["avvp_test"] = comet_avvp_sample(world, rng, rng.permutation(np.repeat(np.arange(lo, hi), n_per_class)),
                                          T, sty, noise, lo)
    for j, (split, n) in enumerate((("train", n_pairs), ("test", n_test)) if speech else ()):
        rng = np.random.default_rng([seed, 5, j])
        data[f"st_{split}"] = comet_sample(world, rng, ["speech", "text"], rng.integers(*COMET_ST_CLASSES, n),
                                           T, sty, noise, "ST")
    for d in data.values():
        d.pop("event", None)
    return data


COMET_INT_ARRAYS = ("label", "step_label", "step_label_video", "step_label_audio")


def _comet_check_file(path: str, name: str, dims: Dict[str, int], T: Optional[int]) -> Tuple[dict, int]:
    """Read and validate one {pair}_{split}.npz; return (arrays, T)."""
    raw = read_npz(path, hint=f"expected arrays {comet_pair_modalities(name)} of shape [N, T, d]")
    out, n = {}, None
    for m in comet_pair_modalities(name):
        if m not in raw:
            raise DataError(f"{path}: missing array '{m}' (found: {sorted(raw)})")
        a = raw[m]
        if a.ndim != 3 or not np.issubdtype(a.dtype, np.floating):
            raise DataError(f"{path}: '{m}' must be a float array [N, T, d], got {a.dtype} {a.shape}")
        check_finite(f"{path}: '{m}'", a)
        n = a.shape[0] if n is None else n
        T = a.shape[1] if T is None else T
        if a.shape[0] != n or a.shape[1] != T or a.shape[0] < 2:
            raise DataError(f"{path}: '{m}' has shape {a.shape}; expected N={n} (>= 2) samples and T={T} steps")
        if dims.setdefault(m, a.shape[2]) != a.shape[2]:
            raise DataError(f"{path}: '{m}' has feature dim {a.shape[2]}, other files have {dims[m]}")
        out[m] = a.astype(np.float32)
    for key in COMET_INT_ARRAYS:
        if key in raw:
            a, shape = raw[key], ((n,) if key == "label" else (n, T))
            if a.shape != shape or not np.issubdtype(a.dtype, np.integer):
                raise DataError(f"{path}: '{key}' must be an integer array of shape {shape}, got {a.dtype} {a.shape}")
            if a.min() < (0 if key == "label" else -1):
                raise DataError(f"{path}: '{key}' has negative values (only step labels may use -1 = background)")
            out[key] = a.astype(np.int64)
    return out, T


def load_comet_npz(data_dir: str, pairs: Sequence[str]) -> Dict[str, dict]:
    """Load `{pair}_{split}.npz` from data_dir: {p}_train for every stage pair p and va_train / va_test
    (both with 'label'; 'step_label' [N, T] optional) are required; {vt,at,it,st,ia}_test are optional
    (retrieval is skipped for a missing pair); avvp_test (video, audio, step_label_video, step_label_audio, in
    va_train's label space; needs va_train's step_label) is optional (the AVE -> AVVP localisation).
    Raises DataError naming the file and the problem."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: --data-dir is not a directory")
    dims, T, data = {}, None, {}
    names = [f"{p.lower()}_train" for p in pairs] + ["va_train", "va_test"]
    names += [n for n in ("vt_test", "at_test", "it_test", "st_test", "ia_test", "avvp_test")
              if os.path.isfile(os.path.join(data_dir, n + ".npz"))]
    for name in names:
        path = os.path.join(data_dir, name + ".npz")
        data[name], T = _comet_check_file(path, name, dims, T)
    for name in ("va_train", "va_test"):
        if "label" not in data[name]:
            raise DataError(f"{os.path.join(data_dir, name + '.npz')}: missing array 'label' [N] "
                            "(needed for V<->A classification)")
    n_cls = int(data["va_train"]["label"].max()) + 1
    for name in [n for n in ("va_train", "va_test", "avvp_test") if n in data]:
        d, path = data[name], os.path.join(data_dir, name + ".npz")
        if any(k in d and d[k].max() >= n_cls for k in COMET_INT_ARRAYS):
            raise DataError(f"{path}: labels must lie in 0..{n_cls - 1} (the classes of va_train.npz)")
    if "avvp_test" in data:
        _check_avvp(data, os.path.join(data_dir, "avvp_test.npz"))
    return data


def _check_avvp(data: Dict[str, dict], path: str) -> None:
    """avvp_test needs its two per-modality step labels and va_train's step labels (the head's training set)."""
    for key in ("step_label_video", "step_label_audio"):
        if key not in data["avvp_test"]:
            raise DataError(f"{path}: missing array '{key}' [N, T] (-1 = background)")
    if "step_label" not in data["va_train"]:
        raise DataError(f"{path}: needs 'step_label' [N, T] in va_train.npz (the localiser is trained on it)")


# ============================================================================= MoDE (mode.py)
# A toy "unified" world: one joint vocabulary of text ids followed by discrete image codes. An image is a
# 4x4 grid of codes (a shape mask filled with a colour code on a background code); captions name colour,
# shape and background; understanding tasks are single-token VQA. Every stream is a dict of int arrays
# tokens [N, L], modality [N, L] (1 from <boi> to <eoi> inclusive, else 0) and loss_mask [N, L] (1 where
# the token is a target, predicted from the prefix; trailing <pad> = 0 with mask 0), the --data-dir format.
# A VQA sequence is <bos> <boi> img <eoi> <sep> <q:task> answer: the task token comes right before the answer.
# World "shared-visual" adds an orientation of the mask that no text names and five tasks about where the
# foreground cells lie (MODE_SV_* below); its text ids extend MODE_TEXT, so every shared word keeps its id.
MODE_COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
MODE_SHAPES = ["circle", "square", "cross", "ring", "bar", "arrow", "heart", "star"]
MODE_BACKGROUNDS = ["white", "sand", "grey", "night"]
MODE_COUNTS = [str(n) for n in range(3, 11)]  # foreground-cell counts of the 8 shape masks
MODE_TASKS = ["scienceqa", "textvqa", "imagenet", "gqa", "vizwiz"]  # the paper's CoIN order
MODE_TEXT = (["<pad>", "<bos>", "<sep>", "<boi>", "<eoi>", "<cap>"] + MODE_COLOURS + MODE_SHAPES + MODE_BACKGROUNDS
             + MODE_COUNTS + ["unanswerable"] + [f"<q:{t}>" for t in MODE_TASKS])
MODE_IMAGE_LO = len(MODE_TEXT)  # image codes: 4 background codes, then 8 colour codes
MODE_VOCAB = MODE_IMAGE_LO + len(MODE_BACKGROUNDS) + len(MODE_COLOURS)
MODE_STREAMS = (["pretrain", "reference_train", "reference_test"]
                + [f"{t}_{s}" for t in MODE_TASKS for s in ("train", "test")])
_MODE_ID = {w: i for i, w in enumerate(MODE_TEXT)}
MODE_ORIENTATIONS = ["identity", "h-flip", "v-flip", "rot180"]  # of the shape mask; named in no caption or prompt
MODE_SV_TASKS = ["top-bottom", "left-right", "top-left", "orientation", "top-row"]  # answers: mode_sv_answer
MODE_SV_TEXT = (MODE_TEXT + ["top", "bottom", "left", "right", "yes", "no"] + MODE_ORIENTATIONS
                + [f"<q:{t}>" for t in MODE_SV_TASKS])
MODE_SV_IMAGE_LO = len(MODE_SV_TEXT)  # the same 12 image codes, after the new words
MODE_SV_VOCAB = MODE_SV_IMAGE_LO + len(MODE_BACKGROUNDS) + len(MODE_COLOURS)
_MODE_SV_ID = {w: i for i, w in enumerate(MODE_SV_TEXT)}
MODE_WORLDS = {"default": (MODE_TASKS, MODE_VOCAB, MODE_IMAGE_LO),  # world -> (tasks, vocab size, first image id)
               "shared-visual": (MODE_SV_TASKS, MODE_SV_VOCAB, MODE_SV_IMAGE_LO)}
MODE_SPECIAL = {"boi_id": _MODE_ID["<boi>"], "eoi_id": _MODE_ID["<eoi>"], "pad_id": _MODE_ID["<pad>"],
                "eos_id": None}  # the --data-dir meta.json keys of the special ids

MODE_MULTI_WORDS = ("it", "is", *map(str, range(10)), "<eos>")  # --answers multi: text ids after MODE_TEXT
MODE_QUESTION_LEN = 21  # built-in VQA: <bos> <boi> 16 codes <eoi> <sep> <q:task>, then the answer

def mode_shape_masks() -> np.ndarray:
    """The 8 fixed 4x4 shape masks [8, 16] (bool), sizes 3..10, pairwise Hamming distance >= 3."""
    rng = np.random.default_rng(1234)  # fixed: the world is the same for every run seed
    masks = []
    while len(masks) < 8:
        m = np.zeros(16, bool)
        m[rng.choice(16, 3 + len(masks), replace=False)] = True
        if all((m != o).sum() >= 3 for o in masks):
            masks.append(m)
    return np.stack(masks)


def mode_orient(masks: np.ndarray) -> np.ndarray:
    """Masks [..., 16] -> [..., 4, 16]: the 4x4 grid as is, mirrored left-right, upside down, turned by 180."""
    g = masks.reshape(*masks.shape[:-1], 4, 4)
    out = np.stack([g, g[..., :, ::-1], g[..., ::-1, :], g[..., ::-1, ::-1]], -3)
    return out.reshape(*masks.shape[:-1], 4, 16)


def _sv_mask_ok(m: np.ndarray, kept: List[np.ndarray]) -> bool:
    g, v = m.reshape(4, 4), mode_orient(m)
    if not (1 <= g[[0, 0, 3, 3], [0, 3, 0, 3]].sum() <= 3 and g[0].any() != g[3].any()):
        return False
    if any((v[i] != v[j]).sum() < 3 for i in range(4) for j in range(i)):
        return False
    return all((v[:, None] != mode_orient(o)[None]).sum(-1).min() >= 3 for o in kept)


def mode_sv_shape_masks() -> np.ndarray:
    """--world shared-visual: the 8 shape masks in the 4 orientations [8, 4, 16] (bool). All 32 are pairwise
    Hamming >= 3; odd sizes (5, 5, 7, 7, 7, 7, 9, 9), so no top/bottom or left/right tie; each shape has 1-3
    foreground corners and foreground in exactly one of rows 0 and 3, so for every shape every task's answer
    depends on the orientation."""
    rng = np.random.default_rng(1234)  # fixed: the world is the same for every run seed
    sizes, masks = (5, 5, 7, 7, 7, 7, 9, 9), []
    while len(masks) < 8:
        m = np.zeros(16, bool)
        m[rng.choice(16, sizes[len(masks)], replace=False)] = True
        if _sv_mask_ok(m, masks):
            masks.append(m)
    return mode_orient(np.stack(masks))


def mode_sv_answer(task: str, c: np.ndarray, s: np.ndarray, o: np.ndarray) -> np.ndarray:
    """--world shared-visual: answer token per sample; each task reads where the foreground cells lie.
    top-bottom: the half (top / bottom) with more foreground cells; left-right: likewise, left / right;
    top-left: is the top-left cell foreground (yes / no); orientation: its name (MODE_ORIENTATIONS);
    top-row: the colour if the top row has a foreground cell, else the shape. No ties: mask sizes are odd."""
    g = mode_sv_shape_masks()[s, o].reshape(-1, 4, 4).astype(int)
    if task == "top-bottom":
        return _mode_words(["bottom", "top"], g[:, :2].sum((1, 2)) > g[:, 2:].sum((1, 2)))
    if task == "left-right":
        return _mode_words(["right", "left"], g[:, :, :2].sum((1, 2)) > g[:, :, 2:].sum((1, 2)))
    if task == "top-left":
        return _mode_words(["no", "yes"], g[:, 0, 0])
    if task == "orientation":
        return _mode_words(MODE_ORIENTATIONS, o)
    if task == "top-row":
        return np.where(g[:, 0].any(1), _mode_words(MODE_COLOURS, c), _mode_words(MODE_SHAPES, s))
    raise DataError(f"unknown MoDE shared-visual task '{task}'")


def mode_answer(task: str, c: np.ndarray, s: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Answer token per sample. Question types differ; answer vocabularies partly overlap."""
    col = np.array([_MODE_ID[w] for w in MODE_COLOURS])[c]
    shp = np.array([_MODE_ID[w] for w in MODE_SHAPES])[s]
    if task == "scienceqa":  # what colour is the object?
        return col
    if task == "textvqa":  # how many foreground cells ("read the number")?
        return np.array([_MODE_ID[w] for w in MODE_COUNTS])[s]
    if task == "imagenet":  # what object class is it?
        return shp
    if task == "gqa":  # compositional: colour on a light background, object class on a dark one
        return np.where(b < 2, col, shp)
    if task == "vizwiz":  # what is the background? unanswerable when it is night
        bg = np.array([_MODE_ID[w] for w in MODE_BACKGROUNDS])[b]
        return np.where(b == 3, _MODE_ID["unanswerable"], bg)
    raise DataError(f"unknown MoDE task '{task}'")


def _mode_images(c, s, b, o=None) -> np.ndarray:
    if o is None:
        masks, lo = mode_shape_masks()[s], MODE_IMAGE_LO
    else:
        masks, lo = mode_sv_shape_masks()[s, o], MODE_SV_IMAGE_LO
    return np.where(masks, lo + 4 + c[:, None], lo + b[:, None])


def _mode_pack(parts: List[np.ndarray], img_at: int, targets: slice, length: int = 24) -> Dict[str, np.ndarray]:
    body = np.concatenate([p if p.ndim == 2 else p[:, None] for p in parts], 1)
    n, l = body.shape
    tokens = np.zeros((n, length), np.int64)
    tokens[:, :l] = body
    modality = np.zeros_like(tokens)
    modality[:, img_at:img_at + 18] = 1  # <boi> 16 codes <eoi>
    loss_mask = np.zeros_like(tokens)
    loss_mask[:, targets] = 1
    return {"tokens": tokens, "modality": modality, "loss_mask": loss_mask}


def _mode_words(names: Sequence[str], idx: np.ndarray) -> np.ndarray:
    """Text ids of names[idx]; MODE_SV_TEXT extends MODE_TEXT, so the ids of the shared words are the same."""
    return np.array([_MODE_SV_ID[w] for w in names])[np.asarray(idx, int)]


def mode_sequences(kind: str, c, s, b, o=None) -> Dict[str, np.ndarray]:
    """Build one stream: kind = 'caption', 't2i' or a task name. Attributes c, s, b are int arrays [N];
    o (orientations, [N]) makes it the shared-visual world (captions and prompts still omit it)."""
    n = len(c)
    bos, boi, eoi, cap, sep = (np.full((n, 1), _MODE_SV_ID[w]) for w in ("<bos>", "<boi>", "<eoi>", "<cap>", "<sep>"))
    img = np.concatenate([boi, _mode_images(c, s, b, o), eoi], 1)
    if kind == "caption":  # <bos> <boi> img <eoi> <cap> <sep> colour shape background
        out = _mode_pack([bos, img, cap, sep, _mode_words(MODE_COLOURS, c), _mode_words(MODE_SHAPES, s),
                          _mode_words(MODE_BACKGROUNDS, b)], 1, slice(21, 24))
    elif kind == "t2i":  # <bos> colour shape <sep> <boi> img <eoi>; targets = the 16 codes
        out = _mode_pack([bos, _mode_words(MODE_COLOURS, c), _mode_words(MODE_SHAPES, s), sep, img], 4, slice(5, 21))
    else:  # <bos> <boi> img <eoi> <sep> <q:task> answer
        answer = mode_answer(kind, c, s, b) if o is None else mode_sv_answer(kind, c, s, o)
        out = _mode_pack([bos, img, sep, np.full((n, 1), _MODE_SV_ID[f"<q:{kind}>"]), answer], 1, slice(21, 22))
    out.update(colour=np.asarray(c), shape=np.asarray(s), background=np.asarray(b))
    if o is not None:
        out["orientation"] = np.asarray(o)
    return out


def make_mode_world(seed: int, n_pretrain: int = 4096, n_train: int = 2048, n_test: int = 512,
                    world: str = "default") -> Dict[str, dict]:
    """All built-in streams of a world (MODE_WORLDS). Pre-training mixes captioning and text-to-image over all
    images; the VQA tasks hold out the attribute combinations with (c + s + b [+ o]) % 4 == 0 for testing:
    default 64 of 256 (colour, shape, background), shared-visual 256 of 1024 (with the orientation)."""
    if world not in MODE_WORLDS:
        raise DataError(f"unknown MoDE world '{world}' (choose from {sorted(MODE_WORLDS)})")
    rng = np.random.default_rng(seed)
    sizes = (8, 8, 4) if world == "default" else (8, 8, 4, 4)  # colour, shape, background [, orientation]

    def draw(n, split=None):
        attrs = [rng.integers(0, k, 8 * n) for k in sizes]
        keep = np.ones(8 * n, bool) if split is None else (sum(attrs) % 4 == 0) == (split == "test")
        return [a[keep][:n] for a in attrs]

    cap, t2i = mode_sequences("caption", *draw(n_pretrain)), mode_sequences("t2i", *draw(n_pretrain))
    out = {"pretrain": {k: np.concatenate([cap[k], t2i[k]]) for k in cap},
           "reference_train": mode_sequences("t2i", *draw(n_train)),
           "reference_test": mode_sequences("t2i", *draw(n_test))}
    for t in MODE_WORLDS[world][0]:
        for split, n in (("train", n_train), ("test", n_test)):
            out[f"{t}_{split}"] = mode_sequences(t, *draw(n, split))
    return out


def mode_read_image(codes: np.ndarray, world: str = "default") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Oracle for generated grids [N, 16] (image ids of the world's vocabulary): (well_formed, colour, shape);
    colour/shape = -1 if malformed. Well-formed = the cells hold exactly one background code and one colour
    code, and the colour cells form one of the 8 shape masks exactly (shared-visual: in any orientation)."""
    if world not in MODE_WORLDS:
        raise DataError(f"unknown MoDE world '{world}' (choose from {sorted(MODE_WORLDS)})")
    variants = mode_shape_masks()[:, None] if world == "default" else mode_sv_shape_masks()  # [8, k, 16]
    masks, n = variants.reshape(-1, 16), len(codes)
    ok, col, shp = np.zeros(n, bool), np.full(n, -1), np.full(n, -1)
    for i, g in enumerate(codes - MODE_WORLDS[world][2]):
        fg, bg = g[g >= 4], g[(g >= 0) & (g < 4)]
        hit = np.where((masks == (g >= 4)).all(1))[0]
        if len(fg) + len(bg) == 16 and len(set(fg)) == 1 and len(set(bg)) == 1 and len(hit) == 1:
            ok[i], col[i], shp[i] = True, fg[0] - 4, hit[0] // variants.shape[1]
    return ok, col, shp


def load_mode_dir(data_dir: str, max_len: int) -> Tuple[dict, Dict[str, dict]]:
    """Read a --data-dir for mode.py: meta.json + one .npz per stream (see mode.py's docstring).
    Returns (meta with image_ids and the special ids, streams); raises DataError naming the file and the problem."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: --data-dir is not a directory")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: cannot read meta.json ({e})") from e
    V, tasks = meta.get("vocab_size"), meta.get("tasks")
    image_ids = _mode_image_ids(meta, meta_path)
    if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
        raise DataError(f"{meta_path}: 'tasks' must be a non-empty list of task names")
    special = {k: meta.get(k) for k in MODE_SPECIAL}
    for k, v in special.items():
        if v is not None and not (isinstance(v, int) and 0 <= v < V and v not in image_ids):
            raise DataError(f"{meta_path}: '{k}' must be a text id in [0, vocab_size) (got {v!r})")
    streams = {}
    for name in (["pretrain", "reference_train", "reference_test"]
                 + [f"{t}_{s}" for t in tasks for s in ("train", "test")]):
        path = os.path.join(data_dir, f"{name}.npz")
        streams[name] = _mode_load_stream(path, V, max_len)
        _mode_check_modality(path, streams[name], image_ids, special)
        _mode_check_ends(path, streams[name], special, name.rsplit("_", 1)[0] in tasks)
    return {"vocab_size": V, "image_token_start": image_ids[0], "tasks": tasks, "image_ids": image_ids,
            **special}, streams


def _mode_image_ids(meta: dict, meta_path: str) -> List[int]:
    """Sorted image ids: image_token_ranges [[lo, hi), ...] (Chameleon's codes lie inside the vocabulary) or,
    in older files, image_token_start (every id >= it)."""
    V, lo, ranges = meta.get("vocab_size"), meta.get("image_token_start"), meta.get("image_token_ranges")
    if ranges is None:
        if not (isinstance(V, int) and isinstance(lo, int) and 0 < lo < V):
            raise DataError(f"{meta_path}: need ints vocab_size and image_token_start "
                            "with 0 < image_token_start < vocab_size (or image_token_ranges)")
        ranges = [[lo, V]]
    ok = isinstance(V, int) and isinstance(ranges, list) and ranges and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r) and 0 < r[0] < r[1] <= V
        for r in ranges)
    if not ok:
        raise DataError(f"{meta_path}: image_token_ranges must be [[lo, hi), ...] with 0 < lo < hi <= vocab_size")
    ids = sorted({i for a, b in ranges for i in range(a, b)})
    if lo is not None and lo != ids[0]:
        raise DataError(f"{meta_path}: image_token_start {lo} is not the first id of image_token_ranges ({ids[0]})")
    return ids


def _mode_check_modality(path: str, st: Dict[str, np.ndarray], image_ids: List[int], special: dict) -> None:
    """With boi_id and eoi_id in meta.json: the modality array must equal the one derived from the ids
    (1 for image ids, <boi> and <eoi>, else 0)."""
    if special["boi_id"] is None or special["eoi_id"] is None:
        return
    derived = np.isin(st["tokens"], image_ids + [special["boi_id"], special["eoi_id"]]).astype(np.int64)
    bad = np.where((derived != st["modality"]).any(1))[0]
    if len(bad):
        raise DataError(f"{path}: row {bad[0]}: 'modality' differs from the one derived from the token ids "
                        "(1 for image ids, boi_id and eoi_id)")


def _mode_check_ends(path: str, st: Dict[str, np.ndarray], special: dict, is_task: bool) -> None:
    """pad_id: no target is a pad. eos_id (answers scored by greedy exact match): every task answer ends with
    its only eos_id target."""
    t, lm = st["tokens"], st["loss_mask"].astype(bool)
    bad = np.where((lm & (t == special["pad_id"])).any(1))[0] if special["pad_id"] is not None else []
    if len(bad):
        raise DataError(f"{path}: row {bad[0]}: a target token is pad_id {special['pad_id']}")
    if special["eos_id"] is None or not is_task:
        return
    last = np.where(lm, np.arange(t.shape[1]), -1).max(1)
    ok = ((lm & (t == special["eos_id"])).sum(1) == 1) & (t[np.arange(len(t)), last] == special["eos_id"])
    if not ok.all():
        raise DataError(f"{path}: row {np.where(~ok)[0][0]}: the answer must end with its only eos_id "
                        f"{special['eos_id']} target")


def mode_multi_answer_world(world: Dict[str, dict]) -> Dict[str, dict]:
    """--answers multi: the built-in world with the MODE_MULTI_WORDS as new text ids (the image codes
    move up by as many) and every VQA answer written `it is <value> <eos>` (counts as two digits; the night
    answer `unanswerable <eos>`), every answer token a target."""
    shift, out = len(MODE_MULTI_WORDS), {}
    for name, st in world.items():
        tokens = np.where(st["tokens"] >= MODE_IMAGE_LO, st["tokens"] + shift, st["tokens"])
        out[name] = dict(st, tokens=tokens)
        if name.rsplit("_", 1)[0] in MODE_TASKS:
            out[name] |= _mode_templated_answers(tokens, st["modality"])
    return out


def _mode_templated_answers(tokens: np.ndarray, modality: np.ndarray) -> Dict[str, np.ndarray]:
    """A VQA stream's question (first MODE_QUESTION_LEN tokens) with its templated answer as the only targets."""
    new = {w: MODE_IMAGE_LO + i for i, w in enumerate(MODE_MULTI_WORDS)}
    q, n = MODE_QUESTION_LEN, len(tokens)
    out = {k: np.zeros((n, q + 5), np.int64) for k in ("tokens", "modality", "loss_mask")}
    out["tokens"][:, :q], out["modality"][:, :q] = tokens[:, :q], modality[:, :q]
    for i, a in enumerate(tokens[:, q]):
        word = MODE_TEXT[a]
        value = [new[d] for d in f"{int(word):02d}"] if word in MODE_COUNTS else [a]
        ans = [a, new["<eos>"]] if word == "unanswerable" else [new["it"], new["is"], *value, new["<eos>"]]
        out["tokens"][i, q:q + len(ans)], out["loss_mask"][i, q:q + len(ans)] = ans, 1
    return out


def export_mode_world(out_dir: str, seed: int = 0, n_pretrain: int = 4096, n_train: int = 2048,
                      n_test: int = 512) -> None:
    """Write the built-in world as a --data-dir (with the image id range and the special ids)."""
    os.makedirs(out_dir, exist_ok=True)
    meta = {"vocab_size": MODE_VOCAB, "image_token_start": MODE_IMAGE_LO,
            "image_token_ranges": [[MODE_IMAGE_LO, MODE_VOCAB]], "tasks": MODE_TASKS,
            **{k: v for k, v in MODE_SPECIAL.items() if v is not None}}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    for name, st in make_mode_world(seed, n_pretrain, n_train, n_test).items():
        np.savez(os.path.join(out_dir, f"{name}.npz"), **{k: st[k] for k in ("tokens", "modality", "loss_mask")})


def _mode_load_stream(path: str, V: int, max_len: int) -> Dict[str, np.ndarray]:
    d = read_npz(path, hint="expected arrays tokens, modality, loss_mask")
    for k in ("tokens", "modality", "loss_mask"):
        if k not in d:
            raise DataError(f"{path}: missing array '{k}' (has {sorted(d)})")
        if d[k].ndim != 2 or not np.issubdtype(d[k].dtype, np.integer):
            raise DataError(f"{path}: '{k}' must be an int array [N, L], got {d[k].dtype} {list(d[k].shape)}")
    t, m, lm = d["tokens"], d["modality"], d["loss_mask"]
    if not (t.shape == m.shape == lm.shape) or t.shape[0] == 0:
        raise DataError(f"{path}: tokens/modality/loss_mask must share one non-empty shape, got "
                        f"{list(t.shape)}, {list(m.shape)}, {list(lm.shape)}")
    if t.shape[1] > max_len:
        raise DataError(f"{path}: sequence length {t.shape[1]} exceeds --max-len {max_len}")
    if t.min() < 0 or t.max() >= V:
        raise DataError(f"{path}: token ids out of range [{t.min()}, {t.max()}] for vocab_size {V}")
    for k, a in (("modality", m), ("loss_mask", lm)):
        if not np.isin(a, (0, 1)).all():
            raise DataError(f"{path}: '{k}' must hold only 0/1")
    if lm[:, 0].any() or (lm.sum(1) == 0).any():
        raise DataError(f"{path}: every row needs >= 1 target and position 0 cannot be a target (loss_mask)")
    return {"tokens": t.astype(np.int64), "modality": m.astype(np.int64), "loss_mask": lm.astype(np.int64)}
