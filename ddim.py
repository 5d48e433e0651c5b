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
  the x_0 estimate                 x0_hat = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)     (predict_x0)
  DDPM (Ho et al. 2020, Alg. 2)    x_{t-1} = mu~_t(x_t, x0_hat) + sqrt(beta~_t) z, through all T steps   (ddpm_step)
  DDIM (Song et al. 2021, eq. 12), over an increasing sub-sequence tau of the steps, from t to the step s before it:
      x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma_t^2) eps_theta(x_t, t) + sigma_t z,                 (ddim_step)
      sigma_t = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s),   0 <= eta <= 1.
    eta = 1 over every step is DDPM (sigma_t^2 = beta~_t; a test checks it). eta = 0 is deterministic: an Euler
    step of an ODE, which run the other way encodes a point x_0 into its x_T (Song et al. sec. 4.3, ddim_invert).
    The sub-sequence: evenly spaced from 0 to T-1 (sampling_timesteps), or the course's rule, every T // S-th step
    from 0 (course_timesteps: 0, 20, ..., 980 for S = 50), or quadratic (quadratic_timesteps).
  DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t),    (dpm_solver_pp_2m)
    lambda_t = log(alpha_t / sigma_t); going from t_{i-1} to t_i with h_i = lambda_{t_i} - lambda_{t_{i-1}},
      x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (exp(-h_i) - 1) D_i,
      D_i = (1 + 1 / (2 r_i)) x0_hat_{i-1} - 1 / (2 r_i) x0_hat_{i-2},   r_i = h_{i-1} / h_i.
    D_1 = x0_hat_0 (a DDIM step), and so is the last step onto the clean data, where h is infinite. It costs one
    network call per step, like DDIM, but is second order. Its steps are placed quadratically in t (dense near the
    data; evenly spaced ones leave one long step there that spoils the second order: see the table and the tests).

The network (NoiseMLP). The course fixes everything but the inside of its SimpleNet: three hidden layers of 128,
Adam 1e-3, batch 128, 5,000 iterations, no EMA. A plain MLP that adds a time embedding to each layer scores
DDPM CD about 30 and DDIM-50 about 60 here: adding shifts every unit by the same amount at a given noise level,
and the roll's thin arms need features that change with the noise level. The course's own TimeLinear layer,
fc(x) * g_k(t) with a separate 256-frequency MLP g_k per layer, rescales every unit with t and alone brings DDPM
to about 10; Fourier features of the point (sin and cos at 2^k / 2, Tancik et al. 2020) let the first layer bend
sharply and take DDPM to about 5, but leave DDIM's deterministic steps a few points flung far out; a linear skip
from the point to the output (skip) pulls those back. --preset course is the three (README, "ddim.py"). The
default, for our own runs, is a residual 4 x 256 MLP with Fourier features, trained longer with a cosine learning
rate and an EMA.

The data: scikit-learn's make_swiss_roll(noise=0, hole=True), columns 0 and 2, written here in numpy. The roll's
parameter t and the height y are drawn uniformly in one of 8 cells of a 3 x 3 grid over [1.5 pi, 4.5 pi] x [0, 21]
(the middle cell is the hole), so the middle turn of the 2D spiral holds 2/8 of the points, each outer one 3/8.
Points are normalised by one scalar mean and std (of the training pool) and scaled by 2, as the course does.

