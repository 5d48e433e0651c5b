"""DDPM on MNIST (28x28) or any folder of images (64x64 RGB): train, sample, grade.

The homework
------------
Train a denoising diffusion probabilistic model (Ho et al. 2020) and hand in
  * 10,000 generated images 00001.png ... 10000.png (28x28 RGB for MNIST) in a zip with no folder inside,
    graded by FID against the MNIST training set (pytorch-fid protocol; full marks below 40);
  * the diffusion process of 8 samples as an 8x8 grid (pure noise, then 7 equal parts of the trajectory);
  * a 5x5 grid of samples and the training-loss curve;
  * for the colour variants (anime faces, cat faces at 64x64): the same, and the fusion of two images.

The maths, in the paper's notation (t runs over {0, ..., T-1} in the code; the paper's t = code's t + 1)
------------------------------------------------------------------------------------------------------
  forward process   q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   abar_t = prod_{s<=t} (1 - beta_s)
                    so  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)          (q_sample)
  training          L_simple = E_{t, x_0, eps} || eps - eps_theta(x_t, t) ||^2   (Algorithm 1, diffusion_loss, train)
  posterior         q(x_{t-1} | x_t, x_0) = N(mu_t, beta~_t I),
                    mu_t = [beta_t sqrt(abar_{t-1}) / (1 - abar_t)] x_0 + [(1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)] x_t,
                    beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)                               (NoiseSchedule)
  sampling          x_0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)                (predict_x0)
                    x_{t-1} = mu_t(x_t, x_0_hat) + sqrt(beta~_t) z                            (Algorithm 2, ddpm_step)
  DDIM (Song et al. 2021, eq. 12), over a sub-sequence of steps t > t', 0 <= eta <= 1:
                    x_{t'} = sqrt(abar_{t'}) x_0_hat + sqrt(1 - abar_{t'} - sigma^2) eps_theta + sigma z,
                    sigma = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'})   (ddim_step)
  With eta = 1 and t' = t - 1, sigma^2 = beta~_t and the DDIM step is the DDPM step (a test checks this).
  fusion            x_t = (1 - lam) q_sample(x_A, t, eps) + lam q_sample(x_B, t, eps), then Algorithm 2 from t  (fuse)

Commands
--------
  python ddpm_mnist.py --epochs 30                      # the homework on a GPU: train, 10k samples, FID
  python ddpm_mnist.py --preset cpu                     # the same on a 2-core CPU in about an hour (README's numbers)
  python ddpm_mnist.py --dataset folder --data-dir anime_faces --image-size 64 --epochs 50 --out runs/anime
  python ddpm_mnist.py --dataset folder --data-dir cat_faces --out runs/cats --fuse a.png b.png --lam 0.5 --fuse-t 500
  python ddpm_mnist.py --sample-only --sampler ddim --steps 100 --eta 0   # resample from runs/ddpm_mnist/ckpt.pt
  torchrun --nproc_per_node 4 ddpm_mnist.py --epochs 30   # several GPUs: the same run, each GPU a share of every batch
"""

import argparse
import atexit
import copy
import csv
import datetime
import gzip
import importlib.util
import json
import math
import os
import pickletools
import shutil
import signal
import struct
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

SCRIPT = "ddpm_mnist"  # written into every checkpoint, so that another script's checkpoint is recognised
# A preset changes defaults only: `--preset cpu --epochs 2` trains 2 epochs. Measured numbers are in the README.
PRESETS = {
    # A 2-core CPU in under an hour (train + 10,000 samples): a narrow UNet, 6 epochs with a cosine learning rate,
    # DDIM with 20 steps; FID against the first 10,000 training digits (their statistics are computed once).
    "cpu": dict(device="cpu", ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_res=7, dropout=0.0, epochs=6,
                batch_size=64, lr=2e-3, lr_decay="cosine", warmup=200, ema_decay=0.999, sampler="ddim", steps=20,
                eta=0.0, sample_batch_size=500, fid_ref_limit=10000, out="runs/cpu_mnist"),
}
# The flags that define a training run: --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("dataset", "data_dir", "image_size", "limit", "flip", "ch", "ch_mult", "num_res_blocks", "attn_res",
            "dropout", "timesteps", "schedule", "batch_size", "lr", "lr_decay", "warmup", "grad_clip", "ema_decay",
            "seed")
DELIBERATELY_DIFFERENT = {
    "train": "unconditional: batches of images without labels (cfg_afhq.py and cond_iclevr.py add them)",
}


