"""ddim.py: the swiss roll, the Chamfer distance, the samplers (DDPM = DDIM at eta 1, DDIM determinism and
inversion, DPM-Solver++ order), a short 2D run and its resume, and the image mode on a tiny ddpm_mnist.py checkpoint."""
import argparse
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ddim
import plumbing

SHARED = Path(__file__).resolve().parents[2] / "shared"


def sklearn_swiss_roll_with_hole(n, random_state):
    """scikit-learn's make_swiss_roll(n, noise=0, hole=True) as its source writes it (X: columns x, y, z; and t)."""
    generator = np.random.RandomState(random_state)
    corners = np.array([[np.pi * (1.5 + i), j * 7] for i in range(3) for j in range(3)])
    corners = np.delete(corners, 4, axis=0)
    corner_index = generator.choice(8, n)
    parameters = generator.uniform(size=(2, n)) * np.array([[np.pi], [7]])
    t, y = corners[corner_index].T + parameters
    X = np.vstack((t * np.cos(t), y, t * np.sin(t))).T
    return X, t


def build(args):
    """The 2D network of a run's flags (a Namespace or a checkpoint's args), as main() builds it."""
    a = argparse.Namespace(**args) if isinstance(args, dict) else args
    return ddim.NoiseMLP(2, a.hidden, a.emb_dim, a.fourier, a.residual, a.time, a.skip)


# ---- data --------------------------------------------------------------------------------------------------------
def test_swiss_roll_is_scikit_learns_draw_for_draw():
    X, _ = sklearn_swiss_roll_with_hole(5000, random_state=3)
    ours = ddim.swiss_roll(5000, np.random.RandomState(3))
    np.testing.assert_allclose(ours, X[:, [0, 2]], rtol=0, atol=1e-12)


def test_swiss_roll_statistics_match_the_construction():
    # Independent draws (different seeds and generators): the distributions must agree, not the points.
    n = 200_000
    X, t = sklearn_swiss_roll_with_hole(n, random_state=11)
    ref = X[:, [0, 2]]
    ours = ddim.swiss_roll(n, np.random.default_rng(12))
    radius = np.linalg.norm(ours, axis=1)  # |(t cos t, t sin t)| = t
    assert radius.min() >= 1.5 * np.pi - 1e-9 and radius.max() <= 4.5 * np.pi + 1e-9
    # The hole: t in the middle third is drawn 2 times in 8 (scikit-learn's own t says the same).
    se = math.sqrt(0.25 * 0.75 / n)
    for r in (t, radius):
        assert abs(np.mean((r > 2.5 * np.pi) & (r < 3.5 * np.pi)) - 0.25) < 5 * se
    for stat in (np.mean, np.std):
        np.testing.assert_allclose(stat(ours, axis=0), stat(ref, axis=0), atol=0.08)
        np.testing.assert_allclose(stat(ours), stat(ref), atol=0.08)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        np.testing.assert_allclose(np.quantile(radius, q), np.quantile(t, q), atol=0.1)
    # The course's normalisation: one scalar mean and std, times 2; the reference uses the pool's constants.
    pool, reference = ddim.make_point_data("swiss_roll", 100_000, 4096, seed=0)
    assert abs(pool.mean().item()) < 1e-4 and abs(pool.std().item() - 2.0) < 1e-3
    assert abs(reference.mean().item()) < 0.1 and abs(reference.std().item() - 2.0) < 0.1
    assert not torch.allclose(pool[:4096], reference)  # independent draws


@pytest.mark.parametrize("name", sorted(set(ddim.DATASETS) - {"swiss_roll"}))
def test_other_datasets_are_normalised_2d_points(name):
    pool, reference = ddim.make_point_data(name, 50_000, 256, seed=1)
    assert pool.shape == (50_000, 2) and reference.shape == (256, 2)
    assert abs(pool.mean().item()) < 1e-4 and abs(pool.std().item() - 2.0) < 1e-3
    assert pool[:, 0].std() > 0.5 and pool[:, 1].std() > 0.5  # spread in both coordinates, not a line


