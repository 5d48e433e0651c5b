"""benchmarks/gpu.py, the one GPU call, run whole on the CPU at toy sizes: every step runs and lands in gpu.json."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def test_every_step_of_the_gpu_call_runs_and_is_recorded(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--device", "cpu", "--out", out,
                           "--data-dir", SHARED / "data", "--inception",
                           SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((out / "gpu.json").read_text())
    assert [(v["compile"], v["batch_size"], v["status"]) for v in summary["train_steps"]] == [
        (False, 128, "ok"), (False, 256, "ok")]
    assert all(v["ms_per_step"] > 0 and v["precision"] == "float32" for v in summary["train_steps"])
    assert summary["train_steps"][1]["lr"] == 2 * summary["train_steps"][0]["lr"]  # the learning rate scaled
    student = summary["student"]
    assert student["status"] == "ok" and student["fid"] > 0 and student["num_samples"] == 16
    assert student["train_seconds"] > 0 and student["sample_seconds"] >= 0 and student["reference_seconds"] > 0
    assert [(r["sampler"], r["status"]) for r in summary["samplers"]] == [("dpmpp", "ok"), ("ddpm", "ok")]
    assert [r["sampling_steps"] for r in summary["samplers"]] == [10, 10]  # --tiny: T = 10
    assert summary["floor"]["status"] == "ok" and summary["floor"]["num_images"] == 16
    assert summary["fid"]["tf32_off"]["images_per_second"] > 0 and summary["fid"]["tf32_on"]["images_per_second"] > 0
    assert summary["fid"]["tf32_feature_change"] == 0  # a CPU has no TF32
    assert (out / "student" / "grid.png").is_file() and "finished" in summary


def test_a_step_that_fails_is_recorded_and_the_next_ones_run(tmp_path):
    """--device cuda where there is none: each training variant and the student's command stop at their flags'
    check (exit 2), the steps that need the student's checkpoint say they did not run, and gpu.json is complete."""
    out = tmp_path / "gpu"
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--device", "cuda", "--out", out,
                           "--data-dir", SHARED / "data"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = json.loads((out / "gpu.json").read_text())
    assert done.returncode == 0 and summary["device"] == "cpu"
    assert [v["status"] for v in summary["train_steps"]] == ["failed (exit 2)"] * 2
    assert summary["student"]["status"] == "failed (exit 2)"
    assert all(r["status"].startswith("not run") for r in summary["samplers"])
    assert summary["floor"]["status"].startswith("not run") and "finished" in summary