# =================================================================================================================
# Flags
# =================================================================================================================
def build_parser():
    p = FlagParser(description="DDPM on MNIST or a folder of images (see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default=None, help="cpu: the configuration measured on a 2-core CPU")
    a("--dataset", choices=["mnist", "folder"], default="mnist", help="mnist (28x28 grey) or folder (any images, RGB)")
    a("--data-dir", default="./data", help="MNIST root (holds MNIST/raw; downloaded if missing) or the image folder")
    a("--image-size", type=int, default=64, help="side of the square images for --dataset folder")
    a("--limit", type=int, default=None, help="train on the first N images only")
    a("--flip", action=argparse.BooleanOptionalAction, default=None, help="random mirroring (default: folders only)")
    a("--ch", type=int, default=64, help="base channel width of the UNet")
    a("--ch-mult", type=int, nargs="+", default=None, help="width per resolution (default 1 2 2; 1 2 2 2 above 32 px)")
    a("--num-res-blocks", type=int, default=2, help="residual blocks per resolution")
    a("--attn-res", type=int, default=16, help="self-attention on feature maps of this side or smaller")
    a("--dropout", type=float, default=0.1, help="dropout inside the residual blocks")
    a("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    a("--schedule", choices=["linear", "cosine"], default="linear", help="linear 1e-4 -> 0.02, or cosine")
    a("--epochs", type=int, default=30, help="passes over the training images")
    a("--iters", type=int, default=None, help="stop after this many optimiser steps instead (overrides --epochs)")
    a("--batch-size", type=int, default=128, help="images per optimiser step (all GPUs together under torchrun)")
    a("--lr", type=float, default=4e-4, help="AdamW learning rate after warm-up")
    a("--lr-decay", choices=["constant", "cosine"], default="constant", help="after warm-up: keep it, or decay to 0")
    a("--warmup", type=int, default=500, help="linear learning-rate warm-up, in steps")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    a("--ema-decay", type=float, default=0.999, help="decay of the weights' moving average (0: none)")
    a("--seed", type=int, default=0,
      help="seeds the training and the sampling noise (with --sample-only: the sampling alone)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    a("--compile", action="store_true", help="torch.compile the model for training and for sampling (sampling gains most: README)")
    a("--fp32-sampling", action="store_true",
      help="sample in float32 on a GPU too (default there: bf16 autocast, faster, a little less exact)")
    a("--out", default="runs/ddpm_mnist", help="folder for checkpoint, images and metrics")
    a("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    a("--sample-only", action="store_true", help="skip training: sample from --ckpt")
    a("--ckpt", default=None, help="checkpoint for --sample-only and --fuse (default OUT/ckpt.pt)")
    a("--num-samples", type=int, default=10000, help="images written to OUT/samples (0: none)")
    a("--sample-batch-size", type=int, default=1000, help="images denoised at once")
    a("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="ancestral DDPM (all T steps) or DDIM")
    a("--steps", type=int, default=None, help="DDIM steps (default: all T)")
    a("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like noise")
    a("--fid", action=argparse.BooleanOptionalAction, default=True, help="FID of the samples against the training set")
    a("--fid-stats", default=None, help="reference statistics .npz (default: the training set's, computed once)")
    a("--fid-ref-limit", type=int, default=None, help="the default reference: only the first N training images")
    a("--inception", default=None, help="FID Inception weights (default: pytorch-fid's file, via torch.hub)")
    a("--save-as", nargs="+", default=None, metavar="OUTPUT=FILE",
      help="also save outputs under a course's names, e.g. grid.png=result_mnist.jpg loss.png=loss_mnist.jpg")
    a("--fuse", nargs="+", default=None, metavar="IMG", help="fuse two images A B, or a folder's images in pairs")
    a("--lam", type=float, default=0.5, help="fusion weight: (1 - lam) * A + lam * B")
    a("--fuse-t", type=int, nargs="+", default=None, metavar="T",
      help="noise both images to step t (default T/2), or to a random t in [LO, HI) per pair with two numbers")
    return p


def parse_args(argv=None):
    args = parse_with_preset(build_parser(), argv)
    if args.ch_mult is None:
        args.ch_mult = [1, 2, 2] if (28 if args.dataset == "mnist" else args.image_size) <= 32 else [1, 2, 2, 2]
    if args.flip is None:
        args.flip = args.dataset == "folder"
    args.ckpt = args.ckpt or os.path.join(args.out, "ckpt.pt")
    check_args(args)
    return args


# =================================================================================================================
# Data: every training image as one uint8 tensor N x C x H x W in memory; each batch goes to the device as it is used
# =================================================================================================================
def load_mnist(data_dir, limit=None):
    """The 60,000 training digits, N x 1 x 28 x 28 uint8 (downloaded by torchvision if they are not there)."""
    return mnist_digits(data_dir)[:limit].unsqueeze(1)


def load_training_images(args):
    if args.dataset == "mnist":
        return load_mnist(args.data_dir, args.limit)
    return load_image_folder(args.data_dir, args.image_size, args.limit)


# =================================================================================================================
# Noise schedule: every per-step constant, computed once in float64
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
# Model: a UNet that predicts the noise eps_theta(x_t, t)
# =================================================================================================================
def timestep_embedding(t, dim):
    """Sinusoidal embedding of the step (Vaswani et al.), as in the DDPM UNet: dim/2 frequencies from 1 to 1e-4."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def group_norm(ch):
    # At least 4 channels per group (32 groups of 4 at the DDPM width of 128). One channel per group would be
    # instance norm, which removes each image's mean brightness at every layer: samples come out grey.
    return nn.GroupNorm(math.gcd(32, max(1, ch // 4)), ch)


class AttentionBlock(nn.Module):
    """Self-attention over all pixels of a feature map, with a residual connection."""

    def __init__(self, ch):
        super().__init__()
        self.heads = ch // 32 if ch % 32 == 0 else 1
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)  # starts as the identity, so attention cannot hurt early training
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2)
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # b x heads x hw x c/heads
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the time embedding added in between; optional self-attention after."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout, attention=False):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: deep UNets train from step one
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttentionBlock(out_ch) if attention else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        # Up to the size of the matching skip connection (7 -> 4 -> 7 needs a size, not a factor of 2).
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): an encoder-decoder with skip connections (Ronneberger et al.; Ho et al.'s layout).

    Level k works at 1/2^k of the image size with ch * ch_mult[k] channels; the levels in attn_levels (and the
    middle) add self-attention. extra_emb, if given, is added to the time embedding: how the conditional scripts
    feed in labels."""

    def __init__(self, in_ch, ch, ch_mult, num_res_blocks, attn_levels, dropout):
        super().__init__()
        self.ch = ch
        self.emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        # Encoder: num_res_blocks blocks per level, then a stride-2 convolution (none after the last level).
        # skip_chs records the width of every output the decoder will concatenate back, in order.
        self.down = nn.ModuleList()
        skip_chs = [ch]
        cur = ch  # channels of the current feature map
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(cur, ch * mult, self.emb_dim, dropout, attention=level in attn_levels))
                cur = ch * mult
                skip_chs.append(cur)
            if level < len(ch_mult) - 1:
                self.down.append(Downsample(cur))
                skip_chs.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, self.emb_dim, dropout, attention=True),
                                  ResBlock(cur, cur, self.emb_dim, dropout)])
        # Decoder: one more block per level than the encoder, each eating one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(cur + skip_chs.pop(), ch * mult, self.emb_dim, dropout, attention=level in attn_levels))
                cur = ch * mult
            if level > 0:
                self.up.append(Upsample(cur))
        self.norm_out = group_norm(cur)
        self.conv_out = nn.Conv2d(cur, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, extra_emb=None):
        emb = self.time_mlp(timestep_embedding(t, self.ch))
        if extra_emb is not None:
            emb = emb + extra_emb
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h, skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.norm_out(h)))


