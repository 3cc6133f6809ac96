"""Small dataset builders and loaders: the built-in synthetic benchmarks and the real-feature readers.

Leaf functions only. Every loader raises DataError with a message that names the file and the problem;
the method scripts turn it into a clear error and exit code 2 before anything is written.
"""

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
# Norm of the stored (raw) backbone features per modality (spec 1.1): ImageBind/UniBind scale the
# L2-normalised outputs by a per-modality logit scale; LanguageBind multiplies non-text by exp(logit_scale).
_IB_SCALE = {"vision": 1.0, "video": 1.0, "tactile": 1.0, "text": 100.0, "audio": 20.0, "depth": 5.0, "thermal": 10.0}
_LB_SCALE = {m: (1.0 if m == "text" else 100.0) for m in _IB_SCALE}
DNS_FEATURE_SCALE = {"imagebind": _IB_SCALE, "languagebind": _LB_SCALE, "unibind": _IB_SCALE}


# ============================================================================= COMET (comet.py)


# ============================================================================= MoDE (mode.py)
