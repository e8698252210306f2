"""Tina's variants and the analyses: regression instead of diffusion (the bench's tina_regress), sentence
prompts (fedtina/data/descriptions.py), and `python -m fedtina.experiments.analyses` at toy size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fedtina.config import TinaConfig
from fedtina.data.descriptions import as_text_prompt, load_descriptions, parse_descriptions, shapes_sentence
from fedtina.data.shapes import class_names as shapes_names
from fedtina.errors import FedtinaError
from fedtina.tina import TinaTrainer
from fedtina.tina.train import ZooTensors, check_objective, load_checkpoint, save_checkpoint
from test_tina import FakeEncoder, fake_zoo, tiny_cfg


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


# ------------------------------------------------------------------ regression instead of diffusion
def test_regress_objective_learns_rows_in_one_pass_and_ignores_the_seed(tmp_path):
    entries, rows, _ = fake_zoo()
    gen = TinaTrainer(entries, FakeEncoder(), tiny_cfg(objective="regress", train_steps=300), log=None).fit()
    names = ["class 1", "class 5", "class 9", "class 20"]
    a, b = gen.generate([names], seed=0)[0], gen.generate([names], seed=7)[0]
    np.testing.assert_array_equal(a.weight, b.weight)          # no noise anywhere: seeds do not matter
    assert _cos(a.weight, np.stack([rows[n] for n in names])) > 0.9
    (p,) = gen.generate([names[::-1]])
    np.testing.assert_allclose(p.weight, a.weight[::-1], atol=1e-4)   # still a set function
    path = save_checkpoint(tmp_path / "r.safetensors", gen)
    np.testing.assert_allclose(load_checkpoint(path, FakeEncoder()).generate([names])[0].weight, a.weight, atol=1e-6)


@pytest.mark.parametrize("changes, match", [
    (dict(objective="gan"), "objective must be one of"),
    (dict(objective="regress", prediction="eps"), "needs prediction=x0"),
    (dict(prediction="score"), "prediction must be one of"),
])
def test_bad_objectives_are_errors(changes, match):
    with pytest.raises(FedtinaError, match=match):
        check_objective(TinaConfig(**changes))


# ------------------------------------------------------------------ descriptions
def test_generated_sentences_paraphrase_shape_and_texture_words():
    s = shapes_sentence("red striped triangle")
    assert s == "a shape with three corners, coloured red, covered in stripes"
    names = shapes_names()
    sentences = load_descriptions("generated", names)
    assert len(set(sentences.values())) == len(names)          # one distinct sentence per class
    for n, sent in sentences.items():
        _, texture, shape = n.split()
        assert shape not in sent and texture not in sent, (n, sent)
    with pytest.raises(FedtinaError, match="not a 'colour texture shape' class"):
        load_descriptions("generated", ["airplanes"])
    assert as_text_prompt("A large bird") == "large bird" and as_text_prompt("tractor") == "tractor"


def test_descriptions_file_errors_name_the_line(tmp_path):
    names = ["oak tree", "tractor", "maple tree"]
    ok = parse_descriptions("# comment\n\noak tree\ta tall tree with lobed leaves\ntractor\ta farm vehicle\n", names,
                            "f.tsv")
    assert ok == {"oak tree": "a tall tree with lobed leaves", "tractor": "a farm vehicle"}
    for text, match in [("oak tree a tree without a tab\n", "line 1: expected 'class name<TAB>description'"),
                        ("oak tree\t   \n", "line 1: expected"),
                        ("oak tree\ta tree\nbus\ta vehicle\n", "line 2: unknown class 'bus'"),
                        ("tractor\ta\ntractor\tb\n", "line 2: class 'tractor' is described twice"),
                        ("# only a comment\n", "no descriptions")]:
        with pytest.raises(FedtinaError, match=match):
            parse_descriptions(text, names, "f.tsv")
    with pytest.raises(FedtinaError, match="does not exist"):
        load_descriptions(str(tmp_path / "missing.tsv"), names)
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("oak tree\tun arbre \xe9lev\xe9\n".encode("latin-1"))
    with pytest.raises(FedtinaError, match="not UTF-8"):
        load_descriptions(str(bad), names)


def test_sentence_prompts_in_training_and_generation():
    entries, rows, _ = fake_zoo(num_tasks=40)
    enc = FakeEncoder()
    descriptions = {n: f"the thing called {n}" for n in list(rows)[:10]}
    data = ZooTensors(entries, enc, TinaTrainer(entries, enc, tiny_cfg(), log=None).layout,
                      descriptions=descriptions, sentence_prob=1.0)
    described = [data.names.index(n) for n in descriptions]
    assert bool(data.has_sentence[described].all()) and int(data.has_sentence.sum()) == len(described)
    np.testing.assert_allclose(data.sentences[described[0]].numpy(),
                               enc.embed_names([as_text_prompt(descriptions[data.names[described[0]]])])[0])
    with pytest.raises(FedtinaError, match="needs class descriptions"):
        TinaTrainer(entries, enc, tiny_cfg(prompt_sentences=0.5), log=None)

    gen = TinaTrainer(entries, enc, tiny_cfg(prompt_sentences=0.5, train_steps=30), log=None,
                      descriptions=descriptions).fit()
    names = ["class 0", "class 1"]
    by_name = gen.generate([names])[0]
    by_text = gen.generate([names], texts=[[descriptions["class 0"], None]])[0]
    assert not np.allclose(by_name.weight[0], by_text.weight[0])          # the sentence is what conditions
    with pytest.raises(FedtinaError, match="texts of label set 0: 1 entries for 2 classes"):
        gen.generate([names], texts=[["x"]])
    with pytest.raises(FedtinaError, match="empty or non-string descriptions"):
        gen.generate([names], texts=[["  ", None]])


# ------------------------------------------------------------------ the analyses at toy size
@pytest.mark.slow
def test_analyses_sample_steps_and_descriptions(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fedtina.experiments import harness
    from test_end_to_end import CONFIGS, TINY

    def run(*overrides: str) -> dict:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("analyses", overrides=[*TINY, f"cache_dir={tmp_path / 'cache'}", "bench.num_tasks=6",
                                                 "bench.k=5", "bench.ood_unseen=2", *overrides])
        return harness.execute("analyses", OmegaConf.to_container(cfg, resolve=True), tmp_path / "out").data

    steps = run("analysis=sample_steps", "analysis.values=[1,10]")
    doc = json.loads((tmp_path / "out" / "analyses.json").read_text())
    assert doc["values"] == ["1", "10"] and (tmp_path / "out" / "sample_steps.png").exists()
    one, ten = (steps["points"][v]["rows"] for v in ("1", "10"))
    for rows in (one, ten):
        assert {"selection", "retrieval", "tina", "oracle"} <= set(rows)
    assert one["selection"] == {**one["selection"], **{k: ten["selection"][k] for k in ("id_acc", "ood_acc")}}
    assert one["tina"]["id_acc"] != ten["tina"]["id_acc"]                 # the steps reach the sampler

    desc = run("analysis=descriptions", "analysis.values=[names]")
    rows = desc["points"]["names"]["rows"]
    assert {"tina_names", "tina_sentences", "selection_sentences"} <= set(rows)
    assert rows["tina_names"]["ood_acc"] != rows["tina_sentences"]["ood_acc"]

    for overrides, match in [(("analysis=tina_size", "analysis.values=[big]"), "is not '<d_model>x<depth>'"),
                             (("analysis=descriptions", "dataset.descriptions=null"), "needs dataset.descriptions"),
                             (("analysis=sample_steps", "analysis.values=[]"), "analysis.values is empty"),
                             (("analysis=sample_steps", "analysis.name=volume"), "unknown analysis 'volume'")]:
        with pytest.raises(FedtinaError, match=match):
            run(*overrides)


# ------------------------------------------------------------------ image prompts in another feature space (CLIP's)
def test_image_prompts_may_be_wider_than_the_head_features(tmp_path):
    entries, rows, _ = fake_zoo(num_tasks=60)
    rng = np.random.default_rng(0)
    proj = rng.standard_normal((len(next(iter(rows.values()))), 24)).astype(np.float32)   # 16-d rows, 24-d images
    shots = {n: ((r + 0.2 * rng.standard_normal((10, len(r)))) @ proj).astype(np.float32) for n, r in rows.items()}
    gen = TinaTrainer(entries, FakeEncoder(), tiny_cfg(train_steps=30), log=None, shots=shots).fit()
    assert gen.image_dim == 24 and gen.layout.feature_dim == 16
    (h,) = gen.generate([["class 0", "class 1"]], shots=[[shots["class 0"][:3], None]])
    assert h.weight.shape == (2, 16)
    with pytest.raises(FedtinaError, match=r"image prompt of 'class 0'.*expected \[n, 24\]"):
        gen.generate([["class 0"]], shots=[[np.ones((2, 16), np.float32)]])
    path = save_checkpoint(tmp_path / "w.safetensors", gen)
    loaded = load_checkpoint(path, FakeEncoder())
    assert loaded.image_dim == 24
    np.testing.assert_allclose(loaded.generate([["class 0", "class 1"]], shots=[[shots["class 0"][:3], None]])[0].weight,
                               h.weight, atol=1e-5)
    with pytest.raises(FedtinaError, match="different widths"):
        TinaTrainer(entries, FakeEncoder(), tiny_cfg(), log=None, shots={"class 0": np.ones((2, 24), np.float32),
                                                                         "class 1": np.ones((2, 16), np.float32)})


class FakeClip:
    """A stand-in for open_clip (no 150M-parameter tower in the tests): text and images to fixed random 24-d unit
    vectors; images by their mean colour, so the features carry what the image shows."""

    def __init__(self, cfg) -> None:
        self.id, self.dim, self.image_calls = "fakeclip", 24, 0
        self.proj = np.random.default_rng(0).standard_normal((3, 24)).astype(np.float32)

    def encode(self, texts):
        return FakeEncoder(dim=24, id="fakeclip").embed_names(list(texts))

    def encode_images(self, images):
        self.image_calls += 1
        x = images.reshape(len(images), -1, 3).mean(1).astype(np.float32) / 255 @ self.proj
        return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.slow
def test_clip_image_prompts_through_the_pipeline(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from fedtina.features import text
    from fedtina.assets import build_assets
    from fedtina.tina.shots import shot_rows
    from fedtina.zoo.tasks import sample_task_sets, selection_heads, task_data
    from fedtina.config import BenchConfig, CoreConfig, from_dict
    from fedtina.validate import validate_core_config
    from simkit import compose

    made = []
    monkeypatch.setitem(text.ENCODERS, "clip", lambda cfg: made.append(FakeClip(cfg)) or made[-1])
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(compose(tmp_path / "cache", "encoder=clip", "encoder.image_prompts=clip"),
                                 resolve=True)
    core_dict = {k: cfg[k] for k in ("dataset", "protocol", "backbone", "encoder", "zoo", "tina", "cache_dir")}
    validate_core_config(core_dict)
    assets = build_assets(from_dict(CoreConfig, core_dict), log=lambda _m: None)
    assert assets.prompt_features.shape == (len(assets.dataset.images), 24)
    assert assets.tina.image_dim == 24 and assets.tina.layout.feature_dim == assets.bank.features.shape[1]
    assert made[-1].image_calls == 1
    again = build_assets(from_dict(CoreConfig, core_dict), log=lambda _m: None)    # the image features are cached
    assert made[-1].image_calls == 0
    np.testing.assert_array_equal(again.prompt_features, assets.prompt_features)

    bench = BenchConfig(num_tasks=3, k=3, ood_unseen=1)
    tasks = [task_data(assets, ids) for ids in sample_task_sets(assets, bench)["ood"]]
    assert all(t.train_p.shape == (len(t.train_y), 24) for t in tasks)
    from dataclasses import replace

    from fedtina.assets import zoo_shots
    from fedtina.tina.rival import train_rival
    rival = train_rival(assets.zoo.entries(), assets.encoder, replace(assets.cfg.tina, train_steps=5),
                        hidden_share=bench.rival_hidden_share,
                        shots=zoo_shots(assets.dataset, assets.split, assets.bank.features))
    rows = shot_rows(assets, tasks, 2, bench, selection_heads(assets, tasks), 0, lambda _row, fn: fn(), rival)
    assert all(h.weight.shape == (3, assets.bank.features.shape[1]) for h in rows["tina_img"] + rows["gidaris"])

    for overrides, match in [(("encoder.image_prompts=clip",), "needs encoder=clip"),
                             (("encoder.image_prompts=dino",), "encoder.image_prompts='dino' is invalid"),
                             (("encoder=clip", "encoder.image_prompts=clip", "method.tina.prompt=both"),
                              "needs encoder.image_prompts=backbone")]:
        from fedtina.validate import validate_simulate_config
        with pytest.raises(FedtinaError, match=match):
            validate_simulate_config(compose(tmp_path / "cache", *overrides))


@pytest.mark.parametrize("argv, message", [
    (["fedtina.experiments.bench", "dataset.name=mnist"], "dataset.name='mnist' is invalid"),
    (["fedtina.experiments.analyses", "analysis.name=volume"], "unknown analysis 'volume'"),
])
def test_report_commands_fail_in_one_line(argv, message, tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", *argv, f"cache_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