Commands (the README's numbers)
-------------------------------
  python ddim.py                                   # swiss roll: train (~3 min on one CPU core), table, plots
  python ddim.py --preset course                   # the course's setting: 128 x 3, Adam 1e-3, 5,000 iterations
  python ddim.py --sample-only --sampler dpmpp --steps 20      # resample from runs/ddim/ckpt.pt
  python ddim.py --data checkerboard --out runs/ddim_checkerboard
  python benchmarks/ddim_swiss_roll.py             # the README's table: default training, 3 seeds, medians
  python ddim.py --ckpt runs/ddpm_mnist/ckpt.pt --steps 50 --eta 0       # images: DDIM on a ddpm_mnist.py model
  python ddim.py --ckpt runs/ddpm_mnist/ckpt.pt --sampler dpmpp --steps 20
"""

import argparse
import atexit
import copy
import csv
import datetime
import importlib.util
import json
import math
import os
import pickletools
import shutil
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

SCRIPT = "ddim"  # written into every checkpoint, so that another script's checkpoint is recognised
# A preset changes defaults only: `--preset course --iters 500` still means 500 iterations.
PRESETS = {
    "cpu": dict(device="cpu"),  # the defaults are sized for a CPU already (about 3 minutes on one core)
    # KAIST CS492(D) assignments 1-2: its fixed training (hidden 128 x 3, Adam 1e-3 constant, batch 128, 5,000
    # iterations, no EMA, no clipping) with a network its TODO allows (TimeLinear layers, Fourier features of the
    # point, a linear skip) and its DDIM step rule.
    "course": dict(hidden=[128, 128, 128], time="scale", emb_dim=256, fourier=3, residual=False, skip=True, iters=5000,
                   batch_size=128, lr=1e-3, lr_decay="constant", warmup=0, grad_clip=0.0, ema_decay=0.0,
                   spacing="course"),
}
# The flags that define a training run: --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("data", "train_points", "hidden", "time", "emb_dim", "fourier", "residual", "skip", "timesteps", "schedule",
            "batch_size", "lr", "lr_decay", "warmup", "grad_clip", "ema_decay", "seed", "preset")
# The 2D table: (sampler, steps, eta, spacing) rows; steps are capped at T. "auto" spacing is each sampler's own
# (--spacing's choice for DDIM, quadratic for DPM-Solver++); the last rows swap them, to separate solver from spacing.
TABLE = ([("ddpm", 1000, 0.0, "auto")]
         + [("ddim", n, eta, "auto") for n in (10, 20, 50, 100, 1000) for eta in (0.0, 0.5, 1.0)]
         + [("dpmpp", n, 0.0, "auto") for n in (10, 20)]
         + [("ddim", n, 0.0, "quadratic") for n in (10, 20, 50)] + [("dpmpp", n, 0.0, "uniform") for n in (10, 20)])
DELIBERATELY_DIFFERENT = {
    "build_model": "builds the MLP of 2D points, not a UNet",
    "train": "fresh random batches of points from a pool, counted in iterations, not epochs",
    "check_args": "the flags of points, the table and the image mode",
}


# =================================================================================================================
# Flags
# =================================================================================================================
def build_parser():
    p = FlagParser(description="DDPM, DDIM and DPM-Solver++ on 2D data (Chamfer distance) or on a "
                                            "ddpm_mnist.py checkpoint (see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default=None, help="course: KAIST's fixed setting; cpu: the defaults")
    a("--data", choices=["swiss_roll", "moons", "circles", "checkerboard"], default="swiss_roll", help="the 2D data")
    a("--num-points", type=int, default=2048, help="generated points, and reference points for the CD")
    a("--train-points", type=int, default=1_000_000, help="size of the training pool drawn once")
    a("--data-dir", default=None, help="image mode: the training images for FID statistics (default: the checkpoint's)")
    a("--hidden", type=int, nargs="+", default=[256, 256, 256, 256], help="widths of the MLP's hidden layers")
    a("--time", choices=["add", "scale"], default="add",
      help="how a layer sees t: add a projection of its embedding, or scale its output by one (the course's TimeLinear)")
    a("--fourier", type=int, default=6, help="Fourier features: sin, cos at 2^k / 2 for k < this (0: the raw point)")
    a("--residual", action=argparse.BooleanOptionalAction, default=True, help="equal-width layers add to their input")
    a("--skip", action=argparse.BooleanOptionalAction, default=False,
      help="add a linear map of the point (scaled with t like the layers) to the output")
    a("--emb-dim", type=int, default=128, help="size of the sinusoidal time embedding")
    a("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    a("--schedule", choices=["linear", "cosine"], default="linear", help="linear 1e-4 -> 0.02 (the course's), or cosine")
    a("--iters", type=int, default=10000, help="training iterations (fresh batches from the pool)")
    a("--batch-size", type=int, default=256, help="points per iteration")
    a("--lr", type=float, default=2e-3, help="Adam learning rate after warm-up")
    a("--lr-decay", choices=["constant", "cosine"], default="cosine", help="after warm-up: keep it, or decay to 0")
    a("--warmup", type=int, default=200, help="linear learning-rate warm-up, in iterations")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    a("--ema-decay", type=float, default=0.999, help="decay of the weights' moving average (0: none)")
    a("--seed", type=int, default=0,
      help="seeds the data, the training and the sampling noise (with --sample-only: the fresh points and the sampling)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    a("--compile", action="store_true", help="torch.compile the model for training (and image mode's sampling)")
    a("--out", default=None, help="output folder (default runs/ddim; runs/ddim_images in image mode)")
    a("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    a("--ckpt-every", type=int, default=1000, help="write OUT/ckpt.pt every this many iterations")
    a("--sample-only", action="store_true", help="skip training: sample from --ckpt (default OUT/ckpt.pt)")
    a("--ckpt", default=None, help="checkpoint to sample from; a ddpm_mnist.py checkpoint switches to image mode")
    a("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddim", help="ddpm (all T steps), ddim, or DPM-Solver++(2M)")
    a("--steps", type=int, default=None, help="sampling steps for ddim and dpmpp (default 50, at most T)")
    a("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like noise")
    a("--spacing", choices=["auto", "uniform", "course", "quadratic"], default="auto",
      help="the steps ddim/dpmpp visit: uniform 0..T-1, course (every T // S-th from 0), quadratic; auto: uniform for "
           "ddim, quadratic for dpmpp")
    a("--table", action=argparse.BooleanOptionalAction, default=True, help="2D: the CD table over samplers and steps")
    a("--num-samples", type=int, default=10000, help="image mode: images written to OUT/samples")
    a("--sample-batch-size", type=int, default=1000, help="image mode: images per sampling batch")
    a("--fid", action=argparse.BooleanOptionalAction, default=True, help="image mode: FID, and FID against steps")
    a("--fid-steps", type=int, nargs="*", default=[10, 20, 50, 100], help="image mode: step counts of the FID table")
    a("--fid-stats", default=None, help="image mode: reference statistics .npz (as ddpm_mnist.py)")
    a("--inception", default=None, help="image mode: FID Inception weights (as ddpm_mnist.py)")
    a("--fp32-sampling", action="store_true",
      help="image mode: sample in float32 on a GPU too (default there: bf16 autocast, faster, a little less exact)")
    return p


def parse_args(argv=None):
    args = parse_with_preset(build_parser(), argv)
    check_args(args)
    if args.resume and (args.sample_only or args.ckpt):
        fail("--resume excludes --sample-only and --ckpt")
    args.sample_only = args.sample_only or args.ckpt is not None
    args.out = args.out or ("runs/ddim" if args.ckpt is None else "runs/ddim_images")
    args.ckpt = args.ckpt or os.path.join(args.out, "ckpt.pt")
    if (args.resume or args.sample_only) and not os.path.isfile(args.ckpt):
        fail(f"checkpoint {args.ckpt} not found (train first, or pass --ckpt)")
    return args


# =================================================================================================================
# Data: 2D point clouds drawn in numpy, normalised by one scalar mean and std, times 2
# =================================================================================================================
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


# =================================================================================================================
# Noise schedule (as ddpm_mnist.py)
# =================================================================================================================
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
        """The same schedule with its tensors on device (every constant above follows from betas)."""
        return NoiseSchedule(self.betas.to(device))


# =================================================================================================================
# Model: an MLP that predicts the noise eps_theta(x_t, t) of a point
# =================================================================================================================
def timestep_embedding(t, dim):
    """Sinusoidal embedding of the step (Vaswani et al.), as in the DDPM UNet: dim/2 frequencies from 1 to 1e-4."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TimeLinear(nn.Module):
    """The course's layer: fc(x) * g(t), where g(t) = Linear(SiLU(Linear(sinusoidal(t, frequencies)))) is this
    layer's own MLP of the step: every output unit is rescaled by a learned function of the noise level."""

    def __init__(self, dim_in, dim_out, frequencies):
        super().__init__()
        self.frequencies = frequencies
        self.fc = nn.Linear(dim_in, dim_out)
        self.time_mlp = nn.Sequential(nn.Linear(frequencies, dim_out), nn.SiLU(), nn.Linear(dim_out, dim_out))

    def forward(self, x, t):
        return self.fc(x) * self.time_mlp(timestep_embedding(t, self.frequencies))


class NoiseMLP(nn.Module):
    """eps_theta(x_t, t) for points.

    The point first becomes Fourier features [x, sin(f_k x), cos(f_k x)] with f_k = 2^k / 2 for k < fourier (Tancik
    et al. 2020): an MLP of the two raw coordinates is smooth at the scale of the whole plot and blurs the roll's thin
    arms together; the features let it bend sharply. Then hidden layers, each seeing the step t in one of two ways:
      time = "add":    h <- silu(W h + b + P e(t)), one shared embedding e(t) with a projection P per layer;
      time = "scale":  h <- silu((W h + b) * g(t)), the course's TimeLinear, a separate MLP g per layer.
    With residual = True a layer whose input is as wide as its output adds to it (h <- h + silu(...)), which lets a
    deeper net train as fast as a shallow one. With skip = True a linear map of the point itself (a TimeLinear in
    "scale" mode) is added to the output: near the data the true eps is (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t),
    linear in x_t, so a point that strays where the MLP never trained is still pulled back rather than flung out by
    its extrapolation (DDIM's deterministic steps never correct such a point; DDPM's noise does).
    fourier = 0, residual = False, skip = False, time = "add" is a plain MLP."""

    def __init__(self, dim, hidden, emb_dim, fourier=0, residual=False, time="add", skip=False):
        super().__init__()
        self.emb_dim, self.residual, self.time = emb_dim, residual, time
        self.register_buffer("freqs", 2.0 ** torch.arange(fourier, dtype=torch.float32) / 2, persistent=False)
        widths = [dim * (1 + 2 * fourier)] + list(hidden)
        if time == "scale":
            self.layers = nn.ModuleList(TimeLinear(a, b, emb_dim) for a, b in zip(widths[:-1], widths[1:]))
        else:
            self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU())
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
            self.emb_proj = nn.ModuleList(nn.Linear(emb_dim, b) for b in hidden)
        self.out = nn.Linear(widths[-1], dim)
        self.skip = (TimeLinear(dim, dim, emb_dim) if time == "scale" else nn.Linear(dim, dim)) if skip else None

    def forward(self, x, t):
        if bool((t == t[0]).all()):  # sampling: every point is at the same step, so embed it once and broadcast
            t = t[:1]
        angles = (x[:, :, None] * self.freqs).flatten(1)  # (N, dim * fourier)
        h = torch.cat([x, angles.sin(), angles.cos()], dim=1)
        if self.time == "add":
            emb = self.time_mlp(timestep_embedding(t, self.emb_dim))
        for k, layer in enumerate(self.layers):
            y = F.silu(layer(h, t)) if self.time == "scale" else F.silu(layer(h) + self.emb_proj[k](emb))
            h = h + y if self.residual and y.shape == h.shape else y
        if self.skip is None:
            return self.out(h)
        return self.out(h) + (self.skip(x, t) if self.time == "scale" else self.skip(x))