# ---- the Chamfer distance ----------------------------------------------------------------------------------------
def brute_force_chamfer(a, b):
    total = 0.0
    for x in a:
        total += min(sum((xi - yi) ** 2 for xi, yi in zip(x, y)) for y in b)
    for y in b:
        total += min(sum((xi - yi) ** 2 for xi, yi in zip(x, y)) for x in a)
    return total


@pytest.mark.parametrize("n, m, dim, chunk", [(37, 53, 2, 8), (64, 5, 3, 1024), (1, 9, 2, 1)])
def test_chamfer_matches_brute_force(n, m, dim, chunk):
    g = torch.Generator().manual_seed(n * m)
    a, b = torch.randn(n, dim, generator=g) * 3, torch.randn(m, dim, generator=g)
    expected = brute_force_chamfer(a.double().tolist(), b.double().tolist())
    assert ddim.chamfer_distance(a, b, chunk=chunk) == pytest.approx(expected, rel=1e-10)
    assert ddim.chamfer_distance(b, a, chunk=chunk) == pytest.approx(expected, rel=1e-10)


def test_chamfer_keeps_tiny_distances():
    a = torch.randn(300, 2, dtype=torch.float64) * 3 + 100  # far from the origin, as cancellation would hurt
    b = a + 1e-5
    assert ddim.chamfer_distance(a, a) == 0.0
    assert ddim.chamfer_distance(a, b) == pytest.approx(600 * 2e-10, rel=1e-3)


# ---- the network and the samplers ---------------------------------------------------------------------------------
def test_course_preset_is_the_courses_timelinear_net_and_the_default_adds_fourier_features():
    args = ddim.parse_args(["--preset", "course"])
    assert (args.hidden, args.iters, args.batch_size, args.lr, args.ema_decay, args.spacing) == ([128] * 3, 5000, 128,
                                                                                                 1e-3, 0.0, "course")
    course = build(args)
    assert all(isinstance(layer, ddim.TimeLinear) for layer in course.layers) and course.skip is not None
    assert course.layers[0].fc.in_features == 2 * (1 + 2 * 3)
    assert [layer.fc.out_features for layer in course.layers] == [128] * 3
    layer, x, t = course.layers[1], torch.randn(4, 128), torch.tensor([0, 10, 500, 999])
    # TimeLinear is fc(x) * g(t), g this layer's own MLP of 256 sinusoidal frequencies
    torch.testing.assert_close(layer(x, t), layer.fc(x) * layer.time_mlp(ddim.timestep_embedding(t, 256)))
    assert ddim.parse_args(["--preset", "course", "--iters", "500"]).iters == 500  # a flag still wins
    torch.manual_seed(0)
    model = build(ddim.parse_args([])).eval()
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda m, inp: seen.update(features=inp[0]))
    model.out.register_forward_pre_hook(lambda m, inp: seen.update(last_hidden=inp[0]))
    x, t = torch.tensor([[0.3, -1.2], [2.0, 0.5]]), torch.tensor([10, 700])
    model(x, t)
    f = torch.tensor([2.0 ** k / 2 for k in range(6)])  # frequencies 1/2, 1, 2, ..., 16
    angles = torch.cat([x[:, :1] * f, x[:, 1:] * f], dim=1)
    torch.testing.assert_close(seen["features"], torch.cat([x, angles.sin(), angles.cos()], dim=1))
    # Residual: with the later layers' weights at zero they add silu(0) = 0, so the first layer's output goes through.
    with torch.no_grad():
        for module in [*model.layers[1:], *model.emb_proj[1:]]:
            module.weight.zero_(), module.bias.zero_()
        first = F.silu(model.layers[0](seen["features"]) + model.emb_proj[0](model.time_mlp(
            ddim.timestep_embedding(t, model.emb_dim))))
        model(x, t)
    torch.testing.assert_close(seen["last_hidden"], first)


