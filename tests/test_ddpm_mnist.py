"""ddpm_mnist.py: the maths against closed forms, then whole runs on tiny settings (CPU, a few seconds each)."""
import csv
import json
import math
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
import ddpm_mnist as dm  # noqa: E402

TINY = ["--data-dir", str(SHARED / "data"), "--limit", "128", "--batch-size", "64", "--ch", "8",
        "--timesteps", "20", "--warmup", "1", "--device", "cpu"]


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "ddpm_mnist.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# --- noise schedule, in float64, against formulas written out independently --------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_matches_closed_forms(kind):
    T = 1000
    s = dm.NoiseSchedule(dm.make_betas(kind, T))
    betas = s.betas.numpy()
    assert s.betas.dtype == torch.float64 and betas.shape == (T,)
    if kind == "linear":
        np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, T), rtol=0, atol=1e-15)
    else:  # abar_t = f(t + 1) / f(0) with f(u) = cos^2(((u / T) + s) / (1 + s) * pi / 2), wherever beta is unclipped
        f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        unclipped = betas < 0.999
        np.testing.assert_allclose(s.alphas_cumprod.numpy()[unclipped], (f[1:] / f[0])[unclipped], rtol=1e-10)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), abar, rtol=1e-12)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    # beta~_t from the product of two Gaussians: 1 / beta~ = 1 / (1 - abar_{t-1}) + alpha_t / beta_t (t >= 1)
    np.testing.assert_allclose(s.posterior_variance.numpy()[1:],
                               1 / (1 / (1 - abar_prev[1:]) + (1 - betas[1:]) / betas[1:]), rtol=1e-10)
    assert s.posterior_variance[0] == 0  # the last step adds no noise
    # With no noise in x_t (x_t = sqrt(abar_t) x_0) the posterior mean must be sqrt(abar_{t-1}) x_0 ...
    c1, c2 = s.posterior_mean_coef1.numpy(), s.posterior_mean_coef2.numpy()
    np.testing.assert_allclose(c1 + c2 * np.sqrt(abar), np.sqrt(abar_prev), rtol=1e-10)
    # ... and the posterior mean as Bayes gives it: (sqrt(abar_{t-1}) beta_t x0 + sqrt(alpha_t)(1 - abar_{t-1}) x_t) / (1 - abar_t)
    np.testing.assert_allclose(c1, np.sqrt(abar_prev) * betas / (1 - abar), rtol=1e-12)
    np.testing.assert_allclose(c2, np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar), rtol=1e-12)


@pytest.mark.parametrize("T", [2, 10, 20, 100])
def test_short_schedules_stay_invertible(T):
    s = dm.NoiseSchedule(dm.make_betas("linear", T))
    assert (s.betas < 1).all() and (s.alphas_cumprod > 0).all() and s.alphas_cumprod[-1] < 0.5


def test_q_sample_has_the_right_mean_and_variance():
    s = dm.NoiseSchedule(dm.make_betas("linear", 1000))
    torch.manual_seed(0)
    n = 400_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for t in (0, 250, 999):
        xt = dm.q_sample(s, x0, torch.full((n,), t), torch.randn(n, 1, dtype=torch.float64))
        abar = float(s.alphas_cumprod[t])
        se = math.sqrt((1 - abar) / n)
        assert abs(xt.mean().item() - math.sqrt(abar) * 0.7) < 5 * se
        assert abs(xt.var().item() - (1 - abar)) < 5 * (1 - abar) * math.sqrt(2 / n)


@pytest.mark.parametrize("clip", [True, False])
def test_ddim_with_eta_1_over_consecutive_steps_is_the_ddpm_step(clip):
    s = dm.NoiseSchedule(dm.make_betas("linear", 1000))
    g = torch.Generator().manual_seed(1)
    for t in (0, 1, 17, 500, 999):
        x_t, eps, z = (torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64) * 1.5 for _ in range(3))
        ddpm = dm.ddpm_step(s, x_t, t, eps, z, clip)
        ddim = dm.ddim_step(s, x_t, t, t - 1, eps, 1.0, z, clip)
        torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-10)