def attention_levels(image_size, ch_mult, attn_res):
    """The levels whose feature maps are attn_res pixels or smaller (28 px: levels at 28, 14, 7; 64 px: 64 ... 8)."""
    sides = [image_size]
    for _ in ch_mult[1:]:
        sides.append((sides[-1] + 1) // 2)  # a stride-2 convolution with padding 1 rounds up
    return [level for level, side in enumerate(sides) if side <= attn_res]


def build_model(args, in_ch):
    size = 28 if args.dataset == "mnist" else args.image_size
    levels = attention_levels(size, args.ch_mult, args.attn_res)
    return UNet(in_ch, args.ch, args.ch_mult, args.num_res_blocks, levels, args.dropout)


# =================================================================================================================
# Diffusion maths
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


def make_eps_fn(model, bf16):
    """The model as eps_fn(x, t), float32 out; in bf16 autocast if bf16 (see sample_in_bf16)."""
    def eps_fn(x, t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(x, t).float()
    return eps_fn


def sample_in_bf16(args, device):
    """Sampling runs in bf16 autocast on a GPU, for speed, unless --fp32-sampling; on the CPU always in float32.
    bf16 is not free: it rounds every layer to 8 bits of mantissa, and guidance multiplies the rounding by w; on a
    small CPU model it scored worse FID than float32 (README, cfg_afhq.py section). benchmarks/gpu.py measures both."""
    return device.type == "cuda" and not args.fp32_sampling


def sampling_network(model, args):
    """The network the sampling loop calls: torch.compile'd with --compile. Sampling calls it once per step and batch
    (10,000 DDPM samples: 10,000 calls of 1,000 images), so compiling pays there: on an H200 one such call of the
    MNIST UNet took 22 ms compiled against 49 ms eager, after 27 s of compiling (README, benchmarks/gpu_profile.py).
    The first call compiles; a batch of another size compiles again."""
    return torch.compile(model) if args.compile else model


def generate(eps_fn, sched, n, shape, timesteps, args, device):
    """n samples as uint8 RGB, in batches of --sample-batch-size. Batch b has its own noise generator (seeded from
    --seed and b), so the images are the same however the batches are shared out: under torchrun each process
    denoises every world-th batch, and the batches are gathered back in order."""
    mine = {}
    for b, start in enumerate(range(0, n, args.sample_batch_size)):
        if b % world_size() != rank():
            continue
        g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + b)
        x_T = torch.randn((min(args.sample_batch_size, n - start), *shape), generator=g, device=device)
        mine[b] = to_uint8(sample(eps_fn, sched, x_T, timesteps, args.sampler, args.eta, g))
        say(f"sampled {start + len(mine[b])}/{n} ({args.sampler}, {len(timesteps)} steps)")
    batches = gather_dicts(mine)
    return torch.cat([batches[b] for b in sorted(batches)]) if batches else torch.zeros((0, 3, *shape[1:]), dtype=torch.uint8)


def fuse(args, eps_fn, sched, in_ch, size, device):
    """Noise A and B to step t with the same eps, mix (1 - lam) x_A + lam x_B, and denoise from t (DDPM).
    t is --fuse-t, or drawn per pair from [LO, HI). Returns the images A, B, the fused ones and each pair's t."""
    paths = args.fuse if len(args.fuse) == 2 else list_images(args.fuse[0])
    images = torch.stack([load_image(p, size, "L" if in_ch == 1 else "RGB") for p in paths[:len(paths) // 2 * 2]])
    a, b = images[0::2].to(device).float() / 127.5 - 1, images[1::2].to(device).float() / 127.5 - 1
    g = torch.Generator(device).manual_seed(args.seed)
    low, high = args.fuse_t if len(args.fuse_t) == 2 else (args.fuse_t[0], args.fuse_t[0] + 1)
    ts = torch.randint(low, high, (len(a),), generator=g, device=device)
    noise = torch.randn(a.shape, generator=g, device=device)  # shared by A and B: the mix keeps step t's variance
    x_t = (1 - args.lam) * q_sample(sched, a, ts, noise) + args.lam * q_sample(sched, b, ts, noise)
    fused = torch.empty_like(x_t)
    for t in ts.unique().tolist():  # the pairs noised to the same step share one chain
        pick = ts == t
        fused[pick] = sample(eps_fn, sched, x_t[pick], list(range(t + 1)), "ddpm", generator=g)
    return to_uint8(a), to_uint8(b), to_uint8(fused), ts.tolist()


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


def train(args, data, model, ema, optimizer, sched, device, state):
    """Algorithm 1 over epochs of shuffled batches. state holds what a checkpoint needs to resume exactly.

    Under torchrun every process draws the whole batch's randomness (the same on all of them), then computes the
    loss on its own share of the batch; DistributedDataParallel averages the gradients, so the processes together
    take the step one process would take on the whole batch."""
    n, bs = len(data), args.batch_size
    iters_per_epoch = math.ceil(n / bs)
    total = total_steps(args, iters_per_epoch)
    net = parallel_model(model, args, device, n)
    model.train()
    progress = Progress(state["step"], total)
    start = time.time() - state["train_seconds"]  # the training clock goes on from where a resumed run stopped
    with CtrlC() as ctrl_c:
        while state["step"] < total:
            if state["epoch_perm"] is None:
                state["epoch_perm"] = torch.randperm(n)
            first = state["batch_in_epoch"] * bs
            idx = state["epoch_perm"][first:first + bs]
            x0 = to_model_input(data[idx], device, args.flip)
            t = torch.randint(0, sched.T, (len(idx),), device=device)
            noise = torch.randn_like(x0)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, state["step"], total)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
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
            state["batch_in_epoch"] += 1
            if state["batch_in_epoch"] == iters_per_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"], state["epoch_perm"] = 0, None
                save_run(args, model, ema, optimizer, state)
            progress.show(state, f"loss {np.mean(state['losses'][-50:]):.4f}", bs, iters_per_epoch)
            if ctrl_c.stop_requested():
                save_run(args, model, ema, optimizer, state)
                say(f"\ninterrupted: saved {args.out}/ckpt.pt at step {state['step']}; continue with --resume")
                sys.exit(130)
    if state["batch_in_epoch"]:  # --iters stopped in the middle of an epoch
        save_run(args, model, ema, optimizer, state)


# =================================================================================================================
# main: check every input, train (or load), then write every output
# =================================================================================================================
def main(argv=None):
    args = parse_args(argv)
    start_distributed(args)
    device = torch.device(args.device)
    saved = load_run(args) if (args.resume or args.sample_only or args.fuse) else None
    if args.fuse:
        check_fusion_inputs(args)
    fid_setup = prepare_fid(args) if args.fid and args.num_samples and not args.fuse and rank() == 0 else None
    data = None if (args.sample_only or args.fuse) else load_training_images(args)  # bad data stops us here
    check_out_folder(args.out)

    torch.manual_seed(args.seed)
    in_ch = 1 if args.dataset == "mnist" else 3
    size = 28 if args.dataset == "mnist" else args.image_size
    sched = NoiseSchedule(make_betas(args.schedule, args.timesteps)).to(device)
    model = build_model(args, in_ch).to(device, memory_format=channels_last(device))
    ema = make_ema(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "epoch_perm": None, "losses": []}
    if saved is not None:
        restore_run(saved, args, model, ema, optimizer, state)
    # Seconds of training over every resume: kept in the checkpoint, so a resumed run reports its whole training.
    state["train_seconds"] = float(saved.get("train_seconds", 0.0)) if saved is not None else 0.0
    say(f"UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")

    bf16 = sample_in_bf16(args, device)
    eps_fn = make_eps_fn(ema.module.eval(), bf16)
    if args.fuse:
        result = write_fusion(args, *fuse(args, eps_fn, sched, in_ch, size, device), fid_of_fusion=args.fid)
        save_as(args)
        return result
    metrics = {"device": str(device), "hardware": device_name(device), "torch": torch.__version__,
               "processes": world_size()}
    t0 = time.time()
    if not args.sample_only:
        warn_if_slow_on_cpu(args, model, sched, data[:args.batch_size], device, steps_per_epoch=math.ceil(len(data) / args.batch_size))
        train(args, data, model, ema, optimizer, sched, device, state)
        metrics.update(train_seconds=round(state["train_seconds"], 1), steps=state["step"], epochs=state["epoch"])
        write_loss(args, {"training loss": state["losses"]}, f"DDPM training loss ({args.dataset}, batch {args.batch_size})")
    if args.num_samples == 0:
        write_metrics(os.path.join(args.out, "metrics.json"), {**metrics, "args": vars(args)})
        return save_as(args)

    steps = args.steps or args.timesteps
    timesteps = sampling_timesteps(args.timesteps, steps if args.sampler == "ddim" else args.timesteps)
    g = torch.Generator(device).manual_seed(args.seed)
    x_T = torch.randn((8, in_ch, size, size), generator=g, device=device)
    _, frames = sample(eps_fn, sched, x_T, timesteps, args.sampler, args.eta, g, record=56)  # 56 = 7 * 8 frames
    t1 = time.time()
    # The 10,000 samples through the compiled network with --compile (the 8 above are not worth a compilation).
    sampling_eps_fn = make_eps_fn(sampling_network(ema.module, args), bf16)
    images = generate(sampling_eps_fn, sched, args.num_samples, (in_ch, size, size), timesteps, args, device)
    if rank() != 0:
        return None  # the other processes are done: rank 0 writes and grades
    metrics.update(sampler=args.sampler, sampling_steps=len(timesteps), eta=args.eta if args.sampler == "ddim" else None,
                   sampling_precision="bf16" if bf16 else "float32",
                   num_samples=len(images), sample_seconds=round(time.time() - t1, 1),
                   samples_per_second=round(len(images) / (time.time() - t1), 2))
    save_process(frames, os.path.join(args.out, "process.png"), os.path.join(args.out, "process.gif"))
    make_grid(images[:25], nrow=5).save(os.path.join(args.out, "grid.png"))
    remove_stale(os.path.join(args.out, "metrics.json"))  # it described the samples about to be replaced
    save_samples(images, os.path.join(args.out, "samples"), os.path.join(args.out, "samples.zip"))
    if fid_setup is not None:
        metrics.update(compute_fid(args, images, fid_setup, device))
    metrics.update(total_seconds=round(time.time() - t0, 1), args=vars(args))
    write_metrics(os.path.join(args.out, "metrics.json"), metrics)
    say(f"wrote {args.out}: grid.png, process.png, process.gif, samples/ and samples.zip ({len(images)} images), "
        + ("" if args.sample_only else "loss.png, loss.csv, ckpt.pt, ") + "metrics.json")
    save_as(args)
    return metrics


# =================================================================================================================
# =================================================================================================================
# APPENDIX: plumbing. Everything above is the method; what follows checks inputs, saves and restores runs,
# handles Ctrl-C and torchrun, reads and writes images, and wires in FID. Python looks these names up when they
# are called, so they may live below main().
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
        at_least("--epochs", args.epochs, 0), at_least("--iters", args.iters, 1),
        at_least("--batch-size", args.batch_size, 1), must(args.lr > 0, f"--lr must be positive, got {args.lr}"),
        at_least("--warmup", args.warmup, 0), between("--ema-decay", args.ema_decay, 0, 1, high_included=False),
        between("--dropout", args.dropout, 0, 1, high_included=False), at_least("--timesteps", args.timesteps, 2),
        at_least("--ch", args.ch, 1), at_least("--ch-mult", min(args.ch_mult), 1),
        at_least("--num-res-blocks", args.num_res_blocks, 1), at_least("--image-size", args.image_size, 8),
        at_least("--limit", args.limit, 1), at_least("--num-samples", args.num_samples, 0),
        at_least("--fid-ref-limit", args.fid_ref_limit, 2),
        at_least("--sample-batch-size", args.sample_batch_size, 1), at_least("--grad-clip", args.grad_clip, 0),
        between("--steps", args.steps, 1, args.timesteps),
        must(args.steps is None or args.sampler == "ddim",
             "--steps applies to --sampler ddim; DDPM takes all T steps (use --sampler ddim --eta 1 for a shorter noisy chain)"),
        between("--eta", args.eta, 0, 1), between("--lam", args.lam, 0, 1),
        must(args.fuse_t is None or len(args.fuse_t) in (1, 2), "--fuse-t takes one step t, or a range LO HI"),
        must(args.fuse_t is None or (0 <= min(args.fuse_t) and max(args.fuse_t) <= args.timesteps
                                     and (len(args.fuse_t) == 1 or args.fuse_t[0] < args.fuse_t[1])
                                     and (len(args.fuse_t) == 2 or args.fuse_t[0] < args.timesteps)),
             f"--fuse-t must be a step in [0, {args.timesteps - 1}] or a range LO < HI within [0, {args.timesteps}], got {args.fuse_t}"),
        device_problem(args.device), compile_problem(args), save_as_problem(args.save_as),
        must(args.dataset != "folder" or args.sample_only or args.fuse or os.path.isdir(args.data_dir),
             f"--data-dir {args.data_dir} is not a folder of images"),
        must(not (args.resume and args.sample_only), "--resume and --sample-only exclude each other"),
        must(args.fuse is None or len(args.fuse) == 2 or (len(args.fuse) == 1 and os.path.isdir(args.fuse[0])),
             "--fuse takes two images or one folder of images"),
        *[must(os.path.exists(path), f"--fuse input {path} does not exist") for path in args.fuse or []],
        must(not (args.resume or args.sample_only or args.fuse) or os.path.isfile(args.ckpt),
             f"checkpoint {args.ckpt} not found (train first, or pass --ckpt)"),
    ]
    for message in problems:
        if message:
            fail(message)


def save_as_problem(pairs):
    """Why a --save-as value cannot be used (None if every one can)."""
    for pair in pairs or []:
        output, _, target = pair.partition("=")
        if not output or not target or os.sep in output:
            return f"--save-as takes OUTPUT=FILE, an output of this run and a file name, e.g. grid.png=result.jpg; got {pair!r}"
        if os.path.splitext(target)[1].lower() not in (".png", ".jpg", ".jpeg", os.path.splitext(output)[1].lower()):
            return f"--save-as {pair}: the new name must end in .png, .jpg or .jpeg (or keep {output}'s extension)"
    return None


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


def check_fusion_inputs(args):
    """The fusion images exist, can be read, and pair up, before any work."""
    paths = args.fuse if len(args.fuse) == 2 else list_images(args.fuse[0])
    if len(paths) < 2:
        fail(f"--fuse needs at least two images, found {len(paths)} in {args.fuse[0]}")
    for path in paths:
        if not os.path.isfile(path):
            fail(f"--fuse input {path} does not exist")
        load_image(path, 8)  # fails with a sentence on a file that is not an image
    args.fuse_t = args.fuse_t or [args.timesteps // 2]
    if max(args.fuse_t) > args.timesteps or (len(args.fuse_t) == 1 and args.fuse_t[0] >= args.timesteps):
        fail(f"--fuse-t {args.fuse_t} is beyond the checkpoint's {args.timesteps} diffusion steps")


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


def gather_dicts(mine):
    """Every process's {key: tensor} merged on rank 0 (the others get {}); a plain run returns mine."""
    if world_size() == 1:
        return mine
    parts = [None] * world_size()
    dist.all_gather_object(parts, {k: v.cpu() for k, v in mine.items()})
    return {k: v for part in parts for k, v in part.items()} if rank() == 0 else {}


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


def first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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


def total_steps(args, iters_per_epoch):
    return args.iters if args.iters else args.epochs * iters_per_epoch


# ---- training helpers -------------------------------------------------------------------------------------------
def to_model_input(batch_uint8, device, flip):
    """uint8 images -> floats in [-1, 1] on device, randomly mirrored if flip."""
    x = batch_uint8.to(device, non_blocking=True).float() / 127.5 - 1
    if flip:
        mirror = torch.rand(x.shape[0], device=device) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x.contiguous(memory_format=channels_last(device))


def channels_last(device):
    """Convolutions run faster in channels_last on a GPU; on the CPU the usual layout is as fast."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


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


def warn_if_slow_on_cpu(args, model, sched, batch, device, steps_per_epoch, **model_kwargs):
    """On the CPU without --preset cpu, time one training step on a copy of the model and, if the run would take
    more than an hour, say so at once with the estimate and the preset sized for a CPU. The random state is
    restored, so the run itself is unchanged."""
    if device.type != "cpu" or args.preset == "cpu" or "cpu" not in PRESETS:
        return
    saved_rng, probe = torch.get_rng_state(), copy.deepcopy(model)
    x0 = to_model_input(batch, device, False)
    t = torch.randint(0, sched.T, (len(x0),))
    start = time.time()
    diffusion_loss(probe, sched, x0, t, torch.randn_like(x0), **model_kwargs).backward()
    seconds = time.time() - start
    torch.set_rng_state(saved_rng)
    steps = total_steps(args, steps_per_epoch)
    train_s = seconds * steps
    sample_s = seconds / len(x0) / 3 * args.num_samples * (args.steps or args.timesteps)  # a forward is ~1/3 of a step
    if train_s + sample_s > 3600:
        say(f"note: this is a GPU-sized run: on this CPU about {format_seconds(train_s)} of training ({steps} steps "
            f"of {seconds:.1f} s) and {format_seconds(sample_s)} of sampling; --preset cpu is the configuration "
            f"measured on a 2-core CPU (README)")


# ---- reading images ---------------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def list_images(root):
    """Image files below root (recursive, any case of .png/.jpg/.jpeg), sorted so runs are reproducible."""
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def to_rgb8(img):
    """Any PIL image as 8-bit RGB. PIL's own convert("RGB") clips 16- and 32-bit grey at 255, so a 16-bit PNG
    would come out almost white: those are scaled to 8 bits first. Palette, RGBA, CMYK, LA, 1-bit: convert."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0  # 16-bit data, or 8-bit in a wide mode
        img = Image.fromarray(np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def load_image(path, size, mode="RGB"):
    """One image as uint8 C x H x W: 8-bit RGB (or grey with mode "L"), resized on its short side and centre-cropped."""
    try:
        with Image.open(path) as img:
            img = ImageOps.fit(to_rgb8(img).convert(mode), (size, size), Image.BICUBIC)
    except Exception as e:  # PIL raises several types for broken files; all mean the same to the user
        fail(f"cannot read image {path} ({type(e).__name__}: {e})")
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.reshape(size, size, -1).copy()).permute(2, 0, 1)


def load_image_folder(root, size, limit=None):
    paths = list_images(root)[:limit]
    if not paths:
        fail(f"no .png/.jpg/.jpeg images found in {root}")
    say(f"reading {len(paths)} images from {root} at {size}x{size} ...")
    return torch.stack([load_image(p, size) for p in paths])


def mnist_digits(data_dir):
    """MNIST's 60,000 training digits (N x 28 x 28 uint8) from data_dir/MNIST/raw, downloaded there if missing.
    A failed download leaves no empty folder behind."""
    raw = os.path.join(data_dir, "MNIST", "raw", "train-images-idx3-ubyte")
    for path, opener in ((raw, open), (raw + ".gz", gzip.open)):
        if os.path.isfile(path):  # the IDX format: a 16-byte header (2051, count, rows, cols), then the pixels
            with opener(path, "rb") as fh:
                data = fh.read()
            magic, n, rows, cols = struct.unpack(">4I", data[:16])
            if magic == 2051 and len(data) == 16 + n * rows * cols:
                return torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8).view(n, rows, cols)
    import torchvision  # here, not at the top: importing it takes seconds, and only the download needs it
    try:
        return torchvision.datasets.MNIST(data_dir, train=True, download=False).data
    except RuntimeError:
        pass  # not there yet
    existed = os.path.isdir(data_dir)
    try:
        say(f"downloading MNIST into {data_dir} ...")
        return torchvision.datasets.MNIST(data_dir, train=True, download=True).data
    except Exception as e:
        if not existed:
            shutil.rmtree(data_dir, ignore_errors=True)
        fail(f"MNIST is not in {os.path.join(data_dir, 'MNIST', 'raw')} and could not be downloaded "
             f"({first_line(e)}); put the four MNIST files there, or pass --data-dir pointing at a folder that has MNIST/raw")


# ---- writing outputs --------------------------------------------------------------------------------------------
def to_uint8(x):
    """[-1, 1] floats -> uint8 RGB N x 3 x H x W, rounded as a PNG writer would; grey is replicated to 3 channels."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def make_grid(images, nrow, pad=2, scale=None):
    """uint8 N x 3 x H x W -> one PIL image, nrow images per row, small images enlarged (nearest) to be seen."""
    n, _, h, w = images.shape
    scale = scale or max(1, 64 // h)
    cols = min(nrow, n)
    rows = -(-n // cols)  # ceil(n / cols)
    grid = torch.full((3, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)  # white lines
    for i, image in enumerate(images):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[:, top:top + h, left:left + w] = image
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def remove_stale(path):
    if os.path.exists(path):
        os.remove(path)


def save_samples(images, folder, zip_path):
    """00001.png, 00002.png, ... and a zip holding exactly those files at its root (what graders unpack).
    Both are written beside their final names and swapped in at the end, so the folder and the zip are always one
    run's complete set (never old files mixed with new ones); an interrupted write leaves the old set."""
    tmp_folder, tmp_zip = folder.rstrip("/\\") + ".tmp", zip_path + ".tmp"
    try:
        shutil.rmtree(tmp_folder, ignore_errors=True)
        os.makedirs(tmp_folder)
        names = [f"{i + 1:05d}.png" for i in range(len(images))]
        for name, img in zip(names, images):
            Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").save(os.path.join(tmp_folder, name))
        with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_STORED) as zf:
            for name in names:
                zf.write(os.path.join(tmp_folder, name), arcname=name)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp_folder, folder)
        os.replace(tmp_zip, zip_path)
    finally:
        shutil.rmtree(tmp_folder, ignore_errors=True)
        remove_stale(tmp_zip)


