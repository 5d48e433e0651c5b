"""DDIM on a 2D swiss roll (Chamfer distance) and on image models, against DDPM and DPM-Solver++(2M).

The homework
------------
Keep a trained DDPM and replace its sampling loop with DDIM. It is graded on 2D particles: 2048 generated points
against 2048 points of the swiss roll, by the Chamfer distance (a sum, not a mean)
    CD(X, Y) = sum_{x in X} min_{y in Y} |x - y|^2 + sum_{y in Y} min_{x in X} |x - y|^2,
full marks for DDPM (all 1000 steps) below 20 and for DDIM with 50 of the 1000 steps below 60. On images, the same
samplers run on a ddpm_mnist.py checkpoint: fewer steps, the same network, FID against the number of steps.

The maths, in the papers' notation (t runs over {0, ..., T-1} in the code; abar_{-1} = 1 is the clean data)
----------------------------------------------------------------------------------------------------------
  training (as in ddpm_mnist.py)   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   loss |eps - eps_theta(x_t, t)|^2
  the x_0 estimate                 x0_hat = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)
  DDPM (Ho et al. 2020, Alg. 2)    x_{t-1} = mu~_t(x_t, x0_hat) + sqrt(beta~_t) z, through all T steps
  DDIM (Song et al. 2021, eq. 12), over an increasing sub-sequence tau of the steps, from t to the step s before it:
      x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma_t^2) eps_theta(x_t, t) + sigma_t z,
      sigma_t = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s).
    eta = 1 over every step is DDPM (sigma_t^2 = beta~_t; a test checks it). eta = 0 is deterministic: an Euler
    step of an ODE, which run the other way encodes a point x_0 into its x_T (Song et al. sec. 4.3, ddim_invert).
  DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t),
    lambda_t = log(alpha_t / sigma_t); going from t_{i-1} to t_i with h_i = lambda_{t_i} - lambda_{t_{i-1}},
      x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (exp(-h_i) - 1) D_i,
      D_i = (1 + 1 / (2 r_i)) x0_hat_{i-1} - 1 / (2 r_i) x0_hat_{i-2},   r_i = h_{i-1} / h_i.
    D_1 = x0_hat_0 (a DDIM step), and so is the last step onto the clean data, where h is infinite. It costs one
    network call per step, like DDIM, but is second order. Its steps are placed quadratically in t (dense near the
    data; evenly spaced ones leave one long step there that spoils the second order: see the table and the tests).

The data: scikit-learn's make_swiss_roll(noise=0, hole=True), columns 0 and 2, written here in numpy. The roll's
parameter t and the height y are drawn uniformly in one of 8 cells of a 3 x 3 grid over [1.5 pi, 4.5 pi] x [0, 21]
(the middle cell is the hole), so the middle turn of the 2D spiral holds 2/8 of the points, each outer one 3/8.
Points are normalised by one scalar mean and std (of the training pool) and scaled by 2, as the course does.

Commands (the README's numbers; OMP_NUM_THREADS=1 on a shared CPU)
------------------------------------------------------------------
  python ddim.py                                   # swiss roll: train (~3 min on one CPU core), table, plots
  python ddim.py --preset course                   # the course's setting: hidden 128 x 3, Adam 1e-3, 5000 iterations
  python ddim.py --sample-only --sampler dpmpp --steps 20      # resample from runs/ddim/ckpt.pt
  python ddim.py --data checkerboard --out runs/ddim_checkerboard
  python benchmarks/ddim_swiss_roll.py             # the README's table: default training, 3 seeds, medians
  python ddim.py --ckpt runs/ddpm_mnist/ckpt.pt --steps 50 --eta 0       # images: DDIM on a ddpm_mnist.py model
  python ddim.py --ckpt runs/ddpm_mnist/ckpt.pt --sampler dpmpp --steps 20
"""

import argparse
import csv
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# Keys that define a training run; --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("data", "train_points", "hidden", "emb_dim", "fourier", "residual", "timesteps", "schedule", "batch_size", "lr", "lr_decay",
            "warmup", "grad_clip", "ema_decay", "seed", "preset")
# The course's setting; any flag given explicitly still wins over the preset.
PRESETS = {"course": dict(hidden=[128, 128, 128], emb_dim=128, fourier=0, residual=False, iters=5000, batch_size=128, lr=1e-3,
                          lr_decay="constant", warmup=0, grad_clip=0.0, ema_decay=0.0)}
