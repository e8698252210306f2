"""Tina: layout, network, diffusion, training, generation, checkpoints. Offline, CPU, fake zoo + fake text encoder."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch

from fedtina.config import TinaConfig
from fedtina.errors import CorruptFileError, FedtinaError, LabelSetError
from fedtina.tina.train import _tensor_digest
from fedtina.tina import (
    DDIMSampler,
    DDPMSampler,
    GlobalSegment,
    NoiseSchedule,
    ParamLayout,
    TinaNet,
    TinaTrainer,
    load_checkpoint,
    parse_label_text,
    save_checkpoint,
    train_tina,
    training_loss,
)

D = 16          # feature dim of the fake heads
TEXT_DIM = 32


# ------------------------------------------------------------------ fakes
@dataclass
class FakeEntry:
    class_names: tuple[str, ...]
    params: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    source: str = "fake"


class FakeEncoder:
    """Deterministic random unit vector per (encoder id, name)."""

    def __init__(self, dim: int = TEXT_DIM, id: str = "fake-encoder", template: str = "a photo of a {}.") -> None:
        self.dim, self.id, self.template = dim, id, template
        self.calls: list[list[str]] = []

    def embed_names(self, names: list[str]) -> np.ndarray:
        self.calls.append(list(names))
        out = np.zeros((len(names), self.dim), dtype=np.float32)
        for i, n in enumerate(names):
            seed = int.from_bytes(hashlib.sha256(f"{self.id}|{n}".encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out[i] = v / np.linalg.norm(v)
        return out


def fake_zoo(num_classes: int = 30, num_tasks: int = 200, k_range=(4, 8), noise: float = 0.05, seed: int = 0,
             extra: dict[str, tuple[int, ...]] | None = None):
    """Each class has a fixed "true" row and bias; a task's head = true rows of its classes + small noise."""
    rng = np.random.default_rng(seed)
    names = [f"class {i}" for i in range(num_classes)]
    rows = rng.standard_normal((num_classes, D)).astype(np.float32)
    biases = (0.5 * rng.standard_normal(num_classes)).astype(np.float32)
    entries = []
    for _ in range(num_tasks):
        k = int(rng.integers(k_range[0], k_range[1] + 1))
        idx = rng.choice(num_classes, size=k, replace=False)
        params = {
            "head.weight": rows[idx] + noise * rng.standard_normal((k, D)).astype(np.float32),
            "head.bias": biases[idx] + noise * rng.standard_normal(k).astype(np.float32),
        }
        for name, shape in (extra or {}).items():
            params[name] = rng.standard_normal(shape).astype(np.float32)
        entries.append(FakeEntry(tuple(names[i] for i in idx), params))
    return entries, dict(zip(names, rows)), dict(zip(names, biases))


