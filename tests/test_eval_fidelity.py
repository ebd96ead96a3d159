"""Evaluations against their reference recipes: DINO's linear protocol, the evaluation crop (timm, DINO)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from conftest import tiny_vit

from ssl_vit.evaluation import features as features_mod
from eval import knn as knn_mod
from eval import linear as linear_mod
from eval.common import EvalError, run_cli
from ssl_vit.evaluation import linear as linear_lib
from ssl_vit.evaluation.features import FeatureExtractor
from ssl_vit.checkpoint import save_checkpoint
from ssl_vit.data import eval_crop_fraction, eval_transform
from ssl_vit.data.transforms import to_normalized_tensor

SMALL = ["--max-train", "16", "--max-test", "10", "--num-workers", "0"]


def _save(path, backbone):
    save_checkpoint(str(path), backbone, objective="dino", objective_config={}, train_config={}, step=0, data={})
    return str(path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return _save(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", tiny_vit())


def _block_outputs(backbone, images):
    """Every block's output tokens [B, P + N, D], recorded by hooks (independent of timm's intermediates)."""
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in backbone.vit.blocks]
    backbone(images)
    for h in hooks:
        h.remove()
    return outputs


@torch.no_grad()
def test_dino_features_are_normed_class_tokens_of_the_last_blocks():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 16, 16)
    small = tiny_vit(depth=5).eval()  # ViT-Ti width 192: the class tokens of the last 4 blocks
    n, avgpool = linear_lib.dino_layout(small.embed_dim)
    feats = linear_lib.dino_features(small, images, n, avgpool)
    assert (n, avgpool) == (4, False) and feats.shape == (3, 4 * 192)
    outs = _block_outputs(small, images)[-4:]
    expected = torch.cat([small.vit.norm(o)[:, 0] for o in outs], dim=1)
    torch.testing.assert_close(feats, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(feats[:, -192:], small(images), rtol=0, atol=1e-5)  # the backbone's own class token

    wide = tiny_vit(model="vit_base", patch_size=8, depth=1).eval()  # width 768: class token + mean patch token
    n, avgpool = linear_lib.dino_layout(wide.embed_dim)
    feats = linear_lib.dino_features(wide, images, n, avgpool)
    assert (n, avgpool) == (1, True) and feats.shape == (3, 2 * 768)
    (out,) = _block_outputs(wide, images)
    normed = wide.vit.norm(out)
    torch.testing.assert_close(feats, torch.cat([normed[:, 0], normed[:, 1:].mean(1)], dim=1), rtol=0, atol=1e-5)


def test_dino_protocol_refuses_backbones_without_its_features():
    with pytest.raises(EvalError, match="--fc-norm"):
        linear_lib.check_dino_backbone(tiny_vit(global_pool="avg", fc_norm=True), "x.pt", 1)
    with pytest.raises(EvalError, match=r"--n-last-blocks 4: x.pt has 2 blocks"):
        linear_lib.check_dino_backbone(tiny_vit(), "x.pt", 4)


def test_dino_protocol_trains_on_fresh_crops_and_records_its_settings(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Each epoch's training images are new random crops (never the cached evaluation images), the
    test images are the evaluation transform's, and the record names the protocol and its settings."""
    seen, original = [], linear_lib.dino_features

    def spy(backbone, images, **kw):
        seen.append(images.clone())
        return original(backbone, images, **kw)

    monkeypatch.setattr(linear_lib, "dino_features", spy)
    out = tmp_path / "linear.json"
    run_cli(linear_mod.main, [tiny_ckpt, "--protocol", "dino", "--n-last-blocks", "2", "--epochs", "2",
                              "--probe-batch-size", "16", "--cache-dir", str(tmp_path / "c"), "--json", str(out),
                              *SMALL])
    (record,) = json.loads(out.read_text())
    assert record["protocol"] == "dino" and record["feature_dim"] == 2 * 192 and record["lr"] == 0.001
    assert record["n_last_blocks"] == 2 and record["avgpool_patchtokens"] is False and record["batch_size"] == 16
    assert record["crop_fraction"] == 1.0 and record["crop_scale"] == [0.08, 1.0] and record["epochs"] == 2
    epoch0, epoch1, test = seen
    assert epoch0.shape[0] == epoch1.shape[0] == 16 and test.shape[0] == 10
    per_image = lambda x: sorted(x.sum((1, 2, 3)).tolist())  # noqa: E731  order-free: the sampler shuffles
    assert not np.allclose(per_image(epoch0), per_image(epoch1), atol=1e-3)
    extractor = FeatureExtractor.from_checkpoint(tiny_ckpt, torch.device("cpu"), str(tmp_path / "c"))
    source = features_mod.labelled_source("default", None, None)
    train = features_mod.image_split(source, "default", "train", 16, extractor.transform, False)
    evaluation = torch.stack([train[i]["image"] for i in range(16)])
    assert not np.allclose(per_image(epoch0), per_image(evaluation), atol=1e-3)