def build_model(args):
    return NoiseMLP(2, args.hidden, args.emb_dim, args.fourier, args.residual, args.time, args.skip)


# =================================================================================================================
# Diffusion maths: the pieces of ddpm_mnist.py, then DPM-Solver++(2M), DDIM inversion and the Chamfer distance
# =================================================================================================================
def extract(a, t, x):
    """a[t] (t an int or one index per sample), shaped to broadcast against x and in x's dtype."""
    return a[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def q_sample(sched, x0, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a sample of q(x_t | x_0) in one step."""
    return extract(sched.sqrt_alphas_cumprod, t, x0) * x0 + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def diffusion_loss(model, sched, x0, t, noise, **model_kwargs):
    """Algorithm 1's loss: the MSE between the noise eps added at step t and the model's prediction of it."""
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
    """DDIM (Song et al. 2021, eq. 12) from step t to step t_prev < t (t_prev = -1 means the clean image), 0 <= eta <= 1."""
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
    x0 = predict_x0(sched, x_t, t, eps)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - a_t.sqrt().to(x_t.dtype) * x0) / (1 - a_t).sqrt().to(x_t.dtype)  # the noise the clipped x0 implies
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    # sigma^2 <= 1 - abar_{t'} for eta <= 1; the clamp only removes rounding below zero.
    direction = (1 - a_prev - sigma ** 2).clamp(min=0).sqrt()
    return (a_prev.sqrt().to(x_t.dtype) * x0 + direction.to(x_t.dtype) * eps + sigma.to(x_t.dtype) * noise)


def sampling_timesteps(T, steps):
    """steps evenly spaced steps from 0 to T-1 inclusive, increasing (all T when steps == T). One step is [T-1]:
    straight from pure noise to the clean image."""
    if steps == 1:
        return [T - 1]
    return torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().tolist()


@torch.inference_mode()
def sample(eps_fn, sched, x, timesteps, sampler="ddpm", eta=0.0, generator=None, record=0, clip=True):
    """Run the reverse process from x (the state at timesteps[-1]) down to a clean image.

    eps_fn(x, t) -> eps_theta for a batch; timesteps increasing (ddpm needs consecutive ones); clip: clamp the
    x_0 estimate to [-1, 1] (images; not for data with another range).
    With record = R > 0 also returns R + 1 frames: x itself, then the state after each R-th of the trajectory
    (the last frame is the result)."""
    n_steps = len(timesteps)
    # Frame k = 1..R is the state after step ceil(k * n_steps / R): with 1000 steps and R = 56, after steps
    # 18, 36, ..., 1000. With fewer steps than frames, a state fills several frames.
    record_after = [math.ceil(k * n_steps / record) for k in range(1, record + 1)] if record else []
    frames = [x]
    for i, t in enumerate(reversed(timesteps)):
        t_prev = timesteps[n_steps - 2 - i] if i < n_steps - 1 else -1
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        if sampler == "ddpm":
            assert t_prev == t - 1, "the DDPM sampler steps through every t"
            x = ddpm_step(sched, x, t, eps, noise, clip)
        else:
            x = ddim_step(sched, x, t, t_prev, eps, eta, noise, clip)
        frames += [x] * record_after.count(i + 1)
    return (x, frames) if record else x


@torch.inference_mode()
def dpm_solver_pp_2m(eps_fn, sched, x, timesteps, record=0, clip=False):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from x (the state at timesteps[-1]) to the clean data.

    Same calling convention as sample(): timesteps increasing, one network call per step, record = R > 0 also
    returns R + 1 frames. It works in lambda = log(alpha / sigma), in which the ODE's linear part is solved exactly,
    and extrapolates the x_0 estimate linearly from the last two steps (a second-order multistep method)."""
    abar = sched.alphas_cumprod.tolist() + [1.0]  # abar[-1] = 1: the clean data
    lam = lambda t: 0.5 * math.log(abar[t] / (1 - abar[t]))
    n_steps = len(timesteps)
    record_after = [math.ceil(k * n_steps / record) for k in range(1, record + 1)] if record else []  # as in sample()
    frames = [x]
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
        frames += [x] * record_after.count(i + 1)
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
    Where rounding would repeat a step the next one is taken, so all T steps is range(T); one step is [T-1]."""
    if steps == 1:
        return [T - 1]
    chosen = []
    for u in np.linspace(0, 1, steps):
        chosen.append(max(round((T - 1) * u * u), chosen[-1] + 1 if chosen else 0))
    return chosen


def course_timesteps(T, steps):
    """The course's DDIM steps: every (T // steps)-th step from 0, i.e. 0, 20, 40, ..., 980 for T = 1000 and 50
    steps (sampling starts at 980 and ends with the step from 0 to the clean data)."""
    stride = T // steps
    return [k * stride for k in range(steps)]


def run_sampler(eps_fn, sched, x_T, sampler, steps, eta=0.0, generator=None, record=0, clip=False, spacing="auto"):
    """x_T -> samples with one of the three samplers sharing eps_fn; steps is ignored by ddpm (all T steps).
    spacing auto: evenly spaced steps for DDIM (the homework's, and ddpm_mnist.py's), quadratic for DPM-Solver++,
    whose second-order steps are wasted where the steps are long near the data (a test shows it)."""
    if sampler == "ddpm":
        return sample(eps_fn, sched, x_T, list(range(sched.T)), "ddpm", 0.0, generator, record, clip)
    if spacing in ("auto", "all"):
        spacing = "uniform" if sampler == "ddim" else "quadratic"
    rule = {"uniform": sampling_timesteps, "course": course_timesteps, "quadratic": quadratic_timesteps}[spacing]
    timesteps = rule(sched.T, steps)
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


# =================================================================================================================
# Training
# =================================================================================================================
class EMA:
    """theta_ema <- d_n theta_ema + (1 - d_n) theta after the n-th update, with the usual warm-up of the decay
    d_n = min(decay, (1 + n) / (10 + n)): 0.18 at n = 1, 0.5 at n = 8, 0.9 at n = 80, the full 0.999 from
    n = 8,991 on. Without it a short run (a CPU preset, a quick look) samples with an average that still holds its
    first, random weights. Buffers that are not floats (counters) are copied."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def decay_now(self):
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update_parameters(self, model):
        self.updates += 1
        d = self.decay_now()
        averaged, current = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in averaged.items() if v.is_floating_point()]
        torch._foreach_lerp_([averaged[k] for k in floats], [current[k] for k in floats], 1 - d)
        for k in averaged.keys() - set(floats):
            averaged[k].copy_(current[k])


def make_ema(model, decay):
    """An exponential moving average of the weights, which samples better than the raw weights."""
    return EMA(model, decay)


def learning_rate(args, step, total):
    """Linear warm-up over --warmup steps, then constant or a cosine down to zero at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_decay == "constant":
        return args.lr
    progress = (step - args.warmup) / max(1, total - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(args, pool, model, ema, optimizer, sched, device, state):
    """Algorithm 1 on random batches of the pool. state holds what a checkpoint needs to resume exactly.
    Under torchrun every process draws the whole batch (the same on all of them) and takes its own share."""
    net = parallel_model(model, args, device, args.batch_size)
    model.train()
    progress = Progress(state["step"], args.iters)
    start = time.time() - state["train_seconds"]  # the training clock goes on from where a resumed run stopped
    with CtrlC() as ctrl_c:
        while state["step"] < args.iters:
            x0 = pool[torch.randint(len(pool), (args.batch_size,))].to(device)
            t = torch.randint(0, sched.T, (len(x0),), device=device)
            noise = torch.randn_like(x0)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, state["step"], args.iters)
            loss = diffusion_loss(net, sched, my_share(x0), my_share(t), my_share(noise))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            ema.update_parameters(model)
            state["losses"].append(mean_over_processes(loss))
            state["step"] += 1
            state["train_seconds"] = time.time() - start
            if state["step"] % args.ckpt_every == 0 or state["step"] == args.iters:
                save_run(args, model, ema, optimizer, state)
            progress.show(state, f"loss {np.mean(state['losses'][-100:]):.4f}", args.batch_size)
            if ctrl_c.stop_requested():
                save_run(args, model, ema, optimizer, state)
                say(f"\ninterrupted: saved {args.out}/ckpt.pt at step {state['step']}; continue with --resume")
                sys.exit(130)


# =================================================================================================================
# main: train (or load) on 2D points, then the table and the plots; or image mode
# =================================================================================================================
def main(argv=None):
    args = parse_args(argv)
    start_distributed(args)
    device = torch.device(args.device)
    saved = None
    if args.resume or args.sample_only:
        saved = load_checkpoint(args.ckpt, None if args.sample_only else SCRIPT)
        if isinstance(saved, dict) and saved.get("script") == "ddpm_mnist":
            return sample_images(args, saved, device)
        if not isinstance(saved, dict) or saved.get("script") != SCRIPT:
            fail(f"{args.ckpt} is neither a ddim.py nor a ddpm_mnist.py checkpoint")
        saved = load_run(args)
        if (args.steps or 1) > args.timesteps:
            fail(f"--steps {args.steps} is more than the checkpoint's {args.timesteps} diffusion steps")
    args.steps = args.steps or min(50, args.timesteps)
    pool, reference = make_point_data(args.data, args.train_points, args.num_points, args.seed)
    check_out_folder(args.out)
    torch.manual_seed(args.seed)
    sched = NoiseSchedule(make_betas(args.schedule, args.timesteps)).to(device)
    model = build_model(args).to(device)
    ema = make_ema(model, args.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    state = {"step": 0, "losses": []}
    if saved is not None:
        restore_run(saved, args, model, ema, optimizer, state)
    # Seconds of training over every resume: kept in the checkpoint, so a resumed run reports its whole training.
    state["train_seconds"] = float(saved.get("train_seconds", 0.0)) if saved is not None else 0.0
    say(f"MLP {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters on {device}; {args.data}, "
        f"T = {args.timesteps}")

    metrics = {"device": str(device), "hardware": device_name(device), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "data": args.data, "num_points": args.num_points,
               "reference": f"{args.num_points} fresh points (numpy seed [{args.seed}, 1]), normalised with the "
                            f"training pool's mean and std"}
    if not args.sample_only:
        cpu0 = time.process_time()
        train(args, pool, model, ema, optimizer, sched, device, state)
        # CPU seconds too: on a shared machine the wall time grows with the load, the CPU time hardly does
        metrics.update(train_seconds=round(state["train_seconds"], 1), train_cpu_seconds=round(time.process_time() - cpu0, 1),
                       iters=state["step"])
        write_loss(args, {"training loss": state["losses"]}, f"diffusion loss ({args.data}, batch {args.batch_size})")
    if rank() != 0:
        return None

    net = ema.module.eval()  # float32 even on a GPU: 2D points need more precision than bf16 gives
    # Each row: (sampler, steps, eta, spacing). "auto" is the sampler's own spacing: DDIM's is --spacing's choice
    # (uniform unless the course's rule is asked for), DPM-Solver++'s quadratic.
    own = {"ddpm": "all", "ddim": "course" if args.spacing == "course" else "uniform", "dpmpp": "quadratic"}
    configs = [(args.sampler, args.steps, args.eta, args.spacing)] + (TABLE if args.table else [])
    configs = list(dict.fromkeys(  # each row once, in order; ddpm takes all T steps, eta is DDIM's alone
        (s, args.timesteps if s == "ddpm" else min(n, args.timesteps), e if s == "ddim" else 0.0,
         own[s] if sp == "auto" or s == "ddpm" else sp) for s, n, e, sp in configs))
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
    course = "_course" if own["ddim"] == "course" else ""
    overview = [n for n in ("ddpm_%d" % args.timesteps, f"ddim_10_eta0{course}", f"ddim_20_eta0{course}",
                            f"ddim_50_eta0{course}", f"ddim_100_eta0{course}", f"ddim_50_eta1{course}", "dpmpp_10",
                            "dpmpp_20") if n in panels]
    if len(overview) > 1:
        tile_panels([panels[n] for n in overview], columns=4).save(os.path.join(args.out, "overview.png"))
    metrics.update(rows=rows, args=vars(args))
    write_metrics(os.path.join(args.out, "metrics.json"), metrics)
    say(f"wrote {args.out}: metrics.json, table.txt, samples.png, samples.csv, scatter/*.png"
        + (", overview.png" if len(overview) > 1 else "") + ("" if args.sample_only else ", loss.png, loss.csv"))
    return metrics


# =================================================================================================================
# Image mode: the same samplers on a ddpm_mnist.py checkpoint
# =================================================================================================================
def sample_images(args, saved, device):
    """Grid, process, N PNGs + zip and FID as ddpm_mnist.py writes them, with --sampler; then FID against steps."""
    import ddpm_mnist  # the UNet and the image writers live there; only image mode needs them
    ck = argparse.Namespace(**saved["args"])
    if (args.steps or 1) > ck.timesteps:
        fail(f"--steps {args.steps} is more than the checkpoint's {ck.timesteps} diffusion steps")
    args.steps = args.steps or min(50, ck.timesteps)
    fid_steps = sorted({min(n, ck.timesteps) for n in args.fid_steps})  # capped at T, as the 2D table's
    fid_args = argparse.Namespace(**{**saved["args"], "out": args.out, "fid_stats": args.fid_stats, "fid": args.fid,
                                     "inception": args.inception, "data_dir": args.data_dir or ck.data_dir})
    fid_setup = ddpm_mnist.prepare_fid(fid_args) if args.fid and args.num_samples else None  # checked before work
    check_out_folder(args.out)
    in_ch = 1 if ck.dataset == "mnist" else 3
    size = 28 if ck.dataset == "mnist" else ck.image_size
    sched = NoiseSchedule(make_betas(ck.schedule, ck.timesteps)).to(device)
    model = ddpm_mnist.build_model(ck, in_ch).to(device)
    model.load_state_dict(saved["ema"])
    net = ddpm_mnist.sampling_network(model.eval(), args)
    eps_fn = ddpm_mnist.make_eps_fn(net, ddpm_mnist.sample_in_bf16(args, device))
    steps = ck.timesteps if args.sampler == "ddpm" else args.steps
    say(f"image mode: {args.ckpt} ({ck.dataset}, T = {ck.timesteps}), {args.sampler} with {steps} steps")

    def draw(n_images, sampler, n_steps, g, spacing="auto"):
        chunks = []
        for start in range(0, n_images, args.sample_batch_size):
            n = min(args.sample_batch_size, n_images - start)
            x_T = torch.randn((n, in_ch, size, size), generator=g, device=device)
            chunks.append(ddpm_mnist.to_uint8(run_sampler(eps_fn, sched, x_T, sampler, n_steps, args.eta, g, clip=True,
                                                          spacing=spacing)))
            say(f"sampled {start + n}/{n_images} ({sampler}, {n_steps} steps)")
        return torch.cat(chunks) if chunks else torch.zeros((0, 3, size, size), dtype=torch.uint8)

    g = torch.Generator(device).manual_seed(args.seed)
    x_T = torch.randn((8, in_ch, size, size), generator=g, device=device)
    _, frames = run_sampler(eps_fn, sched, x_T, args.sampler, steps, args.eta, g, record=56, clip=True,
                            spacing=args.spacing)
    ddpm_mnist.save_process(frames, os.path.join(args.out, "process.png"), os.path.join(args.out, "process.gif"))
    metrics = {"device": str(device), "hardware": device_name(device), "torch": torch.__version__, "ckpt": args.ckpt,
               "sampler": args.sampler, "sampling_steps": steps, "eta": args.eta if args.sampler == "ddim" else None,
               "spacing": args.spacing,
               "sampling_precision": "bf16" if ddpm_mnist.sample_in_bf16(args, device) else "float32"}
    t0 = time.time()
    images = draw(args.num_samples, args.sampler, steps, g, args.spacing)
    metrics.update(num_samples=len(images), sample_seconds=round(time.time() - t0, 1))
    remove_stale(os.path.join(args.out, "metrics.json"))  # it described the samples about to be replaced
    if len(images):
        ddpm_mnist.make_grid(images[:25], nrow=5).save(os.path.join(args.out, "grid.png"))
        ddpm_mnist.save_samples(images, os.path.join(args.out, "samples"), os.path.join(args.out, "samples.zip"))
    if fid_setup is not None and len(images):
        result = ddpm_mnist.compute_fid(fid_args, images, fid_setup, device)
        metrics.update(result)
        if result["fid"] is not None and fid_steps:
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
                        value = ddpm_mnist.compute_fid(fid_args, fake, fid_setup, device)["fid"]
                    table.append({"sampler": sampler, "steps": n_steps, "eta": args.eta if sampler == "ddim" else None,
                                  "fid": value, "num_samples": len(fake), "sample_seconds": round(seconds, 1)})
            say(f"FID against steps ({args.num_samples} samples vs {result['fid_reference']}):")
            for r in table:
                say(f"  {r['sampler']:<6}{r['steps']:>5} steps  FID {r['fid']:8.3f}  {r['sample_seconds']:7.1f} s")
            metrics["fid_vs_steps"] = table
    metrics.update(args=vars(args))
    write_metrics(os.path.join(args.out, "metrics.json"), metrics)
    say(f"wrote {args.out}: grid.png, process.png, process.gif, samples/ and samples.zip ({len(images)} images), "
        f"metrics.json")
    return metrics


# =================================================================================================================
# =================================================================================================================
# APPENDIX: plumbing. Everything above is the method; what follows checks inputs, saves and restores runs,
# handles Ctrl-C and torchrun, and draws the plots. Python looks these names up when they are called, so they
# may live below main().
# =================================================================================================================
# =================================================================================================================

# ---- argument checks --------------------------------------------------------------------------------------------
class FlagParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is told in one sentence (and exit status 2) instead of the usage block."""

    def error(self, message):
        fail(f"{message} (see --help)")


def parse_with_preset(parser, argv):
    """Parse argv, with --preset's values as the defaults: an explicit flag still wins over the preset.

    --epochs and --iters are one choice, when to stop, so an explicit --epochs also sets aside a preset's --iters;
    likewise an explicit --sampler ddpm (all T steps) sets aside a preset's DDIM --steps."""
    # argparse leaves a value the namespace already holds unless its flag is given: None afterwards means "not given".
    given = parser.parse_known_args(argv, argparse.Namespace(epochs=None, iters=None, sampler=None, steps=None))[0]
    if given.preset:
        parser.set_defaults(**PRESETS[given.preset])
    args = parser.parse_args(argv)
    if given.epochs is not None and given.iters is None:
        args.iters = None
    if given.sampler == "ddpm" and given.steps is None:
        args.steps = None
    return args


def fail(message):
    """One clear sentence and a non-zero exit: how every script reports bad input."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def at_least(flag, value, low):
    return None if value is None or value >= low else f"{flag} must be at least {low}, got {value}"


def between(flag, value, low, high, high_included=True):
    inside = value is None or (low <= value <= high if high_included else low <= value < high)
    return None if inside else f"{flag} must be in [{low}, {high}{']' if high_included else ')'}, got {value}"


def must(condition, message):
    return None if condition else message


def device_problem(device):
    """Why --device cannot be used here (None if it can)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return f"--device {device!r} is not a device; use cpu, cuda or cuda:N"
    if parsed.type not in ("cpu", "cuda"):
        return f"--device {device} is not supported; use cpu, cuda or cuda:N"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device} was asked for but CUDA is not available here; use --device cpu"
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)"
    return None


