"""Experiment trackers (--report-to): what each one records, read back from its own files, and that a
resumed run continues the same tracker run. W&B runs offline and MLflow on a local file store: no network."""

import glob
import json
import shutil
import struct
import sys

import pytest

from ssl_vit.errors import ConfigError
from ssl_vit.train import run_recipe
from ssl_vit.train.trackers import TrackerError

TINY = ["--model", "vit_tiny", "--depth", "1", "--patch-size", "4", "--img-size", "16", "--batch-size", "16",
        "--num-workers", "0", "--log-every", "1"]
RUN_FILES = {"config.json", "metrics.jsonl", "state", "ckpt.pt", ".lock"}  # a run folder without trackers


def _recipe(out, *extra):
    return run_recipe("supervised", {}, argv=[*TINY, "--out", str(out), *extra])


def _losses(run) -> dict[int, float]:
    """step -> loss, as metrics.jsonl recorded it."""
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    pytest.importorskip("wandb", reason='the wandb extra: pip install -e ".[wandb]" (make test installs it)')
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing written outside tmp_path
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    for name in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def mlflow_env(monkeypatch):
    pytest.importorskip("mlflow", reason='the mlflow extra: pip install -e ".[mlflow]" (make test installs it)')
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores without it
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def _wandb_records(path: str):
    """The protobuf records of a W&B offline run file. wandb no longer ships a Python reader, so this
    follows its framing (LevelDB's log format): a 7-byte file header, then 32 KiB blocks of chunks,
    each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its data."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, pos, payload = open(path, "rb").read(), 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a chunk header: the block's zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        payload, pos = payload + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def _wandb_run(run) -> dict:
    """Every offline W&B run file in a run folder (one per start): their ids, run names and projects,
    the config they recorded, and each logged loss as (step, value) in the order logged."""
    found = {"ids": [], "names": set(), "projects": set(), "config": {}, "losses": []}
    for path in sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["ids"].append(record.run.run_id)
                found["names"].add(record.run.display_name)
                found["projects"].add(record.run.project)
            elif kind == "config":
                found["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                       for item in record.history.item}
                if "loss" in row:
                    found["losses"].append((row["_step"], row["loss"]))
    return found


def test_wandb_offline_records_the_loss_at_each_logged_step_and_the_config(tmp_path, offline_wandb):
    run = tmp_path / "sup-run"
    _recipe(run, "--steps", "3", "--report-to", "wandb", "--lr", "0.002")
    found = _wandb_run(run)
    kept = json.load(open(run / "trackers.json"))
    assert found["ids"] == [kept["wandb"]]
    assert found["names"] == {"sup-run"} and found["projects"] == {"ssl_vit"}  # named after the run folder
    assert dict(found["losses"]) == pytest.approx(_losses(run), rel=1e-9) and len(found["losses"]) == 3
    config = found["config"]
    assert config["train.lr"] == 0.002 and config["backbone.depth"] == 1 and config["objective"] == "supervised"
    assert config["train.precision"] == "no"  # resolved
    assert config["train.crop_scale"] == "[0.08, 1.0]" and config["train.image_column"] == "None"
    assert not (run / "mlruns").exists() and not (run / "sup-run").exists()  # only the tracker asked for


def test_mlflow_file_store_records_the_loss_at_each_step_and_the_config_as_params(tmp_path, monkeypatch,
                                                                                   mlflow_env):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    run = tmp_path / "sup-run"
    _recipe(run, "--steps", "3", "--report-to", "mlflow", "--lr", "0.002")
    client, run_id = MlflowClient(tracking_uri=store), json.load(open(run / "trackers.json"))["mlflow"]
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert dict(history) == pytest.approx(_losses(run), rel=1e-9) and len(history) == 3
    info = client.get_run(run_id)
    assert info.info.run_name == "sup-run"
    assert client.get_experiment(info.info.experiment_id).name == "ssl_vit"
    params = info.data.params
    assert params["train.lr"] == "0.002" and params["backbone.depth"] == "1" and params["objective"] == "supervised"
    assert "train.out" not in params  # a setting a resume may change: MLflow refuses a parameter that changes
    assert not (run / "mlruns").exists()  # the store is where MLFLOW_TRACKING_URI points


def test_a_resumed_run_continues_the_same_tracker_runs_and_logs_each_step_once(tmp_path, offline_wandb,
                                                                               mlflow_env):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    _recipe(run, "--steps", "4", "--stop-at", "2", "--report-to", "wandb,mlflow")
    first = json.load(open(run / "trackers.json"))
    _recipe(run, "--steps", "4", "--report-to", "wandb,mlflow")
    assert json.load(open(run / "trackers.json")) == first
    store = (run / "mlruns").resolve().as_uri()  # the default: a file store inside the run folder
    history = [(m.step, m.value) for m in MlflowClient(tracking_uri=store).get_metric_history(first["mlflow"], "loss")]
    assert sorted(s for s, _ in history) == [1, 2, 3, 4]
    assert dict(history) == pytest.approx(_losses(run), rel=1e-9)
    found = _wandb_run(run)
    assert found["ids"] == [first["wandb"]] * 2  # two starts of one W&B run
    # each step once; the two starts' files sort by their start second, then by a random id, so the order of
    # steps across them is not the order they were logged in
    assert sorted(s for s, _ in found["losses"]) == [1, 2, 3, 4]
    assert dict(found["losses"]) == pytest.approx(_losses(run), rel=1e-9)


def test_a_run_that_starts_again_at_step_0_starts_new_tracker_runs(tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    _recipe(run, "--steps", "2", "--report-to", "mlflow")
    first = json.load(open(run / "trackers.json"))["mlflow"]
    shutil.rmtree(run / "state")  # as a run that failed before its first saved state: it starts again
    _recipe(run, "--steps", "2", "--report-to", "mlflow")
    second = json.load(open(run / "trackers.json"))["mlflow"]
    assert second != first
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    assert [m.step for m in client.get_metric_history(second, "loss")] == [1, 2]  # not logged over the old run


def test_an_old_run_folder_without_the_setting_resumes_with_other_trackers(tmp_path, mlflow_env):
    run = tmp_path / "run"
    _recipe(run, "--steps", "3", "--stop-at", "1")  # TensorBoard, the default
    config = json.load(open(run / "config.json"))
    del config["train"]["report_to"]  # as run folders written before --report-to existed
    json.dump(config, open(run / "config.json", "w"))
    _recipe(run, "--steps", "3", "--report-to", "mlflow")  # a resume may change the trackers
    assert json.load(open(run / "config.json"))["train"]["report_to"] == "mlflow"
    assert sorted(_losses(run)) == [1, 2, 3] and (run / "mlruns").is_dir()


def test_tensorboard_still_writes_the_loss_in_the_run_folder_by_default(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _recipe(run, "--steps", "3")
    events = EventAccumulator(str(run / "run"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert logged == pytest.approx(_losses(run), rel=1e-6)  # TensorBoard keeps float32
    assert not (run / "trackers.json").exists()  # TensorBoard has no run id to keep


def test_report_to_none_writes_no_tracker_files(tmp_path):
    run = tmp_path / "run"
    _recipe(run, "--steps", "2", "--report-to", "none")
    assert {p.name for p in run.iterdir()} == RUN_FILES


@pytest.mark.parametrize("missing, report_to", [("wandb", "wandb"), ("mlflow", "tensorboard,mlflow"),
                                                ("wandb", "all")])
def test_a_tracker_whose_package_is_missing_is_refused_naming_the_extra(tmp_path, monkeypatch, missing,
                                                                         report_to):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now fails, as when it is not installed
    with pytest.raises(TrackerError) as err:
        _recipe(tmp_path / "run", "--steps", "1", "--report-to", report_to)
    assert f'pip install -e ".[{missing}]"' in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("report_to, named", [("tensorbord", "'tensorbord'"), ("wandb,comet", "'comet'"),
                                              ("all,wandb", "'all'")])
def test_an_unknown_tracker_is_refused_by_name_listing_the_valid_ones(tmp_path, report_to, named):
    with pytest.raises(ConfigError, match=f"--report-to {report_to}: unknown tracker {named}") as err:
        _recipe(tmp_path / "run", "--steps", "1", "--report-to", report_to)
    assert "tensorboard, wandb, mlflow" in str(err.value) and "all or none" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_does_not_start_is_one_line(tmp_path, monkeypatch, mlflow_env):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://store")
    with pytest.raises(TrackerError, match="a tracker did not start") as err:
        _recipe(tmp_path / "run", "--steps", "1", "--report-to", "mlflow")
    assert "\n" not in str(err.value)