def test_eval_transform_crops_from_224_px_as_timm_and_dino():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (300, 260, 3), dtype=np.uint8))
    bicubic = v2.InterpolationMode.BICUBIC

    def reference(resize, crop):
        return v2.Compose([v2.Resize(resize, interpolation=bicubic, antialias=True), v2.CenterCrop(crop),
                           to_normalized_tensor()])(image)

    assert eval_crop_fraction(224) == 0.875 and eval_crop_fraction(223) == 1.0
    torch.testing.assert_close(eval_transform(224)(image), reference(256, 224), rtol=0, atol=1e-5)  # DINO's val
    torch.testing.assert_close(eval_transform(32)(image), reference(32, 32), rtol=0, atol=1e-5)  # exact size
    torch.testing.assert_close(eval_transform(32, crop_fraction=0.5)(image), reference(64, 32), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="--crop-fraction 1.5"):
        eval_crop_fraction(32, 1.5)


def test_crop_fraction_is_recorded_and_keys_the_feature_cache(tiny_ckpt, tmp_path, monkeypatch, capsys):
    cache = str(tmp_path / "c")
    whole = FeatureExtractor.from_checkpoint(tiny_ckpt, torch.device("cpu"), cache, num_workers=0)
    half = FeatureExtractor.from_checkpoint(tiny_ckpt, torch.device("cpu"), cache, num_workers=0, crop_fraction=0.5)
    first = whole.features("default", max_train=8, max_test=8)
    second = half.features("default", max_train=8, max_test=8)  # would read the first's entry if the key lacked the crop
    assert not torch.allclose(first.train, second.train)
    calls = []
    original = features_mod.extract
    monkeypatch.setattr(features_mod, "extract", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    out = tmp_path / "knn.json"
    run_cli(knn_mod.main, [tiny_ckpt, "--crop-fraction", "0.5", "--k", "3", "--cache-dir", cache, "--json", str(out),
                           "--max-train", "8", "--max-test", "8", "--num-workers", "0"])
    assert calls == []  # the same crop reads the cache
    assert [r["crop_fraction"] for r in json.loads(out.read_text())] == [0.5]


def test_dino_only_flags_need_the_dino_protocol(tiny_ckpt, tmp_path, capsys):
    for argv in (["--n-last-blocks", "1"], ["--protocol", "dino"]):  # the second: 4 blocks of a 2-block model
        with pytest.raises(SystemExit):
            run_cli(linear_mod.main, [tiny_ckpt, *argv, "--cache-dir", str(tmp_path), *SMALL])
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("error: ") == 1


# ----- label fractions (the 1% / 10% protocols) -----
def test_class_balanced_subset_takes_the_fraction_of_each_class_by_seed():
    from ssl_vit.data.subsets import class_balanced_subset
    from ssl_vit.errors import ConfigError

    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 4)
    keep = class_balanced_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[keep]).tolist() == [5, 3, 1]  # round(10%), at least one per class
    assert torch.equal(keep, class_balanced_subset(labels, 0.1, seed=0)) and torch.equal(keep, keep.sort().values)
    assert not torch.equal(keep, class_balanced_subset(labels, 0.1, seed=1))
    assert torch.equal(class_balanced_subset(labels, 1.0), torch.arange(84))
    with pytest.raises(ConfigError, match=r"--label-fraction 0.0: use a fraction in \(0, 1\]"):
        class_balanced_subset(labels, 0.0)