def tiny_cfg(**kw) -> TinaConfig:
    base = dict(max_classes=10, d_model=64, depth=2, num_heads=4, batch_size=32, train_steps=250, lr=1e-3,
                warmup_steps=20, timesteps=1000, sample_steps=10, log_every=50, device="cpu", seed=0)
    base.update(kw)
    return TinaConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """2 shared cores: intra-op threading only adds contention for these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo():
    return fake_zoo()


@pytest.fixture(scope="module")
def trained(zoo):
    entries, _, _ = zoo
    trainer = TinaTrainer(entries, FakeEncoder(), tiny_cfg(), log=None)
    gen = trainer.fit()
    return trainer, gen


def random_net(num_global_tokens: int = 0, seed: int = 0) -> TinaNet:
    """A TinaNet with every weight random (the zero-init would make outputs trivially constant)."""
    torch.manual_seed(seed)
    net = TinaNet(D + 1, TEXT_DIM, d_model=32, depth=2, num_heads=4, num_global_tokens=num_global_tokens)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net.eval()


# ------------------------------------------------------------------ layout
def test_layout_roundtrip_and_stats(zoo):
    entries, _, _ = zoo
    layout = ParamLayout(D).fit(e.params for e in entries)
    assert layout.token_dim == D + 1 and layout.num_global_tokens == 0
    tokens = np.concatenate([layout.encode(e.params)[0] for e in entries])
    np.testing.assert_allclose(tokens.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(tokens.std(0), 1, atol=1e-3)
    p = layout.decode(*layout.encode(entries[3].params))
    np.testing.assert_allclose(p["head.weight"], entries[3].params["head.weight"], atol=1e-5)
    np.testing.assert_allclose(p["head.bias"], entries[3].params["head.bias"], atol=1e-5)
    with pytest.raises(FedtinaError, match="expected"):
        layout.class_tokens({"head.weight": np.zeros((3, D + 2)), "head.bias": np.zeros(3)})


def test_layout_global_segments_roundtrip():
    segs = [GlobalSegment("lora.A", (4, D)), GlobalSegment("lora.B", (D, 4)), GlobalSegment("scale", (3,))]
    entries, _, _ = fake_zoo(num_tasks=20, extra={s.name: s.shape for s in segs})
    layout = ParamLayout(D, segs).fit(e.params for e in entries)
    T = D + 1
    # 64 values -> 4 tokens of 17 (last one padded), 64 -> 4, 3 -> 1
    assert layout.num_global_tokens == 4 + 4 + 1
    cls_tok, glob_tok = layout.encode(entries[0].params)
    assert glob_tok.shape == (9, T) and cls_tok.shape == (len(entries[0].class_names), T)
    back = layout.decode(cls_tok, glob_tok)
    assert set(back) == {"head.weight", "head.bias", "lora.A", "lora.B", "scale"}
    for name, value in entries[0].params.items():
        assert back[name].shape == value.shape
        np.testing.assert_allclose(back[name], value, atol=1e-5)
    # the class-token path is unchanged by global segments
    plain = ParamLayout(D).fit(e.params for e in entries)
    np.testing.assert_allclose(plain.encode(entries[0].params)[0], cls_tok, atol=1e-6)
    # spec + stats survive serialisation
    again = ParamLayout.from_spec(layout.spec(), layout.state_tensors())
    np.testing.assert_allclose(again.encode(entries[1].params)[1], layout.encode(entries[1].params)[1], atol=1e-6)
    with pytest.raises(FedtinaError, match="lora.B"):
        layout.global_tokens({k: v for k, v in entries[0].params.items() if k != "lora.B"})


def test_training_and_generation_with_global_segment():
    segs = [GlobalSegment("adapter", (2, 20))]
    entries, _, _ = fake_zoo(num_tasks=30, extra={"adapter": (2, 20)})
    trainer = TinaTrainer(entries, FakeEncoder(), tiny_cfg(train_steps=5, warmup_steps=1), global_segments=segs, log=None)
    gen = trainer.fit()
    assert gen.layout.num_global_tokens == 3
    sets = [["class 1", "class 2"], ["class 3", "class 4", "class 5"]]
    out = gen.generate_params(sets, steps=3)
    assert out[0]["adapter"].shape == (2, 20) and out[1]["head.weight"].shape == (3, D)
    perm = gen.generate_params([["class 2", "class 1"]], steps=3)[0]
    np.testing.assert_allclose(perm["adapter"], out[0]["adapter"], atol=1e-5)
    np.testing.assert_allclose(perm["head.weight"], out[0]["head.weight"][::-1], atol=1e-5)


# ------------------------------------------------------------------ schedule and samplers
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_noise_schedule(kind):
    s = NoiseSchedule(1000, kind)
    ab = s.alphas_cumprod
    assert ab.shape == (1000,) and s.betas.shape == (1000,)
    assert torch.all(ab[1:] < ab[:-1]) and 0.99 < ab[0] <= 1 and ab[-1] < 0.01
    assert torch.all((s.betas > 0) & (s.betas < 1))
    assert s.alpha_bar(torch.tensor([-1])).item() == 1.0
    gen = torch.Generator().manual_seed(0)   # fixed draws: at t=999 the eps -> x0 round-off is amplified ~20x
    x0, noise = torch.randn(3, 5, D + 1, generator=gen), torch.randn(3, 5, D + 1, generator=gen)
    t = torch.tensor([0, 500, 999])
    xt = s.q_sample(x0, t, noise)
    assert torch.allclose(xt[0], x0[0], atol=0.1) and not torch.allclose(xt[2], x0[2], atol=0.5)
    for pred in ("x0", "eps", "v"):   # target <-> (x0, eps) are consistent
        x0_hat, eps_hat = s.split(s.target(x0, noise, t, pred), xt, t, pred)
        torch.testing.assert_close(x0_hat[1:], x0[1:], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(eps_hat[:2], noise[:2], atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError):
        NoiseSchedule(10, "quadratic")


def test_ddim_and_ddpm_sample_shapes():
    net = random_net()
    B, N, T = 3, 5, D + 1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    cond, noise = torch.randn(B, N, TEXT_DIM), torch.randn(B, N, T)
    sched = NoiseSchedule(1000)
    ddim = DDIMSampler(sched, steps=7)
    assert ddim.timesteps[0] == 999 and ddim.timesteps[-1] == 0 and len(ddim.timesteps) == 7
    out = ddim.sample(net, cond, mask, noise)
    assert out.shape == (B, N, T) and torch.isfinite(out).all()
    assert torch.all(out[~mask] == 0)
    torch.testing.assert_close(ddim.sample(net, cond, mask, noise), out)            # eta = 0 is deterministic
    sto = DDIMSampler(sched, steps=7, eta=1.0)
    a = sto.sample(net, cond, mask, noise, generator=torch.Generator().manual_seed(0))
    b = sto.sample(net, cond, mask, noise, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)
    small = NoiseSchedule(20)
    out = DDPMSampler(small).sample(net, cond, mask, noise, generator=torch.Generator().manual_seed(0))
    assert out.shape == (B, N, T) and torch.isfinite(out).all() and torch.all(out[~mask] == 0)


# ------------------------------------------------------------------ network
def test_masked_tokens_do_not_influence_real_tokens():
    for G in (0, 2):
        net = random_net(num_global_tokens=G)
        B, K, T = 2, 6, D + 1
        N = G + K
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[0, G + 3:] = False
        mask[1, G + 5:] = False
        x, text, t = torch.randn(B, N, T), torch.randn(B, N, TEXT_DIM), torch.tensor([10, 700])
        with torch.no_grad():
            out = net(x, t, text, mask)
            x2, text2 = x.clone(), text.clone()
            x2[~mask] = 100 * torch.randn_like(x2[~mask])
            text2[~mask] = torch.randn_like(text2[~mask])
            out2 = net(x2, t, text2, mask)
            torch.testing.assert_close(out[mask], out2[mask], atol=1e-5, rtol=1e-5)
            # the check can fail: unmasking the padded tokens does change the real ones
            out3 = net(x2, t, text2, torch.ones_like(mask))
            assert not torch.allclose(out[mask], out3[mask], atol=1e-3)


def test_network_is_permutation_equivariant_over_class_tokens():
    G = 2
    net = random_net(num_global_tokens=G)
    K = 7
    x, text = torch.randn(1, G + K, D + 1), torch.randn(1, G + K, TEXT_DIM)
    mask, t = torch.ones(1, G + K, dtype=torch.bool), torch.tensor([300])
    perm = torch.cat([torch.arange(G), G + torch.randperm(K, generator=torch.Generator().manual_seed(3))])
    with torch.no_grad():
        out = net(x, t, text, mask)
        out_p = net(x[:, perm], t, text[:, perm], mask)
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-5)


def test_zero_init_predicts_the_mean_token():
    net = TinaNet(D + 1, TEXT_DIM, d_model=32, depth=2, num_heads=4)
    out = net(torch.randn(2, 3, D + 1), torch.tensor([1, 2]), torch.randn(2, 3, TEXT_DIM), torch.ones(2, 3, dtype=torch.bool))
    assert torch.all(out == 0)


def test_training_loss_ignores_padding():
    net = random_net()
    sched = NoiseSchedule(1000)
    x0, cond = torch.randn(2, 4, D + 1), torch.randn(2, 4, TEXT_DIM)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    t, noise = torch.tensor([100, 800]), torch.randn(2, 4, D + 1)
    loss = training_loss(net, x0, cond, mask, sched, t=t, noise=noise)
    x0b, noiseb = x0.clone(), noise.clone()
    x0b[~mask], noiseb[~mask] = 50.0, -50.0
    loss_b = training_loss(net, x0b, cond, mask, sched, t=t, noise=noiseb)
    assert loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, loss_b)


# ------------------------------------------------------------------ training: can learn
def test_training_learns_the_true_rows(trained, zoo):
    trainer, gen = trained
    _, rows, biases = zoo
    losses = [loss for _, loss in trainer.history]
    assert len(losses) == 5 and losses[-1] < 0.3 * losses[0], losses
    rng = np.random.default_rng(7)
    names = sorted(rows)
    sets = [list(rng.choice(names, size=int(rng.integers(1, 11)), replace=False)) for _ in range(20)]
    heads = gen.generate(sets)
    cos, cos_rand, bias_err = [], [], []
    for h in heads:
        assert h.weight.dtype == np.float32 and h.weight.shape == (h.k, D) and h.bias.shape == (h.k,)
        for name, w, b in zip(h.class_names, h.weight, h.bias):
            true = rows[name]
            cos.append(w @ true / np.linalg.norm(w) / np.linalg.norm(true))
            other = rows[names[(names.index(name) + 1) % len(names)]]
            cos_rand.append(other @ true / np.linalg.norm(other) / np.linalg.norm(true))
            bias_err.append(abs(b - biases[name]))
    assert np.mean(cos) > 0.9 and np.min(cos) > 0.8, (np.mean(cos), np.min(cos))
    assert abs(np.mean(cos_rand)) < 0.3
    assert np.mean(bias_err) < 0.2


# ------------------------------------------------------------------ generation
def test_generation_is_order_invariant_and_deterministic(trained):
    _, gen = trained
    names = ["class 3", "class 17", "class 8", "class 25", "class 0"]
    perm = [2, 4, 0, 1, 3]
    a, b, c = gen.generate([names, [names[i] for i in perm], names[:2]], seed=11)
    np.testing.assert_allclose(b.weight, a.weight[perm], atol=1e-5)
    np.testing.assert_allclose(b.bias, a.bias[perm], atol=1e-5)
    assert b.class_names == tuple(names[i] for i in perm)
    again = gen.generate([names], seed=11)[0]                              # alone in its batch: same head
    np.testing.assert_allclose(again.weight, a.weight, atol=1e-5)
    other_seed = gen.generate([names], seed=12)[0]
    assert not np.array_equal(other_seed.weight, a.weight)


def test_generation_embeds_names_once_per_call(trained):
    _, gen = trained
    enc = FakeEncoder()
    gen.encoder, before = enc, gen.encoder
    try:
        gen.generate([["class 1", "class 2"], ["class 2", "class 3"]])
    finally:
        gen.encoder = before
    assert len(enc.calls) == 1 and sorted(enc.calls[0]) == ["class 1", "class 2", "class 3"]


@pytest.mark.parametrize("sets, match", [
    ([["class 1"], []], "label set 1 is empty"),
    ([["class 1", "class 2", "class 1"]], r"label set 0 has duplicated class names \['class 1'\]"),
    ([["class 1"], [f"class {i}" for i in range(11)]], "label set 1 has 11 classes, more than max_classes=10"),
    ([["class 1"], "class 2"], "label set 1 is a string"),
    ([["class 1", "  "]], "label set 0 has empty"),
])
def test_label_set_errors(trained, sets, match):
    _, gen = trained
    with pytest.raises(LabelSetError, match=match):
        gen.generate(sets)


def test_generate_from_text(trained):
    _, gen = trained
    head = gen.generate_from_text("a model for: class 4, class 9 and class 2")
    assert head.class_names == ("class 4", "class 9", "class 2")
    ref = gen.generate([["class 4", "class 9", "class 2"]])[0]
    np.testing.assert_allclose(head.weight, ref.weight, atol=1e-6)


@pytest.mark.parametrize("text, names", [
    ("a model for: maple tree, oak tree, tractor", ["maple tree", "oak tree", "tractor"]),
    ("maple tree, oak tree and tractor", ["maple tree", "oak tree", "tractor"]),
    ("maple tree, oak tree, and tractor.", ["maple tree", "oak tree", "tractor"]),
    ("maple tree\noak tree\n\n tractor \n", ["maple tree", "oak tree", "tractor"]),
    ("- maple tree\n- oak tree\n1. tractor", ["maple tree", "oak tree", "tractor"]),
    ("A classifier for cats and dogs", ["cats", "dogs"]),
    ("classes: red  circle; blue square", ["red circle", "blue square"]),
    ("tractor", ["tractor"]),
    ("", []),
])
def test_parse_label_text(text, names):
    assert parse_label_text(text) == names


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_roundtrip(trained, tmp_path):
    _, gen = trained
    path = save_checkpoint(tmp_path / "sub" / "tina.safetensors", gen)
    assert path.exists() and not list(path.parent.glob(".*tmp"))
    loaded = load_checkpoint(path, FakeEncoder())
    assert loaded.cfg == gen.cfg and loaded.layout.spec() == gen.layout.spec()
    sets = [["class 1", "class 5", "class 7"], ["class 2"]]
    for h1, h2 in zip(gen.generate(sets, seed=3), loaded.generate(sets, seed=3)):
        assert h1.class_names == h2.class_names
        np.testing.assert_array_equal(h1.weight, h2.weight)
        np.testing.assert_array_equal(h1.bias, h2.bias)


def test_checkpoint_errors(trained, tmp_path):
    _, gen = trained
    path = save_checkpoint(tmp_path / "tina.safetensors", gen)
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated.safetensors"):
        load_checkpoint(truncated, FakeEncoder())

    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    with pytest.raises(CorruptFileError, match="garbled.safetensors"):
        load_checkpoint(garbled, FakeEncoder())

    flipped = tmp_path / "flipped.safetensors"                  # header intact, weights garbled
    flipped.write_bytes(data[:-40] + bytes(x ^ 0x55 for x in data[-40:]))
    with pytest.raises(CorruptFileError, match="flipped.safetensors.*checksum"):
        load_checkpoint(flipped, FakeEncoder())

    # a valid safetensors file that lacks some of the network's tensors
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("model.blocks.1.")}
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, str(partial), metadata={**meta, "sha256": _tensor_digest(tensors)})
    with pytest.raises(CorruptFileError, match=r"(?s)partial.safetensors .*Missing key.*blocks\.1\."):
        load_checkpoint(partial, FakeEncoder())
    no_stats = tmp_path / "nostats.safetensors"
    tensors = {k: v for k, v in tensors.items() if not k.startswith("layout.")}
    save_file(tensors, str(no_stats), metadata={**meta, "sha256": _tensor_digest(tensors)})
    with pytest.raises(CorruptFileError, match="nostats.safetensors .*layout tensors"):
        load_checkpoint(no_stats, FakeEncoder())

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors", FakeEncoder())

    for enc, match in ((FakeEncoder(id="other-encoder"), "other-encoder"), (FakeEncoder(dim=16), "dim 16"),
                       (FakeEncoder(template="{}"), "template")):
        with pytest.raises(FedtinaError, match=match) as info:
            load_checkpoint(path, enc)
        assert not isinstance(info.value, CorruptFileError)


def test_checkpoint_with_keys_this_version_lacks_loads(trained, tmp_path):
    """Checkpoints saved before the residual mode and the base option were removed hold their config keys and layout
    statistics."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    _, gen = trained
    path = save_checkpoint(tmp_path / "tina.safetensors", gen)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["layout.residual_mean"] = torch.zeros(2, D + 1)
    tensors["layout.residual_std"] = torch.ones(2, D + 1)
    config = {**json.loads(meta["config"]), "residual": False, "borrow_prob": 0.3, "base": "none", "hidden_share": 0.5}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, "config": json.dumps(config), "sha256": _tensor_digest(tensors)})
    loaded = load_checkpoint(old, FakeEncoder())
    assert loaded.cfg == gen.cfg
    sets = [["class 1", "class 5"]]
    np.testing.assert_array_equal(loaded.generate(sets)[0].weight, gen.generate(sets)[0].weight)


