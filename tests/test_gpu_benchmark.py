"""benchmarks/gpu.py, the one call that measures every GPU figure, run on this CPU at toy sizes: every step runs
and lands in gpu.json, so the call on a lent GPU cannot fail on a typo."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_step_of_the_gpu_benchmark_runs_at_toy_sizes(tmp_path):
    out = tmp_path / "gpu"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu",
                             "--out", str(out), "--budget", "900"], cwd=ROOT, capture_output=True, text=True,
                            timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((out / "gpu.json").read_text())
    steps = summary["steps"]
    assert set(steps) == {"ddpm_mnist_epochs_30", "fid_speed", "gan_mnist", "cfg_mnist"}
    ddpm = steps["ddpm_mnist_epochs_30"]
    assert ddpm["finished"] and ddpm["num_samples"] == 8 and ddpm["fid"] > 0 and "train16" in ddpm["fid_reference"]
    assert steps["fid_speed"]["images"] == 4 and steps["fid_speed"]["seconds_per_10k_png"] > 0
    assert steps["gan_mnist"]["finished"] and steps["gan_mnist"]["fid"] > 0
    assert steps["cfg_mnist"]["finished"] and steps["cfg_mnist"]["fid_w0"] > 0
    assert 0 <= steps["cfg_mnist"]["right_digit_w7.5"] <= 1
    assert summary["tiny"] and summary["total_seconds"] < 900