def compile_problem(args):
    """Why --compile cannot work here (None if it can, as far as can be seen before compiling): torch.compile turns
    the network into C++ on a CPU, built by the compiler it looks for ($CXX, else g++; clang++ on macOS, cl on
    Windows), and into Triton kernels on a GPU. Without them it would stop at the first step with a long traceback."""
    if not args.compile:
        return None
    if str(args.device).startswith("cuda"):
        return None if importlib.util.find_spec("triton") else "--compile on a GPU needs Triton (pip install triton); run without --compile"
    compiler = os.environ.get("CXX") or {"win32": "cl", "darwin": "clang++"}.get(sys.platform, "g++")
    if shutil.which(compiler.split()[0]) is None:
        return f"--compile on a CPU needs a C++ compiler ({compiler}), which this machine does not have; run without --compile"
    return None


def check_args(args):
    """Every flag's value, before anything is read or written (run again with the checkpoint's values on resume)."""
    problems = [
        at_least("--num-points", args.num_points, 1), at_least("--train-points", args.train_points, 1),
        at_least("--hidden", min(args.hidden), 1), at_least("--emb-dim", args.emb_dim, 2),
        between("--fourier", args.fourier, 0, 16), at_least("--timesteps", args.timesteps, 2),
        at_least("--iters", args.iters, 0), at_least("--batch-size", args.batch_size, 1),
        must(args.lr > 0, f"--lr must be positive, got {args.lr}"), at_least("--warmup", args.warmup, 0),
        at_least("--grad-clip", args.grad_clip, 0), between("--ema-decay", args.ema_decay, 0, 1, high_included=False),
        at_least("--ckpt-every", args.ckpt_every, 1), at_least("--steps", args.steps, 1),
        must(args.steps is None or args.sampler != "ddpm",
             "--steps applies to --sampler ddim or dpmpp; DDPM takes all T steps (use --sampler ddim --eta 1 for a "
             "shorter noisy chain)"),
        must(args.resume or args.sample_only or args.ckpt or (args.steps or 1) <= args.timesteps,
             f"--steps must be between 1 and --timesteps ({args.timesteps}), got {args.steps}"),
        between("--eta", args.eta, 0, 1), at_least("--num-samples", args.num_samples, 0),
        at_least("--sample-batch-size", args.sample_batch_size, 1),
        at_least("--fid-steps", min(args.fid_steps, default=1), 1), device_problem(args.device), compile_problem(args),
        must(args.data_dir is None or os.path.isdir(args.data_dir), f"--data-dir {args.data_dir} is not a folder"),
    ]
    for message in problems:
        if message:
            fail(message)