def test_empty_zoo_and_bad_config_are_errors():
    with pytest.raises(FedtinaError, match="empty zoo"):
        TinaTrainer([], FakeEncoder(), tiny_cfg(), log=None)
    entries, _, _ = fake_zoo(num_tasks=3)
    with pytest.raises(FedtinaError, match="prediction"):
        TinaTrainer(entries, FakeEncoder(), tiny_cfg(prediction="score"), log=None)


def test_warm_start_keeps_weights_and_layout(trained, zoo):
    _, gen = trained
    entries, _, _ = zoo
    grown = entries + fake_zoo(num_tasks=10, seed=5)[0]
    same = train_tina(grown, FakeEncoder(), replace(gen.cfg, train_steps=0), log=None, init=gen)
    assert same.layout is gen.layout
    sets = [["class 1", "class 2"]]
    np.testing.assert_array_equal(same.generate(sets)[0].weight, gen.generate(sets)[0].weight)
    more = train_tina(grown, FakeEncoder(), replace(gen.cfg, train_steps=3, warmup_steps=1), log=None, init=gen)
    assert not np.array_equal(more.generate(sets)[0].weight, gen.generate(sets)[0].weight)
    with pytest.raises(FedtinaError, match="does not match"):
        train_tina(grown, FakeEncoder(), replace(gen.cfg, d_model=32), log=None, init=gen)

