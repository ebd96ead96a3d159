"""Faults and bad inputs a new user hits: each a clear error or a correct run, never a silent one."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import free_port, small_digits
from ssl_vit.checkpoint import CheckpointError, load_checkpoint
from ssl_vit.config import ConfigError
from ssl_vit.data.loader import to_rgb
from ssl_vit.objectives.supervised import Supervised
from ssl_vit.train import NonFiniteError, run_recipe
from ssl_vit.train.run_folder import RunLock

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "vit_tiny", "--depth", "1", "--patch-size", "4", "--img-size", "16", "--batch-size", "8",
        "--num-workers", "0", "--log-every", "1"]


def _run(out, *extra):
    return run_recipe("supervised", {}, argv=[*TINY, "--out", str(out), *extra])


def test_a_failed_start_writes_nothing_and_the_corrected_command_runs(tmp_path):
    with pytest.raises(Exception, match="no/such/data"):
        _run(tmp_path / "run", "--steps", "1", "--data", str(tmp_path / "no/such/data"))
    assert not (tmp_path / "run").exists()
    assert load_checkpoint(_run(tmp_path / "run", "--steps", "1"))["step"] == 1
    # a folder whose config.json has no saved state behind it takes new settings
    os.remove(tmp_path / "run" / "state" / "latest")
    assert load_checkpoint(_run(tmp_path / "run", "--steps", "1", "--lr", "0.5"))["train_config"]["lr"] == 0.5


# Holds the run lock of argv[1] in another process, with a forked child alive as a data-loader
# worker would be, and prints both process ids once the lock is held.
HOLD_LOCK = """
import os, sys, time
from ssl_vit.train.run_folder import RunLock
RunLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print(os.getpid(), child, flush=True)
time.sleep(120)
"""


def _hold_lock(folder: Path) -> tuple[subprocess.Popen, int]:
    """Another process holding ``folder``'s run lock, and the pid of its forked child."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ids = holder.stdout.readline().split()
    if not ids:
        pytest.fail(f"could not take the lock: {holder.communicate()[1].strip().splitlines()[-1]}")
    return holder, int(ids[1])


def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    holder, child = _hold_lock(tmp_path / "run")
    try:
        with pytest.raises(ConfigError, match=f"another run is training in {tmp_path / 'run'} \\(process {holder.pid}\\)"):
            _run(tmp_path / "run", "--steps", "1")
        assert not (tmp_path / "run" / "config.json").exists()
    finally:
        holder.kill(), holder.wait(), os.kill(child, signal.SIGKILL)
    _run(tmp_path / "run", "--steps", "1")  # free again


def test_a_killed_run_frees_its_folder_at_once_while_its_forked_workers_live(tmp_path):
    """Data-loader workers outlive a SIGKILLed run by up to 5 s; the rerun must not be refused."""
    (tmp_path / "run").mkdir()
    holder, child = _hold_lock(tmp_path / "run")
    holder.kill(), holder.wait()
    try:
        os.kill(child, 0)  # the forked child still lives
        RunLock(str(tmp_path / "run")).acquire()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_run_that_raised_frees_its_folder_for_the_next_process(tmp_path, monkeypatch):
    _always_nan(monkeypatch)
    with pytest.raises(NonFiniteError) as failed:  # its traceback keeps the trainer and its workers alive
        _run(tmp_path / "run", "--steps", "2", "--num-workers", "1")
    holder, child = _hold_lock(tmp_path / "run")  # would fail to start: the lock still held here
    holder.kill(), holder.wait(), os.kill(child, signal.SIGKILL)
    del failed


def test_a_latest_pointer_to_a_missing_state_is_an_error_not_a_restart(tmp_path):
    _run(tmp_path / "run", "--steps", "2", "--stop-at", "1")
    (tmp_path / "run" / "state" / "latest").write_text("step-7")
    with pytest.raises(CheckpointError, match="names step-7, which is missing"):
        _run(tmp_path / "run", "--steps", "2")


def test_steps_logged_before_a_kill_are_logged_once_after_resuming(tmp_path):
    _run(tmp_path / "run", "--steps", "4", "--stop-at", "2")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:  # what a killed run had logged past its state
        fh.write(json.dumps({"step": 3, "epoch": 0, "loss": 9.0}) + "\n")
    _run(tmp_path / "run", "--steps", "4")
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl") if "loss" in line]
    assert steps == [1, 2, 3, 4]