# The 2D table: (sampler, steps, eta, spacing) rows; steps are capped at T. "auto" spacing is each sampler's own
# (evenly spaced for DDIM, quadratic for DPM-Solver++); the last rows swap them, to separate solver from spacing.
TABLE = ([("ddpm", 1000, 0.0, "auto")]
         + [("ddim", n, eta, "auto") for n in (10, 20, 50, 100, 1000) for eta in (0.0, 0.5, 1.0)]
         + [("dpmpp", n, 0.0, "auto") for n in (10, 20)]
         + [("ddim", n, 0.0, "quadratic") for n in (10, 20, 50)] + [("dpmpp", n, 0.0, "uniform") for n in (10, 20)])


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DDPM, DDIM and DPM-Solver++ on 2D data (Chamfer distance) or on a "
                                            "ddpm_mnist.py checkpoint (see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=["swiss_roll", "moons", "circles", "checkerboard"], default="swiss_roll")
    g.add_argument("--num-points", type=int, default=2048, help="generated points, and reference points for the CD")
    g.add_argument("--train-points", type=int, default=1_000_000, help="size of the training pool drawn once")
    g.add_argument("--data-dir", default=None,
                   help="image mode: the training images for FID reference statistics (default: the checkpoint's)")
    g = p.add_argument_group("model and noise schedule")
    g.add_argument("--hidden", type=int, nargs="+", default=[256, 256, 256, 256], help="widths of the MLP's hidden layers")
    g.add_argument("--fourier", type=int, default=6,
                   help="Fourier features of the point: sin and cos at frequencies 2^k / 2 for k < this (0: the raw point)")
    g.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True,
                   help="hidden layers of equal width add their output to their input")
    g.add_argument("--emb-dim", type=int, default=128, help="size of the sinusoidal time embedding")
    g.add_argument("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    g.add_argument("--schedule", choices=["linear", "cosine"], default="linear",
                   help="linear: beta 1e-4 -> 0.02 (Ho et al., the course); cosine: Nichol & Dhariwal 2021")
    g = p.add_argument_group("training")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="course: hidden 128 128 128 (plain MLP), Adam 1e-3 constant, batch 128, 5000 iterations, no EMA")
    g.add_argument("--iters", type=int, default=10000, help="training iterations (fresh batches from the pool)")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate after warm-up")
    g.add_argument("--lr-decay", choices=["constant", "cosine"], default="cosine",
                   help="after warm-up: keep the rate, or decay it to zero along a cosine")
    g.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up, in iterations")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.999, help="decay of the weights' moving average (0: none)")
    g.add_argument("--seed", type=int, default=0, help="seeds the data, the training and the sampling noise")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--out", default=None, help="output folder (default runs/ddim; runs/ddim_images in image mode)")
    g.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    g.add_argument("--ckpt-every", type=int, default=1000, help="write OUT/ckpt.pt every this many iterations")
    g = p.add_argument_group("sampling and outputs")
    g.add_argument("--sample-only", action="store_true", help="skip training: sample from --ckpt (default OUT/ckpt.pt)")
    g.add_argument("--ckpt", default=None,
                   help="checkpoint to sample from; a ddpm_mnist.py checkpoint switches to image mode")
    g.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddim",
                   help="ddpm: ancestral, all T steps; ddim: --steps and --eta; dpmpp: DPM-Solver++(2M), --steps")
    g.add_argument("--steps", type=int, default=None, help="sampling steps for ddim and dpmpp (default 50, at most T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    g.add_argument("--spacing", choices=["auto", "uniform", "quadratic"], default="auto",
                   help="which steps ddim/dpmpp visit; auto: evenly spaced for ddim, quadratic for dpmpp")
    g.add_argument("--table", action=argparse.BooleanOptionalAction, default=True,
                   help="2D: the CD table over samplers, steps and eta (else only --sampler)")
    g.add_argument("--num-samples", type=int, default=10000, help="image mode: images written to OUT/samples")
    g.add_argument("--sample-batch-size", type=int, default=1000, help="image mode: images per sampling batch")
    g.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                   help="image mode: FID of the samples, and FID against steps (skipped with a note if no weights)")
    g.add_argument("--fid-steps", type=int, nargs="*", default=[10, 20, 50, 100],
                   help="image mode: step counts of the FID table (DDIM at --eta, and DPM-Solver++); none: no table")
    g.add_argument("--fid-stats", default=None, help="image mode: reference statistics .npz (as ddpm_mnist.py)")
    g.add_argument("--inception", default=None, help="image mode: FID Inception weights (as ddpm_mnist.py)")

    # A preset changes the defaults only, so that `--preset course --iters 500` still means 500 iterations.
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)

    # Bad values stop here, before anything is read or written.
    checks = [
        (args.num_points >= 1, f"--num-points must be at least 1, got {args.num_points}"),
        (args.train_points >= 1, f"--train-points must be at least 1, got {args.train_points}"),
        (min(args.hidden) >= 1 and args.emb_dim >= 2, "--hidden widths must be positive and --emb-dim at least 2"),
        (0 <= args.fourier <= 16, f"--fourier must be between 0 and 16, got {args.fourier}"),
        (args.timesteps >= 2, f"--timesteps must be at least 2, got {args.timesteps}"),
        (args.schedule != "linear" or args.timesteps > 20,  # make_betas scales beta_max to 0.02 * 1000 / T
         f"--timesteps {args.timesteps} with the linear schedule ends at beta = {20 / args.timesteps:g} >= 1 "
         "(abar = 0, no x_0 estimate): use more than 20 steps or --schedule cosine"),
        (args.iters >= 0, f"--iters must be 0 or more, got {args.iters}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.warmup >= 0, f"--warmup must be 0 or more, got {args.warmup}"),
        (args.grad_clip >= 0, f"--grad-clip must be 0 (off) or more, got {args.grad_clip}"),
        (0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1), got {args.ema_decay}"),
        (args.ckpt_every >= 1, f"--ckpt-every must be at least 1, got {args.ckpt_every}"),
        (args.steps is None or args.steps >= 1, f"--steps must be at least 1, got {args.steps}"),
        (args.steps is None or args.sampler != "ddpm",
         "--steps applies to --sampler ddim or dpmpp; DDPM takes all T steps (use --sampler ddim --eta 1 for a "
         "shorter noisy chain)"),
        (args.eta >= 0, f"--eta must be 0 or more, got {args.eta}"),
        (args.num_samples >= 0, f"--num-samples must be 0 or more, got {args.num_samples}"),
        (args.sample_batch_size >= 1, f"--sample-batch-size must be at least 1, got {args.sample_batch_size}"),
        (min(args.fid_steps, default=1) >= 1, "--fid-steps must all be at least 1"),
        (args.device == "cpu" or not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device} was asked for but CUDA is not available"),
        (not (args.resume and (args.sample_only or args.ckpt)), "--resume excludes --sample-only and --ckpt"),
        (args.data_dir is None or os.path.isdir(args.data_dir), f"--data-dir {args.data_dir} is not a folder"),
    ]
    for ok, message in checks:
        if not ok:
            p.exit(2, f"error: {message}\n")
    args.sample_only = args.sample_only or args.ckpt is not None
    args.out = args.out or ("runs/ddim" if args.ckpt is None else "runs/ddim_images")
    args.ckpt = args.ckpt or os.path.join(args.out, "ckpt.pt")
    if (args.resume or args.sample_only) and not os.path.isfile(args.ckpt):
        p.exit(2, f"error: checkpoint {args.ckpt} not found (train first, or pass --ckpt)\n")
    if not (args.resume or args.sample_only) and (args.steps or 1) > args.timesteps:
        p.exit(2, f"error: --steps must be between 1 and --timesteps ({args.timesteps}), got {args.steps}\n")
    return args


def fail(message):
    """One clear sentence and a non-zero exit: how every script reports bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# Data: 2D point clouds drawn in numpy, normalised by one scalar mean and std, times 2
# ---------------------------------------------------------------------------------------------------------------
def swiss_roll(n, rng):
    """scikit-learn's make_swiss_roll(n, noise=0, hole=True), columns x and z: the same draws in the same order, so
    with rng = np.random.RandomState(seed) the points equal scikit-learn's for random_state=seed.

    (t, y) is uniform in one of 8 cells of a 3 x 3 grid, t in [1.5 pi, 4.5 pi] in thirds of width pi and y in
    [0, 21] in thirds of 7, the middle cell left out: that cell is the hole in the 3D roll. In 2D y is dropped, and
    what stays of the hole is that the middle third of t is drawn only 2 times in 8, each outer third 3 times in 8."""
    cells = np.array([[np.pi * (1.5 + i), 7.0 * j] for i in range(3) for j in range(3) if (i, j) != (1, 1)])
    corner = cells[rng.choice(8, n)]
    t, _y = (corner.T + rng.uniform(size=(2, n)) * np.array([[np.pi], [7.0]]))
    return np.stack([t * np.cos(t), t * np.sin(t)], axis=1)


def moons(n, rng):
    """Two interleaved half circles (scikit-learn's make_moons layout), positions along each drawn uniformly."""
    s = rng.uniform(0, np.pi, n)
    upper = rng.uniform(size=n) < 0.5
    return np.where(upper[:, None], np.stack([np.cos(s), np.sin(s)], 1), np.stack([1 - np.cos(s), 0.5 - np.sin(s)], 1))


def circles(n, rng):
    """Two concentric circles, the inner one half as wide (scikit-learn's make_circles(factor=0.5) layout)."""
    a = rng.uniform(0, 2 * np.pi, n)
    radius = np.where(rng.uniform(size=n) < 0.5, 1.0, 0.5)
    return radius[:, None] * np.stack([np.cos(a), np.sin(a)], 1)


def checkerboard(n, rng):
    """Uniform on the 8 dark squares of a 4 x 4 board."""
    square = rng.integers(0, 8, n) if hasattr(rng, "integers") else rng.randint(0, 8, n)
    row = square // 2
    col = 2 * (square % 2) + row % 2  # alternate columns from row to row
    return np.stack([col, row], 1) + rng.uniform(size=(n, 2)) - 2.0


DATASETS = {"swiss_roll": swiss_roll, "moons": moons, "circles": circles, "checkerboard": checkerboard}


def normalise(points, mean, std, scale=2.0):
    return (points - mean) / std * scale


def make_point_data(name, train_points, num_points, seed):
    """The training pool and the reference set, independent draws, both normalised with the pool's mean and std
    (one scalar each, as the course does; a 1M-point pool makes them the distribution's own)."""
    pool = DATASETS[name](train_points, np.random.default_rng([seed, 0]))
    reference = DATASETS[name](num_points, np.random.default_rng([seed, 1]))
    mean, std = pool.mean(), pool.std()
    as_tensor = lambda points: torch.from_numpy(normalise(points, mean, std)).float()
    return as_tensor(pool), as_tensor(reference)


# ---------------------------------------------------------------------------------------------------------------
# Noise schedule (as ddpm_mnist.py)
# ---------------------------------------------------------------------------------------------------------------
def make_betas(kind, T):
    if kind == "linear":
        # Ho et al. use 1e-4 -> 0.02 for T = 1000; scaling by 1000 / T keeps abar_{T-1} near 0 for other T
        # (clipped like the cosine schedule, so a very short chain never has beta = 1 and abar = 0).
        scale = 1000 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=0.999)
    # Cosine schedule (Nichol & Dhariwal 2021, eq. 17): abar follows cos^2, beta clipped so the last step is not 1.
    s = 0.008
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


class NoiseSchedule:
    """The constants of the forward process and its posterior, indexed by t in {0, ..., T-1}."""

    def __init__(self, betas):
        self.T = len(betas)
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])  # abar_{-1} = 1
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)  # beta~_t
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)

    def to(self, device):
        moved = object.__new__(NoiseSchedule)
        moved.__dict__ = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()}
        return moved