def test_ddim_with_eta_0_is_deterministic_and_sampling_timesteps_cover_the_chain():
    assert dm.sampling_timesteps(1000, 1000) == list(range(1000))
    ts = dm.sampling_timesteps(1000, 50)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 50 and all(b > a for a, b in zip(ts, ts[1:]))
    s = dm.NoiseSchedule(dm.make_betas("linear", 1000))
    eps_fn = lambda x, t: 0.3 * x  # any fixed function will do
    x = torch.randn(3, 1, 4, 4)
    a = dm.sample(eps_fn, s, x, ts, "ddim", 0.0, torch.Generator().manual_seed(1))
    b = dm.sample(eps_fn, s, x, ts, "ddim", 0.0, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_sample_records_noise_first_and_the_result_last():
    s = dm.NoiseSchedule(dm.make_betas("linear", 20))
    x = torch.randn(2, 1, 4, 4)
    out, frames = dm.sample(lambda x, t: torch.zeros_like(x), s, x, list(range(20)), "ddpm",
                            generator=torch.Generator().manual_seed(0), record=7)
    assert len(frames) == 8 and frames[0] is x and torch.equal(frames[-1], out)


def test_unet_keeps_the_shape_for_odd_sizes_and_conditioning():
    for size, mult in ((28, (1, 2, 2)), (28, (1, 2, 2, 2)), (16, (1, 2))):
        net = dm.UNet(3, 8, mult, 1, dm.attention_levels(size, mult, 8), 0.0)
        x = torch.randn(2, 3, size, size)
        assert net(x, torch.tensor([0, 999])).shape == x.shape
        assert net(x, torch.tensor([3, 4]), extra_emb=torch.randn(2, net.emb_dim)).shape == x.shape


@pytest.mark.parametrize("curves", [{"loss": list(np.geomspace(1.0, 0.002, 500))},  # over decades: log axis
                                     {"G": list(np.linspace(-1, 2, 300)), "D": list(np.linspace(2, 0.5, 300))},
                                     {"loss": [0.5]}])
def test_plot_loss_draws_any_curve(tmp_path, curves):
    dm.plot_loss(curves, tmp_path / "loss.png", "title")
    with Image.open(tmp_path / "loss.png") as img:
        pixels = np.asarray(img.convert("RGB"))
    assert img.size == (900, 540) and (pixels.std(axis=2) > 20).any()  # coloured curve pixels were drawn


def test_tick_labels_tell_every_tick_apart():
    assert dm.tick_labels([0.01, 0.1, 1.0, 10.0]) == ["0.01", "0.1", "1", "10"]  # 3 digits where they suffice
    barely_moving = dm.tick_labels(np.linspace(1.005, 1.012, 6))  # at 3 digits: 1, 1.01, 1.01, 1.01, 1.01, 1.01
    assert len(set(barely_moving)) == 6 and barely_moving[0] == "1.005" and barely_moving[-1] == "1.012"


# --- whole runs -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist")
    run(*TINY, "--epochs", "1", "--num-samples", "30", "--sample-batch-size", "16", "--out", out,
        "--fid", "--inception", SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth",
        "--fid-stats", SHARED / "fid-reference" / "mnist_train10k_stats.npz")
    return out


def test_mnist_run_writes_every_output(mnist_run):
    out = mnist_run
    for name in ("ckpt.pt", "loss.csv", "loss.png", "grid.png", "process.png", "process.gif", "samples.zip", "metrics.json"):
        assert (out / name).is_file(), name
    names = [f"{i:05d}.png" for i in range(1, 31)]
    assert sorted(p.name for p in (out / "samples").iterdir()) == names
    for name in names[:3] + names[-1:]:
        with Image.open(out / "samples" / name) as img:
            assert img.size == (28, 28) and img.mode == "RGB"
    with zipfile.ZipFile(out / "samples.zip") as zf:
        assert zf.namelist() == names  # at the root: no folder inside
        assert zf.read("00007.png") == (out / "samples" / "00007.png").read_bytes()
    with Image.open(out / "grid.png") as img:  # 5 x 5 cells of 28 px + 2 px padding, doubled to be seen
        assert img.size == (2 * (5 * 30 + 2),) * 2
    with Image.open(out / "process.png") as img:  # 8 samples x 8 steps
        assert img.size == (2 * (8 * 30 + 2),) * 2
    with open(out / "loss.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["iteration", "loss"] and len(rows) == 1 + 2  # 128 images / 64 per batch
    assert all(math.isfinite(float(r[1])) for r in rows[1:])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 30 and metrics["sampler"] == "ddpm" and metrics["sampling_steps"] == 20
    assert metrics["fid_num_samples"] == 30 and math.isfinite(metrics["fid"]) and metrics["fid"] > 0
    assert metrics["fid_reference"].endswith("mnist_train10k_stats.npz")


def test_sample_only_with_ddim_is_reproducible_and_seed_draws_again(mnist_run, tmp_path):
    said = {}
    for out, extra in ((tmp_path / "a", []), (tmp_path / "b", []), (tmp_path / "c", ["--seed", "1", "--ch", "12"])):
        said[out.name] = run("--sample-only", "--ckpt", mnist_run / "ckpt.pt", "--out", out, "--num-samples", "4",
                             "--sampler", "ddim", "--steps", "5", "--eta", "0", "--no-fid", *extra).stdout
    assert "note: --sample-only keeps the checkpoint's --ch 8 (not 12)" in said["c"] and "note" not in said["a"]
    def png(run_dir, i):
        return (tmp_path / run_dir / "samples" / f"{i:05d}.png").read_bytes()
    for i in range(1, 5):
        assert png("a", i) == png("b", i)  # the checkpoint's seed: the same images
        assert png("a", i) != png("c", i)  # an explicit --seed: the same model, other noise
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["sampler"] == "ddim" and metrics["sampling_steps"] == 5 and metrics["eta"] == 0.0
    assert metrics["args"]["seed"] == 0 and json.loads((tmp_path / "c" / "metrics.json").read_text())["args"]["seed"] == 1


def make_image_folder(root, n=10):
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    for i in range(n):  # mixed sizes, modes and extension cases, one level down as well
        arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
        path = (root / "sub" if i % 2 else root) / f"img{i}.{['png', 'JPG', 'jpeg'][i % 3]}"
        Image.fromarray(arr).convert("L" if i == 3 else "RGB").save(path, format="PNG" if i % 3 == 0 else "JPEG")
    return root


def test_folder_run_and_fusion(tmp_path):
    data = make_image_folder(tmp_path / "faces")
    out = tmp_path / "out"
    run("--dataset", "folder", "--data-dir", data, "--image-size", "16", "--ch", "8", "--timesteps", "10",
        "--epochs", "1", "--batch-size", "4", "--num-samples", "5", "--no-fid", "--device", "cpu", "--out", out)
    with Image.open(out / "samples" / "00005.png") as img:
        assert img.size == (16, 16) and img.mode == "RGB"
    run("--dataset", "folder", "--data-dir", data, "--out", out, "--fuse", data / "img0.png", data / "sub" / "img1.JPG",
        "--lam", "0.3", "--fuse-t", "5", "--device", "cpu")
    with Image.open(out / "fusion.png") as img:  # one pair: A | B | fused, 16 px + 2 px padding, enlarged 4x
        assert img.size == (4 * (3 * 18 + 2), 4 * (18 + 2))


def test_resume_continues_the_same_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(*TINY, "--epochs", "2", "--num-samples", "0", "--out", straight)
    run(*TINY, "--epochs", "1", "--num-samples", "0", "--out", resumed)
    run(*TINY, "--epochs", "2", "--num-samples", "0", "--out", resumed, "--resume")
    a, b = (dm.load_checkpoint(p / "ckpt.pt") for p in (straight, resumed))
    assert a["step"] == b["step"] == 4 and a["epoch"] == b["epoch"] == 2
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    assert torch.equal(a["losses"], b["losses"])
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])


