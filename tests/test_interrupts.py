"""Ctrl-C in the middle of an epoch, in every training script: the step in flight finishes, the checkpoint is
written, the run exits with 130, and --resume ends with the same weights, optimiser state and losses as a run that
was never interrupted (bit for bit, on one thread: float sums depend on the thread count)."""
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import cfg_afhq  # noqa: E402
import cond_iclevr  # noqa: E402
import ddim  # noqa: E402
import ddpm_mnist  # noqa: E402
import gan_baseline  # noqa: E402
from iclevr_fixtures import write_miniature_iclevr  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("interrupt_data")
    rng = np.random.default_rng(0)
    for k, name in enumerate(("a", "b")):
        (base / "classes" / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 60, (12, 12, 3)).astype(np.uint8)
            pixels[..., k] += 180
            Image.fromarray(pixels).save(base / "classes" / name / f"{i}.png")
    write_miniature_iclevr(base / "iclevr", num_train=16, num_test=32, seed=0)
    return base


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def runs(data):
    """(module, optimiser class whose step is interrupted, argv, keys of the checkpoint to compare)"""
    return {
        "ddpm_mnist": (ddpm_mnist, torch.optim.AdamW,
                       ["--data-dir", str(SHARED / "data"), "--limit", "48", "--batch-size", "16", "--ch", "8",
                        "--timesteps", "10", "--epochs", "2", "--num-samples", "0", "--device", "cpu"], ("model", "ema")),
        "cfg_afhq": (cfg_afhq, torch.optim.AdamW,
                     ["--data-dir", str(data / "classes"), "--image-size", "8", "--ch", "8", "--ch-mult", "1", "2",
                      "--num-res-blocks", "1", "--timesteps", "10", "--batch-size", "4", "--epochs", "2",
                      "--num-samples", "0", "--no-fid", "--device", "cpu"], ("model", "ema")),
        "cond_iclevr": (cond_iclevr, torch.optim.AdamW,
                        ["--data-dir", str(data / "iclevr"), "--image-size", "16", "--ch", "8", "--ch-mult", "1", "1",
                         "--num-res-blocks", "1", "--attn-res", "0", "--timesteps", "8", "--schedule", "cosine",
                         "--batch-size", "4", "--epochs", "2", "--sampler", "ddim", "--steps", "2", "--device", "cpu",
                         "--test-files", "test.json"], ("model", "ema")),
        "ddim": (ddim, torch.optim.Adam,
                 ["--hidden", "16", "16", "--emb-dim", "8", "--batch-size", "32", "--train-points", "500", "--iters", "12",
                  "--num-points", "16", "--timesteps", "20", "--no-table", "--steps", "4", "--ckpt-every", "5",
                  "--device", "cpu"], ("model", "ema")),
        "gan_baseline": (gan_baseline, torch.optim.Adam,
                         ["--data-dir", str(SHARED / "data"), "--limit", "48", "--batch-size", "16", "--ch", "8",
                          "--z-dim", "8", "--epochs", "2", "--num-samples", "0", "--device", "cpu"], ("G", "D", "ema")),
    }


@pytest.mark.parametrize("name", ["ddpm_mnist", "cfg_afhq", "cond_iclevr", "ddim", "gan_baseline"])
def test_ctrl_c_mid_epoch_resumes_to_the_same_run(name, data, tmp_path, monkeypatch, one_thread):
    module, optimizer, argv, keys = runs(data)[name]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    module.main(argv + ["--out", str(straight)])
    calls = {"n": 0}
    original = optimizer.step

    def step_then_interrupt(self, *a, **k):  # Ctrl-C arrives during the third optimiser step
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)
    monkeypatch.setattr(optimizer, "step", step_then_interrupt)
    with pytest.raises(SystemExit) as stop:
        module.main(argv + ["--out", str(cut)])
    assert stop.value.code == 130
    monkeypatch.setattr(optimizer, "step", original)
    interrupted = torch.load(cut / "ckpt.pt", weights_only=True)
    total = torch.load(straight / "ckpt.pt", weights_only=True)["step"]
    assert 0 < interrupted["step"] < total
    assert not (cut / "ckpt.pt.tmp").exists()
    module.main(argv + ["--out", str(cut), "--resume"])
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (straight, cut))
    assert a["step"] == b["step"] == total
    for key in keys:
        for param in a[key]:
            assert torch.equal(a[key][param], b[key][param]), f"{name}: {key}.{param} differs after resume"
    for key in ("losses", "d_losses", "g_losses"):
        if key in a:
            assert torch.equal(a[key], b[key]), key
    opt_key = "optimizer" if "optimizer" in a else "opt_g"
    first = next(iter(a[opt_key]["state"]))
    assert torch.equal(a[opt_key]["state"][first]["exp_avg"], b[opt_key]["state"][first]["exp_avg"])
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])
    # the training clock goes on over --resume: the resumed run's seconds include those before the interruption
    assert 0 < interrupted["train_seconds"] < b["train_seconds"]