def check_out_folder(out):
    """--out must be a folder we can write to: made if missing, tried with a probe file that is removed again."""
    if rank() != 0:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_probe"):
            pass
    except OSError as e:
        fail(f"--out {out} is not a folder this run can write to ({e.strerror or e})")


# ---- torchrun: several processes, one GPU each ------------------------------------------------------------------
def start_distributed(args):
    """Under torchrun (which sets RANK and WORLD_SIZE), join the process group and take this process's GPU.
    A plain `python script.py` run is process 0 of 1 and nothing changes."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    on_gpu = args.device.startswith("cuda")
    dist.init_process_group("nccl" if on_gpu else "gloo")
    # On a way out that skips leave_distributed (an error), still leave the group before Python tears itself down.
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if on_gpu:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"


def leave_distributed():
    """Under torchrun, wait here until every process has finished main(), then leave the group (a plain run: nothing).

    Why wait: the process group's own threads release each collective's tensors a moment after the collective
    returns, and releasing a tensor that Python made needs the interpreter. A process that returns from main() at
    once (every rank but 0 does, after the last gather) can start shutting Python down before that moment, and the
    thread then aborts the process ("terminate called without an active exception"). Waiting for rank 0 gives the
    threads that moment. Rank 0 may spend long on FID after the last gather (half an hour for 10,000 images on a
    CPU), longer than gloo's default 30 minutes, so gloo's barrier is given a day."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(days=1))
    else:
        dist.barrier()
    dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def my_share(x):
    """This process's contiguous share of a batch (the whole batch in a plain run)."""
    return x.tensor_split(world_size())[rank()] if world_size() > 1 else x


