"""python -m eval.embedding: the 2-D map, the nearest training images of fixed queries, the JSON."""

import io
import json
import re
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import small_digits, tiny_vit
from eval import embedding, embedding_figures
from eval.common import run_cli
from ssl_vit.evaluation import features as features_mod
from ssl_vit.evaluation.features import FeatureExtractor, Features, subset
from ssl_vit.checkpoint import save_checkpoint
from ssl_vit.data import load_data
from ssl_vit.data.loader import to_rgb

MAX_TRAIN, MAX_TEST, QUERIES, K, POINTS = 60, 30, 4, 5, 20
SMALL = ["--max-train", str(MAX_TRAIN), "--max-test", str(MAX_TEST), "--num-workers", "0"]
RECORD_KEYS = {"checkpoint", "data", "crop_fraction", "method", "features", "num_train", "num_test", "points_drawn",
               "seed", "pca_explained_variance_ratio", "pca_variance_2", "pca_variance_10", "neighbours",
               "neighbour_agreement", "queries", "query_labels", "neighbour_rows", "neighbour_labels",
               "neighbour_similarity"}


def _save(path, backbone):
    path.parent.mkdir(parents=True)
    save_checkpoint(str(path), backbone, objective="supervised", objective_config={}, train_config={},
                    step=0, data={})
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A class-token checkpoint, and a mean-pooled one: its features' norms differ from image to image
    (a class token after the final LayerNorm has nearly the same norm for every image), so ranking
    by dot product instead of cosine changes its neighbours."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    return [_save(root / "token" / "ckpt.pt", tiny_vit()), _save(root / "avg" / "ckpt.pt", tiny_vit(global_pool="avg"))]


@pytest.fixture(scope="module")
def run(checkpoints, tmp_path_factory):
    """One command over both checkpoints; returns its folders, payload and the views the figures drew."""
    root = tmp_path_factory.mktemp("embedding")
    cache, out = str(root / "cache"), root / "out"
    drawn = []

    def plot_and_keep(views):
        drawn.extend(views)
        return embedding_figures.plot_retrieval(views)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(embedding.FIGURES, "retrieval.png", plot_and_keep)
        payload = embedding.main([*checkpoints, "--data", "default", "--cache-dir", cache, "--out", str(out),
                                  "--queries", str(QUERIES), "--neighbours", str(K), "--max-points", str(POINTS),
                                  "--json", str(root / "r.json"), *SMALL])
    return {"cache": cache, "out": out, "payload": payload, "views": drawn, "json": root / "r.json"}


def _cached_features(spec, cache) -> Features:
    """The features the command used, read back from its cache (no extraction: the key is the same)."""
    return FeatureExtractor.from_checkpoint(spec, torch.device("cpu"), cache, num_workers=0).features(
        "default", max_train=MAX_TRAIN, max_test=MAX_TEST)


def _brute_force_cosine(feats: Features) -> torch.Tensor:
    """[M, N] cosine similarity of every test feature with every training feature, in float64."""
    train, test = feats.train.double(), feats.test.double()
    return (test @ train.T) / (test.norm(dim=1)[:, None] * train.norm(dim=1)[None, :])


def test_cli_writes_both_figures_and_the_json_with_its_fields(run, checkpoints):
    payload, out = run["payload"], run["out"]
    assert [v.points.shape for v in run["views"]] == [(POINTS, 2)] * 2  # --max-points of the 30 test images
    for name in ("embedding.png", "retrieval.png"):
        with Image.open(out / name) as img:
            img.verify()
    assert payload["figures"]["embedding.png"]["panels"] == 2  # one panel per checkpoint
    assert payload["figures"]["retrieval.png"]["panels"] == 2 * QUERIES * (1 + K)
    saved = json.loads((out / "embedding.json").read_text())
    assert saved == json.loads(json.dumps(payload)) and json.loads(run["json"].read_text()) == saved["records"]
    for record, spec in zip(saved["records"], checkpoints):
        assert set(record) == RECORD_KEYS and record["checkpoint"] == spec and record["data"] == "default"
        assert record["method"] == "pca" and record["features"] == "L2-normalised" and record["crop_fraction"] == 1.0
        assert (record["num_train"], record["num_test"], record["points_drawn"]) == (MAX_TRAIN, MAX_TEST, POINTS)
        ratio = record["pca_explained_variance_ratio"]
        assert len(ratio) == 10 and ratio == sorted(ratio, reverse=True)
        assert record["pca_variance_2"] == pytest.approx(sum(ratio[:2]), abs=1e-4)
        assert 0 < record["pca_variance_2"] < record["pca_variance_10"] <= 1.0 + 1e-4
        assert np.array(record["neighbour_rows"]).shape == (QUERIES, K) and len(record["queries"]) == QUERIES


