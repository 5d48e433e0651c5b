"""Every training script under `torchrun --nproc_per_node 2` on this CPU (gloo): the same steps as one process
with the same global batch, the outputs written once and complete, and Ctrl-C leaving a checkpoint that resumes."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from iclevr_fixtures import write_miniature_iclevr  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: two processes on two cores
MNIST = ["--data-dir", str(SHARED / "data"), "--limit", "64", "--batch-size", "8", "--ch", "8", "--timesteps", "20",
         "--warmup", "1", "--dropout", "0", "--device", "cpu", "--no-fid"]


def torchrun(script, args, **kwargs):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / script), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, **kwargs)


def plain(script, args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def losses(out, column=1):
    with open(out / "loss.csv") as fh:
        return np.array([float(row[column]) for row in list(csv.reader(fh))[1:]])


@pytest.mark.parametrize("script, args", [
    ("ddpm_mnist.py", MNIST + ["--iters", "5", "--num-samples", "6", "--sample-batch-size", "2"]),
    ("ddim.py", ["--device", "cpu", "--hidden", "32", "32", "--emb-dim", "16", "--batch-size", "16", "--iters", "5",
                 "--train-points", "2000", "--num-points", "64", "--timesteps", "50", "--no-table", "--steps", "5"]),
], ids=["ddpm_mnist", "ddim"])
def test_two_processes_take_the_steps_of_one(tmp_path, script, args):
    one, two = tmp_path / "one", tmp_path / "two"
    result = plain(script, args + ["--out", one])
    assert result.returncode == 0, result.stderr[-2000:]
    result = torchrun(script, args + ["--out", two])
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 5
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)  # the same batches, noise and steps: float rounding only
    saved_one = torch.load(one / "ckpt.pt", weights_only=True)
    saved_two = torch.load(two / "ckpt.pt", weights_only=True)
    for name, value in saved_one["model"].items():
        torch.testing.assert_close(saved_two["model"][name], value, rtol=1e-3, atol=1e-5)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["processes"] == 2 if "processes" in metrics else True
    if script == "ddpm_mnist.py":  # 6 samples in 3 batches over 2 processes, gathered back in order, written once
        names = [f"{i:05d}.png" for i in range(1, 7)]
        assert sorted(os.listdir(two / "samples")) == names
        with zipfile.ZipFile(two / "samples.zip") as zf:
            assert zf.namelist() == names
        for name in names:  # the same noise per batch, however the batches were shared out
            a_img = np.asarray(__import__("PIL.Image").Image.open(one / "samples" / name)).astype(int)
            b_img = np.asarray(__import__("PIL.Image").Image.open(two / "samples" / name)).astype(int)
            assert np.abs(a_img - b_img).max() <= 8 and np.abs(a_img - b_img).mean() < 1


def test_ctrl_c_under_torchrun_leaves_a_checkpoint_that_resumes(tmp_path):
    """Ctrl-C in a terminal reaches torchrun and both workers (and torchrun forwards it again): every process
    stops after the same step, rank 0 writes the checkpoint, and --resume under torchrun finishes the run."""
    out = tmp_path / "run"
    args = MNIST + ["--epochs", "400", "--num-samples", "0", "--out", out]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "ddpm_mnist.py"), *map(str, args)]
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the whole process group
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "interrupted: saved" in output, output[-3000:]
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert 0 < saved["step"] < 400 * 8
    assert not (out / "ckpt.pt.tmp").exists()
    result = torchrun("ddpm_mnist.py", MNIST + ["--epochs", str(saved["epoch"] + 2), "--num-samples", "0",
                                                "--out", out, "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == (saved["epoch"] + 2) * 8 and resumed["batch_in_epoch"] == 0
    assert len(losses(out)) == resumed["step"]  # one loss per step, the interrupted run's included


def test_the_other_scripts_run_under_torchrun_and_write_once(tmp_path):
    classes = tmp_path / "classes"
    rng = np.random.default_rng(0)
    from PIL import Image
    for k, name in enumerate(("a", "b")):
        (classes / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 60, (12, 12, 3)).astype(np.uint8)
            pixels[..., k] += 180
            Image.fromarray(pixels).save(classes / name / f"{i}.png")
    iclevr = tmp_path / "iclevr"
    write_miniature_iclevr(iclevr, num_train=16, num_test=32, seed=0)
    small = ["--device", "cpu", "--ch", "8", "--batch-size", "8", "--epochs", "1"]
    runs = {
        "cfg_afhq.py": ["--data-dir", classes, "--image-size", "8", "--ch-mult", "1", "2", "--num-res-blocks", "1",
                        "--timesteps", "10", "--num-samples", "4", "--sample-batch-size", "2", "--no-fid",
                        "--warmup", "1", "--dropout", "0"],
        "cond_iclevr.py": ["--data-dir", iclevr, "--image-size", "16", "--output-size", "16", "--ch-mult", "1", "1",
                           "--num-res-blocks", "1", "--attn-res", "0", "--timesteps", "8", "--schedule", "cosine",
                           "--warmup", "1", "--sampler", "ddim", "--steps", "4",
                           "--classifier-epochs", "1", "--classifier-guidance", "2"],  # every process trains it
        "gan_baseline.py": ["--dataset", "classes", "--data-dir", classes, "--image-size", "16", "--z-dim", "8",
                            "--num-samples", "6", "--sample-batch-size", "4", "--stats-samples", "8", "--no-fid"],
    }
    for script, args in runs.items():
        out = tmp_path / script.replace(".py", "")
        result = torchrun(script, small + args + ["--out", out])
        assert result.returncode == 0, (script, result.stderr[-3000:])
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["processes"] == 2, script
        assert (out / "ckpt.pt").is_file() and (out / "loss.csv").is_file()
        rows = list(csv.reader(open(out / "loss.csv")))
        assert len(rows) == 1 + (2 if script != "cond_iclevr.py" else 2), (script, len(rows))  # 16 images / 8: written once
    assert len(list((tmp_path / "cfg_afhq" / "samples_w7.5").rglob("*.png"))) == 4
    assert len(os.listdir(tmp_path / "gan_baseline" / "samples")) == 6
    assert len(os.listdir(tmp_path / "cond_iclevr" / "test")) == 32
    assert json.loads((tmp_path / "cond_iclevr" / "metrics.json").read_text())["guide_dir"] == "own classifier"


def test_a_process_that_finishes_first_waits_for_the_others_before_leaving(tmp_path):
    """leave_distributed (the same copy in every script): rank 1 is done at once, rank 0 two seconds later, and
    rank 1 leaves only after rank 0 (leaving at once could abort it while its threads still release tensors)."""
    script = tmp_path / "leave.py"
    script.write_text(
        "import json, sys, time, types\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import ddpm_mnist as script\n"
        "script.start_distributed(types.SimpleNamespace(device='cpu'))\n"
        "me = script.rank()\n"
        "if me == 0:\n"
        "    time.sleep(2)\n"
        "start = time.time()\n"
        "script.leave_distributed()\n"
        "result = {'waited': time.time() - start, 'still_in_group': script.dist.is_initialized()}\n"
        f"open({str(tmp_path)!r} + f'/rank{{me}}.json', 'w').write(json.dumps(result))\n")
    result = torchrun(script, [])  # ROOT / an absolute path is that path
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["waited"] > 1.5 and ranks[0]["waited"] < 1.0, ranks
    assert not ranks[0]["still_in_group"] and not ranks[1]["still_in_group"]