def test_interrupted_epoch_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Ctrl-C in the middle of an epoch saves the batch position; --resume finishes that epoch, not a new one."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    # Both runs in this process: bitwise equality needs the same thread count (float sums depend on it).
    dm.main([*TINY, "--epochs", "1", "--num-samples", "0", "--out", str(straight)])
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step_then_interrupt(self, *a, **k):  # Ctrl-C arrives in the middle of the first batch
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    with pytest.raises(SystemExit) as stop:
        dm.main([*TINY, "--epochs", "1", "--num-samples", "0", "--out", str(cut)])
    assert stop.value.code == 130
    saved = dm.load_checkpoint(cut / "ckpt.pt")
    assert saved["step"] == 1 and saved["batch_in_epoch"] == 1 and saved["epoch"] == 0
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    dm.main([*TINY, "--epochs", "1", "--num-samples", "0", "--out", str(cut), "--resume"])
    a, b = (dm.load_checkpoint(p / "ckpt.pt") for p in (straight, cut))
    assert b["step"] == 2
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "unreadable image", "negative epochs"])
def test_bad_input_exits_with_one_sentence_and_writes_nothing(tmp_path, case):
    data, out = tmp_path / "data", tmp_path / "out"
    if case != "missing folder":
        data.mkdir()
    if case == "unreadable image":
        (data / "ok.png").write_bytes(b"")
        Image.new("RGB", (8, 8)).save(data / "fine.png")
        (data / "broken.jpg").write_bytes(b"not really a jpeg")
    epochs = "-1" if case == "negative epochs" else "1"
    proc = run("--dataset", "folder", "--data-dir", data, "--epochs", epochs, "--out", out, check=False)
    assert proc.returncode != 0
    message = proc.stderr.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1 and message.startswith("error:"), message
    assert {"missing folder": "not a folder", "empty folder": "no .png", "unreadable image": "cannot read image",
            "negative epochs": "--epochs"}[case] in message
    if case == "unreadable image":
        assert "broken.jpg" in message or "ok.png" in message
    assert not out.exists()


