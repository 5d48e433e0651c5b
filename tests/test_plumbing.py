"""What every run promises (CONVENTIONS.md), tested once, on ddpm_mnist.py: bad input stops at once, a checkpoint is
data and survives a crash, Ctrl-C loses nothing and --resume is the same run, a rerun never mixes its samples with
an earlier run's; and the writers lay out what they say they do."""
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
import ddpm_mnist  # noqa: E402
import plumbing  # noqa: E402

TINY = ["--data-dir", str(SHARED / "data"), "--limit", "48", "--batch-size", "16", "--ch", "8", "--timesteps", "10",
        "--warmup", "1", "--device", "cpu", "--no-fid"]


def run(*args):
    return subprocess.run([sys.executable, "ddpm_mnist.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float sums depend on the thread count: bit-for-bit comparisons need one
    yield
    torch.set_num_threads(threads)


class Payload:
    """Unpickling this would create a file: a checkpoint that carries code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    (base / "text.pt").write_text("not a checkpoint")
    torch.save({"script": "cfg_afhq", "args": {}}, base / "other.pt")
    torch.save({"script": "ddpm_mnist", "model": Payload(str(base / "code_ran"))}, base / "code.pt")
    return base


@pytest.mark.parametrize("args, culprit", [
    (["--epochs", "-1"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--eta", "1.5"], "--eta"),
    (["--sampler", "ddpm", "--steps", "5"], "--steps"),  # DDPM takes every step
    (["--batch-size", "lots"], "--batch-size"),
    (["--dataset", "folder", "--data-dir", "{base}/no_such_folder"], "no_such_folder"),
    (["--fid", "--fid-stats", "{base}/missing.npz"], "missing.npz"),
    (["--sample-only", "--ckpt", "{base}/nothing.pt"], "nothing.pt"),
    (["--sample-only", "--ckpt", "{base}/text.pt"], "text.pt"),
    (["--sample-only", "--ckpt", "{base}/other.pt"], "ddpm_mnist"),
    (["--sample-only", "--ckpt", "{base}/code.pt"], "code.pt"),
    (["--fuse", "{base}/a.png", "{base}/b.png", "--ckpt", "{base}/other.pt"], "a.png"),
    (["--save-as", "grid.png"], "--save-as"),
    (["--device", "tpu"], "--device"),
])
def test_bad_input_stops_with_one_sentence_before_any_work(bad_files, tmp_path, args, culprit):
    out = tmp_path / "out"
    defaults = {"--data-dir": tmp_path / "no_mnist", "--device": "cpu", "--out": out}
    result = run(*[a.format(base=bad_files) for a in args], *[x for k, v in defaults.items() if k not in args for x in (k, v)])
    assert result.returncode == 2, result.stderr[-2000:]
    assert culprit in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "no_mnist").exists()  # nothing read, downloaded or written
    assert not (bad_files / "code_ran").exists()  # the payload's code never ran


def test_an_interrupted_checkpoint_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    plumbing.save_checkpoint(path, {"script": "x", "step": 1})

    def half_written(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError):
        plumbing.save_checkpoint(path, {"script": "x", "step": 2})
    assert plumbing.load_checkpoint(path, "x")["step"] == 1


def interrupt_at(monkeypatch, step, action):
    """Run action() during the optimiser step number `step` (1-based)."""
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step_and_act(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            action()
        return original(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step_and_act)


def test_ctrl_c_finishes_the_step_saves_and_resume_is_the_same_run(tmp_path, monkeypatch, one_thread):
    argv = TINY + ["--epochs", "2", "--num-samples", "0"]  # 3 steps an epoch
    ddpm_mnist.main(argv + ["--out", str(tmp_path / "straight")])
    interrupt_at(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(SystemExit) as stop:
        ddpm_mnist.main(argv + ["--out", str(tmp_path / "cut")])
    assert stop.value.code == 130
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 5  # the step in flight finished
    monkeypatch.undo()
    ddpm_mnist.main(argv + ["--out", str(tmp_path / "cut"), "--resume"])
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("straight", "cut"))
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"]["weights"][key], b["ema"]["weights"][key]), key
    assert torch.equal(a["losses"]["loss"], b["losses"]["loss"])


def test_a_crash_loses_at_most_a_minute_or_the_epoch_in_progress(tmp_path, monkeypatch):
    """At an epoch's end a checkpoint is written only if the last is SAVE_EVERY_S old: this run's first epoch takes a
    second, so a crash in the second epoch finds none; with SAVE_EVERY_S = 0 it finds the first epoch's."""
    def crash():
        raise RuntimeError("the machine went away")
    for every, out in ((60, tmp_path / "minute"), (0, tmp_path / "every_epoch")):
        monkeypatch.setattr(plumbing, "SAVE_EVERY_S", every)
        interrupt_at(monkeypatch, 5, crash)
        with pytest.raises(RuntimeError):
            ddpm_mnist.main(TINY + ["--epochs", "2", "--num-samples", "0", "--out", str(out)])
        assert (out / "progress" / "epoch_001.png").is_file()
    assert not (tmp_path / "minute" / "ckpt.pt").exists()
    assert torch.load(tmp_path / "every_epoch" / "ckpt.pt", weights_only=True)["step"] == 3  # the end of epoch 1


@pytest.mark.parametrize("native_bf16, name, dtype", [(True, "bf16", torch.bfloat16), (False, "fp16", torch.float16)])
def test_precision_follows_what_the_gpu_computes_natively(monkeypatch, native_bf16, name, dtype):
    asked = []  # a T4 reports bf16 when emulation counts: only native bf16 may choose it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or native_bf16)
    amp = plumbing.Precision(torch.device("cuda"))
    assert (amp.name, amp.dtype, asked) == (name, dtype, [False])
    cpu = plumbing.Precision(torch.device("cpu"))
    assert (cpu.name, cpu.scaler.is_enabled()) == ("float32", False)
    assert plumbing.Precision("cpu", "fp16").scaler.is_enabled()  # the scaler is on exactly for fp16


class TinyDenoiser(torch.nn.Module):
    """eps_theta(x_t, t) as one convolution: enough for the loss to fall in a few steps."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


def test_fp16_with_a_gradient_scaler_trains(tmp_path):
    """The training step of every script in fp16 autocast with its GradScaler (a T4's path; here on the CPU): the
    loss falls, and the loss was scaled (a scaler that is off keeps the scale at 1)."""
    torch.manual_seed(0)
    args = ddpm_mnist.parse_args(["--timesteps", "100", "--batch-size", "16", "--iters", "40", "--warmup", "1",
                                  "--lr", "0.02", "--device", "cpu", "--out", str(tmp_path)])
    plumbing.make_out_folder(args.out)
    data = (torch.rand(64, 1, 28, 28) > 0.7).to(torch.uint8) * 255
    model = TinyDenoiser()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    state, amp = {"step": 0, "seconds": 0.0, "losses": {"loss": []}}, plumbing.Precision("cpu", "fp16")
    ddpm_mnist.train(args, data, model, ddpm_mnist.EMA(model, 0.9), optimizer,
                     ddpm_mnist.NoiseSchedule(ddpm_mnist.make_betas("linear", 100)), state, amp)
    losses = torch.stack(state["losses"]["loss"])
    assert losses[-10:].mean() < 0.8 * losses[:5].mean()
    assert amp.scaler.get_scale() > 1 and optimizer.state[model.conv.weight]["step"] > 30


def test_a_rerun_never_mixes_its_samples_with_an_earlier_runs(tmp_path):
    assert run(*TINY, "--iters", "1", "--num-samples", "5", "--out", tmp_path).returncode == 0
    result = run("--sample-only", "--ckpt", tmp_path / "ckpt.pt", "--num-samples", "3", "--out", tmp_path,
                 "--no-fid", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    names = ["00001.png", "00002.png", "00003.png"]
    assert sorted(os.listdir(tmp_path / "samples")) == names
    with zipfile.ZipFile(tmp_path / "samples.zip") as zf:
        assert zf.namelist() == names  # flat: no folder inside
    assert json.loads((tmp_path / "metrics.json").read_text())["num_samples"] == 3


@pytest.mark.parametrize("n, nrow", [(2, 5), (7, 3), (25, 5)])
def test_make_grid_lays_out_what_torchvision_does(n, nrow):
    import torchvision
    images = torch.randint(0, 256, (n, 3, 64, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    ours = np.asarray(plumbing.make_grid(images, nrow=nrow))
    theirs = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    assert ours.shape == theirs.shape and (ours == theirs).all()


@pytest.mark.parametrize("curves", [{"loss": np.geomspace(1.0, 0.002, 500)},
                                     {"G": np.linspace(-1, 2, 300), "D": np.linspace(2, 0.5, 300)}])
def test_plot_loss_draws_every_curve(tmp_path, curves):
    plumbing.plot_loss(curves, tmp_path / "loss.png", "title")
    pixels = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB")).astype(int)
    below_legend = pixels[80 + 8 + 22 * len(curves) + 10:540 - 80]  # inside the axes, under the legend lines
    for colour in [(31, 119, 180), (214, 39, 40)][:len(curves)]:
        assert (np.abs(below_legend - colour).sum(axis=2) < 10).sum() > 100, colour


def test_save_as_writes_a_jpeg_under_the_courses_name(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "grid.png")
    target = tmp_path / "hand_in" / "result_mnist.jpg"
    plumbing.save_as(type("Args", (), {"save_as": [f"grid.png={target}"], "out": str(tmp_path)}))
    with Image.open(target) as img:
        assert img.format == "JPEG" and img.size == (8, 8)
