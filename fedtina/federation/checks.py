"""The server's gate for heads that clients upload to the zoo: a head only joins the zoo (and so Tina's training
data) when it is well-formed and at least about as good as the selection head on the server's own held-out images.

Cheap checks run first (names, dtype, size, shape, finiteness, row norms); the accuracy check runs last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtina.errors import FedtinaError
from fedtina.federation.client_ops import align_head, head_accuracy, to_positions
from fedtina.heads import Head


@dataclass
class HeadCheckConfig:
    max_row_norm_ratio: float = 10.0  # vs the mean row norm of plausible heads (the zoo's)
    max_acc_drop: float = 0.15        # below selection on the server's held-out features
    max_bytes: int = 1_000_000


@dataclass
class CheckResult:
    accepted: bool
    reason: str                       # "ok" when accepted, else what is wrong
    acc: float | None                 # the head's accuracy on the server's held-out features (None: not reached)
    reference_acc: float | None       # the reference (selection) head's accuracy there


def _refuse(reason: str, acc: float | None = None, ref: float | None = None) -> CheckResult:
    return CheckResult(False, reason, acc, ref)


def head_nbytes(head: Head) -> int:
    """Payload size of a head: its arrays plus its class names (UTF-8)."""
    names = sum(len(n.encode()) for n in head.class_names)
    return int(np.asarray(head.weight).nbytes + np.asarray(head.bias).nbytes + names)


def server_val_data(features: np.ndarray, labels: np.ndarray, server_val_idx: np.ndarray,
                    class_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The server's held-out images of `class_ids`: (features float32 [n, d], labels = positions in `class_ids`)."""
    idx = np.asarray(server_val_idx, dtype=np.int64)
    idx = idx[np.isin(np.asarray(labels)[idx], np.asarray(class_ids, dtype=np.int64))]
    x = np.asarray(features[idx], dtype=np.float32)
    return x, to_positions(np.asarray(labels)[idx], tuple(class_ids))


def check_head(head: Head, expected_names: tuple[str, ...], feature_dim: int, reference: Head,
               val_x: np.ndarray, val_y: np.ndarray, reference_row_norm: float, cfg: HeadCheckConfig) -> CheckResult:
    """Accept or refuse an uploaded head (see the module docstring). `val_y` are positions in `expected_names`;
    `reference` is the selection head for the same classes (any order). With no held-out image the accuracy check
    is skipped (acc None). Bad *server-side* inputs (reference, norm) raise FedtinaError rather than refuse."""
    expected = tuple(expected_names)
    if reference_row_norm <= 0 or not np.isfinite(reference_row_norm):
        raise FedtinaError(f"reference_row_norm={reference_row_norm}: must be a positive finite number")
    names = tuple(head.class_names)
    if len(set(names)) != len(names) or sorted(names) != sorted(expected):
        return _refuse(f"class set mismatch: head has {list(names)}, expected {list(expected)}")
    weight, bias = head.weight, head.bias
    if not isinstance(weight, np.ndarray) or not isinstance(bias, np.ndarray):
        return _refuse(f"weight/bias are {type(weight).__name__}/{type(bias).__name__}, not numpy arrays")
    if weight.dtype != np.float32 or bias.dtype != np.float32:
        return _refuse(f"dtype {weight.dtype}/{bias.dtype}, expected float32")
    nbytes = head_nbytes(head)
    if nbytes > cfg.max_bytes:
        return _refuse(f"oversized: {nbytes} bytes > max_bytes={cfg.max_bytes}")
    want = (len(expected), int(feature_dim))
    if weight.shape != want or bias.shape != (len(expected),):
        return _refuse(f"wrong shape: weight {weight.shape}, bias {bias.shape}; expected {want} and ({want[0]},)")
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        return _refuse("non-finite values (NaN or inf) in weight or bias")
    ratio = float(np.linalg.norm(weight, axis=1).max()) / reference_row_norm
    if ratio > cfg.max_row_norm_ratio:
        return _refuse(f"implausible row norm: largest row is {ratio:.2f}x the generic head's mean row norm "
                       f"(max_row_norm_ratio={cfg.max_row_norm_ratio})")
    if len(val_y) == 0:
        return CheckResult(True, "ok (no held-out images for these classes; accuracy not checked)", None, None)
    aligned = align_head(head, expected, feature_dim)
    ref = align_head(reference, expected, feature_dim)
    acc, ref_acc = head_accuracy(aligned, val_x, val_y), head_accuracy(ref, val_x, val_y)
    if acc < ref_acc - cfg.max_acc_drop:
        return _refuse(f"poor accuracy on the server's held-out images: {acc:.3f} vs reference {ref_acc:.3f} "
                       f"(max_acc_drop={cfg.max_acc_drop})", acc, ref_acc)
    return CheckResult(True, "ok", acc, ref_acc)