def random_mlp(seed=0):
    torch.manual_seed(seed)
    return ddim.NoiseMLP(2, [32, 32], 16).eval()


def test_ddim_eta1_over_all_steps_is_the_ddpm_step():
    sched = ddim.NoiseSchedule(ddim.make_betas("linear", 1000))
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(64, 2, generator=g, dtype=torch.float64) for _ in range(3))
    for t in (0, 1, 2, 10, 500, 998, 999):
        ddpm = ddim.ddpm_step(sched, x, t, eps, noise, clip=False)
        ddim_ = ddim.ddim_step(sched, x, t, t - 1, eps, 1.0, noise, clip=False)
        torch.testing.assert_close(ddim_, ddpm, rtol=1e-9, atol=1e-9)
    # ... and so whole chains agree when they are given the same noise.
    model, sched = random_mlp(), ddim.NoiseSchedule(ddim.make_betas("linear", 100))
    x_T = torch.randn(128, 2, generator=torch.Generator().manual_seed(1))
    a = ddim.sample(model, sched, x_T, list(range(100)), "ddpm", generator=torch.Generator().manual_seed(2), clip=False)
    b = ddim.sample(model, sched, x_T, list(range(100)), "ddim", 1.0, torch.Generator().manual_seed(2), clip=False)
    c = ddim.sample(model, sched, x_T, list(range(100)), "ddim", 1.0, torch.Generator().manual_seed(3), clip=False)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert (c - a).abs().max() > 0.01  # the check can fail: other noise gives another chain


def test_ddim_eta0_is_deterministic_and_eta_adds_noise():
    model, sched = random_mlp(), ddim.NoiseSchedule(ddim.make_betas("linear", 1000))
    x_T = torch.randn(128, 2, generator=torch.Generator().manual_seed(1))
    ts = ddim.sampling_timesteps(1000, 20)
    runs = [ddim.sample(model, sched, x_T, ts, "ddim", 0.0, torch.Generator().manual_seed(s), clip=False)
            for s in (5, 6)]
    assert torch.equal(runs[0], runs[1])
    noisy = [ddim.sample(model, sched, x_T, ts, "ddim", 0.5, torch.Generator().manual_seed(s), clip=False)
             for s in (5, 6)]
    assert (noisy[0] - noisy[1]).abs().max() > 0.01
    dpm = [ddim.dpm_solver_pp_2m(model, sched, x_T, ts) for _ in range(2)]
    assert torch.equal(dpm[0], dpm[1])


def gaussian_problem(T=1000, s=2.0):
    """Data N(0, s^2 I): the exact eps_theta is known, and the ODE maps x_T to x_T * s / sqrt(abar s^2 + 1 - abar)."""
    sched = ddim.NoiseSchedule(ddim.make_betas("linear", T))
    abar = sched.alphas_cumprod

    def eps_fn(x, t):
        a = abar[t].to(x.dtype)[:, None]
        return (1 - a).sqrt() * x / (a * s * s + 1 - a)

    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = x_T * s / (abar[-1] * s * s + 1 - abar[-1]).sqrt()
    return sched, eps_fn, x_T, exact


