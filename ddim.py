"""DDIM on a 2D swiss roll (Chamfer distance) and on image models, against DDPM and DPM-Solver++(2M).

The homework
------------
Keep a trained DDPM and replace its sampling loop with DDIM. It is graded on 2D particles: 2048 generated points
against 2048 points of the swiss roll, by the Chamfer distance (a sum, not a mean)               (chamfer_distance)
    CD(X, Y) = sum_{x in X} min_{y in Y} |x - y|^2 + sum_{y in Y} min_{x in X} |x - y|^2,
full marks for DDPM (all 1000 steps) below 20 and for DDIM with 50 of the 1000 steps below 60. On images, the same
samplers run on a ddpm_mnist.py checkpoint: fewer steps, the same network, graded by FID.

The maths, in the papers' notation (t runs over {0, ..., T-1} in the code; abar_{-1} = 1 is the clean data)
----------------------------------------------------------------------------------------------------------
  training (as in ddpm_mnist.py)   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   loss |eps - eps_theta(x_t, t)|^2
                                                                                 (q_sample, diffusion_loss, train)
  the x_0 estimate                 x0_hat = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)     (predict_x0)
  DDPM (Ho et al. 2020, Alg. 2)    x_{t-1} = mu~_t(x_t, x0_hat) + sqrt(beta~_t) z, through all T steps   (ddpm_step)
  DDIM (Song et al. 2021, eq. 12), over an increasing sub-sequence tau of the steps, from t to the step s before it:
      x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma_t^2) eps_theta(x_t, t) + sigma_t z,               (ddim_step)
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

The course fixes all but the inside of its network (3 hidden layers of 128, Adam 1e-3, batch 128, 5,000 iterations,
no EMA): --preset course uses its TimeLinear layers, Fourier features and a skip (NoiseMLP says why). Training runs in
epochs over a pool of --train-points; each epoch's end (and the last step) writes ckpt.pt and progress/epoch_NNN.png,
256 points from fixed noise by DDIM-20. Then table.txt and metrics.json (the CD of every sampler of TABLE, from the
same x_T), scatter/<row>.png (ddpm_1000.png, ddim_50_eta0_course.png, ...), loss.csv/.png. Image mode (--ckpt of a
ddpm_mnist.py run) writes what ddpm_mnist.py writes, into runs/ddim_images by default.

Commands
--------
  python ddim.py                                   # swiss roll: train, the table, the plots
  python ddim.py --preset course --out runs/kaist_ddim         # the course's setting: 128 x 3, Adam 1e-3, 5,000 steps
  python ddim.py --sample-only --sampler dpmpp --steps 20      # resample from runs/ddim/ckpt.pt
  python ddim.py --data checkerboard --out runs/ddim_checkerboard
  python benchmarks/ddim_swiss_roll.py -- --preset course      # 3 seeds, the medians
  python ddim.py --ckpt runs/ddpm_mnist/ckpt.pt --steps 50 --eta 0       # images: DDIM on a ddpm_mnist.py model
  python ddim.py --ckpt runs/ddpm_mnist/ckpt.pt --sampler dpmpp --steps 20
"""

import argparse
import copy
import functools
import math
import os
import shutil
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import numpy as np
from PIL import Image, ImageDraw, ImageFont

import plumbing
import ddpm_mnist

SCRIPT = "ddim"  # written into every checkpoint, so that another script's checkpoint is recognised
PRESETS = {  # a preset changes defaults only: `--preset course --iters 500` trains 500 steps
    # KAIST CS492(D) assignments 1-2: its fixed training, a network its TODO allows, its DDIM steps
    "course": dict(hidden=[128, 128, 128], time="scale", emb_dim=256, fourier=3, residual=False, skip=True, iters=5000,
                   batch_size=128, lr=1e-3, lr_decay="constant", warmup=0, grad_clip=0.0, ema_decay=0.0,
                   spacing="course"),
}
# The flags that define a training run: --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("data", "train_points", "hidden", "time", "emb_dim", "fourier", "residual", "skip", "timesteps", "schedule",
            "batch_size", "lr", "lr_decay", "warmup", "grad_clip", "ema_decay", "seed", "preset")
