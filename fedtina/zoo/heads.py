"""Linear classification heads on frozen features: the object Tina generates and clients use.

Besides the `Head` itself this module trains heads on frozen backbone features, many at once:

* `finetune_heads`       fine-tune from given rows (zoo heads, clients, Tina+ft), L2 pull toward the initial rows
* `train_scratch_heads`  the same from zero rows and without the pull (the `scratch` baseline)
* `oracle_heads`         per-task hyper-parameters picked on an inner hold-out of the task's own images, then a refit
* `selection_head`       the generic model's rows for the task's classes (nearest seen name for a class without
                         one: unseen, or novel: held out of the generic model)
* `imprint_rows`         class-mean rows (imprinting, Qi et al. 2018), alone
* `RowScale`, `imprint_missing`, `mixed_head`  imprinted rows centred and scaled to stand beside trained rows in one
                         head: for the classes without a trained row (unseen, novel) beside the rows of the others

Every trainer packs all tasks into one padded tensor (tasks padded to the same number of classes and samples, with
masks) and runs full-batch Adam with a closed-form gradient, so hundreds of heads train in seconds on a CPU. The
objective is a *sum* of independent per-task objectives and Adam is element-wise, so a head comes out the same
whether it is trained alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from fedtina.config import HeadTrainConfig
from fedtina.device import pick_device
from fedtina.errors import FedtinaError, LabelSetError, UnknownClassError

TaskData = tuple[np.ndarray, np.ndarray]          # (features float [n, d], labels int [n] = positions 0..k-1)
NameEmbeddings = Callable[[list[str]], np.ndarray] | Mapping[str, np.ndarray]

# Largest padded feature tensor [tasks, samples, d] one batch may hold (float32 elements, 256 MiB); more tasks are
# trained chunk by chunk, which does not change the result since tasks are independent.
MAX_BATCH_ELEMENTS = 1 << 26

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


@dataclass(frozen=True)
class Head:
    """A personalized classifier head: one row (and bias) per class, in logit order."""

    class_names: tuple[str, ...]
    weight: np.ndarray   # float32 [k, d]
    bias: np.ndarray     # float32 [k]

    @property
    def k(self) -> int:
        return len(self.class_names)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight.T + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted positions 0..k-1 (in `class_names` order)."""
        return np.argmax(self.logits(features), axis=1)

    def params(self) -> dict[str, np.ndarray]:
        return {"head.weight": self.weight, "head.bias": self.bias}


# ----------------------------------------------------------------------------------------------------------------
# validation