def test_fusion_writes_every_fused_image_and_their_fid(tmp_path, quick_frechet):
    """The SJTU hand-in: a folder fused in pairs, each pair at its own t drawn from a range, every fused image as a
    file beside the grid, and the FID of the fused images against their sources."""
    data = make_image_folder(tmp_path / "faces")
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(pairs / f"{i}.png")
    out = tmp_path / "out"
    run("--dataset", "folder", "--data-dir", data, "--image-size", "16", "--ch", "8", "--timesteps", "10",
        "--epochs", "1", "--batch-size", "4", "--num-samples", "0", "--no-fid", "--device", "cpu", "--out", out)
    # In this process, so that the distance can skip its matrix square root (conftest.py); the features are real.
    dm.main(["--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--fuse", str(pairs), "--fuse-t", "0",
             "6", "--lam", "0.5", "--device", "cpu", "--inception", str(SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth")])
    names = sorted(os.listdir(out / "fusion"))
    assert names == ["00001.png", "00002.png", "00003.png"]  # 6 images: 3 pairs, 3 fused images
    with zipfile.ZipFile(out / "fusion.zip") as zf:
        assert zf.namelist() == names
    result = json.loads((out / "fusion.json").read_text())
    assert result["pairs"] == 3 and all(0 <= t < 6 for t in result["t_per_pair"]) and result["fuse_t"] == [0, 6]
    assert result["fid"] > 0 and result["fid_num_samples"] == 3 and "6 source images" in result["fid_reference"]
    assert quick_frechet == [((2048,), (2048, 2048), (2048,), (2048, 2048))]  # fused images against their sources
    with Image.open(out / "fusion.png") as img:  # 3 rows of A | B | fused
        assert img.size == (4 * (3 * 18 + 2), 4 * (3 * 18 + 2))


def test_a_gpu_sized_run_on_the_cpu_says_so_at_once(capsys):
    args = dm.parse_args(["--data-dir", str(SHARED / "data"), "--device", "cpu"])  # the defaults: 30 epochs, ch 64
    model = dm.build_model(args, 1)
    sched = dm.NoiseSchedule(dm.make_betas("linear", 1000))
    batch = dm.load_mnist(str(SHARED / "data"), 64)
    rng = torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm.warn_if_slow_on_cpu(args, model, sched, batch, torch.device("cpu"), steps_per_epoch=469)
    out = capsys.readouterr().out
    assert "GPU-sized" in out and "--preset cpu" in out and len(out.strip().splitlines()) == 1
    assert torch.equal(torch.get_rng_state(), rng)  # the run itself is unchanged: same random state, same weights
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    args.preset = "cpu"
    dm.warn_if_slow_on_cpu(args, model, sched, batch, torch.device("cpu"), steps_per_epoch=469)
    assert capsys.readouterr().out == ""