def save_process(frames, png_path, gif_path, columns=8):
    """frames: list of N x C x H x W states from noise to image. PNG: one row per sample, `columns` evenly spaced
    frames (first pure noise, last the result). GIF: every frame, the samples side by side."""
    # With 57 frames and 8 columns: frames 0, 8, 16, ..., 56.
    chosen = [round(k * (len(frames) - 1) / (columns - 1)) for k in range(columns)]
    rows = torch.stack([to_uint8(frames[k]) for k in chosen], dim=1)  # N x columns x 3 x H x W
    make_grid(rows.flatten(0, 1), nrow=columns).save(png_path)
    gif = [make_grid(to_uint8(f), nrow=len(f)) for f in frames] + [make_grid(to_uint8(frames[-1]), nrow=len(frames[-1]))] * 10
    gif[0].save(gif_path, save_all=True, append_images=gif[1:], duration=60, loop=0)


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


def save_as(args):
    """--save-as OUTPUT=FILE ...: copies of outputs under the names a course asks for, converted by the new name's
    extension (grid.png=result_mnist.jpg writes a JPEG)."""
    for pair in args.save_as or []:
        output, target = pair.split("=", 1)
        source = os.path.join(args.out, output)
        if not os.path.isfile(source):
            say(f"note: --save-as {pair}: this run wrote no {output}")
            continue
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        if os.path.splitext(target)[1].lower() == os.path.splitext(output)[1].lower():
            shutil.copyfile(source, target)
        else:
            with Image.open(source) as img:
                img.convert("RGB").save(target, quality=95)
        say(f"wrote {target} (from {source})")