def test_outputs_are_readable_by_others_as_open_would_make_them(tmp_path):
    old = os.umask(0o022)
    try:
        path = _run(tmp_path / "run", "--steps", "0")
    finally:
        os.umask(old)
    for name in (path, tmp_path / "run" / "config.json"):
        assert os.stat(name).st_mode & 0o777 == 0o644


def _always_nan(monkeypatch):
    forward = Supervised.forward
    monkeypatch.setattr(Supervised, "forward", lambda self, batch: (lambda out: (out[0] * float("nan"), out[1]))(
        forward(self, batch)))


@pytest.mark.timeout(120)
def test_skipping_non_finite_steps_stops_after_a_run_of_them(tmp_path, monkeypatch):
    _always_nan(monkeypatch)
    with pytest.raises(NonFiniteError, match="at step 3 after skipping 3 in a row"):
        _run(tmp_path / "run", "--steps", "4", "--on-nonfinite", "skip", "--max-skipped-steps", "3")


def test_a_resumed_run_with_a_skipped_step_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """The skipped step used up its batches: the resumed run continues after them, not on them again."""
    data = ["--data", small_digits(tmp_path / "data"), "--steps", "8"]
    forward, seen = Supervised.forward, []

    def record(self, batch):
        seen.append(int(batch["index"][0]))
        return forward(self, batch)

    monkeypatch.setattr(Supervised, "forward", record)
    _run(tmp_path / "probe", *data, "--steps", "2")
    poison = seen[1]  # the first example of step 1's batch

    def nan_on_that_batch(self, batch):
        loss, metrics = forward(self, batch)
        return (loss * float("nan") if self.training and int(batch["index"][0]) == poison else loss), metrics

    monkeypatch.setattr(Supervised, "forward", nan_on_that_batch)
    skip = [*data, "--on-nonfinite", "skip"]
    whole = load_checkpoint(_run(tmp_path / "whole", *skip))
    _run(tmp_path / "run", *skip, "--stop-at", "4")
    resumed = load_checkpoint(_run(tmp_path / "run", *skip))
    assert whole["step"] == resumed["step"] == 8
    for k, v in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("mode, values", [("I;16", np.arange(0, 65536, 16, dtype=np.uint16)),
                                          ("F", np.linspace(0.0, 1.0, 4096, dtype=np.float32))])
def test_16_bit_and_float_images_keep_their_levels(mode, values):
    image = Image.fromarray(values.reshape(64, 64))
    assert image.mode == mode
    if mode == "I;16":  # the way such a file arrives: a 16-bit PNG
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = Image.open(io.BytesIO(buf.getvalue()))
        assert image.mode == "I;16"
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert len(np.unique(rgb)) == 256  # every 8-bit level, not a solid white image


def test_finetune_runs_that_differ_only_in_settings_get_their_own_folders(tmp_path):
    from eval import finetune

    ckpt = _run(tmp_path / "pre", "--steps", "0")
    common = [ckpt, "--data", "default", "--steps", "1", "--batch-size", "8", "--num-workers", "0",
              "--out", str(tmp_path / "ft")]
    (first,) = finetune.main(common)
    (second,) = finetune.main([*common, "--lr", "0.003"])
    assert first["run"] != second["run"] and second["run"].endswith("-lr_0_003-steps_1-batch_8")
    assert second["lr"] == 0.003