# ---------------------------------------------------------------------------------------------------------------
# Model: an MLP that predicts the noise eps_theta(x_t, t) of a point
# ---------------------------------------------------------------------------------------------------------------
def timestep_embedding(t, dim):
    """Sinusoidal embedding of the step (Vaswani et al.), as in the DDPM UNet: dim/2 frequencies from 1 to 1e-4."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class NoiseMLP(nn.Module):
    """eps_theta(x_t, t) for points.

    The point first becomes Fourier features [x, sin(f_k x), cos(f_k x)] with f_k = 2^k / 2 for k < fourier (Tancik
    et al. 2020): an MLP of the two raw coordinates is smooth at the scale of the whole plot and blurs the roll's thin
    arms together; the features let it bend sharply. Then hidden layers h <- silu(W h + b + P e(t)), each given the
    time embedding e(t) through its own projection P so that it can act differently at each noise level; with
    residual = True a layer whose input is as wide as its output adds to it (h <- h + silu(...)), which lets a deeper
    net train as fast as a shallow one. fourier = 0 and residual = False is the course's plain MLP."""

    def __init__(self, dim, hidden, emb_dim, fourier=0, residual=False):
        super().__init__()
        self.emb_dim, self.residual = emb_dim, residual
        self.register_buffer("freqs", 2.0 ** torch.arange(fourier, dtype=torch.float32) / 2, persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU())
        widths = [dim * (1 + 2 * fourier)] + list(hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.emb_proj = nn.ModuleList(nn.Linear(emb_dim, b) for b in hidden)
        self.out = nn.Linear(widths[-1], dim)

    def forward(self, x, t):
        if bool((t == t[0]).all()):  # sampling: every point is at the same step, so embed it once and broadcast
            t = t[:1]
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim))
        angles = (x[:, :, None] * self.freqs).flatten(1)  # (N, dim * fourier)
        h = torch.cat([x, angles.sin(), angles.cos()], dim=1)
        for layer, proj in zip(self.layers, self.emb_proj):
            y = F.silu(layer(h) + proj(emb))
            h = h + y if self.residual and y.shape == h.shape else y
        return self.out(h)


