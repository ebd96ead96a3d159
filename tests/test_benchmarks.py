"""The throughput benchmark: its host-sync audit, and one tiny side-by-side run end to end."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from measure import SyncAudit  # noqa: E402


def test_sync_audit_flags_what_would_stall_a_gpu_and_nothing_else():
    x, mask = torch.randn(8, 4), torch.rand(8) > 0.5
    with SyncAudit() as audit:
        x.sum().item()
        x[mask]
        torch.bincount(torch.tensor([1, 2, 2]))
        x.masked_fill(mask.unsqueeze(1), 0.0)  # the same data dependence, done on the device
        x[torch.tensor([0, 3])]
        with audit.ignoring():
            x.max().item()
    assert dict(audit.ops) == {"_local_scalar_dense": 1, "index (boolean mask)": 1, "bincount": 1}


def test_quick_run_prints_ratios_and_records_crashes(capsys):
    pytest.importorskip("lightly")
    pytest.importorskip("vit_pytorch")
    import train_throughput

    record = train_throughput.main([
        "--quick", "--objectives", "mae", "--depth", "1", "--batch-size", "4", "--warmup", "1", "--rounds", "1",
        "--steps", "1", "--round-seconds", "0", "--no-memory", "--data", "", "--no-save"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rows = {row["impl"]: row for row in record["rows"]}
    assert set(rows) == {"ours", "lightly MAE", "vit-pytorch MAE", "vit-pytorch MAE pool=mean"}
    assert "error" in rows["vit-pytorch MAE"]  # its README's ViT(pool='cls') breaks its MAE (1.26)
    ratios = [rows[name]["ratio_images_per_s"] for name in ("lightly MAE", "vit-pytorch MAE pool=mean")]
    assert all(r > 0 for r in ratios)
    assert last == f"min ratio ours/theirs: {min(ratios):.2f}"


def test_gpu_check_records_each_section_and_survives_one_that_hangs(tmp_path):
    """The prepared GPU check, at its CPU smoke sizes: the step figures of each objective land in
    gpu_check.json, a section past its time limit is recorded (rc 124) and the next one still runs."""
    import gpu_check

    record = gpu_check.main(["--out", str(tmp_path / "out"), "--smoke", "--sections", "eager", "--budget", "300"])
    saved = __import__("json").loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert saved["device"] == record["device"] and saved["torch"] == torch.__version__
    rows = {r["objective"]: r for r in saved["sections"]["eager"]["rows"]}
    assert set(rows) == set(gpu_check.OBJECTIVES) and all(r["images_per_s"] > 0 for r in rows.values())
    assert saved["sections"]["mae_over_supervised"] > 0
    with open(tmp_path / "log.txt", "w") as log:
        hung = gpu_check.run_section("hang", [sys.executable, "-c", "import time; time.sleep(30)"], 1, log)
        after = gpu_check.run_section("next", [sys.executable, "-c", "print('ran')"], 30, log)
    assert hung["rc"] == 124 and after["rc"] == 0
    assert "ran" in (tmp_path / "log.txt").read_text()


def test_gpu_check_reads_the_loop_speed_after_warm_up(tmp_path):
    import gpu_check

    (tmp_path / "metrics.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in [
        {"step": 10, "images_per_s": 5.0}, {"step": 20, "images_per_s": 90.0}, {"step": 20, "test_top1": 0.5},
        {"step": 30, "images_per_s": 100.0}]))
    assert gpu_check.recipe_images_per_s(tmp_path) == 100.0  # the upper median of 90 and 100: warm-up left out
    rows = [{"objective": "supervised", "impl": "ours", "images_per_s": 200.0},
            {"objective": "mae", "impl": "ours", "images_per_s": 500.0},
            {"objective": "mae", "impl": "ours+compile", "images_per_s": 900.0}]
    assert gpu_check._mae_ratio(rows) == 2.5  # eager against eager


def test_loader_speed_runs_without_the_data_folder(tmp_path, monkeypatch):
    """The input-pipeline benchmark makes its own images where ../shared/data is missing (a lent GPU machine)."""
    import loader_speed

    monkeypatch.setattr(loader_speed, "CIFAR10", tmp_path / "missing")
    monkeypatch.setattr(loader_speed, "MIN_BATCHES", 1)
    record = loader_speed.main(["--img-size", "32", "--objectives", "supervised", "dino", "--seconds", "0",
                                "--images", "64", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--rounds", "2",
                                "--json", str(tmp_path / "o.json")])
    rows = {row["objective"]: row for row in record["rows"]}
    assert set(rows) == {"supervised", "dino"} and rows["supervised"]["data"] == "synthetic 32px PNG"
    assert all(rows[o][k] > 0 for o in rows for k in ("pil_per_core", "device_per_core", "device_over_pil_per_core"))
    assert rows["supervised"]["timm_per_core"] > 0 and "timm_per_core" not in rows["dino"]  # timm has no multi-crop
    assert len(rows["supervised"]["pil_over_timm_per_core_rounds"]) == 2  # the paths took turns
    assert (tmp_path / "o.json").exists()