def mean_over_processes(loss):
    """The loss of the whole batch as a float: the mean of the processes' losses."""
    if world_size() == 1:
        return loss.item()
    total = loss.detach().float().clone()
    dist.all_reduce(total)
    return total.item() / world_size()


def any_process(flag):
    """True on every process if flag is True on any of them (all stop at the same step)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value)
    return value.item() > 0


def parallel_model(model, args, device, n):
    """The network the training step calls: DistributedDataParallel under torchrun, compiled with --compile.
    n: the images per epoch (see check_shares)."""
    net = model
    if world_size() > 1:
        check_shares(n, args.batch_size)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net) if args.compile else net


def check_shares(n, batch_size):
    """Under torchrun every process needs a share of every batch, the last short one of an epoch included."""
    if 0 < n % batch_size < world_size():
        fail(f"under torchrun every process needs an image of each batch, but the last batch of an epoch holds "
             f"{n % batch_size} of the {n} images; choose a --batch-size that leaves 0 or at least {world_size()} over")


def say(message):
    """Print on rank 0 only (every process would print the same line)."""
    if rank() == 0:
        print(message, flush=True)


# ---- Ctrl-C -----------------------------------------------------------------------------------------------------
class CtrlC:
    """Ctrl-C asks the training loop to stop: the step in flight finishes, a checkpoint is written, the run exits.
    A second Ctrl-C a second or more later stops at once (torchrun forwards the first to its workers, so one
    press may arrive twice)."""

    def __enter__(self):
        self.asked_at = None
        self.previous = signal.signal(signal.SIGINT, self.ask)
        return self

    def ask(self, signum, frame):
        if self.asked_at is not None and time.time() - self.asked_at > 1:
            raise KeyboardInterrupt
        self.asked_at = self.asked_at or time.time()

    def stop_requested(self):
        return any_process(self.asked_at is not None)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


# ---- checkpoints and random state -------------------------------------------------------------------------------
def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint, or a stray temp file."""
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, script=None):
    """The saved run as plain tensors and numbers: weights_only=True, a checkpoint is data and never runs code.
    A file that is not a checkpoint, or (with script) one written by another script, stops with one sentence."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, text, code: torch raises several types
        if asks_to_run_code(path, e):
            fail(f"{path} holds Python objects, not only tensors and numbers; it is refused, because loading it "
                 f"could run code")
        fail(f"{path} is not a checkpoint (it is empty, truncated or another kind of file)")
    if script is not None and (not isinstance(saved, dict) or saved.get("script") != script):
        source = saved.get("script") if isinstance(saved, dict) else None
        fail(f"{path} is not a {script}.py checkpoint (it was written by "
             f"{source + '.py' if source else 'another script or an older version of this one'})")
    return saved


def asks_to_run_code(path, error):
    """Whether torch refused the file because unpickling it would call Python functions (GLOBAL, REDUCE...),
    rather than because it is not a checkpoint at all."""
    if "Unsupported global" in str(error):
        return True
    try:
        with open(path, "rb") as fh:
            ops = {op.name for op, _, _ in pickletools.genops(fh)}
    except Exception:
        return False
    return bool(ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ"})


def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def explicit_flags(args):
    """The flags whose value differs from the parser's default (given on the command line, or by --preset)."""
    defaults = build_parser().parse_args([])
    return {k for k, v in vars(args).items() if getattr(defaults, k, v) != v}