def test_dpm_solver_is_second_order_and_beats_ddim():
    sched, eps_fn, x_T, exact = gaussian_problem()
    err = {}
    for name, spacing in (("ddim", "uniform"), ("dpmpp", "uniform"), ("dpmpp", "quadratic")):
        for n in (10, 20, 40, 80):
            out = ddim.run_sampler(eps_fn, sched, x_T, name, n, spacing=spacing)
            err[name, spacing, n] = ((out - exact).norm() / exact.norm()).item()
    # Halving the step size: about x1/2 for a first-order method (DDIM), about x1/4 for a second-order one.
    ddim_rate = err["ddim", "uniform", 40] / err["ddim", "uniform", 80]
    dpm_rate = err["dpmpp", "uniform", 40] / err["dpmpp", "uniform", 80]
    assert 1.7 < ddim_rate < 2.4 and 3.2 < dpm_rate < 5, (ddim_rate, dpm_rate)
    # With evenly spaced steps the long last steps near the data spoil the second order at 10 steps; quadratic
    # spacing (its default) puts DPM-Solver++ far ahead of DDIM at every count.
    assert err["dpmpp", "uniform", 10] > err["ddim", "uniform", 10] / 2
    for n in (10, 20, 40, 80):
        assert err["dpmpp", "quadratic", n] < err["ddim", "uniform", n] / 10, n
    default = ddim.run_sampler(eps_fn, sched, x_T, "dpmpp", 20)
    assert default.equal(ddim.run_sampler(eps_fn, sched, x_T, "dpmpp", 20, spacing="quadratic"))
    # One step is the DDIM step (both land on the x_0 estimate).
    torch.testing.assert_close(ddim.run_sampler(eps_fn, sched, x_T, "dpmpp", 1),
                               ddim.run_sampler(eps_fn, sched, x_T, "ddim", 1))


@pytest.mark.parametrize("T", [2, 20, 1000])
def test_quadratic_timesteps(T):
    for steps in range(1, T + 1):
        ts = ddim.quadratic_timesteps(T, steps)
        assert len(ts) == steps and all(b > a for a, b in zip(ts, ts[1:])) and ts[-1] == T - 1
        assert ts[0] == (0 if steps > 1 else T - 1)  # one step starts at pure noise, not at the clean end
    assert ddim.quadratic_timesteps(T, T) == list(range(T))
    if T == 1000:  # denser near the data than evenly spaced steps
        assert ddim.quadratic_timesteps(T, 20)[1] < ddim.sampling_timesteps(T, 20)[1] / 4
        assert ddim.course_timesteps(T, 50) == list(range(0, 1000, 20))


# ---- a short 2D run: training, the table, the plots; and the inversion on its trained model ------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddim_2d")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thresholds below were set on one thread; restored after
    metrics = ddim.main(["--out", str(out), "--device", "cpu", "--iters", "1500", "--hidden", "64", "64", "64",
                         "--emb-dim", "32", "--batch-size", "256", "--lr", "3e-3", "--warmup", "50",
                         "--train-points", "50000", "--num-points", "256", "--sampler", "dpmpp", "--steps", "15",
                         "--seed", "3"])
    torch.set_num_threads(threads)
    return out, metrics