def _launch(launcher: list[str], out, steps: int, env: dict) -> subprocess.Popen:
    cmd = [*launcher, str(ROOT / "recipes" / "supervised.py"), *TINY, "--steps", str(steps), "--out", str(out)]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_launch_whose_processes_would_each_train_alone_is_refused(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    launched = _launch([torchrun, "--nproc_per_node", "2", "--master_port", free_port()], tmp_path / "run", 2, {})
    _, err = launched.communicate(timeout=300)
    assert launched.returncode != 0
    assert "launched as one of 2 (WORLD_SIZE=2) but Accelerate runs it alone" in err
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2" in err
    assert not (tmp_path / "run" / "config.json").exists()


def _processes_writing_to(out) -> list[int]:
    """Live processes whose command line names ``out`` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            state = open(f"/proc/{entry}/stat").read().split(") ")[-1][0]
        except (OSError, ValueError):
            continue
        if entry.isdigit() and str(out) in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_workers_end_when_their_launcher_is_killed(tmp_path):
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--main_process_port", free_port(), "--mixed_precision", "no", "--dynamo_backend", "no"]
    launched = _launch(launcher, tmp_path / "run", 100_000, {"ACCELERATE_USE_CPU": "true"})
    deadline = time.time() + 300
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline and launched.poll() is None:
        time.sleep(0.1)
    assert launched.poll() is None, launched.communicate()[1][-2000:]
    workers = [pid for pid in _processes_writing_to(tmp_path / "run") if pid != launched.pid]
    assert len(workers) >= 2
    launched.kill()  # SIGKILL: the launcher cannot pass anything on
    launched.wait()
    deadline = time.time() + 30
    while any(pid in _processes_writing_to(tmp_path / "run") for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    orphans = [pid for pid in workers if pid in _processes_writing_to(tmp_path / "run")]
    for pid in orphans:  # leave no trainer behind, whatever the verdict
        os.kill(pid, signal.SIGKILL)
    assert not orphans


def _string_labelled_parquet(folder) -> str:
    """Digits with their labels as words ("zero" ... "nine"), train and test Parquet files."""
    from ssl_vit.data import load_data

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    src = load_data("default")
    folder.mkdir()
    for split, ds in (("train", src.train.select(range(80))), ("test", src.test.select(range(40)))):
        ds = ds.cast_column("label", datasets.Value("int64")).map(lambda r: {"label": words[r["label"]]})
        ds.to_parquet(str(folder / f"digits-{split}.parquet"))
    return str(folder)


@pytest.mark.parametrize("objective", ["supervised", "mae"])
def test_string_labels_become_sorted_classes(tmp_path, objective):
    data = _string_labelled_parquet(tmp_path / "data")
    ckpt = load_checkpoint(run_recipe(objective, {}, argv=[*TINY, "--steps", "1", "--data", data,
                                                            "--out", str(tmp_path / "run")]))
    names = ckpt["data"]["class_names"]
    assert names == sorted(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    from ssl_vit.data import load_data

    raw = datasets.load_dataset("parquet", data_files=f"{data}/digits-train.parquet", split="train")["label"]
    mapped = load_data(data).train["label"]
    assert [names[i] for i in mapped] == raw  # each word is its own class
    if objective == "supervised":
        assert 0.0 <= ckpt["results"]["test_accuracy"] <= 1.0


def test_evaluations_can_skip_unreadable_images_and_rebuild_a_corrupt_cache(tmp_path, capsys):
    from eval import knn
    from eval.common import EvalError
    from test_data import _image_folder

    _image_folder(tmp_path / "data", (("train", 6), ("test", 3)))
    bad = tmp_path / "data" / "train" / "cat" / "0.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    ckpt = _run(tmp_path / "pre", "--steps", "0")
    args = [ckpt, "--data", str(tmp_path / "data"), "--k", "3", "--num-workers", "0",
            "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(Exception, match=r"cat/0\.png.*--skip-bad-images"):
        knn.main(args)
    (record,) = knn.main([*args, "--skip-bad-images"])
    assert "left out 1 unreadable images" in capsys.readouterr().err
    for entry in (tmp_path / "cache").iterdir():
        entry.write_bytes(b"not safetensors")
    assert knn.main([*args, "--skip-bad-images"]) == [record]  # rebuilt, the same numbers
    assert "is unreadable (" in capsys.readouterr().err
    with pytest.raises(EvalError, match="classes \\[3\\] that the training split does not"):
        from ssl_vit.evaluation.features import check_labels
        check_labels(torch.tensor([0, 3]), 3, "x", "test")


def test_a_random_bytes_safetensors_file_is_named(tmp_path):
    path = tmp_path / "backbone.safetensors"
    path.write_bytes(os.urandom(256))
    from ssl_vit.checkpoint import load_backbone

    with pytest.raises(CheckpointError, match=f"{path} is not a readable safetensors file"):
        load_backbone(str(path))


def test_a_full_disk_keeps_the_last_good_state_and_says_so(tmp_path, monkeypatch):
    import errno

    from accelerate import Accelerator

    from ssl_vit.checkpoint import DiskFullError

    save_state = Accelerator.save_state

    def fills_the_disk_at_step_4(self, output_dir=None, **kw):
        if output_dir and "step-4" in str(output_dir):
            os.makedirs(output_dir, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", fills_the_disk_at_step_4)
    with pytest.raises(DiskFullError, match=r"no space left on the disk of .*\.step-4\.tmp.*last good state is kept "
                                            r"\(.*step-2\)"):
        _run(tmp_path / "run", "--steps", "6", "--save-every", "2")
    assert sorted(os.listdir(tmp_path / "run" / "state")) == ["latest", "step-2"]

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    import ssl_vit.checkpoint as checkpoint

    torch_save = checkpoint.torch.save

    def torch_save_on_a_full_disk(obj, f, *a, **kw):  # the checkpoint's write fails as torch's does
        if str(f).endswith("ckpt.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return torch_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(DiskFullError, match=r"no space left on the disk of .*ckpt\.pt"):
        _run(tmp_path / "other", "--steps", "1")
    assert not [n for n in os.listdir(tmp_path / "other") if n.startswith(".tmp-") or n == "ckpt.pt"]


def test_an_unreadable_random_state_refuses_to_resume(tmp_path):
    _run(tmp_path / "run", "--steps", "2", "--stop-at", "1")
    (tmp_path / "run" / "state" / "step-1" / "random_states_0.pkl").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="random_states_0.pkl cannot be used .*other random numbers"):
        _run(tmp_path / "run", "--steps", "2")


def test_single_class_data_is_refused_for_supervised_training(tmp_path):
    from ssl_vit.data import DataError, load_data

    src = load_data("default")
    (tmp_path / "data").mkdir()
    for split, ds in (("train", src.train), ("test", src.test)):
        ds.filter(lambda r: r["label"] == 0).select(range(10)).cast_column(
            "label", datasets.Value("int64")).to_parquet(str(tmp_path / "data" / f"zeros-{split}.parquet"))
    with pytest.raises(DataError, match="has a single class: supervised training would reach loss 0"):
        _run(tmp_path / "run", "--steps", "1", "--data", str(tmp_path / "data"))


def test_a_streamed_local_parquet_with_integer_labels_has_its_classes(tmp_path):
    from ssl_vit.data import load_data

    src = load_data("default")
    (tmp_path / "data").mkdir()
    for split, ds in (("train", src.train.select(range(80))), ("test", src.test.select(range(40)))):
        ds.cast_column("label", datasets.Value("int64")).to_parquet(str(tmp_path / "data" / f"d-{split}.parquet"))
    streamed, loaded = load_data(str(tmp_path / "data"), streaming=True), load_data(str(tmp_path / "data"))
    assert streamed.class_names == loaded.class_names == [str(d) for d in range(10)]
    ckpt = load_checkpoint(_run(tmp_path / "run", "--steps", "1", "--data", str(tmp_path / "data"), "--streaming"))
    assert ckpt["step"] == 1 and 0.0 <= ckpt["results"]["test_accuracy"] <= 1.0


@pytest.mark.parametrize("command, message", [
    (["recipes/supervised.py", "--steps", "-1"], "error: --steps -1: must be >= 0"),
    (["-m", "ssl_vit.export", "{ckpt}", "{tmp}/x.safetensors", "--student"], "only DINO and MSN runs have a student"),
    (["-m", "eval.inspection", "{tmp}/missing.pt", "--out", "{tmp}/inspect"], "missing.pt does not exist"),
    (["-m", "ssl_vit.viz.curves", "{tmp}/no-run"], "no-run does not exist: pass a run folder"),
])
def test_commands_print_one_line_for_a_user_error(tmp_path, command, message, tiny_supervised_ckpt):
    argv = [a.format(ckpt=tiny_supervised_ckpt, tmp=tmp_path) for a in command]
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and message in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def tiny_supervised_ckpt(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("pre") / "run", "--steps", "0")


def test_the_non_finite_stop_says_how_to_go_on(tmp_path, monkeypatch):
    _always_nan(monkeypatch)
    with pytest.raises(NonFiniteError, match=r"Start a new run \(--out\) with a lower --lr"):
        _run(tmp_path / "run", "--steps", "2")