def load_run(args):
    """The checkpoint to resume or sample from, checked now: it loads, it is this script's, and the flags that
    define the run are taken from it (with a note for each one given differently on the command line)."""
    saved = load_checkpoint(args.ckpt, SCRIPT)
    missing = [key for key in RUN_KEYS if key not in saved.get("args", {})]
    if missing:
        fail(f"{args.ckpt} has no --{missing[0].replace('_', '-')} among its settings: it comes from an older version "
             f"of {SCRIPT}.py or is damaged")
    given = explicit_flags(args)
    for key in RUN_KEYS:
        if key == "seed" and args.sample_only and key in given:
            continue  # --sample-only --seed S: the same model, another draw of the sampling noise
        if key in given and getattr(args, key) != saved["args"][key]:
            say(f"note: {'--resume' if args.resume else '--sample-only'} keeps the checkpoint's "
                f"--{key.replace('_', '-')} {saved['args'][key]} (not {getattr(args, key)})")
        setattr(args, key, saved["args"][key])
    check_args(args)  # --steps and --fuse-t against the checkpoint's T
    return saved


def save_run(args, model, ema, optimizer, state):
    if rank() == 0:
        save_checkpoint(os.path.join(args.out, "ckpt.pt"), {
            "script": SCRIPT, "model": model.state_dict(), "ema": ema.module.state_dict(), "ema_updates": ema.updates,
            "optimizer": optimizer.state_dict(),
            "args": vars(args), "rng": rng_state(), "losses": torch.tensor(state["losses"]),
            **{k: v for k, v in state.items() if k != "losses"}})


