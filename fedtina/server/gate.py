"""The server's gate for heads that clients upload to the zoo: a head only joins the zoo (and so Tina's training
data) when it is well-formed, at least about as good as the selection head on the server's own held-out images, and
tells every pair of its classes apart about as well as the server's own heads do.

Cheap checks run first (names, dtype, size, shape, finiteness, row norms); the accuracy checks run last: the mean
accuracy against the selection head, then the per-class check. That one is what catches plausible but harmful heads:
rows permuted under the same names (a label flip) cost only 2/k of the mean accuracy, which a weak reference (unseen
classes) hides. For each pair of classes (a, b) it takes the AUC of the logit difference z_a - z_b between a's and
b's held-out images, and refuses a head whose AUC for some pair falls more than `max_class_drop` below the better of
the selection head's and the sent head's (Tina's, a strong reference for unseen classes). Swapping rows a and b turns
that AUC into 1 - AUC. The AUC is blind to biases (a constant shift of z_a - z_b): honest fine-tuning on a client's
skewed data writes its class prior into the biases, which on the server's balanced images costs a rare class most of
its recall (measured: a per-class recall check refused 22% of honest uploads at a 0.5 drop) but not its AUC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtina.config import NON_NEGATIVE, POSITIVE, bounded
from fedtina.errors import FedtinaError
from fedtina.client.ops import align_head, head_accuracy, to_positions
from fedtina.zoo.heads import Head


@dataclass
class HeadCheckConfig:
    max_row_norm_ratio: float = bounded(10.0, POSITIVE)  # vs the mean row norm of plausible heads (the zoo's)
    max_acc_drop: float = bounded(0.15, NON_NEGATIVE)  # below selection on the server's held-out features
    max_class_drop: float = 0.4       # a class pair's AUC below the better reference's AUC for it
    min_class_images: int = 5         # held-out images each class of a pair needs for the pair to be checked
    max_bytes: int = bounded(1_000_000, POSITIVE)


@dataclass
class CheckResult:
    accepted: bool
    reason: str                       # "ok" when accepted, else what is wrong
    acc: float | None                 # the head's accuracy on the server's held-out features (None: not reached)
    reference_acc: float | None       # the reference (selection) head's accuracy there
    class_drop: float | None = None   # the largest class-pair AUC drop vs the references (None: not reached)


def _refuse(reason: str, acc: float | None = None, ref: float | None = None,
            class_drop: float | None = None) -> CheckResult:
    return CheckResult(False, reason, acc, ref, class_drop)


def head_nbytes(head: Head) -> int:
    """Payload size of a head: its arrays plus its class names (UTF-8)."""
    names = sum(len(n.encode()) for n in head.class_names)
    return int(np.asarray(head.weight).nbytes + np.asarray(head.bias).nbytes + names)


def plausible_row_norm(entries, generic_weight: np.ndarray) -> float:
    """The row norm of a plausible head, for `max_row_norm_ratio`: the mean row norm of the zoo's heads (fine-tuned
    heads have rows several times longer than the generic head's: measured 6x-9x on shapes, so the generic scale
    would refuse the zoo itself); the generic head's mean row norm while the zoo is empty."""
    rows = [np.linalg.norm(np.asarray(e.params["head.weight"], np.float32), axis=1) for e in entries]
    if rows:
        return float(np.concatenate(rows).mean())
    return float(np.linalg.norm(np.asarray(generic_weight), axis=1).mean())