def test_short_run_writes_plots_and_table(short_run):
    out, returned = short_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == returned["rows"]
    rows = {r["name"]: r for r in metrics["rows"]}
    expected = {"dpmpp_15", "ddpm_1000", "dpmpp_10", "dpmpp_20", "dpmpp_10_uniform", "dpmpp_20_uniform"} | {
        f"ddim_{n}_eta{e:g}" for n in (10, 20, 50, 100, 1000) for e in (0, 0.5, 1)} | {
        f"ddim_{n}_eta0_quadratic" for n in (10, 20, 50)}
    assert set(rows) == expected and metrics["rows"][0]["name"] == "dpmpp_15"  # the run's own sampler first
    assert all(r["cd"] > 0 and r["seconds"] > 0 for r in rows.values())
    assert {"device", "torch", "data", "num_points", "reference", "train_seconds", "train_cpu_seconds", "iters", "rows",
            "args"} <= set(metrics)
    assert metrics["num_points"] == 256 and metrics["iters"] == 1500 and metrics["train_seconds"] > 0
    # Trained, not noise: DDPM's points are far closer to the roll than the Gaussian they started from.
    _, reference = ddim.make_point_data("swiss_roll", 50_000, 256, seed=3)
    noise_cd = ddim.chamfer_distance(torch.randn(256, 2, generator=torch.Generator().manual_seed(3)), reference)
    assert rows["ddpm_1000"]["cd"] < noise_cd / 10, (rows["ddpm_1000"]["cd"], noise_cd)
    # 1,500 steps at the default EMA decay (0.999): the warm-up lets the average follow the weights.
    assert rows["ddim_50_eta0"]["cd"] < noise_cd / 10, (rows["ddim_50_eta0"]["cd"], noise_cd)
    table = (out / "table.txt").read_text().strip().splitlines()
    assert len(table) == 1 + len(expected) and table[1].split()[:2] == ["dpmpp", "15"]
    assert float(table[1].split()[-2]) == pytest.approx(rows["dpmpp_15"]["cd"], abs=1e-3)
    for name in expected:  # every scatter plot shows generated points (blue) over the reference
        img = np.asarray(Image.open(out / "scatter" / f"{name}.png").convert("RGB")).astype(int)
        assert ((img[..., 2] > 150) & (img[..., 0] < 100)).sum() > 100, name
    assert (out / "loss.csv").read_text().count("\n") == 1501 and Image.open(out / "loss.png").size[0] > 300
    # 50,000 points in batches of 256: 195 steps an epoch, so 7 whole epochs and the last step's plot (epoch 8)
    assert sorted(os.listdir(out / "progress")) == [f"epoch_{e:03d}.png" for e in range(1, 9)]
    progress = np.asarray(Image.open(out / "progress" / "epoch_001.png").convert("RGB")).astype(int)
    assert ((progress[..., 2] > 150) & (progress[..., 0] < 100)).sum() > 50
    assert plumbing.load_checkpoint(str(out / "ckpt.pt"), "ddim")["step"] == 1500


def test_ddim_inversion_round_trip_on_the_trained_model(short_run):
    saved = plumbing.load_checkpoint(str(short_run[0] / "ckpt.pt"), "ddim")
    a = saved["args"]
    net = build(a).eval()
    net.load_state_dict(saved["ema"]["weights"])
    sched = ddim.NoiseSchedule(ddim.make_betas(a["schedule"], a["timesteps"]))
    _, points = ddim.make_point_data("swiss_roll", 50_000, 512, seed=7)
    ts = ddim.sampling_timesteps(a["timesteps"], 200)
    x_T = ddim.ddim_invert(net, sched, points, ts)
    back = ddim.sample(net, sched, x_T, ts, "ddim", 0.0, clip=False)
    error = (back - points).norm(dim=1)
    assert error.mean() < 0.02 and error.max() < 0.2, (error.mean(), error.max())  # the data spans about [-3.7, 3.7]
    # The encodings look like the prior: about standard normal, and not the points themselves.
    assert abs(x_T.std().item() - 1) < 0.15 and (x_T - points).norm(dim=1).mean() > 1
    coarse = ddim.sample(net, sched, ddim.ddim_invert(net, sched, points, ts[::20]), ts[::20], "ddim", 0.0, clip=False)
    assert (coarse - points).norm(dim=1).mean() > error.mean()  # the check can fail: 10 steps invert worse


def test_resume_continues_exactly(tmp_path):
    # 320 points in batches of 32: 10 steps an epoch; the first run stops mid-epoch 2, at step 13
    common = ["--device", "cpu", "--hidden", "16", "--emb-dim", "8", "--batch-size", "32", "--train-points", "320",
              "--num-points", "16", "--timesteps", "50", "--steps", "5", "--lr-decay", "constant", "--warmup", "3"]
    ddim.main(common + ["--out", str(tmp_path / "straight"), "--iters", "25"])
    ddim.main(common + ["--out", str(tmp_path / "resumed"), "--iters", "13"])
    first = plumbing.load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"), "ddim")
    ddim.main(common + ["--out", str(tmp_path / "resumed"), "--iters", "25", "--resume"])
    a = plumbing.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"), "ddim")
    b = plumbing.load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"), "ddim")
    assert first["step"] == 13 and a["step"] == b["step"] == 25
    assert not torch.equal(first["model"]["out.weight"], b["model"]["out.weight"])  # it did train on
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert all(torch.equal(v[s], b["optimizer"]["state"][k][s]) for s in v), k
    assert torch.equal(a["losses"]["loss"], b["losses"]["loss"])
    rows_a = json.loads((tmp_path / "straight" / "metrics.json").read_text())["rows"]
    rows_b = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["rows"]
    assert math.isfinite(rows_a[0]["cd"]) and [r["cd"] for r in rows_a] == [r["cd"] for r in rows_b]