def write_metrics(path, metrics):
    with open(path + ".tmp", "w") as fh:
        json.dump(metrics, fh, indent=2)
    os.replace(path + ".tmp", path)


def write_fusion(args, a, b, fused, ts, fid_of_fusion):
    """fusion.png (rows A | B | fused), each fused image as fusion/00001.png ..., and their FID against the source
    images (both A and B) when --fid is on and the Inception weights are there."""
    make_grid(torch.stack([a, b, fused], dim=1).flatten(0, 1), nrow=3).save(os.path.join(args.out, "fusion.png"))
    save_samples(fused, os.path.join(args.out, "fusion"), os.path.join(args.out, "fusion.zip"))
    result = {"pairs": len(a), "lam": args.lam, "t_per_pair": ts, "fuse_t": args.fuse_t}
    if fid_of_fusion:
        result.update(fid_between(fused, torch.cat([a, b]), args))
    write_metrics(os.path.join(args.out, "fusion.json"), result)
    say(f"wrote {args.out}/fusion.png, fusion/ and fusion.zip: {len(a)} pair(s), rows of A | B | fused "
        f"(lam {args.lam}, t {ts[0] if len(set(ts)) == 1 else f'{min(ts)}..{max(ts)}'})"
        + (f"; FID {result['fid']:.2f} against the {2 * len(a)} sources" if result.get("fid") is not None else ""))
    return result


