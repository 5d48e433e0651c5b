"""ddpm_mnist.py: the maths against closed forms in float64, then whole runs at tiny settings (CPU, seconds each)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
import ddpm_mnist as dm  # noqa: E402
import fid  # noqa: E402

WEIGHTS = SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth"
TINY = ["--data-dir", str(SHARED / "data"), "--limit", "128", "--batch-size", "64", "--ch", "8",
        "--timesteps", "20", "--warmup", "1", "--device", "cpu"]


def run(*args):
    return subprocess.run([sys.executable, "ddpm_mnist.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


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
    c1, c2 = s.posterior_mean_coef1.numpy(), s.posterior_mean_coef2.numpy()
    np.testing.assert_allclose(c1 + c2 * np.sqrt(abar), np.sqrt(abar_prev), rtol=1e-10)  # noise-free x_t
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
        assert abs(xt.mean().item() - math.sqrt(abar) * 0.7) < 5 * math.sqrt((1 - abar) / n)
        assert abs(xt.var().item() - (1 - abar)) < 5 * (1 - abar) * math.sqrt(2 / n)


def test_diffusion_loss_is_the_mse_between_the_noise_and_its_prediction():
    s = dm.NoiseSchedule(dm.make_betas("linear", 100))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 50, 98, 99])
    model = lambda x_t, t: 0.5 * x_t + t.float()[:, None, None, None] / 100  # noqa: E731 (any function of x_t and t)
    abar = s.alphas_cumprod[t].float()[:, None, None, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    expected = ((noise - model(x_t, t)) ** 2).mean()
    torch.testing.assert_close(dm.diffusion_loss(model, s, x0, t, noise), expected)


@pytest.mark.parametrize("clip", [True, False])
def test_ddim_with_eta_1_over_consecutive_steps_is_the_ddpm_step(clip):
    s = dm.NoiseSchedule(dm.make_betas("linear", 1000))
    g = torch.Generator().manual_seed(1)
    for t in (0, 1, 17, 500, 999):
        x_t, eps, z = (torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64) * 1.5 for _ in range(3))
        torch.testing.assert_close(dm.ddim_step(s, x_t, t, t - 1, eps, 1.0, z, clip), dm.ddpm_step(s, x_t, t, eps, z, clip),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [2, 20, 1000])
def test_one_ddim_step_with_the_true_noise_lands_on_the_clean_image(T):
    assert dm.sampling_timesteps(T, 1) == [T - 1]
    sched = dm.NoiseSchedule(dm.make_betas("linear", T))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 1, 5, 5, generator=g, dtype=torch.float64)
    x_T = dm.q_sample(sched, x0, T - 1, eps)
    out = dm.sample(lambda x, t: eps, sched, x_T, [T - 1], "ddim", 0.0, g, clip=False)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x_T, x0, atol=1e-2)


def test_ddim_with_eta_0_is_deterministic_and_sampling_timesteps_cover_the_chain():
    assert dm.sampling_timesteps(1000, 1000) == list(range(1000))
    ts = dm.sampling_timesteps(1000, 50)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 50 and all(b > a for a, b in zip(ts, ts[1:]))
    s = dm.NoiseSchedule(dm.make_betas("linear", 1000))
    x = torch.randn(3, 1, 4, 4)
    a = dm.sample(lambda x, t: 0.3 * x, s, x, ts, "ddim", 0.0, torch.Generator().manual_seed(1))
    b = dm.sample(lambda x, t: 0.3 * x, s, x, ts, "ddim", 0.0, torch.Generator().manual_seed(2))
    c = dm.sample(lambda x, t: 0.3 * x, s, x, ts, "ddim", 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_sample_records_noise_first_and_the_result_last():
    s = dm.NoiseSchedule(dm.make_betas("linear", 20))
    x = torch.randn(2, 1, 4, 4)
    out, frames = dm.sample(lambda x, t: torch.zeros_like(x), s, x, list(range(20)), "ddpm",
                            generator=torch.Generator().manual_seed(0), record=7)
    assert len(frames) == 8 and frames[0] is x and torch.equal(frames[-1], out)


def test_unet_keeps_the_shape_for_odd_sizes_and_conditioning():
    for size, mult in ((28, [1, 2, 2]), (28, [1, 2, 2, 2]), (16, [1, 2])):
        args = dm.parse_args(["--dataset", "folder", "--data-dir", str(ROOT), "--image-size", str(size),
                              "--ch", "8", "--ch-mult", *map(str, mult), "--num-res-blocks", "1", "--attn-res", "8"])
        net = dm.build_model(args, 3)
        x = torch.randn(2, 3, size, size)
        assert net(x, torch.tensor([0, 999])).shape == x.shape
        assert net(x, torch.tensor([3, 4]), extra_emb=torch.randn(2, net.emb_dim)).shape == x.shape


def test_ema_warms_up_and_follows_its_formula():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = dm.EMA(model, 0.999)
    for n in range(1, 101):
        with torch.no_grad():
            model.weight.fill_(float(n))
        before = ema.module.weight.item()
        ema.update()
        d = min(0.999, (1 + n) / (10 + n))
        assert ema.module.weight.item() == pytest.approx(d * before + (1 - d) * n, rel=1e-6)
    # Without the warm-up the average of the weights 1 ... 100 would still be below 6; with it, it follows them.
    assert ema.module.weight.item() > 85 and ema.updates == 100


# --- whole runs -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """A tiny MNIST run with FID, in this process, with the stubbed Fréchet distance (conftest's quick_frechet)."""
    out = tmp_path_factory.mktemp("mnist")
    stub = pytest.MonkeyPatch()
    stub.setattr(fid, "frechet_distance",  # as conftest's quick_frechet: no 2048 x 2048 square root
                 lambda m1, s1, m2, s2, eps=1e-6: float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2)))
    try:
        metrics = dm.main(TINY + ["--epochs", "2", "--num-samples", "30", "--sample-batch-size", "16", "--out", str(out),
                                  "--inception", str(WEIGHTS),
                                  "--fid-stats", str(SHARED / "fid-reference" / "mnist_train10k_stats.npz")])
    finally:
        stub.undo()
    yield out, metrics