# The 2D table: (sampler, steps capped at T, eta, spacing); the last rows swap the spacings, to separate the two.
TABLE = ([("ddpm", 1000, 0, "auto")] + [("ddim", n, e, "auto") for n in (10, 20, 50, 100, 1000) for e in (0, 0.5, 1)]
         + [("dpmpp", n, 0, "auto") for n in (10, 20)] + [("ddim", n, 0, "quadratic") for n in (10, 20, 50)]
         + [("dpmpp", n, 0, "uniform") for n in (10, 20)])
DELIBERATELY_DIFFERENT = {"train": "points from a pool, no flips, gradient clipping optional (the course has none)"}


# ---- flags ------------------------------------------------------------------------------------------------------
def build_parser():
    p = plumbing.FlagParser(description="DDIM on 2D points or a ddpm_mnist.py checkpoint (see the module docstring).",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default=None, help="course: KAIST's fixed setting")
    a("--data", choices=sorted(DATASETS), default="swiss_roll", help="the 2D data")
    a("--num-points", type=int, default=2048, help="generated points, and reference points for the CD")
    a("--train-points", type=int, default=1_000_000, help="size of the training pool, drawn once")
    a("--hidden", type=int, nargs="+", default=[256, 256, 256, 256], help="widths of the MLP's hidden layers")
    a("--time", choices=["add", "scale"], default="add", help="a layer adds an embedding of t, or is scaled by one")
    a("--fourier", type=int, default=6, help="Fourier features: sin, cos at 2^k / 2 for k < this (0: the raw point)")
    a("--residual", action=argparse.BooleanOptionalAction, default=True, help="equal-width layers add to their input")
    a("--skip", action=argparse.BooleanOptionalAction, default=False, help="a linear map of the point joins the output")
    a("--emb-dim", type=int, default=128, help="size of the sinusoidal time embedding")
    a("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    a("--schedule", choices=["linear", "cosine"], default="linear", help="linear 1e-4 -> 0.02 (the course's) or cosine")
    a("--epochs", type=int, default=None, help="passes over the pool (instead of --iters)")
    a("--iters", type=int, default=10000, help="optimiser steps")
    a("--batch-size", type=int, default=256, help="points per optimiser step")
    a("--lr", type=float, default=2e-3, help="AdamW learning rate after warm-up")
    a("--lr-decay", choices=["constant", "cosine"], default="cosine", help="after warm-up: keep it, or decay to 0")
    a("--warmup", type=int, default=200, help="linear learning-rate warm-up, in steps")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    a("--ema-decay", type=float, default=0.999, help="decay of the weights' moving average (0: none)")
    a("--seed", type=int, default=0, help="seeds the data, the training and the sampling (--sample-only: the sampling)")
    a("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddim", help="ddpm (all T steps), ddim, DPM-Solver++(2M)")
    a("--steps", type=int, default=None, help="sampling steps for ddim and dpmpp (default 50, at most T)")
    a("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like noise")
    a("--spacing", choices=["auto", "uniform", "course", "quadratic"], default="auto", help="the steps (run_sampler)")
    a("--num-samples", type=int, default=10000, help="image mode: images written to OUT/samples")
    a("--sample-batch-size", type=int, default=1000, help="image mode: images denoised at once")
    plumbing.add_run_flags(p, out=None)  # --ckpt of a ddpm_mnist.py run: image mode; --out default runs/ddim(_images)
    return p


def parse_args(argv=None):
    args = plumbing.parse_with_preset(build_parser(), PRESETS, argv)
    args.images = args.ckpt is not None and not (args.sample_only or args.resume)  # image mode: a ddpm_mnist.py ckpt
    args.out = args.out or ("runs/ddim_images" if args.images else "runs/ddim")
    check_args(args)
    return args


def check_args(args):
    """The flags a student may get wrong, before anything is read or written (again with a checkpoint's values)."""
    plumbing.check(
        *plumbing.run_flag_problems(args), plumbing.at_least("--timesteps", args.timesteps, 2),
        plumbing.at_least("--train-points", args.train_points, args.batch_size),  # at least one whole batch
        plumbing.between("--ema-decay", args.ema_decay, 0, 1, high_included=False),
        plumbing.must(args.steps is None or args.sampler != "ddpm", "--steps is for ddim and dpmpp: ddpm takes all T"),
        None if args.images else plumbing.between("--steps", args.steps, 1, args.timesteps),  # images: the ckpt's T
        plumbing.between("--eta", args.eta, 0, 1), plumbing.at_least("--num-samples", args.num_samples, 1),
        plumbing.must(not args.images or os.path.isfile(args.ckpt), f"checkpoint {args.ckpt} not found"),
    )


# ---- data: 2D point clouds drawn in numpy, normalised by one scalar mean and std, times 2 ------------------------
def swiss_roll(n, rng):
    """scikit-learn's make_swiss_roll(n, noise=0, hole=True), columns x and z, draw for draw with a RandomState. (t, y)
    is uniform in one of 8 cells of a 3 x 3 grid over [1.5 pi, 4.5 pi] x [0, 21]; the middle cell, left out, is the
    roll's hole. In 2D y is dropped: the middle third of t is drawn 2 times in 8, each outer third 3 times in 8."""
    cells = np.array([[np.pi * (1.5 + i), 7.0 * j] for i in range(3) for j in range(3) if (i, j) != (1, 1)])
    corner = cells[rng.choice(8, n)]
    t, _y = corner.T + rng.uniform(size=(2, n)) * np.array([[np.pi], [7.0]])
    return np.stack([t * np.cos(t), t * np.sin(t)], axis=1)


def checkerboard(n, rng):
    """Uniform on the 8 dark squares of a 4 x 4 board."""
    square = rng.integers(0, 8, n)
    row = square // 2
    col = 2 * (square % 2) + row % 2  # alternate columns from row to row
    return np.stack([col, row], 1) + rng.uniform(size=(n, 2)) - 2.0


DATASETS = {"swiss_roll": swiss_roll, "checkerboard": checkerboard}


def make_point_data(name, train_points, num_points, seed):
    """The training pool and the reference set, independent draws, normalised by the pool's mean and std (one scalar
    each, as the course does), times 2."""
    pool = DATASETS[name](train_points, np.random.default_rng([seed, 0]))
    reference = DATASETS[name](num_points, np.random.default_rng([seed, 1]))
    mean, std = pool.mean(), pool.std()
    return [torch.from_numpy((points - mean) / std * 2).float() for points in (pool, reference)]


# ---- noise schedule: every per-step constant, computed once in float64 (as ddpm_mnist.py) -------------------------
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


# ---- model: an MLP that predicts the noise eps_theta(x_t, t) of a point -----------------------------------------
def timestep_embedding(t, dim):
    """Sinusoidal embedding of the step (Vaswani et al.), as in the DDPM UNet: dim/2 frequencies from 1 to 1e-4."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TimeLinear(nn.Module):
    """The course's layer: fc(x) * g(t), g = Linear(SiLU(Linear(sinusoidal(t)))) its own MLP: units scaled with t."""

    def __init__(self, dim_in, dim_out, frequencies):
        super().__init__()
        self.frequencies = frequencies
        self.fc = nn.Linear(dim_in, dim_out)
        self.time_mlp = nn.Sequential(nn.Linear(frequencies, dim_out), nn.SiLU(), nn.Linear(dim_out, dim_out))

    def forward(self, x, t):
        return self.fc(x) * self.time_mlp(timestep_embedding(t, self.frequencies))


class NoiseMLP(nn.Module):
    """eps_theta(x_t, t) for points: Fourier features [x, sin(f_k x), cos(f_k x)], f_k = 2^k / 2 for k < fourier
    (Tancik et al. 2020; an MLP of the raw point is smooth at the scale of the plot and blurs the roll's thin arms),
    then hidden layers that see t as a shift, the same for every unit at a noise level (time "add": silu(W h + b +
    P e(t))), or as the course's TimeLinear, every unit rescaled (time "scale": silu((W h + b) * g(t))). residual: an
    equal-width layer adds to its input. skip: a linear map of the point joins the output: near the data the true eps
    is linear in x_t, so a point that strays where the MLP never trained is pulled back, not flung out by DDIM."""

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
        self.skip = TimeLinear(dim, dim, emb_dim) if skip else None

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
        return self.out(h) if self.skip is None else self.out(h) + self.skip(x, t)


# ---- diffusion maths: the pieces of ddpm_mnist.py, then DPM-Solver++(2M), DDIM inversion, the Chamfer distance ---
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
    noise_part = extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * eps
    return (x_t - noise_part) / extract(sched.sqrt_alphas_cumprod, t, x_t)


def ddpm_step(sched, x_t, t, eps, noise, clip=True):
    """Algorithm 2: x_{t-1} ~ q(x_{t-1} | x_t, x_0_hat), with sigma_t^2 = beta~_t (zero at t = 0)."""
    x0 = predict_x0(sched, x_t, t, eps)
    if clip:  # images live in [-1, 1]; clipping the estimate keeps early, poor estimates from derailing the chain
        x0 = x0.clamp(-1, 1)
    mean = extract(sched.posterior_mean_coef1, t, x_t) * x0 + extract(sched.posterior_mean_coef2, t, x_t) * x_t
    return mean + extract(sched.posterior_variance, t, x_t).sqrt() * noise


def ddim_step(sched, x_t, t, t_prev, eps, eta, noise, clip=True):
    """DDIM (Song et al. 2021, eq. 12) from step t to step t_prev < t (t_prev = -1: the clean image), 0 <= eta <= 1."""
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
    x0 = predict_x0(sched, x_t, t, eps)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - a_t.sqrt().to(x_t.dtype) * x0) / (1 - a_t).sqrt().to(x_t.dtype)  # the noise the clipped x0 implies
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    # sigma^2 <= 1 - abar_{t'} for eta <= 1; the clamp only removes rounding below zero.
    direction = (1 - a_prev - sigma ** 2).clamp(min=0).sqrt()
    return a_prev.sqrt().to(x_t.dtype) * x0 + direction.to(x_t.dtype) * eps + sigma.to(x_t.dtype) * noise


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
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from x (the state at timesteps[-1]) to the clean data, called as
    sample(). In lambda = log(alpha / sigma) the ODE's linear part is solved exactly, and the x_0 estimate is
    extrapolated linearly from the last two steps: second order, still one network call per step."""
    abar = sched.alphas_cumprod.tolist() + [1.0]  # abar[-1] = 1: the clean data
    lam = [0.5 * math.log(a / (1 - a)) for a in abar[:-1]]
    n_steps = len(timesteps)
    record_after = [math.ceil(k * n_steps / record) for k in range(1, record + 1)] if record else []  # as in sample()
    frames = [x]
    x0_prev = h_prev = None
    for i, t in enumerate(reversed(timesteps)):
        s = timesteps[n_steps - 2 - i] if i < n_steps - 1 else -1
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = predict_x0(sched, x, t, eps)
        x0 = x0.clamp(-1, 1) if clip else x0
        if s < 0:  # onto the clean data: sigma_s = 0 and h is infinite, so the step lands on the estimate itself
            x = x0
        else:
            h = lam[s] - lam[t]
            # D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = h_prev / h; the first step has no history: D = x0 (DDIM)
            d = x0 if x0_prev is None else x0 + (h / (2 * h_prev)) * (x0 - x0_prev)
            x = math.sqrt((1 - abar[s]) / (1 - abar[t])) * x - math.sqrt(abar[s]) * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        frames += [x] * record_after.count(i + 1)
    return (x, frames) if record else x


@torch.inference_mode()
def ddim_invert(eps_fn, sched, x0, timesteps):
    """Encode clean points into x at timesteps[-1]: the eta = 0 DDIM update run forwards (Song et al. 2021, sec. 4.3),
    x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_theta(x_s, s) from step s to the next step t: the eps of the step
    left stands in for the step reached. From the clean data (s = -1, never trained on) eps is asked at the first."""
    abar = sched.alphas_cumprod.tolist() + [1.0]
    x, s = x0, -1
    for t in timesteps:
        eps = eps_fn(x, torch.full((x.shape[0],), max(s, timesteps[0]), device=x.device, dtype=torch.long))
        x0_hat = (x - math.sqrt(1 - abar[s]) * eps) / math.sqrt(abar[s])
        x = math.sqrt(abar[t]) * x0_hat + math.sqrt(1 - abar[t]) * eps
        s = t
    return x


def quadratic_timesteps(T, steps):
    """steps steps from 0 to T-1 along t = (T-1) u^2, u evenly spaced: dense near the data, where the trajectory bends
    most (Song et al. 2021's 'quadratic'). A step that rounding would repeat moves up one: T steps is range(T)."""
    if steps == 1:
        return [T - 1]
    chosen = []
    for u in np.linspace(0, 1, steps):
        chosen.append(max(round((T - 1) * u * u), chosen[-1] + 1 if chosen else 0))
    return chosen


def course_timesteps(T, steps):
    """The course's DDIM steps: every (T // steps)-th from 0 (0, 20, ..., 980 for T = 1000, 50 steps; then clean)."""
    return [k * (T // steps) for k in range(steps)]


def run_sampler(eps_fn, sched, x_T, sampler, steps, eta=0.0, generator=None, record=0, clip=False, spacing="auto"):
    """x_T -> samples with one of the three samplers (ddpm takes all T steps). spacing auto: evenly spaced for DDIM (the
    homework's), quadratic for DPM-Solver++, whose second order is wasted on long steps near the data (a test shows)."""
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


# ---- training -----------------------------------------------------------------------------------------------------
class EMA:
    """theta_ema <- d_n theta_ema + (1 - d_n) theta after the n-th update, with the usual warm-up of the decay
    d_n = min(decay, (1 + n) / (10 + n)), so that a short run does not sample with its first, random weights."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        # state_dict() tensors share memory with the weights: look the pairs up once, update them in place.
        self.pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))

    @torch.no_grad()
    def update(self):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for averaged, current in self.pairs:
            if averaged.is_floating_point():
                averaged.lerp_(current, 1 - d)
            else:
                averaged.copy_(current)

    def state_dict(self):
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, saved):
        self.module.load_state_dict(saved["weights"])
        self.updates = saved["updates"]


def learning_rate(args, step, total):
    """Linear warm-up over --warmup steps, then constant or a cosine down to zero at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_decay == "constant":
        return args.lr
    progress = (step - args.warmup) / max(1, total - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(args, pool, model, ema, optimizer, sched, reference, state):
    """Algorithm 1: repeat { x_0 ~ pool, t ~ Uniform({0..T-1}), eps ~ N(0, I); step on ||eps - eps_theta(x_t, t)||^2 }.
    The run's state is its step: the epoch and the batch follow by divmod, each epoch's order from the seed and the
    epoch, so a resumed run is the same run. Under torchrun each process takes its share of every batch."""
    bs, device = args.batch_size, pool.device
    steps_per_epoch = len(pool) // bs  # whole batches only: every step has the same shape
    total = args.iters or args.epochs * steps_per_epoch
    net = plumbing.parallel_model(model, args)
    progress = plumbing.Progress(state, total, steps_per_epoch, bs)
    model.train()
    order = None
    with plumbing.CtrlC() as ctrl_c:
        while state["step"] < total:
            epoch, i = divmod(state["step"], steps_per_epoch)
            if order is None or i == 0:  # a million points: shuffled once an epoch, not every step
                order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            x0 = pool[order[i * bs:(i + 1) * bs].to(device)]
            t = torch.randint(0, sched.T, (bs,), device=device)
            noise = torch.randn_like(x0)
            optimizer.param_groups[0]["lr"] = learning_rate(args, state["step"], total)
            loss = diffusion_loss(net, sched, plumbing.my_share(x0), plumbing.my_share(t), plumbing.my_share(noise))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            ema.update()
            state["losses"]["loss"].append(plumbing.mean_over_processes(loss))
            state["step"] += 1
            progress.show(state)  # also counts the training seconds
            if state["step"] % steps_per_epoch == 0 or state["step"] == total:  # points from fixed noise: see it learn
                save_progress_plot(ema.module, sched, reference, args, -(-state["step"] // steps_per_epoch))
            stop = ctrl_c.stop_requested()
            if progress.checkpoint_due(state, stop):  # at the end, on Ctrl-C, at an epoch's end once a minute
                plumbing.save_run(args, SCRIPT, state, stop, model=model, ema=ema, optimizer=optimizer)


# ---- the homework's deliverables: the CD table and the scatter plots ----------------------------------------------
def scatter_panel(points, reference, title, size=480):
    """Generated points (blue) over the reference (grey), on a square 15% wider than the reference; a PIL image."""
    span, m = reference.abs().max().item() * 1.15, 30  # half the square's side, the margin in pixels
    img = Image.new("RGB", (size + 2 * m, size + 2 * m), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=14)
    draw.rectangle([m, m, m + size, m + size], outline="black")
    for pts, colour in ((reference, (170, 170, 170)), (points, (31, 90, 200))):
        pts = pts.cpu().double().numpy()
        inside = (np.abs(pts) <= span).all(axis=1)
        for x, y in (pts[inside] / span + [1, -1]) * [size / 2, -size / 2] + m:
            draw.ellipse([x - 1.4, y - 1.4, x + 1.4, y + 1.4], fill=colour)
    draw.text((m + size / 2, m / 2), title, fill="black", font=font, anchor="mm")
    caption = f"grey: reference, blue: generated ({(~inside).sum()} outside)"
    draw.text((m + size / 2, size + 1.5 * m), caption, fill="black", font=font, anchor="mm")
    return img


def save_progress_plot(model, sched, reference, args, epoch):
    """progress/epoch_NNN.png: 256 points from fixed noise by DDIM-20, with its own generator (as ddpm_mnist.py)."""
    g = torch.Generator(reference.device).manual_seed(args.seed)
    x_T = torch.randn((256, 2), generator=g, device=reference.device)
    points = run_sampler(model, sched, x_T, "ddim", min(20, sched.T), generator=g)
    plot = scatter_panel(points, reference, f"epoch {epoch}: DDIM, 20 steps", size=320)
    plumbing.save_progress(torch.from_numpy(np.array(plot)).permute(2, 0, 1)[None] / 127.5 - 1, args.out, epoch)


def chamfer_table(args, net, sched, reference):
    """The run's own sampler, then each row of TABLE, all from the same x_T: the CD of its points to the reference,
    scatter/<row>.png and a line of table.txt. Returns the rows."""
    usual = {"ddpm": "all", "ddim": "uniform", "dpmpp": "quadratic"}  # a row's name adds any other spacing
    own = {**usual, "ddim": "course" if args.spacing == "course" else "uniform"}
    configs = dict.fromkeys(  # each row once, in order; ddpm takes all T steps, eta is DDIM's alone
        (s, sched.T if s == "ddpm" else min(n, sched.T), e if s == "ddim" else 0.0,
         own[s] if sp == "auto" or s == "ddpm" else sp)
        for s, n, e, sp in [(args.sampler, args.steps, args.eta, args.spacing)] + TABLE)
    shutil.rmtree(os.path.join(args.out, "scatter"), ignore_errors=True)  # a rerun's plots never mix with the last's
    os.makedirs(os.path.join(args.out, "scatter"))
    rows, lines = [], [f"{'sampler':<8}{'steps':>7}{'eta':>6}  {'spacing':<10}{'CD':>10}{'seconds':>10}"]
    for sampler, steps, eta, spacing in configs:
        g = torch.Generator(reference.device).manual_seed(args.seed)
        x_T = torch.randn((args.num_points, 2), generator=g, device=reference.device)
        start = time.time()
        points = run_sampler(net, sched, x_T, sampler, steps, eta, g, spacing=spacing)
        seconds, cd = time.time() - start, chamfer_distance(points, reference)
        name = f"{sampler}_{steps}" + (f"_eta{eta:g}" if sampler == "ddim" else "")
        name += "" if spacing == usual[sampler] else f"_{spacing}"  # ddpm_1000, ddim_50_eta0_course, dpmpp_20
        rows.append({"name": name, "sampler": sampler, "steps": steps, "eta": eta if sampler == "ddim" else None,
                     "spacing": spacing, "cd": cd, "seconds": round(seconds, 3)})
        scatter_panel(points, reference, f"{name}: CD {cd:.2f}").save(os.path.join(args.out, "scatter", name + ".png"))
        shown_eta = f"{eta:g}" if sampler == "ddim" else "-"
        lines.append(f"{sampler:<8}{steps:>7}{shown_eta:>6}  {spacing:<10}{cd:>10.3f}{seconds:>10.2f}")
    plumbing.say("\n".join(lines))
    with open(os.path.join(args.out, "table.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return rows


# ---- image mode: the same samplers on a ddpm_mnist.py checkpoint ------------------------------------------------
def sample_images(args):
    """--ckpt of a ddpm_mnist.py run: its EMA UNet sampled with --sampler; writes what ddpm_mnist.py writes."""
    saved = plumbing.load_checkpoint(args.ckpt, "ddpm_mnist")
    ck = argparse.Namespace(**saved["args"])
    plumbing.check(plumbing.between("--steps", args.steps, 1, ck.timesteps))
    steps = ck.timesteps if args.sampler == "ddpm" else args.steps or min(50, ck.timesteps)
    ck.out, ck.fid_ref_limit = args.out, args.fid_ref_limit or ck.fid_ref_limit  # FID: that run's reference
    stats = args.fid_stats or plumbing.training_set_stats(ck)
    inception = plumbing.prepare_fid(args, stats) if args.fid else None
    plumbing.make_out_folder(args.out)
    device = torch.device(args.device)
    shape = (1, 28, 28) if ck.dataset == "mnist" else (3, ck.image_size, ck.image_size)
    sched = NoiseSchedule(make_betas(ck.schedule, ck.timesteps)).to(device)
    model = ddpm_mnist.build_model(ck, shape[0]).to(device).eval()
    model.load_state_dict(saved["ema"]["weights"])
    amp = plumbing.Precision(device)  # bf16, or fp16 on GPUs without bf16, float32 on a CPU (as ddpm_mnist.py)
    eps_fn = ddpm_mnist.make_eps_fn(torch.compile(model) if args.compile else model, amp)
    g = torch.Generator(device).manual_seed(args.seed)
    x_T = torch.randn((8, *shape), generator=g, device=device)
    _, frames = run_sampler(eps_fn, sched, x_T, args.sampler, steps, args.eta, g, 56, clip=True, spacing=args.spacing)

    def draw(count, g):  # count images from noise by --sampler, as uint8
        x_T = torch.randn((count, *shape), generator=g, device=device)
        return plumbing.to_uint8(run_sampler(eps_fn, sched, x_T, args.sampler, steps, args.eta, g, clip=True,
                                             spacing=args.spacing))
    start = time.time()
    images = plumbing.sample_in_batches(draw, args.num_samples, args.sample_batch_size, args.seed, device)
    if not plumbing.leave_distributed():
        return None  # under torchrun the other processes stop here: process 0 writes and grades
    plumbing.write_samples(args.out, images, frames)  # 56 frames + noise: 8 columns of 8 samples in process.png
    metrics = {"device": plumbing.device_name(device), "torch": torch.__version__, "ckpt": args.ckpt,
               "sampler": args.sampler, "sampling_steps": steps, "eta": args.eta if args.sampler == "ddim" else None,
               "spacing": args.spacing, "num_samples": len(images), "sample_seconds": round(time.time() - start, 1),
               "precision": amp.name}
    if inception is not None:
        reference = functools.partial(ddpm_mnist.load_training_images, ck, ck.fid_ref_limit)  # read only if not cached
        metrics.update(plumbing.compute_fid(images, inception, stats, reference, device))
    plumbing.write_metrics(os.path.join(args.out, "metrics.json"), {**metrics, "args": vars(args)})
    plumbing.save_as(args)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    plumbing.start_distributed(args)
    if args.images:
        return sample_images(args)
    saved = None
    if args.resume or args.sample_only:
        saved = plumbing.load_run(args, SCRIPT, RUN_KEYS, parse_args([]))
        check_args(args)  # again: the checkpoint's T bounds --steps
    args.steps = args.steps or min(50, args.timesteps)
    device = torch.device(args.device)
    pool, reference = [x.to(device) for x in make_point_data(args.data, args.train_points, args.num_points, args.seed)]
    plumbing.make_out_folder(args.out)

    torch.manual_seed(args.seed)
    sched = NoiseSchedule(make_betas(args.schedule, args.timesteps)).to(device)
    model = NoiseMLP(2, args.hidden, args.emb_dim, args.fourier, args.residual, args.time, args.skip).to(device)
    ema = EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    state = {"step": 0, "seconds": 0.0, "losses": {"loss": []}}
    if saved is not None:
        plumbing.restore_run(saved, args, state, model=model, ema=ema, optimizer=optimizer)

    metrics = {"device": plumbing.device_name(device), "torch": torch.__version__, "data": args.data,
               "num_points": args.num_points, "reference": f"{args.num_points} points, numpy seed [{args.seed}, 1]",
               "precision": "float32"}  # 2D points need more precision than bf16 gives, on a GPU too
    if not args.sample_only:
        cpu = time.process_time()  # CPU seconds too: on a shared machine the wall time grows with the load
        train(args, pool, model, ema, optimizer, sched, reference, state)
        plumbing.write_loss(args.out, state["losses"], f"diffusion loss ({args.data}, batch {args.batch_size})")
        metrics.update(train_seconds=round(state["seconds"], 1), train_cpu_seconds=round(time.process_time() - cpu, 1),
                       iters=state["step"])
    if not plumbing.leave_distributed():
        return None  # under torchrun the other processes stop here: process 0 samples and grades
    plumbing.remove_old_metrics(args.out)
    # The EMA network in float32, even on a GPU: 2D points need more precision than bf16 gives.
    metrics["rows"] = chamfer_table(args, ema.module, sched, reference)
    plumbing.write_metrics(os.path.join(args.out, "metrics.json"), {**metrics, "args": vars(args)})
    plumbing.save_as(args)
    return metrics


if __name__ == "__main__":
    main()