# ---- FID (fid.py, the pytorch-fid protocol) ---------------------------------------------------------------------
def default_fid_stats(args):
    """Where the training set's reference statistics are cached: runs/fid_stats_<data>.npz, beside --out."""
    limit = getattr(args, "fid_ref_limit", None)
    if args.dataset == "mnist":
        name = f"mnist_train{limit // 1000}k" if limit and limit % 1000 == 0 else f"mnist_train{limit or '60k'}"
    else:
        name = f"{os.path.basename(os.path.abspath(args.data_dir))}_{args.image_size}px" + (f"_first{limit}" if limit else "")
    return os.path.join(os.path.dirname(os.path.abspath(args.out)), f"fid_stats_{name}.npz")


def prepare_fid(args):
    """What FID will need, checked now rather than after training: the Inception weights (a given --inception must
    load; without weights FID is skipped, said now) and the reference statistics (a given --fid-stats must exist and
    hold a covariance of Inception features; without one the training set's are computed once after sampling)."""
    import fid  # imported here so training never needs the Inception network
    try:
        inception = fid.load_inception(args.inception, "cpu")
    except fid.FIDError as e:
        if args.inception:
            fail(f"--inception: {e}")
        say(f"note: FID will be skipped: {e}")
        return {"inception": None, "note": str(e)}
    stats = args.fid_stats or default_fid_stats(args)
    if args.fid_stats or os.path.isfile(stats):
        try:
            fid.load_statistics(stats, dim=fid.FEATURE_DIM)
        except fid.FIDError as e:
            fail(f"--fid-stats: {e}")
    elif args.dataset == "folder" and not os.path.isdir(args.data_dir):
        fail(f"FID needs the statistics of the training images, but {stats} does not exist and --data-dir "
             f"{args.data_dir} is not a folder: pass --fid-stats FILE or --no-fid")
    else:
        say(f"note: {stats} does not exist yet: the training images' statistics are computed into it after sampling "
            f"(once; slow on a CPU: pass --fid-stats FILE or --no-fid to skip)")
    return {"inception": inception, "stats": stats}