def test_neighbours_are_the_nearest_by_cosine_and_agreement_is_counted_over_every_test_image(run, checkpoints):
    for record, spec in zip(run["payload"]["records"], checkpoints):
        feats = _cached_features(spec, run["cache"])
        cosine = _brute_force_cosine(feats)  # [M, N]
        best = cosine.topk(K, dim=1)
        for i, query_row in enumerate(record["queries"]):
            q = feats.test_rows.tolist().index(query_row)
            positions = [feats.train_rows.tolist().index(r) for r in record["neighbour_rows"][i]]
            # the named neighbours' true similarities are the K largest, in order (robust to exact ties)
            torch.testing.assert_close(cosine[q, positions], best.values[q], rtol=0, atol=1e-5)
            assert record["neighbour_similarity"][i] == pytest.approx(best.values[q].tolist(), abs=1e-4)
            assert record["neighbour_labels"][i] == feats.train_labels[positions].tolist()
            assert record["query_labels"][i] == int(feats.test_labels[q])
        by_hand = np.mean([[int(feats.train_labels[j]) == int(feats.test_labels[i]) for j in row]
                           for i, row in enumerate(best.indices.tolist())])
        assert record["neighbour_agreement"] == pytest.approx(by_hand, abs=1e-9)


def test_the_nearest_neighbour_is_the_most_similar_direction_not_the_largest_dot_product():
    train = torch.tensor([[1.0, 0.0], [10.0, 10.0], [0.0, 1.0]])  # the long one has the largest dot product
    feats = Features(train, torch.tensor([0, 1, 2]), torch.tensor([[1.0, 0.1]]), torch.tensor([0]), 3)
    sims, idx = embedding.nearest_training(feats, 2)
    assert idx.tolist() == [[0, 1]] and sims[0, 0].item() == pytest.approx(1 / np.hypot(1.0, 0.1))


def test_the_same_queries_for_every_checkpoint(run):
    first, second = run["payload"]["records"]
    assert first["queries"] == second["queries"] and first["query_labels"] == second["query_labels"]
    assert len(set(first["queries"])) == QUERIES
    a, b = run["views"]
    assert all(np.array_equal(x, y) for x, y in zip(a.query_images, b.query_images))


def _decoded(row_value) -> np.ndarray:
    return np.asarray(to_rgb(row_value))


def test_the_retrieval_grid_shows_the_images_whose_features_were_retrieved(run, checkpoints):
    """Neighbour j of query i in the grid is the training image at that neighbour's position under
    the same --max-train subset, and the checkpoint maps that image to the retrieved feature."""
    source = load_data("default")
    train, test = subset(source.train, MAX_TRAIN), subset(source.test, MAX_TEST)
    for view, spec in zip(run["views"], checkpoints):
        feats = _cached_features(spec, run["cache"])
        best = _brute_force_cosine(feats).topk(K, dim=1).indices
        extractor = FeatureExtractor.from_checkpoint(spec, torch.device("cpu"), run["cache"], num_workers=0)
        for i, query_row in enumerate(view.record["queries"]):
            q = feats.test_rows.tolist().index(query_row)
            assert np.array_equal(view.query_images[i], _decoded(test[q]["image"]))
            for j, position in enumerate(best[q].tolist()):
                image = train[position]["image"]
                assert np.array_equal(view.neighbour_images[i][j], _decoded(image)), (i, j)
                with torch.no_grad():
                    feature = extractor.backbone(extractor.transform(to_rgb(image))[None])[0]
                torch.testing.assert_close(feature, feats.train[position], rtol=0, atol=1e-4)