def test_linear_probe_trains_on_the_label_fraction_and_records_it(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Both protocols see only the chosen fraction of the training images; the test set stays whole."""
    sizes, step, train_dino = [], linear_lib.sgd_step, linear_lib.train_dino_probe
    monkeypatch.setattr(linear_lib, "sgd_step", lambda m, o, x, y: (sizes.append(len(y)), step(m, o, x, y)))
    monkeypatch.setattr(linear_lib, "train_dino_probe",
                        lambda represent, model, train, *a: (sizes.append(len(train)), train_dino(represent, model, train, *a)))
    args = [tiny_ckpt, "--epochs", "1", "--probe-batch-size", "64", "--cache-dir", str(tmp_path / "c"),
            "--max-train", "40", "--max-test", "10", "--num-workers", "0"]
    for protocol, extra in (("cached", []), ("dino", ["--n-last-blocks", "1"])):
        sizes.clear()
        out = tmp_path / f"{protocol}.json"
        run_cli(linear_mod.main, args + ["--label-fraction", "0.25", "--protocol", protocol, *extra, "--json", str(out)])
        (record,) = json.loads(out.read_text())
        assert record["label_fraction"] == 0.25 and 6 <= sizes[0] <= 14, (protocol, sizes)  # ~10 of 40, per class
    with pytest.raises(SystemExit):
        run_cli(linear_mod.main, args + ["--label-fraction", "1.5"])
    err = capsys.readouterr().err
    assert "error: --label-fraction 1.5: use a fraction in (0, 1]" in err and "Traceback" not in err


def test_supervised_training_and_finetuning_train_on_the_label_fraction(tiny_ckpt, tmp_path, capsys):
    """The Trainer's train split is the class-balanced fraction (the test split whole); eval.finetune
    records it, and its epochs count over the fraction's images."""
    from eval import finetune as finetune_mod
    from ssl_vit.config import parse_run_config
    from ssl_vit.data import load_data
    from ssl_vit.objectives.supervised import SupervisedConfig
    from ssl_vit.train import Trainer, run_recipe

    full = load_data("default")
    tiny = ["--model", "vit_tiny", "--depth", "1", "--patch-size", "4", "--img-size", "16", "--batch-size", "8",
            "--num-workers", "0", "--steps", "1"]
    trainer = Trainer(parse_run_config("supervised", SupervisedConfig, {},
                                       [*tiny, "--label-fraction", "0.1", "--out", str(tmp_path / "sup")]))
    trainer.lock.release()
    counts = torch.bincount(torch.tensor(list(trainer.source.train["label"])))
    expected = [round(0.1 * int(n)) for n in torch.bincount(torch.tensor(list(full.train["label"])))]
    assert counts.tolist() == expected and len(trainer.source.test) == len(full.test)
    out = tmp_path / "ft.json"
    run_cli(finetune_mod.main, [tiny_ckpt, "--steps", "2", "--batch-size", "8", "--num-workers", "0", "--label-fraction",
                                "0.1", "--out", str(tmp_path / "runs"), "--json", str(out)])
    (record,) = json.loads(out.read_text())
    assert record["label_fraction"] == 0.1 and record["run"].endswith("labels_0_1")
    assert record["epochs"] == pytest.approx(2 / (sum(expected) // 8))
    from ssl_vit.errors import ConfigError

    with pytest.raises(ConfigError, match="--label-fraction 0.1: the mae objective trains without labels"):
        run_recipe("mae", argv=[*tiny, "--label-fraction", "0.1", "--out", str(tmp_path / "mae")])