def compute_fid(args, images, fid_setup, device):
    """FID of uint8 RGB samples against the reference statistics (N and the reference are stated with it)."""
    import fid
    if fid_setup["inception"] is None:
        return {"fid": None, "fid_note": "skipped: " + fid_setup["note"]}
    inception, stats = fid_setup["inception"].to(device), fid_setup["stats"]
    if not os.path.isfile(stats):
        limit = getattr(args, "fid_ref_limit", None)
        say(f"computing the reference statistics of the training images into {stats} (once)")
        reference = (load_mnist(args.data_dir, limit) if args.dataset == "mnist"
                     else load_image_folder(args.data_dir, args.image_size, limit))
        fid.save_statistics(stats, *fid.compute_statistics(reference, model=inception, device=device))
    mu, sigma = fid.compute_statistics(images, model=inception, device=device)
    value = fid.frechet_distance(mu, sigma, *fid.load_statistics(stats))
    say(f"FID {value:.3f}  ({len(images)} samples vs {stats})")
    return {"fid": value, "fid_num_samples": len(images), "fid_reference": stats}


def fid_between(images, reference, args):
    """FID of two uint8 image sets (the fused images against their sources), or None without the weights."""
    import fid
    if len(images) < 2:
        say("note: FID of the fused images needs at least two pairs")
        return {"fid": None}
    try:
        inception = fid.load_inception(args.inception, args.device)
    except fid.FIDError as e:
        say(f"note: FID of the fused images skipped: {e}")
        return {"fid": None}
    mu1, sigma1 = fid.compute_statistics(images, model=inception)
    mu2, sigma2 = fid.compute_statistics(reference, model=inception)
    return {"fid": fid.frechet_distance(mu1, sigma1, mu2, sigma2), "fid_num_samples": len(images),
            "fid_reference": f"the {len(reference)} source images"}


if __name__ == "__main__":  # last, so that main() finds every function of the appendix
    main()
    leave_distributed()