def build_point_model(args):
    return NoiseMLP(2, args.hidden, args.emb_dim, args.fourier, args.residual)


# ---------------------------------------------------------------------------------------------------------------
# Diffusion maths: the pieces of ddpm_mnist.py, then DPM-Solver++(2M), DDIM inversion and the Chamfer distance
# ---------------------------------------------------------------------------------------------------------------
def extract(a, t, x):
    """a[t] (t an int or one index per sample), shaped to broadcast against x and in x's dtype."""
    return a[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def q_sample(sched, x0, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a sample of q(x_t | x_0) in one step."""
    return extract(sched.sqrt_alphas_cumprod, t, x0) * x0 + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def diffusion_loss(model, sched, x0, **model_kwargs):
    """Algorithm 1: a random step per image, and the MSE between the true and the predicted noise."""
    t = torch.randint(0, sched.T, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    return F.mse_loss(model(q_sample(sched, x0, t, noise), t, **model_kwargs).float(), noise)


def predict_x0(sched, x_t, t, eps):
    """Invert q_sample: the clean image implied by the predicted noise."""
    return (x_t - extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / extract(sched.sqrt_alphas_cumprod, t, x_t)


def ddpm_step(sched, x_t, t, eps, noise, clip=True):
    """Algorithm 2: x_{t-1} ~ q(x_{t-1} | x_t, x_0_hat), with sigma_t^2 = beta~_t (zero at t = 0)."""
    x0 = predict_x0(sched, x_t, t, eps)
    if clip:  # images live in [-1, 1]; clipping the estimate keeps early, poor estimates from derailing the chain
        x0 = x0.clamp(-1, 1)
    mean = extract(sched.posterior_mean_coef1, t, x_t) * x0 + extract(sched.posterior_mean_coef2, t, x_t) * x_t
    return mean + extract(sched.posterior_variance, t, x_t).sqrt() * noise


def ddim_step(sched, x_t, t, t_prev, eps, eta, noise, clip=True):
    """DDIM (Song et al. 2021, eq. 12) from step t to step t_prev < t (t_prev = -1 means the clean image)."""
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
    x0 = predict_x0(sched, x_t, t, eps)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - a_t.sqrt().to(x_t.dtype) * x0) / (1 - a_t).sqrt().to(x_t.dtype)  # the noise the clipped x0 implies
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    direction = (1 - a_prev - sigma ** 2).clamp(min=0).sqrt()
    return (a_prev.sqrt().to(x_t.dtype) * x0 + direction.to(x_t.dtype) * eps + sigma.to(x_t.dtype) * noise)


def sampling_timesteps(T, steps):
    """steps evenly spaced steps from 0 to T-1 inclusive (all T when steps == T), in increasing order."""
    return torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().tolist()


@torch.inference_mode()
def sample(eps_fn, sched, x, timesteps, sampler="ddpm", eta=0.0, generator=None, record=0, clip=True):
    """Run the reverse process from x (the state at timesteps[-1]) down to a clean image.

    eps_fn(x, t) -> eps_theta for a batch; timesteps increasing (ddpm needs consecutive ones); clip: clamp the
    x_0 estimate to [-1, 1] (images; not for data with another range).
    With record = R > 0 also returns R + 1 frames: x itself, then the state after each R-th of the trajectory
    (the last frame is the result)."""
    frames, n_steps, next_frame = [x], len(timesteps), 1
    for i, t in enumerate(reversed(timesteps)):
        t_prev = timesteps[n_steps - 2 - i] if i < n_steps - 1 else -1
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        if sampler == "ddpm":
            assert t_prev == t - 1, "the DDPM sampler steps through every t"
            x = ddpm_step(sched, x, t, eps, noise, clip)
        else:
            x = ddim_step(sched, x, t, t_prev, eps, eta, noise, clip)
        while record and next_frame <= record and -(-n_steps * next_frame // record) == i + 1:
            frames.append(x)
            next_frame += 1
    return (x, frames) if record else x


@torch.inference_mode()
def dpm_solver_pp_2m(eps_fn, sched, x, timesteps, record=0, clip=False):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from x (the state at timesteps[-1]) to the clean data.

    Same calling convention as sample(): timesteps increasing, one network call per step, record = R > 0 also
    returns R + 1 frames. It works in lambda = log(alpha / sigma), in which the ODE's linear part is solved exactly,
    and extrapolates the x_0 estimate linearly from the last two steps (a second-order multistep method)."""
    abar = sched.alphas_cumprod.tolist() + [1.0]  # abar[-1] = 1: the clean data
    lam = lambda t: 0.5 * math.log(abar[t] / (1 - abar[t]))
    frames, n_steps, next_frame = [x], len(timesteps), 1
    x0_prev = h_prev = None
    for i, t in enumerate(reversed(timesteps)):
        s = timesteps[n_steps - 2 - i] if i < n_steps - 1 else -1
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = predict_x0(sched, x, t, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
        if s < 0:  # onto the clean data: sigma_s = 0 and h is infinite, so the step lands on the estimate itself
            x = x0
        else:
            h = lam(s) - lam(t)
            # D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = h_prev / h; the first step has no history: D = x0 (DDIM)
            d = x0 if x0_prev is None else x0 + (h / (2 * h_prev)) * (x0 - x0_prev)
            x = math.sqrt((1 - abar[s]) / (1 - abar[t])) * x - math.sqrt(abar[s]) * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        while record and next_frame <= record and -(-n_steps * next_frame // record) == i + 1:
            frames.append(x)
            next_frame += 1
    return (x, frames) if record else x


@torch.inference_mode()
def ddim_invert(eps_fn, sched, x0, timesteps):
    """Encode clean points into x at timesteps[-1]: the eta = 0 DDIM update run forwards in t (Song et al. 2021,
    sec. 4.3). From step s to the next step t:  x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_theta(x_s, s);
    eps at the step being left stands in for eps at the step being reached, the mirror image of the sampler.
    From the clean data (s = -1, where the network was never trained) eps_theta is asked at the first step."""
    abar = sched.alphas_cumprod.tolist() + [1.0]
    x, s = x0, -1
    for t in timesteps:
        eps = eps_fn(x, torch.full((x.shape[0],), max(s, timesteps[0]), device=x.device, dtype=torch.long))
        x0_hat = (x - math.sqrt(1 - abar[s]) * eps) / math.sqrt(abar[s])
        x = math.sqrt(abar[t]) * x0_hat + math.sqrt(1 - abar[t]) * eps
        s = t
    return x


def quadratic_timesteps(T, steps):
    """steps steps from 0 to T-1, placed along t = (T-1) u^2 for evenly spaced u: dense near the data, where the
    trajectory bends most (the 'quadratic' sub-sequence of Song et al. 2021, DPM-Solver's 'time_quadratic').
    Where rounding would repeat a step the next one is taken, so all T steps is range(T)."""
    chosen = []
    for u in np.linspace(0, 1, steps):
        chosen.append(max(round((T - 1) * u * u), chosen[-1] + 1 if chosen else 0))
    return chosen


def run_sampler(eps_fn, sched, x_T, sampler, steps, eta=0.0, generator=None, record=0, clip=False, spacing="auto"):
    """x_T -> samples with one of the three samplers sharing eps_fn; steps is ignored by ddpm (all T steps).
    spacing auto: evenly spaced steps for DDIM (the homework's, and ddpm_mnist.py's), quadratic for DPM-Solver++,
    whose second-order steps are wasted where the steps are long near the data (a test shows it)."""
    if sampler == "ddpm":
        return sample(eps_fn, sched, x_T, list(range(sched.T)), "ddpm", 0.0, generator, record, clip)
    if spacing == "auto":
        spacing = "uniform" if sampler == "ddim" else "quadratic"
    timesteps = (sampling_timesteps if spacing == "uniform" else quadratic_timesteps)(sched.T, steps)
    if sampler == "ddim":
        return sample(eps_fn, sched, x_T, timesteps, "ddim", eta, generator, record, clip)
    return dpm_solver_pp_2m(eps_fn, sched, x_T, timesteps, record, clip)


def chamfer_distance(a, b, chunk=1024):
    """sum_x min_y |x - y|^2 + sum_y min_x |x - y|^2 over point sets a (N x D) and b (M x D), in float64.
    Rows of a are taken in chunks so that 2048 x 2048 (or larger) sets never build the whole distance matrix."""
    a, b = a.double(), b.double()
    a_to_b = a.new_zeros(())
    b_to_a = a.new_full((len(b),), float("inf"))
    for start in range(0, len(a), chunk):
        # compute_mode: exact differences, not the |a|^2 + |b|^2 - 2ab shortcut that loses tiny distances
        d2 = torch.cdist(a[start:start + chunk], b, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        a_to_b = a_to_b + d2.min(dim=1).values.sum()
        b_to_a = torch.minimum(b_to_a, d2.min(dim=0).values)
    return float(a_to_b + b_to_a.sum())


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def make_ema(model, decay):
    """An exponential moving average of the weights, which samples better than the raw weights."""
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def learning_rate(args, step):
    """Linear warm-up, then constant or a cosine down to zero at the last iteration."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_decay == "constant":
        return args.lr
    progress = (step - args.warmup) / max(1, args.iters - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_mlp(args, pool, model, ema, optimizer, sched, device, state):
    """Algorithm 1 on random batches of the pool. state holds what a checkpoint needs to resume exactly."""
    model.train()
    t_start, t_print, step_start = time.time(), time.time(), state["step"]

    def checkpoint():
        save_checkpoint(os.path.join(args.out, "ckpt.pt"), {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "args": vars(args), "rng": rng_state(), "losses": torch.tensor(state["losses"]), "step": state["step"]})

    try:
        while state["step"] < args.iters:
            x0 = pool[torch.randint(len(pool), (args.batch_size,))].to(device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, state["step"])
            loss = diffusion_loss(model, sched, x0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            ema.update_parameters(model)
            state["losses"].append(loss.item())
            state["step"] += 1
            if state["step"] % args.ckpt_every == 0 or state["step"] == args.iters:
                checkpoint()
            if time.time() - t_print > 5 or state["step"] == args.iters:
                t_print, elapsed = time.time(), time.time() - t_start
                rate = (state["step"] - step_start) / elapsed
                print(f"step {state['step']}/{args.iters}  loss {np.mean(state['losses'][-100:]):.4f}  "
                      f"{rate:.0f} it/s  left {format_seconds((args.iters - state['step']) / max(rate, 1e-9))}",
                      flush=True)
    except KeyboardInterrupt:
        checkpoint()
        print(f"\ninterrupted: saved {args.out}/ckpt.pt at step {state['step']}; continue with --resume", flush=True)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------
def get_font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def plot_loss(curves, path, title):
    """Line plot of {name: values per iteration} drawn with PIL: axes, ticks, labels, a smoothed line per curve.
    The y axis is logarithmic when every value is positive (a diffusion loss falls over decades)."""
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    W, H, left, right, top, bottom = 900, 540, 90, 30, 50, 70
    img = Image.new("RGB", (W, H), "white")
    draw, font, small = ImageDraw.Draw(img), get_font(18), get_font(14)
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in curves.values()])
    log = bool((values > 0).all()) and np.log10(values.max() / values.min()) >= 1  # log axis only over decades
    f = np.log10 if log else (lambda v: np.asarray(v, dtype=np.float64))
    lo, hi = np.percentile(f(values), [0.5, 100]) if len(values) else (0, 1)
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo - 0.03 * (hi - lo), hi + 0.03 * (hi - lo))
    n_max = max(len(v) for v in curves.values())
    px = lambda i: left + (W - left - right) * i / max(1, n_max - 1)
    py = lambda v: top + (H - top - bottom) * (1 - (min(max(v, lo), hi) - lo) / (hi - lo))
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    ticks = np.arange(math.floor(lo), math.ceil(hi) + 1, dtype=np.float64) if log and hi - lo >= 1 else np.linspace(lo, hi, 6)
    for v in ticks:
        if lo <= v <= hi:
            label = f"{10 ** v:.3g}" if log else f"{v:.3g}"
            draw.line([left - 5, py(v), left, py(v)], fill="black")
            draw.text((left - 8, py(v)), label, fill="black", font=small, anchor="rm")
    for i in np.linspace(0, n_max - 1, 6).round().astype(int) if n_max > 1 else [0]:
        draw.line([px(i), H - bottom, px(i), H - bottom + 5], fill="black")
        draw.text((px(i), H - bottom + 8), str(int(i) + 1), fill="black", font=small, anchor="ma")
    for k, (name, v) in enumerate(curves.items()):
        v = f(np.asarray(v, dtype=np.float64))
        colour = colours[k % len(colours)]
        faint = tuple(c + (255 - c) * 2 // 3 for c in colour)
        window = max(1, len(v) // 100)
        smooth = np.convolve(v, np.ones(window) / window, mode="valid") if len(v) >= window else v
        step = max(1, len(v) // 2000)  # at most ~2000 points per line keeps the PNG quick to draw
        if len(v) > 1:
            draw.line([(px(i), py(v[i])) for i in range(0, len(v), step)], fill=faint, width=1)
        if len(smooth) > 1:
            draw.line([(px(i + window - 1), py(smooth[i])) for i in range(0, len(smooth), step)], fill=colour, width=2)
        draw.text((W - right - 10, top + 10 + 22 * k), f"{name} (moving average of {window})", fill=colour,
                  font=small, anchor="ra")
    draw.text((W / 2, 15), title, fill="black", font=font, anchor="ma")
    draw.text(((left + W - right) / 2, H - 25), "iteration", fill="black", font=font, anchor="ma")
    label = Image.new("RGB", (H - top - bottom, 24), "white")
    ImageDraw.Draw(label).text((label.width / 2, 2), "loss (log scale)" if log else "loss", fill="black", font=font, anchor="ma")
    img.paste(label.rotate(90, expand=True), (8, top))
    img.save(path)


def write_metrics(path, metrics):
    with open(path + ".tmp", "w") as fh:
        json.dump(metrics, fh, indent=2)
    os.replace(path + ".tmp", path)


def scatter_panel(points, reference, title, lo, hi, size=480):
    """Generated points (blue) drawn over the reference (grey) on the square [lo, hi]^2, as a PIL image.
    Points outside the square are counted in the caption rather than silently lost."""
    margin_l, margin_t, margin_b = 50, 36, 40
    img = Image.new("RGB", (size + margin_l + 10, size + margin_t + margin_b), "white")
    draw, font, small = ImageDraw.Draw(img), get_font(16), get_font(12)
    to_px = lambda p: (margin_l + (p[:, 0] - lo) / (hi - lo) * size, margin_t + (hi - p[:, 1]) / (hi - lo) * size)
    draw.rectangle([margin_l, margin_t, margin_l + size, margin_t + size], outline="black")
    for v in np.linspace(lo, hi, 5):
        x, y = to_px(np.array([[v, v]]))
        draw.line([x[0], margin_t + size, x[0], margin_t + size + 4], fill="black")
        draw.text((x[0], margin_t + size + 6), f"{v:.1f}", fill="black", font=small, anchor="ma")
        draw.line([margin_l - 4, y[0], margin_l, y[0]], fill="black")
        draw.text((margin_l - 6, y[0]), f"{v:.1f}", fill="black", font=small, anchor="rm")
    outside = 0
    for pts, colour, r in ((reference, (170, 170, 170), 1.6), (points, (31, 90, 200), 1.2)):
        pts = pts.cpu().double().numpy()
        inside = ((pts >= lo) & (pts <= hi)).all(axis=1)
        if pts is not reference:
            outside = int((~inside).sum())
        xs, ys = to_px(pts[inside])
        for x, y in zip(xs, ys):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    draw.text((margin_l + size / 2, 8), title, fill="black", font=font, anchor="ma")
    caption = "blue: generated, grey: reference" + (f"  ({outside} generated points outside)" if outside else "")
    draw.text((margin_l + size / 2, margin_t + size + 22), caption, fill="black", font=small, anchor="ma")
    return img


def tile_panels(panels, columns):
    w, h = panels[0].size
    rows = math.ceil(len(panels) / columns)
    sheet = Image.new("RGB", (w * columns, h * rows), "white")
    for k, panel in enumerate(panels):
        sheet.paste(panel, ((k % columns) * w, (k // columns) * h))
    return sheet


def row_name(sampler, steps, eta, spacing):
    name = {"ddpm": f"ddpm_{steps}", "ddim": f"ddim_{steps}_eta{eta:g}", "dpmpp": f"dpmpp_{steps}"}[sampler]
    return name if spacing == "auto" else f"{name}_{spacing}"


def write_table(rows, path_txt):
    lines = [f"{'sampler':<8}{'steps':>7}{'eta':>6}  {'spacing':<10}{'CD':>10}{'seconds':>10}"]
    for r in rows:
        eta = f"{r['eta']:g}" if r["sampler"] == "ddim" else "-"
        lines.append(f"{r['sampler']:<8}{r['steps']:>7}{eta:>6}  {r['spacing']:<10}{r['cd']:>10.3f}"
                     f"{r['seconds']:>10.2f}")
    text = "\n".join(lines)
    print(text, flush=True)
    with open(path_txt, "w") as fh:
        fh.write(text + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Image mode: the same samplers on a ddpm_mnist.py checkpoint
# ---------------------------------------------------------------------------------------------------------------
def sample_images(args, saved, device):
    """Grid, process, N PNGs + zip and FID as ddpm_mnist.py writes them, with --sampler; then FID against steps."""
    import ddpm_mnist  # the UNet and the image writers live there; only image mode needs them
    ck = argparse.Namespace(**saved["args"])
    if (args.steps or 1) > ck.timesteps:
        fail(f"--steps {args.steps} is more than the checkpoint's {ck.timesteps} diffusion steps")
    args.steps = args.steps or min(50, ck.timesteps)
    fid_steps = sorted({min(n, ck.timesteps) for n in args.fid_steps})  # capped at T, as the 2D table's
    fid_args = argparse.Namespace(**{**saved["args"], "out": args.out, "fid_stats": args.fid_stats,
                                     "inception": args.inception, "data_dir": args.data_dir or ck.data_dir})
    in_ch = 1 if ck.dataset == "mnist" else 3
    size = 28 if ck.dataset == "mnist" else ck.image_size
    os.makedirs(args.out, exist_ok=True)
    sched = NoiseSchedule(make_betas(ck.schedule, ck.timesteps)).to(device)
    model = ddpm_mnist.build_model(ck, in_ch).to(device)
    ema = make_ema(model, ck.ema_decay)
    ema.load_state_dict(saved["ema"])
    eps_fn = ddpm_mnist.make_eps_fn(ema.module.eval(), device)
    steps = ck.timesteps if args.sampler == "ddpm" else args.steps
    print(f"image mode: {args.ckpt} ({ck.dataset}, T = {ck.timesteps}), {args.sampler} with {steps} steps", flush=True)

    def draw(n_images, sampler, n_steps, g, spacing="auto"):
        chunks = []
        for start in range(0, n_images, args.sample_batch_size):
            n = min(args.sample_batch_size, n_images - start)
            x_T = torch.randn((n, in_ch, size, size), generator=g, device=device)
            chunks.append(ddpm_mnist.to_uint8(run_sampler(eps_fn, sched, x_T, sampler, n_steps, args.eta, g, clip=True,
                                                       spacing=spacing)))
            print(f"sampled {start + n}/{n_images} ({sampler}, {n_steps} steps)", flush=True)
        return torch.cat(chunks)

    g = torch.Generator(device).manual_seed(args.seed)
    x_T = torch.randn((8, in_ch, size, size), generator=g, device=device)
    _, frames = run_sampler(eps_fn, sched, x_T, args.sampler, steps, args.eta, g, record=56, clip=True,
                         spacing=args.spacing)
    ddpm_mnist.save_process(frames, os.path.join(args.out, "process.png"), os.path.join(args.out, "process.gif"))
    metrics = {"device": str(device), "torch": torch.__version__, "ckpt": args.ckpt, "sampler": args.sampler,
               "sampling_steps": steps, "eta": args.eta if args.sampler == "ddim" else None, "spacing": args.spacing}
    t0 = time.time()
    images = draw(args.num_samples, args.sampler, steps, g, args.spacing)
    metrics.update(num_samples=len(images), sample_seconds=round(time.time() - t0, 1))
    if len(images):
        ddpm_mnist.make_grid(images[:25], nrow=5).save(os.path.join(args.out, "grid.png"))
        ddpm_mnist.save_samples(images, os.path.join(args.out, "samples"), os.path.join(args.out, "samples.zip"))
    if args.fid and len(images):
        result = ddpm_mnist.compute_fid(fid_args, images, device)
        metrics.update(result or {"fid": None})
        if result and fid_steps:
            table = []
            for sampler in ("ddim", "dpmpp"):
                for n_steps in fid_steps:
                    if (sampler, n_steps) == (args.sampler, steps) and args.spacing == "auto":
                        fake, seconds = images, metrics["sample_seconds"]  # the main run's images: no second draw
                        value = result["fid"]
                    else:
                        t1 = time.time()
                        fake = draw(args.num_samples, sampler, n_steps, torch.Generator(device).manual_seed(args.seed))
                        seconds = time.time() - t1
                        value = ddpm_mnist.compute_fid(fid_args, fake, device)["fid"]
                    table.append({"sampler": sampler, "steps": n_steps, "eta": args.eta if sampler == "ddim" else None,
                                  "fid": value, "num_samples": len(fake), "sample_seconds": round(seconds, 1)})
            print(f"FID against steps ({args.num_samples} samples vs {result['fid_reference']}):")
            for r in table:
                print(f"  {r['sampler']:<6}{r['steps']:>5} steps  FID {r['fid']:8.3f}  {r['sample_seconds']:7.1f} s")
            metrics["fid_vs_steps"] = table
    metrics.update(args=vars(args))
    write_metrics(os.path.join(args.out, "metrics.json"), metrics)
    print(f"wrote {args.out}: grid.png, process.png, process.gif, samples/ and samples.zip ({len(images)} images), "
          f"metrics.json", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# main: train (or load) on 2D points, then the table and the plots; or image mode
# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    saved = None
    if args.resume or args.sample_only:
        saved = load_checkpoint(args.ckpt)
        if "ch_mult" in saved.get("args", {}):  # a ddpm_mnist.py checkpoint
            return sample_images(args, saved, device)
        if "hidden" not in saved.get("args", {}):
            fail(f"{args.ckpt} is neither a ddim.py nor a ddpm_mnist.py checkpoint")
        for key in RUN_KEYS:  # the model and the data are the checkpoint's; --iters and the outputs can change
            setattr(args, key, saved["args"][key])
        if (args.steps or 1) > args.timesteps:
            fail(f"--steps {args.steps} is more than the checkpoint's {args.timesteps} diffusion steps")
    args.steps = args.steps or min(50, args.timesteps)
    pool, reference = make_point_data(args.data, args.train_points, args.num_points, args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    sched = NoiseSchedule(make_betas(args.schedule, args.timesteps)).to(device)
    model = build_point_model(args).to(device)
    ema = make_ema(model, args.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    state = {"step": 0, "losses": []}
    if saved is not None:
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(step=saved["step"], losses=saved["losses"].tolist())
        if args.resume:
            set_rng_state(saved["rng"])
            print(f"resuming {args.ckpt} at step {state['step']}", flush=True)
    print(f"MLP {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters on {device}; {args.data}, "
          f"T = {args.timesteps}", flush=True)

    metrics = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "data": args.data, "num_points": args.num_points,
               "reference": f"{args.num_points} fresh points (numpy seed [{args.seed}, 1]), normalised with the "
                            f"training pool's mean and std"}
    if not args.sample_only:
        t0, cpu0 = time.time(), time.process_time()
        train_mlp(args, pool, model, ema, optimizer, sched, device, state)
        # CPU seconds too: on a shared machine the wall time grows with the load, the CPU time hardly does
        metrics.update(train_seconds=round(time.time() - t0, 1), train_cpu_seconds=round(time.process_time() - cpu0, 1),
                       iters=state["step"])
        with open(os.path.join(args.out, "loss.csv"), "w", newline="") as fh:
            csv.writer(fh).writerows([("iteration", "loss")] + list(enumerate(state["losses"], 1)))
        if state["losses"]:
            plot_loss({"training loss": state["losses"]}, os.path.join(args.out, "loss.png"),
                      f"diffusion loss ({args.data}, batch {args.batch_size})")

    net = ema.module.eval()  # float32 even on a GPU: 2D points need more precision than bf16 gives
    configs = [(args.sampler, args.steps, args.eta, args.spacing)] + (TABLE if args.table else [])
    own = {"ddpm": "auto", "ddim": "uniform", "dpmpp": "quadratic"}
    configs = list(dict.fromkeys(  # each row once, in order; ddpm takes all T steps, eta is DDIM's alone
        (s, args.timesteps if s == "ddpm" else min(n, args.timesteps), e if s == "ddim" else 0.0,
         "auto" if s == "ddpm" or sp == own[s] else sp) for s, n, e, sp in configs))
    reference = reference.to(device)
    span = reference.abs().max().item() * 1.15
    os.makedirs(os.path.join(args.out, "scatter"), exist_ok=True)
    rows, panels = [], {}
    for sampler, steps, eta, spacing in configs:
        g = torch.Generator(device).manual_seed(args.seed)  # every sampler starts from the same x_T
        x_T = torch.randn((args.num_points, 2), generator=g, device=device)
        t1 = time.time()
        points = run_sampler(net, sched, x_T, sampler, steps, eta, g, spacing=spacing)
        seconds = time.time() - t1
        cd = chamfer_distance(points, reference)
        name = row_name(sampler, steps, eta, spacing)
        spacing = {"ddpm": "all", "ddim": "uniform", "dpmpp": "quadratic"}[sampler] if spacing == "auto" else spacing
        rows.append({"sampler": sampler, "steps": steps, "eta": eta if sampler == "ddim" else None, "spacing": spacing,
                     "cd": cd, "seconds": round(seconds, 3), "name": name})
        label = {"ddpm": "DDPM", "ddim": f"DDIM eta={eta:g}", "dpmpp": "DPM-Solver++(2M)"}[sampler]
        label += "" if spacing in ("all", "uniform") else f", {spacing}"
        panels[name] = scatter_panel(points, reference, f"{label}, {steps} steps: CD {cd:.2f}", -span, span)
        panels[name].save(os.path.join(args.out, "scatter", name + ".png"))
        if len(rows) == 1:  # the run's own sampler: its points as a file too
            panels[name].save(os.path.join(args.out, "samples.png"))
            np.savetxt(os.path.join(args.out, "samples.csv"), points.cpu().numpy(), delimiter=",", header="x,y",
                       comments="")
    write_table(rows, os.path.join(args.out, "table.txt"))
    overview = [n for n in ("ddpm_%d" % args.timesteps, "ddim_10_eta0", "ddim_20_eta0", "ddim_50_eta0",
                            "ddim_100_eta0", "ddim_50_eta1", "dpmpp_10", "dpmpp_20") if n in panels]
    if len(overview) > 1:
        tile_panels([panels[n] for n in overview], columns=4).save(os.path.join(args.out, "overview.png"))
    metrics.update(rows=rows, args=vars(args))
    write_metrics(os.path.join(args.out, "metrics.json"), metrics)
    print(f"wrote {args.out}: metrics.json, table.txt, samples.png, samples.csv, scatter/*.png"
          + (", overview.png" if len(overview) > 1 else "") + ("" if args.sample_only else ", loss.png, loss.csv"),
          flush=True)


if __name__ == "__main__":
    main()