def test_mnist_run_writes_every_output(mnist_run):
    out, metrics = mnist_run
    names = [f"{i:05d}.png" for i in range(1, 31)]
    assert sorted(os.listdir(out / "samples")) == names
    with Image.open(out / "samples" / "00001.png") as img:
        assert img.size == (28, 28) and img.mode == "RGB"
    for name in ("grid.png", "process.png", "process.gif", "loss.png", "loss.csv", "ckpt.pt", "samples.zip",
                 "progress/epoch_001.png", "progress/epoch_002.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_samples"] == 30 and saved["precision"] == "float32"
    assert saved["sampler"] == "ddim" and saved["sampling_steps"] == min(dm.DDIM_STEPS, 20)  # the default sampler
    assert saved["steps"] == 4 and saved["fid_num_samples"] == 30 and saved["fid"] == metrics["fid"]


def test_the_fid_in_metrics_is_fid_py_on_the_written_pngs(mnist_run, quick_frechet):
    out, metrics = mnist_run
    inception = fid.load_inception(str(WEIGHTS), "cpu")
    mu, sigma = fid.compute_statistics(str(out / "samples"), inception, device="cpu")
    reference = fid.load_statistics(str(SHARED / "fid-reference" / "mnist_train10k_stats.npz"))
    assert fid.frechet_distance(mu, sigma, *reference) == pytest.approx(metrics["fid"], rel=1e-9)


