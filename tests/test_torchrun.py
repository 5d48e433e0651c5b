"""`torchrun --nproc_per_node 2` on this CPU (gloo): the same steps as one process with the same global batch, the
samples drawn by both processes and written once, in order."""
import csv
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: two processes on two cores
ARGS = ["--data-dir", str(SHARED / "data"), "--limit", "64", "--batch-size", "8", "--ch", "8", "--timesteps", "20",
        "--warmup", "1", "--dropout", "0", "--device", "cpu", "--no-fid", "--iters", "5", "--num-samples", "6",
        "--sample-batch-size", "2"]


def losses(out):
    with open(out / "loss.csv") as fh:
        return np.array([float(row[1]) for row in list(csv.reader(fh))[1:]])


def test_two_processes_take_the_steps_of_one_and_write_the_samples_once(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    result = subprocess.run([sys.executable, "ddpm_mnist.py", *ARGS, "--out", one], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "ddpm_mnist.py", *ARGS, "--out", two], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 5
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)  # the same batches, noise and steps: float rounding only
    saved_one, saved_two = (torch.load(out / "ckpt.pt", weights_only=True) for out in (one, two))
    for name, value in saved_one["model"].items():
        torch.testing.assert_close(saved_two["model"][name], value, rtol=1e-3, atol=1e-5)
    names = [f"{i:05d}.png" for i in range(1, 7)]  # 3 batches over 2 processes, gathered back in order
    assert sorted(os.listdir(two / "samples")) == names
    with zipfile.ZipFile(two / "samples.zip") as zf:
        assert zf.namelist() == names
    for name in names:  # each batch has its own noise, however the batches were shared out
        a_img, b_img = (np.asarray(Image.open(out / "samples" / name)).astype(int) for out in (one, two))
        assert np.abs(a_img - b_img).max() <= 8 and np.abs(a_img - b_img).mean() < 1