def test_feature_rows_name_the_split_rows_when_a_subset_is_drawn_and_images_are_skipped(tmp_path, checkpoints):
    """Each cached feature names the row of the full split it came from: a --max-train subset and a
    skipped unreadable image leave rows out, and the image at each named row gives that feature."""
    folder = tmp_path / "digits"
    small_digits(folder, n_train=40, n_test=10)
    path = str(folder / "digits-train.parquet")
    train = datasets.load_dataset("parquet", data_files=path, split="train")
    train = train.cast_column("image", datasets.Image(decode=False))
    chosen = features_mod.subset_rows(len(train), 30)
    bad = chosen[3]  # inside the subset
    rows = train.to_list()
    rows[bad]["image"] = {"bytes": b"not an image", "path": None}
    datasets.Dataset.from_list(rows, features=train.features).cast_column("image", datasets.Image()).to_parquet(path)
    extractor = FeatureExtractor.from_checkpoint(checkpoints[0], torch.device("cpu"), str(tmp_path / "cache"), num_workers=0,
                                 skip_bad_images=True)
    feats = extractor.features(str(folder), max_train=30)
    assert feats.train_rows.tolist() == [r for r in chosen if r != bad]
    source = load_data(str(folder))
    with torch.no_grad():
        again = extractor.backbone(torch.stack([extractor.transform(to_rgb(source.train[r]["image"]))
                                                for r in feats.train_rows.tolist()]))
    torch.testing.assert_close(again, feats.train, rtol=0, atol=1e-4)
    assert feats.test_rows.tolist() == list(range(10))


# ----- bad input: one line, no traceback, nothing written, nothing extracted -----
def _unlabelled(tmp_path) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    rows = {"image": [{"bytes": buf.getvalue(), "path": None}] * 12}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()}))
    ds.to_parquet(str(tmp_path / "unlabelled.parquet"))
    return str(tmp_path / "unlabelled.parquet")


@pytest.mark.parametrize("case", ["unlabelled", "umap", "missing", "twice", "neighbours", "queries"])
def test_bad_inputs_are_one_line_and_write_nothing(case, checkpoints, tmp_path, capsys, monkeypatch):
    specs, flags = [checkpoints[0]], []
    if case == "unlabelled":  # named second: refused before the first data set is extracted
        flags, message = ["--data", "default", "--data", _unlabelled(tmp_path)], "has no label column"
    elif case == "umap":
        monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
        flags, message = ["--method", "umap"], "pip install umap-learn"
    elif case == "missing":  # named second: refused before the first checkpoint is extracted
        specs, message = [checkpoints[0], str(tmp_path / "missing.pt")], f"{tmp_path / 'missing.pt'} does not exist"
    elif case == "twice":  # both would be drawn into one panel
        specs, message = [checkpoints[0]] * 2, f"checkpoint {checkpoints[0]} is given twice"
    elif case == "neighbours":
        flags, message = ["--neighbours", "61"], f"--neighbours 61 exceeds the {MAX_TRAIN} training images"
    else:
        flags, message = ["--queries", "31"], f"{MAX_TEST} test images are too few"

    def no_extraction(*a, **kw):
        raise AssertionError("features were extracted before the inputs were checked")

    monkeypatch.setattr(features_mod, "extract", no_extraction)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(embedding.main, [*specs, *flags, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                                 "--json", str(tmp_path / "r.json"), *SMALL])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    errors = re.findall(r"(?:^|\n)error: .*", err)  # progress bars of `datasets` may come first
    assert len(errors) == 1 and message in errors[0] and err.rstrip().endswith(errors[0].strip()), err
    assert not out.exists() and not (tmp_path / "r.json").exists()