def server_val_data(features: np.ndarray, labels: np.ndarray, server_val_idx: np.ndarray,
                    class_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The server's held-out images of `class_ids`: (features float32 [n, d], labels = positions in `class_ids`)."""
    idx = np.asarray(server_val_idx, dtype=np.int64)
    idx = idx[np.isin(np.asarray(labels)[idx], np.asarray(class_ids, dtype=np.int64))]
    x = np.asarray(features[idx], dtype=np.float32)
    return x, to_positions(np.asarray(labels)[idx], tuple(class_ids))


def pair_aucs(head: Head, x: np.ndarray, y: np.ndarray, checked: np.ndarray) -> np.ndarray:
    """[k, k] matrix, upper triangle: for classes a < b (positions; both `checked`), the AUC with which the logit
    difference z_a - z_b ranks a's images above b's (ties count half); NaN elsewhere. One vectorised pass per class
    a (the server checks every upload: at 100,000 clients a loop over pairs cost ~9 ms a head)."""
    k = len(head.class_names)
    z = x @ np.asarray(head.weight, dtype=np.float32).T + np.asarray(head.bias, dtype=np.float32)
    onehot = (y[:, None] == np.arange(k)).astype(np.float32)                     # [n, k]
    counts = onehot.sum(axis=0)
    out = np.full((k, k), np.nan)
    for a in np.flatnonzero(checked):
        later = np.flatnonzero(checked & (np.arange(k) > a))
        if not len(later):
            continue
        d = z[:, a : a + 1] - z[:, later]                    # [n, m]: z_a - z_b for every image and later b
        mine, theirs = d[y == a], onehot[:, later]            # a's images; who is b's
        wins = (mine[:, None, :] > d[None]) + 0.5 * (mine[:, None, :] == d[None])   # [n_a, n, m]
        out[a, later] = np.einsum("ijm,jm->m", wins, theirs) / (len(mine) * counts[later])
    return out


def _class_check(head: Head, refs: dict[str, Head], x: np.ndarray, y: np.ndarray,
                 cfg: HeadCheckConfig) -> tuple[str | None, float | None]:
    """(why the head fails the per-class check or None, the largest AUC drop over the checked pairs or None). Every
    head is aligned to the same class order; a pair counts once both classes have `min_class_images` held-out
    images."""
    names = head.class_names
    counts = np.bincount(y, minlength=len(names))
    checked = counts >= cfg.min_class_images
    if checked.sum() < 2:
        return None, None
    auc = pair_aucs(head, x, y, checked)
    ref_auc = np.stack([pair_aucs(h, x, y, checked) for h in refs.values()])
    best, source = ref_auc.max(axis=0), ref_auc.argmax(axis=0)
    drop = np.nan_to_num(best - auc, nan=-np.inf)
    a, b = np.unravel_index(int(np.argmax(drop)), drop.shape)
    over = int((drop > cfg.max_class_drop).sum())
    if not over:
        return None, float(drop[a, b])
    more = f"; {over - 1} more pair(s) over the limit" if over > 1 else ""
    return (f"classes {names[a]!r} and {names[b]!r} swapped or confused: on the server's held-out images "
            f"({counts[a]} + {counts[b]}) the head tells them apart with AUC {auc[a, b]:.2f} vs {best[a, b]:.2f} "
            f"under {list(refs)[source[a, b]]}, a drop of {drop[a, b]:.2f} (max_class_drop={cfg.max_class_drop})"
            f"{more}"), float(drop[a, b])


def check_head(head: Head, expected_names: tuple[str, ...], feature_dim: int, reference: Head,
               val_x: np.ndarray, val_y: np.ndarray, reference_row_norm: float, cfg: HeadCheckConfig,
               sent: Head | None = None) -> CheckResult:
    """Accept or refuse an uploaded head (see the module docstring). `val_y` are positions in `expected_names`;
    `reference` is the selection head for the same classes (any order), `sent` the head the server sent this client
    (any order; None: the per-class check uses the selection head alone). With no held-out image the accuracy checks
    are skipped (acc None). Bad *server-side* inputs (reference, norm) raise FedtinaError rather than refuse."""
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
    refs = {"the selection head": ref}
    if sent is not None:
        refs["the head the server sent"] = align_head(sent, expected, feature_dim)
    why, class_drop = _class_check(aligned, refs, val_x, val_y, cfg)
    if why is not None:
        return _refuse(why, acc, ref_acc, class_drop)
    return CheckResult(True, "ok", acc, ref_acc, class_drop)