def restore_run(saved, args, model, ema, optimizer, state):
    model.load_state_dict(saved["model"])
    ema.module.load_state_dict(saved["ema"])
    ema.updates = saved["ema_updates"]
    optimizer.load_state_dict(saved["optimizer"])
    state.update({k: saved[k] for k in state if k != "losses"})
    state["losses"] = saved["losses"].tolist()
    if args.resume:
        set_rng_state(saved["rng"])
        say(f"resuming {args.ckpt} at step {state['step']}" + (f" (epoch {state['epoch']})" if "epoch" in state else ""))


# ---- training helpers -------------------------------------------------------------------------------------------
def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One line every few seconds: (epoch,) step, the given losses, images per second and the time left."""

    def __init__(self, step, total):
        self.start_step, self.total = step, total
        self.start = self.last = time.time()

    def show(self, state, losses, batch_size, iters_per_epoch=None):
        if time.time() - self.last < 5 and state["step"] != self.total:
            return
        self.last = time.time()
        rate = (state["step"] - self.start_step) / max(1e-9, self.last - self.start)
        epoch = ""
        if iters_per_epoch:
            epoch = f"epoch {state['epoch'] + (state['batch_in_epoch'] > 0)}/{math.ceil(self.total / iters_per_epoch)}  "
        say(f"{epoch}step {state['step']}/{self.total}  {losses}  {rate * batch_size:.0f} img/s  "
            f"left {format_seconds((self.total - state['step']) / max(rate, 1e-9))}")


# ---- writing outputs --------------------------------------------------------------------------------------------
def remove_stale(path):
    if os.path.exists(path):
        os.remove(path)


def get_font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def tick_labels(values):
    """The axis labels for these tick values: 3 significant digits, or more where 3 would print two ticks alike
    (a loss that barely moves spans 1.005 to 1.012)."""
    for digits in range(3, 16):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(labels):
            break
    return labels


def plot_loss(curves, path, title):
    """{name: values per iteration} as a PIL line plot: each curve faint, its moving average bold; the y axis on a log
    scale when every value is positive and they span a decade (a diffusion loss does)."""
    W, H, m = 900, 540, 80  # size and margin
    img, font = Image.new("RGB", (W, H), "white"), get_font(15)
    draw, every = ImageDraw.Draw(img), np.concatenate([np.asarray(v, dtype=np.float64) for v in curves.values()])
    f = np.log10 if (every > 0).all() and every.max() >= 10 * every.min() else np.asarray
    lo, hi = np.percentile(f(every), [0.5, 100]) + [-1e-6, 1e-6]  # the first few, largest values would squash the rest
    n = max(len(v) for v in curves.values())
    xy = lambda i, v: (m + (W - 2 * m) * i / max(1, n - 1), H - m - (H - 2 * m) * (np.clip(v, lo, hi) - lo) / (hi - lo))
    draw.rectangle([m, m, W - m, H - m], outline="black")
    ticks = np.linspace(lo, hi, 6)
    for v, label in zip(ticks, tick_labels(10 ** ticks if f is np.log10 else ticks)):
        draw.text((m - 6, xy(0, v)[1]), label, fill="black", font=font, anchor="rm")
    for k, (name, v) in enumerate(curves.items()):
        colour, v, window = [(31, 119, 180), (214, 39, 40), (44, 160, 44)][k % 3], f(np.asarray(v, float)), max(1, len(v) // 100)
        draw.line([xy(i, v[i]) for i in range(len(v))], fill=tuple(c + (255 - c) * 2 // 3 for c in colour))
        draw.line([xy(i + window - 1, a) for i, a in enumerate(np.convolve(v, np.ones(window) / window, "valid"))], fill=colour, width=2)
        draw.text((W - m - 8, m + 8 + 22 * k), f"{name} (moving average of {window})", fill=colour, font=font, anchor="ra")
    draw.text((W / 2, m / 2), title, fill="black", font=font, anchor="mm")
    draw.text((W / 2, H - m / 2), f"iteration 1 ... {n}" + ("; loss on a log scale" if f is np.log10 else ""), fill="black",
              font=font, anchor="mm")
    img.save(path)


def write_loss(args, curves, title):
    """loss.csv (one row per iteration, a column per curve) and loss.png, on rank 0."""
    if rank() != 0:
        return
    with open(os.path.join(args.out, "loss.csv"), "w", newline="") as fh:
        header = [name.replace("training ", "").replace(" ", "_") for name in curves]  # "training loss" -> "loss"
        csv.writer(fh).writerows([("iteration", *header)]
                                 + [(i + 1, *row) for i, row in enumerate(zip(*curves.values()))])
    if len(next(iter(curves.values()))):
        plot_loss(curves, os.path.join(args.out, "loss.png"), title)


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
    """ddpm_1000, ddim_50_eta0, dpmpp_20; a spacing other than the sampler's usual one is added: ddim_50_eta0_course."""
    name = {"ddpm": f"ddpm_{steps}", "ddim": f"ddim_{steps}_eta{eta:g}", "dpmpp": f"dpmpp_{steps}"}[sampler]
    usual = {"ddpm": "all", "ddim": "uniform", "dpmpp": "quadratic"}[sampler]
    return name if spacing == usual else f"{name}_{spacing}"


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


if __name__ == "__main__":  # last, so that main() finds every function of the appendix
    main()
    leave_distributed()