def test_grid_is_the_first_25_samples_and_process_rows_go_from_noise_to_the_sample(mnist_run):
    out, _ = mnist_run
    grid = np.asarray(Image.open(out / "grid.png"))
    scale, pad = 2, 2  # 28-px images are enlarged twice to be seen; 2-px white lines
    for i in (0, 7, 24):
        top, left = (pad + (i // 5) * (28 + pad)) * scale, (pad + (i % 5) * (28 + pad)) * scale
        sample = np.asarray(Image.open(out / "samples" / f"{i + 1:05d}.png"))
        assert (grid[top:top + 56:2, left:left + 56:2] == sample).all()
    process = np.asarray(Image.open(out / "process.png")).astype(float)
    assert process.shape == (scale * (8 * 30 + 2), scale * (8 * 30 + 2), 3)
    cells = [[process[(pad + r * 30) * scale:(pad + r * 30 + 28) * scale, (pad + c * 30) * scale:(pad + c * 30 + 28) * scale]
              for c in range(8)] for r in range(8)]
    noise_std = np.mean([cells[r][0].std() for r in range(8)])
    last_diff = np.mean([np.abs(cells[r][7] - cells[r][6]).mean() for r in range(8)])
    first_diff = np.mean([np.abs(cells[r][1] - cells[r][0]).mean() for r in range(8)])
    assert noise_std > 60 and last_diff < first_diff  # the first column is noise; the chain settles towards the end


def test_sample_only_with_ddim_is_reproducible_and_seed_draws_again(mnist_run, tmp_path):
    out, _ = mnist_run
    common = ["--sample-only", "--ckpt", out / "ckpt.pt", "--sampler", "ddim", "--steps", "5", "--num-samples", "4",
              "--no-fid", "--device", "cpu"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run(*common, "--out", tmp_path / name, "--seed", seed).returncode == 0
    a, b, c = (np.asarray(Image.open(tmp_path / n / "samples" / "00001.png")) for n in "abc")
    assert (a == b).all() and not (a == c).all()
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["sampling_steps"] == 5


def test_folder_run_and_fusion(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3)).astype(np.uint8)).save(faces / f"{i}.jpg")
    out = tmp_path / "run"
    result = run("--dataset", "folder", "--data-dir", faces, "--image-size", "16", "--ch", "8", "--ch-mult", "1", "2",
                 "--timesteps", "10", "--batch-size", "4", "--iters", "3", "--num-samples", "4", "--no-fid",
                 "--device", "cpu", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(out / "samples" / "00001.png") as img:
        assert img.size == (16, 16) and img.mode == "RGB"
    result = run("--out", out, "--fuse", faces, "--fuse-t", "2", "6", "--lam", "0.3", "--no-fid", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    fusion = json.loads((out / "fusion.json").read_text())
    assert fusion["pairs"] == 4 and all(2 <= t < 6 for t in fusion["t_per_pair"]) and fusion["lam"] == 0.3
    assert sorted(os.listdir(out / "fusion")) == [f"{i:05d}.png" for i in range(1, 5)]
    assert Image.open(out / "fusion.png").size == (4 * (3 * 18 + 2), 4 * (4 * 18 + 2))  # rows A | B | fused, x4


def test_fusion_of_two_identical_images_at_t_0_returns_the_image():
    """With A = B and t = 0 the mix is A noised by one step; denoising it gives back A up to the model's error."""
    sched = dm.NoiseSchedule(dm.make_betas("linear", 10))
    x0 = torch.rand(1, 1, 4, 4) * 2 - 1
    noise = torch.randn(1, 1, 4, 4)
    x_t = 0.5 * dm.q_sample(sched, x0, 0, noise) + 0.5 * dm.q_sample(sched, x0, 0, noise)
    out = dm.sample(lambda x, t: noise, sched, x_t, [0], "ddpm", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_a_gpu_sized_run_on_the_cpu_says_so_at_once(tmp_path):
    result = run("--data-dir", tmp_path / "nothing_here", "--device", "cpu", "--out", tmp_path / "out",
                 "--inception", tmp_path / "missing.pth")
    assert result.returncode == 2 and "--preset cpu" in result.stdout and "missing.pth" in result.stderr