def _check_head(head: Head, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The head's (weight, bias) as float32, after checking shapes against its class names."""
    w, b = np.asarray(head.weight, dtype=np.float32), np.asarray(head.bias, dtype=np.float32)
    k = len(head.class_names)
    if k == 0:
        raise LabelSetError(f"{where}: the head has no classes")
    if len(set(head.class_names)) != k:
        raise LabelSetError(f"{where}: duplicated class names in {list(head.class_names)}")
    if w.ndim != 2 or w.shape[0] != k or b.shape != (k,):
        raise FedtinaError(f"{where}: head with k={k} classes needs weight [k, d] and bias [k], "
                           f"got weight {w.shape} and bias {b.shape}")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise FedtinaError(f"{where}: head parameters contain NaN or inf")
    return w, b


def _check_data(where: str, k: int, d: int, feats, labels) -> TaskData:
    """(features float32 [n, d], labels int64 [n]) after checking them against a head with k classes of width d."""
    x = np.asarray(feats, dtype=np.float32)
    y = np.asarray(labels)
    if x.ndim != 2 or x.shape[0] == 0:
        raise FedtinaError(f"{where}: features must be a non-empty [n, d] array, got shape {x.shape}")
    if x.shape[1] != d:
        raise FedtinaError(f"{where}: features have d={x.shape[1]} but the head's rows have d={d}")
    if y.ndim != 1 or len(y) != len(x):
        raise FedtinaError(f"{where}: {len(x)} feature rows but labels of shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise FedtinaError(f"{where}: labels must be integers (positions 0..k-1), got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= k:
        raise LabelSetError(f"{where}: labels must be positions 0..{k - 1} for a head with k={k} classes, "
                            f"got labels in [{y.min()}, {y.max()}]")
    if not np.isfinite(x).all():
        raise FedtinaError(f"{where}: features contain NaN or inf")
    return x, y.astype(np.int64)


def _check_tasks(inits: Sequence[Head], data: Sequence[TaskData]) -> tuple[list, list, list[TaskData]]:
    """Validated float32 weights, biases and data of every task; errors name the task index."""
    if len(inits) != len(data):
        raise FedtinaError(f"{len(inits)} initial heads but {len(data)} (features, labels) pairs: need one per task")
    weights, biases, checked = [], [], []
    d = None
    for i, (head, task) in enumerate(zip(inits, data)):
        w, b = _check_head(head, f"task {i}")
        if d is not None and w.shape[1] != d:
            raise FedtinaError(f"task {i}: head rows have d={w.shape[1]}, task 0 has d={d}; all tasks share one d")
        d = w.shape[1]
        if not isinstance(task, (tuple, list)) or len(task) != 2:
            raise FedtinaError(f"task {i}: data must be a (features, labels) pair")
        checked.append(_check_data(f"task {i}", head.k, d, *task))
        weights.append(w)
        biases.append(b)
    return weights, biases, checked


def accuracy(head: Head, feats: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of `head` on features whose labels are positions 0..k-1 in the head's class order."""
    w, _ = _check_head(head, "accuracy")
    x, y = _check_data("accuracy", head.k, w.shape[1], feats, labels)
    return float(np.mean(head.predict(x) == y))


# ----------------------------------------------------------------------------------------------------------------
# the batched trainer
#
# Shapes: T tasks, R replicas per task (hyper-parameter settings trained side by side on the same features: the
# oracle's grid; R = 1 otherwise), K classes (padded), N samples (padded), d feature width. Rows of all replicas go
# through one bmm with the task's features, so R settings cost little more than one (features are read once).


@dataclass
class _Packed:
    """Tasks padded to one tensor: padded class rows are masked out of the softmax, padded samples weigh 0."""

    xt: torch.Tensor      # [T, d, N] features, transposed (class-major logits [T, K, N] are ~2x faster on CPU)
    y: torch.Tensor       # [T, N] long labels (0 on padding)
    sw: torch.Tensor      # [T, N] sample weight: 1/n_t on real samples, 0 on padding
    row_ok: torch.Tensor  # [T, K] bool: real class rows
    w0: torch.Tensor      # [T, K, d] initial rows (0 on padding)
    b0: torch.Tensor      # [T, K]
    ragged: bool          # some task has fewer than K classes: only then do logits need the row mask


def _pack(weights: list[np.ndarray], biases: list[np.ndarray], data: list[TaskData], device) -> _Packed:
    t, d = len(weights), weights[0].shape[1]
    kmax, nmax = max(len(b) for b in biases), max(len(y) for _, y in data)
    x = np.zeros((t, d, nmax), np.float32)
    y = np.zeros((t, nmax), np.int64)
    sw = np.zeros((t, nmax), np.float32)
    row_ok = np.zeros((t, kmax), bool)
    w0 = np.zeros((t, kmax, d), np.float32)
    b0 = np.zeros((t, kmax), np.float32)
    for i, (w, b, (xi, yi)) in enumerate(zip(weights, biases, data)):
        n, k = len(yi), len(b)
        x[i, :, :n], y[i, :n], sw[i, :n] = xi.T, yi, 1.0 / n
        row_ok[i, :k], w0[i, :k], b0[i, :k] = True, w, b
    as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return _Packed(as_t(x), as_t(y), as_t(sw), as_t(row_ok), as_t(w0), as_t(b0), not row_ok.all())


def _logits(p: _Packed, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """w [T, R, K, d], b [T, R, K] -> logits [T, R, K, N], -inf on padded class rows."""
    t, r, k, d = w.shape
    z = torch.baddbmm(b.reshape(t, r * k, 1), w.reshape(t, r * k, d), p.xt).view(t, r, k, -1)
    return z.masked_fill(~p.row_ok[:, None, :, None], float("-inf")) if p.ragged else z


def _label_index(p: _Packed, r: int) -> torch.Tensor:
    return p.y[:, None, None, :].expand(-1, r, 1, -1)


def _objective(p: _Packed, w, b, l2, wd) -> torch.Tensor:
    """Sum over tasks and replicas of: mean CE + l2 * (||W-W0||^2 + ||b-b0||^2) + wd * ||W||^2 (l2, wd: [T, R]).
    The reference that `_grad` differentiates in closed form."""
    logp = torch.log_softmax(_logits(p, w, b), 2)
    ce = -(logp.gather(2, _label_index(p, w.shape[1]))[:, :, 0] * p.sw[:, None]).sum(-1)
    pull = ((w - p.w0[:, None]) ** 2).sum((2, 3)) + ((b - p.b0[:, None]) ** 2).sum(2)
    return (ce + l2 * pull + wd * (w ** 2).sum((2, 3))).sum()


def _grad(p: _Packed, w, b, pull: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradient of `_objective` ((softmax - onehot) / n); cheaper than autograd. Padded rows get 0.
    pull = `_pull_terms(...)`: the regulariser's gradient is c_w * w - a_w (weights) and c_b * b - a_b (bias)."""
    t, r, k, d = w.shape
    c_w, a_w, c_b, a_b = pull
    g = torch.softmax(_logits(p, w, b), 2)
    g.scatter_add_(2, _label_index(p, r), torch.full_like(g[:, :, :1], -1.0))
    g.mul_(p.sw[:, None, None, :])
    gw = torch.bmm(g.view(t, r * k, -1), p.xt.transpose(1, 2)).view(t, r, k, d).addcmul_(c_w, w).sub_(a_w)
    gb = g.sum(3).addcmul_(c_b, b).sub_(a_b)
    return gw, gb


def _pull_terms(p: _Packed, l2, wd) -> tuple[torch.Tensor, ...]:
    """d/dw [l2 ||w-w0||^2 + wd ||w||^2] = 2(l2+wd) w - 2 l2 w0, and for the bias 2 l2 b - 2 l2 b0; constant parts
    precomputed once per fit."""
    c_w = (2 * (l2 + wd))[..., None, None]
    return c_w, 2 * l2[..., None, None] * p.w0[:, None], 2 * l2[..., None], 2 * l2[..., None] * p.b0[:, None]


def _fit(p: _Packed, lr, l2, wd, steps, snapshots: Sequence[int] = ()) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Full-batch Adam (the update of torch.optim.Adam) from the packed initial rows, for every (task, replica).

    lr, l2, wd: float [T, R]; steps: int [T, R], a replica stops moving after its steps. Returns rows w [T, R, K, d]
    and b [T, R, K] after each step count in `snapshots` (0 = the initial rows), and the final ones under key -1.
    """
    r = lr.shape[1]
    w = p.w0[:, None].expand(-1, r, -1, -1).clone()
    b = p.b0[:, None].expand(-1, r, -1).clone()
    mw, vw, mb, vb = (torch.zeros_like(a) for a in (w, w, b, b))
    (b1, b2) = _ADAM_BETAS
    pull = _pull_terms(p, l2, wd)
    out = {0: (w.clone(), b.clone())} if 0 in snapshots else {}
    for step in range(1, max(int(steps.max()), *snapshots, 0) + 1):
        gw, gb = _grad(p, w, b, pull)
        rate = -lr * (steps >= step) / (1 - b1 ** step)
        for par, grad, m, v, rr in ((w, gw, mw, vw, rate[..., None, None]), (b, gb, mb, vb, rate[..., None])):
            m.lerp_(grad, 1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            par.addcmul_(rr, m.div(v.sqrt().div_((1 - b2 ** step) ** 0.5).add_(_ADAM_EPS)))
        if step in snapshots:
            out[step] = (w.clone(), b.clone())
    out[-1] = (w, b)
    return out


def _evaluate(p: _Packed, w, b) -> tuple[np.ndarray, np.ndarray]:
    """Per (task, replica) accuracy and mean NLL over the real samples: two float arrays [T, R]."""
    z = _logits(p, w, b)
    idx = _label_index(p, w.shape[1])
    hit = (z.argmax(2, keepdim=True) == idx)[:, :, 0].float()
    nll = -torch.log_softmax(z, 2).gather(2, idx)[:, :, 0]
    sw = p.sw[:, None]
    return (hit * sw).sum(-1).cpu().numpy(), (nll * sw).sum(-1).cpu().numpy()


def _chunks(data: Sequence[TaskData], width: int) -> list[np.ndarray]:
    """Task indices in groups whose padded tensors ([tasks, samples, width], width = max(d, R*K)) hold at most
    MAX_BATCH_ELEMENTS; tasks sorted by size so a group pads little."""
    order = np.argsort([len(y) for _, y in data], kind="stable")
    groups, cur, nmax = [], [], 0
    for i in order:
        n = len(data[i][1])
        if cur and (len(cur) + 1) * max(nmax, n) * width > MAX_BATCH_ELEMENTS:
            groups.append(np.array(cur))
            cur, nmax = [], 0
        cur.append(i)
        nmax = max(nmax, n)
    return groups + [np.array(cur)] if cur else groups


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else pick_device(device or "auto")


def _to_head(init: Head, w: torch.Tensor, b: torch.Tensor) -> Head:
    k = init.k
    return Head(tuple(init.class_names), w[:k].cpu().numpy().copy(), b[:k].cpu().numpy().copy())


def _train(inits, weights, biases, data, cfgs: Sequence[HeadTrainConfig], device) -> list[Head]:
    """Train task i with its own cfgs[i], chunk by chunk (one replica per task); heads in input order."""
    dev = _device(device)
    out: list[Head | None] = [None] * len(inits)
    kmax = max(len(b) for b in biases)
    for idx in _chunks(data, max(weights[0].shape[1], kmax)):
        p = _pack([weights[i] for i in idx], [biases[i] for i in idx], [data[i] for i in idx], dev)
        col = lambda attr, dt=torch.float32: torch.tensor(  # noqa: E731
            [[getattr(cfgs[i], attr)] for i in idx], dtype=dt, device=dev)
        w, b = _fit(p, col("lr"), col("l2_to_init"), col("weight_decay"), col("steps", torch.int64))[-1]
        for j, i in enumerate(idx):
            out[i] = _to_head(inits[i], w[j, 0], b[j, 0])
    return out  # type: ignore[return-value]


def finetune_heads(inits: Sequence[Head], data: Sequence[TaskData], cfg: HeadTrainConfig,
                   device: str | torch.device | None = None) -> list[Head]:
    """Fine-tune many heads at once on frozen features.

    inits[i] gives task i's class names (logit order) and starting rows; data[i] = (features [n_i, d], labels [n_i]
    as positions 0..k_i-1). k_i and n_i may differ across tasks. Objective per task: mean cross-entropy
    + cfg.l2_to_init * (||W-W0||^2 + ||b-b0||^2) + cfg.weight_decay * ||W||^2, full-batch Adam, cfg.steps steps,
    constant cfg.lr. device: None/"auto" -> CUDA when present.
    """
    weights, biases, checked = _check_tasks(inits, data)
    if cfg.steps < 0 or cfg.lr < 0 or cfg.l2_to_init < 0 or cfg.weight_decay < 0:
        raise FedtinaError(f"head training needs steps, lr, l2_to_init, weight_decay >= 0, got {cfg}")
    if not inits:
        return []
    return _train(inits, weights, biases, checked, [cfg] * len(inits), device)


def train_scratch_heads(class_names_list: Sequence[Sequence[str]], data: Sequence[TaskData], cfg: HeadTrainConfig,
                        d: int, device: str | torch.device | None = None) -> list[Head]:
    """The `scratch` baseline: heads trained from zero rows (softmax regression is convex, so zero is a fine start)
    with cfg.steps/lr/weight_decay and no pull toward any init (cfg.l2_to_init is ignored)."""
    inits = [Head(tuple(names), np.zeros((len(names), d), np.float32), np.zeros(len(names), np.float32))
             for names in class_names_list]
    return finetune_heads(inits, data, HeadTrainConfig(steps=cfg.steps, lr=cfg.lr, l2_to_init=0.0,
                                                       weight_decay=cfg.weight_decay), device)


# ----------------------------------------------------------------------------------------------------------------
# oracle: per-task hyper-parameters from an inner hold-out split of the task's own training images


@dataclass(frozen=True)
class OracleGrid:
    """Candidates of the oracle's search: every (lr, l2_to_init) pair is a replica of one batched run and every
    step count a checkpoint of it (constant-lr Adam), so the whole grid costs a few plain fine-tunes. 0 steps (keep
    the initial rows) is a candidate, and so is the base config's (steps, lr, l2_to_init) (always added)."""

    steps: tuple[int, ...] = (0, 10, 25, 50, 100, 200)
    lr: tuple[float, ...] = (0.02, 0.1)         # with the step checkpoints: Adam moves ~lr*steps, 0.2 .. 20
    l2_to_init: tuple[float, ...] = (0.0, 1e-2, 1e-1)


def stratified_split(labels: np.ndarray, val_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train idx, val idx): per class round(val_fraction * n_c) images to val, but >= 1 when n_c >= 2 and always
    >= 1 left for training (a class with one image stays in train)."""
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(max(int(round(val_fraction * len(idx))), 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _grid_points(grid: OracleGrid, base: HeadTrainConfig) -> tuple[list[tuple[float, float]], list[int]]:
    """(lr, l2) replicas, base first (so ties go to the plain fine-tune), and the sorted step checkpoints."""
    pairs = [(base.lr, base.l2_to_init)] + [(lr, l2) for lr in grid.lr for l2 in grid.l2_to_init]
    return list(dict.fromkeys(pairs)), sorted(set(grid.steps) | {base.steps})


def oracle_search(inits: Sequence[Head], data: Sequence[TaskData], base_cfg: HeadTrainConfig,
                  grid: OracleGrid = OracleGrid(), val_fraction: float = 0.3, seed: int = 0,
                  device: str | torch.device | None = None, repeats: int = 3,
                  criterion: str = "nll") -> list[HeadTrainConfig]:
    """Per task, the (steps, lr, l2_to_init) with the best held-out score, averaged over `repeats` stratified inner
    splits of the task's own training data (val_fraction held out each time; repeats smooth the noise of small
    hold-outs). criterion "acc": mean accuracy, ties broken by mean NLL; "nll": mean NLL; remaining ties go to the
    earlier candidate (base_cfg comes first). All candidates, splits and tasks train in one batched run.
    weight_decay stays base_cfg's. A task too small to hold out anything (one image per class) keeps its initial
    rows (0 steps): with nothing to check a fine-tune against, moving is a gamble (measured on the embedded data's
    ID tasks with 1 shot per class: base_cfg's 10 steps lost 5.5 points against the received head)."""
    weights, biases, checked = _check_tasks(inits, data)
    if not 0.0 < val_fraction < 1.0:
        raise FedtinaError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not (grid.steps and grid.lr and grid.l2_to_init) or min(grid.steps) < 0:
        raise FedtinaError(f"oracle grid needs non-empty steps (>= 0), lr and l2_to_init, got {grid}")
    if repeats < 1 or criterion not in ("acc", "nll"):
        raise FedtinaError(f"oracle needs repeats >= 1 and criterion 'acc' or 'nll', got {repeats}, {criterion!r}")
    pairs, steps = _grid_points(grid, base_cfg)
    # one packed "job" per (task, repeat): train part, val part, the task's initial rows
    jobs = [(i, *stratified_split(checked[i][1], val_fraction, np.random.default_rng([seed, i, rep])))
            for i in range(len(inits)) for rep in range(repeats)]
    jobs = [(i, tr, va) for i, tr, va in jobs if len(va)]
    train = [(checked[i][0][tr], checked[i][1][tr]) for i, tr, _ in jobs]
    val = [(checked[i][0][va], checked[i][1][va]) for i, _, va in jobs]
    owner = np.array([i for i, _, _ in jobs], int)
    acc = np.zeros((len(inits), len(pairs) * len(steps)))
    nll = np.zeros_like(acc)
    dev, r = _device(device), len(pairs)
    rep = lambda col, n, dt=torch.float32: torch.tensor([col] * n, dtype=dt, device=dev)  # noqa: E731
    kmax = max((len(b) for b in biases), default=1)
    for idx in _chunks(train, max(weights[0].shape[1], r * kmax)) if jobs else []:
        sub = lambda seq: [seq[owner[j]] for j in idx]  # noqa: E731
        ptr = _pack(sub(weights), sub(biases), [train[j] for j in idx], dev)
        pva = _pack(sub(weights), sub(biases), [val[j] for j in idx], dev)
        n = len(idx)
        snaps = _fit(ptr, rep([lr for lr, _ in pairs], n), rep([l2 for _, l2 in pairs], n),
                     rep([base_cfg.weight_decay] * r, n), rep([max(steps)] * r, n, torch.int64), steps)
        a, l = (np.stack(v, 2).reshape(n, -1) for v in zip(*(_evaluate(pva, *snaps[s]) for s in steps)))
        np.add.at(acc, owner[idx], a / repeats)
        np.add.at(nll, owner[idx], np.nan_to_num(l, nan=np.inf) / repeats)
    best: list[HeadTrainConfig] = [replace(base_cfg, steps=0)] * len(inits)
    order = np.arange(acc.shape[1])
    for i in np.unique(owner):  # candidates (replica, step) flattened
        keys = (order, nll[i], -acc[i]) if criterion == "acc" else (order, nll[i])
        ri, si = divmod(int(np.lexsort(keys)[0]), len(steps))
        best[i] = HeadTrainConfig(steps=steps[si], lr=pairs[ri][0], l2_to_init=pairs[ri][1],
                                  weight_decay=base_cfg.weight_decay)
    return best


def oracle_heads(inits: Sequence[Head], data: Sequence[TaskData], base_cfg: HeadTrainConfig,
                 grid: OracleGrid = OracleGrid(), val_fraction: float = 0.3, seed: int = 0,
                 device: str | torch.device | None = None, repeats: int = 3, criterion: str = "nll") -> list[Head]:
    """The benchmark's upper bound: `oracle_search` picks each task's (steps, lr, l2_to_init) on a held-out part of
    its own training images, then every task is refit on all its training images with its winner, in one batch.
    It sees only the task's training data (never test images)."""
    cfgs = oracle_search(inits, data, base_cfg, grid, val_fraction, seed, device, repeats, criterion)
    weights, biases, checked = _check_tasks(inits, data)
    return _train(inits, weights, biases, checked, cfgs, device) if inits else []


# ----------------------------------------------------------------------------------------------------------------
# selection: the generic model's rows


def generic_rows(bank, class_names: Sequence[str]) -> dict[str, tuple[np.ndarray, np.float32]]:
    """{class name: (row [d], bias)} of the generic head in a FeatureBank (row i = class bank.seen[i]: the seen
    classes less the novel ones, which have no row, as unseen ones); `class_names` maps class ids to names."""
    w, b, seen = np.asarray(bank.generic_weight, np.float32), np.asarray(bank.generic_bias, np.float32), bank.seen
    if w.ndim != 2 or w.shape[0] != len(seen) or b.shape != (len(seen),):
        raise FedtinaError(f"generic head has weight {w.shape} and bias {b.shape} for {len(seen)} seen classes")
    return {class_names[int(c)]: (w[i], b[i]) for i, c in enumerate(seen)}


@dataclass(frozen=True)
class RowScale:
    """Where an imprinted row must sit to stand beside trained rows in one head. Backbone features are ReLU outputs,
    so every class mean points along their common direction, and a raw imprinted row scores high on every image: it
    steals the trained rows' images (measured: `mixed` kept 2% of the seen classes' recall on Caltech-101 OOD tasks).
    An imprinted row is therefore built from the class mean *minus* `center` (the mean feature of the images the
    trained rows were fit on), at the trained rows' mean norm `norm`, with the bias that gives it their mean logit
    `offset` at `center` (SimpleShot's centering, Wang et al. 2019, put on a linear head's scale)."""

    center: np.ndarray
    norm: float
    offset: float

    @classmethod
    def of(cls, weight: np.ndarray, bias: np.ndarray, features: np.ndarray) -> "RowScale":
        """Of trained rows (weight [C, d], bias [C]) and the features [n, d] they were fit on."""
        w, b, x = np.asarray(weight, np.float64), np.asarray(bias, np.float64), np.asarray(features, np.float64)
        if w.ndim != 2 or b.shape != (len(w),) or len(w) == 0 or x.ndim != 2 or x.shape[1] != w.shape[1] or not len(x):
            raise FedtinaError(f"row scale: rows {w.shape}, biases {b.shape} and features {x.shape} do not fit")
        center = x.mean(0)
        return cls(center.astype(np.float32), float(np.linalg.norm(w, axis=1).mean()), float((w @ center + b).mean()))


def generic_scale(bank, backbone_idx: np.ndarray) -> RowScale:
    """The generic head's RowScale, centred on the features of the images it was trained on (`backbone_idx`)."""
    return RowScale.of(bank.generic_weight, bank.generic_bias, np.asarray(bank.features)[np.asarray(backbone_idx)])


def _class_means(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    x, y = np.asarray(x, np.float32), np.asarray(y)
    counts = np.bincount(y, minlength=k)
    if len(counts) > k or (counts[:k] == 0).any():
        raise LabelSetError(f"imprinting needs an image of every class 0..{k - 1}, got counts {counts.tolist()}")
    return np.stack([x[y == c].mean(0) for c in range(k)])


def unit_rows(m: np.ndarray) -> np.ndarray:
    """Each row L2-normalised (a zero row stays zero)."""
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def imprint_rows(x: np.ndarray, y: np.ndarray, k: int, scale: float) -> np.ndarray:
    """Imprinted rows (Qi et al. 2018) for positions 0..k-1 of labels `y`: each class's mean feature, L2-normalised,
    times `scale`: float32 [k, d]. A class without an image has no row to imprint: LabelSetError."""
    return (scale * unit_rows(_class_means(x, y, k))).astype(np.float32)


def centered_rows(x: np.ndarray, y: np.ndarray, k: int, scale: RowScale) -> tuple[np.ndarray, np.ndarray]:
    """Imprinted rows that stand beside trained rows (`RowScale`): (weight [k, d], bias [k]) float32 for positions
    0..k-1 of labels `y`; a class without an image: LabelSetError."""
    w = scale.norm * unit_rows(_class_means(x, y, k) - scale.center)
    return w.astype(np.float32), (scale.offset - w @ scale.center).astype(np.float32)


def imprint_missing(head: Head, missing: Sequence[int], x: np.ndarray, y: np.ndarray, scale: RowScale) -> Head:
    """`head` with the rows at positions `missing` replaced by `centered_rows` of their images (`x`, labels `y` =
    positions in head.class_names; images of the other classes are ignored). Nothing missing: `head` itself."""
    missing = sorted(set(int(j) for j in missing))
    if not missing:
        return head
    y = np.asarray(y)
    keep = np.isin(y, missing)
    pos = np.full(len(head.class_names), -1)
    pos[missing] = np.arange(len(missing))
    w, b = centered_rows(np.asarray(x)[keep], pos[y[keep]], len(missing), scale)
    weight, bias = np.array(head.weight, np.float32), np.array(head.bias, np.float32)
    weight[missing], bias[missing] = w, b
    return Head(head.class_names, weight, bias)


def mixed_head(names: Sequence[str], x: np.ndarray, y: np.ndarray,
               generic_rows: Mapping[str, tuple[np.ndarray, float]], scale: RowScale) -> Head:
    """The generic row and bias of each class that has one, and for the others (unseen, novel) the row imprinted
    from their images (`x`, labels `y` = positions in `names`) on the generic rows' scale (`generic_scale`). Every
    class with a generic row: exactly `selection_head(names, generic_rows)`."""
    names = tuple(names)
    d = len(scale.center)
    rows = [generic_rows.get(n, (np.zeros(d, np.float32), 0.0)) for n in names]
    head = Head(names, np.stack([np.asarray(r, np.float32) for r, _ in rows]),
                np.array([b for _, b in rows], np.float32))
    return imprint_missing(head, [j for j, n in enumerate(names) if n not in generic_rows], x, y, scale)


def _embed(names: list[str], name_embeddings: NameEmbeddings) -> np.ndarray:
    if callable(name_embeddings):
        emb = np.asarray(name_embeddings(names), np.float32)
    else:
        missing = [n for n in names if n not in name_embeddings]
        if missing:
            raise UnknownClassError(f"no name embedding for class(es) {missing}")
        emb = np.stack([np.asarray(name_embeddings[n], np.float32) for n in names])
    if emb.ndim != 2 or len(emb) != len(names):
        raise FedtinaError(f"name embeddings for {len(names)} names have shape {emb.shape}, "
                           f"expected [{len(names)}, dim]")
    return unit_rows(emb)


def selection_head(task_names: Sequence[str], generic_rows: Mapping[str, tuple[np.ndarray, float]],
                   name_embeddings: NameEmbeddings | None = None) -> Head:
    """The `selection` baseline: the generic head's row and bias for each class of the task, in task order.

    generic_rows: {seen class name: (row [d], bias)} (see `generic_rows(bank, names)`).
    name_embeddings: a text encoder (list of names -> [n, dim]) or a {name: vector} dict; used only for classes
    without a generic row (unseen), which take the row of the seen class with the most cosine-similar name.
    Without it, an unseen class raises UnknownClassError.
    """
    names = tuple(task_names)
    if not names:
        raise LabelSetError("selection_head: empty label set")
    if len(set(names)) != len(names):
        raise LabelSetError(f"selection_head: duplicated class names in {list(names)}")
    if not generic_rows:
        raise FedtinaError("selection_head: no generic rows given")
    unseen = [n for n in names if n not in generic_rows]
    source = {n: n for n in names if n in generic_rows}
    if unseen:
        if name_embeddings is None:
            raise UnknownClassError(f"classes {unseen} have no generic row and no name embeddings were given to "
                                    f"find their nearest seen class")
        seen = list(generic_rows)
        emb = _embed(unseen + seen, name_embeddings)
        nearest = np.argmax(emb[: len(unseen)] @ emb[len(unseen):].T, axis=1)
        source.update({n: seen[j] for n, j in zip(unseen, nearest)})
    w = np.stack([np.asarray(generic_rows[source[n]][0], np.float32) for n in names])
    b = np.array([generic_rows[source[n]][1] for n in names], np.float32)
    return Head(names, w, b)


# ----------------------------------------------------------------------------------------------------------------
# the row bank: what uploads give without a generator


@dataclass
class RowBank:
    """Per class name, the mean row (weight and bias) of every uploaded head that held it: the obvious
    non-generative use of uploads. Running sums, so memory is per class name, not per upload. Classes in `skip`
    are never banked (their rows stay the served head's)."""

    sums: dict[str, tuple[np.ndarray, float, int]] = field(default_factory=dict)   # name -> (sum w, sum b, count)
    skip: frozenset[str] = frozenset()

    def add(self, head: Head) -> None:
        for j, name in enumerate(head.class_names):
            if name in self.skip:
                continue
            w, b, n = self.sums.get(name, (0.0, 0.0, 0))
            self.sums[name] = (np.asarray(head.weight[j], np.float64) + w, float(head.bias[j]) + b, n + 1)

    def count(self, name: str) -> int:
        return self.sums.get(name, (None, None, 0))[2]

    def over(self, head: Head) -> Head:
        """`head` with each class's row replaced by its mean uploaded row, where an upload held the class."""
        w, b = np.array(head.weight, np.float32), np.array(head.bias, np.float32)
        for j, name in enumerate(head.class_names):
            if name in self.sums:
                sw, sb, n = self.sums[name]
                w[j], b[j] = sw / n, sb / n
        return Head(head.class_names, w, b)