@pytest.mark.parametrize("argv, culprit", [
    (["--iters", "-1"], "--iters"),
    (["--steps", "0"], "--steps"),
    (["--sampler", "ddpm", "--steps", "10"], "--steps"),
    (["--steps", "2000"], "--steps"),
    (["--eta", "1.5"], "--eta"),
    (["--batch-size", "64", "--train-points", "10"], "--train-points"),
    (["--sample-only"], "ckpt.pt"),
    (["--data", "spiral"], "--data"),
])
def test_bad_input_stops_before_writing(tmp_path, capsys, argv, culprit):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        ddim.main(argv + ["--out", str(out)])
    assert e.value.code == 2 and culprit in capsys.readouterr().err
    assert not out.exists()


# ---- image mode on a tiny ddpm_mnist.py checkpoint ---------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_ckpt(tmp_path_factory):
    import ddpm_mnist
    out = tmp_path_factory.mktemp("ddpm_tiny")
    ddpm_mnist.main(["--data-dir", str(SHARED / "data"), "--limit", "128", "--epochs", "1", "--ch", "8",
                     "--timesteps", "20", "--num-samples", "0", "--no-fid", "--device", "cpu", "--out", str(out)])
    return out / "ckpt.pt"


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_image_mode_writes_what_ddpm_mnist_writes(tmp_path, mnist_ckpt, sampler):
    out = tmp_path / sampler
    ddim.main(["--ckpt", str(mnist_ckpt), "--sampler", sampler, "--steps", "5", "--num-samples", "12",
               "--sample-batch-size", "5", "--no-fid", "--device", "cpu", "--out", str(out)])
    names = [f"{i:05d}.png" for i in range(1, 13)]
    assert sorted(os.listdir(out / "samples")) == names
    with zipfile.ZipFile(out / "samples.zip") as zf:
        assert sorted(zf.namelist()) == names
    with Image.open(out / "samples" / "00001.png") as img:
        assert img.size == (28, 28) and img.mode == "RGB"
    assert Image.open(out / "grid.png").size[0] > 5 * 28 and Image.open(out / "process.png").size[0] > 8 * 28
    assert Image.open(out / "process.gif").n_frames > 1  # animated (PIL merges repeated frames)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["sampler"], metrics["sampling_steps"], metrics["num_samples"]) == (sampler, 5, 12)


def test_image_mode_rejects_more_steps_than_the_checkpoint(tmp_path, mnist_ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        ddim.main(["--ckpt", str(mnist_ckpt), "--steps", "50", "--no-fid", "--device", "cpu",
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--steps" in err and "20" in err  # the checkpoint's T
    assert not (tmp_path / "o").exists()


def test_image_mode_grades_with_fid(tmp_path, mnist_ckpt, quick_frechet):
    stats = SHARED / "fid-reference" / "mnist_train10k_stats.npz"
    metrics = ddim.main(["--ckpt", str(mnist_ckpt), "--steps", "4", "--num-samples", "16", "--device", "cpu",
                         "--inception", str(SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth"),
                         "--fid-stats", str(stats), "--out", str(tmp_path / "fid")])
    written = json.loads((tmp_path / "fid" / "metrics.json").read_text())
    assert written["fid"] == metrics["fid"] > 0 and written["fid_num_samples"] == 16
    assert written["fid_reference"] == str(stats) and len(quick_frechet) == 1
