"""Classifier-free guidance on AFHQ 64x64 (cat, dog, wild): one class-conditional DDPM, FID per guidance scale.

The homework
------------
Train one UNet both as a class-conditional and as an unconditional noise predictor (Ho & Salimans 2022) by
replacing the class label with a null label with probability 0.1, then sample with classifier-free guidance.
AFHQ (cat, dog, wild) at 64x64; 500 samples per guidance scale, classes balanced; FID at w = 0 and w = 7.5
against the AFHQ validation images resized to 64x64 (full marks below 30 at both scales); a grid per scale
with one row per class, and a hand-in folder of 32 samples per scale. Any folder with one sub-folder of images per
class works the same way.

The maths, in the papers' notation (t runs over {0, ..., T-1} in the code; the paper's t = code's t + 1)
------------------------------------------------------------------------------------------------------
  labels            c in {1, ..., K} for the K classes; c = 0 is the null label, written 0 below (no class)
  forward process   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)                 (q_sample)
  training          c~ = 0 with probability p_uncond (--cfg-dropout 0.1), else c                  (drop_labels)
                    L = E_{t, (x_0, c), eps} || eps - eps_theta(x_t, t, c~) ||^2     (Ho & Salimans, Algorithm 1)
                    so one network learns both eps_theta(x_t, t, c) and the unconditional eps_theta(x_t, t, 0)
  guidance          eps~_theta(x_t, t, c) = (1 + w) eps_theta(x_t, t, c) - w eps_theta(x_t, t, 0)   (guided_eps)
                    w = 0 is the conditional model, w = -1 the unconditional one; larger w gives samples more
                    typical of their class and less varied. Both predictions come from one forward pass over
                    the doubled batch [x_t; x_t] with labels [c; 0]                          (make_cfg_eps_fn)
  sampling          eps~ in place of eps_theta in the usual samplers (Ho & Salimans, Algorithm 2):
                    x_0_hat = (x_t - sqrt(1 - abar_t) eps~) / sqrt(abar_t)                          (predict_x0)
                    DDPM   x_{t-1} = mu_t(x_t, x_0_hat) + sqrt(beta~_t) z            (Ho et al. 2020, ddpm_step)
                    DDIM   x_{t'} = sqrt(abar_{t'}) x_0_hat + sqrt(1 - abar_{t'} - sigma^2) eps~ + sigma z
                                                                            (Song et al. 2021, eq. 12, ddim_step)

The two conventions for w (read this before comparing numbers with the course's)
---------------------------------------------------------------------------------
  here            w in --cfg-scales goes into the formula above for every value: w = 0 keeps the label (the
                  conditional model), w = -1 (also spelled "uncond") drops it (the unconditional model).
  KAIST's course  the same formula, but only for a scale above 1: at a scale of 1 or less its sampler calls the
                  network without the label. So the course's "scale 0.0 (no CFG)" is our w = -1 ("uncond"), and
                  its 7.5 is our 7.5. --preset course samples at "uncond" and 7.5, the course's two scales.

Commands
--------
  python cfg_afhq.py --data-dir afhq --prepare-eval   # the homework on a GPU: eval folder, train, 500 samples at
                                                      # w = 0 and 7.5, grids, hand-in folders, FID per scale
  python cfg_afhq.py --preset course --data-dir afhq --prepare-eval   # the course's fixed UNet and 100,000 steps
  python cfg_afhq.py --data-dir afhq --sample-only --cfg-scales 0 1 3 7.5 --sampler ddim --steps 100
  python cfg_afhq.py --preset cpu --data-dir data/mnist_classes --fid-stats ../shared/fid-reference/mnist_train10k_stats.npz
  python benchmarks/cfg_mnist_classes.py --preset cpu   # the README's MNIST numbers (MNIST as ten class folders)
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
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

SCRIPT = "cfg_afhq"  # written into every checkpoint, so that another script's checkpoint is recognised
# A preset changes defaults only; an explicit flag still wins. Measured numbers are in the README.
PRESETS = {
    # Sized for a 2-core CPU on 28x28 digits (MNIST as ten class folders, benchmarks/cfg_mnist_classes.py): grey
    # images in a one-channel model (three channels of one grey leave coloured speckle on a briefly trained model),
    # ddpm_mnist.py's CPU UNet, 8 epochs of 3,000 digits per class, AdamW 6e-3 with a cosine decay, the cosine noise
    # schedule, DDIM with 50 steps and eta = 1. FID at w = 0 / 7.5 (500 samples each; 2-core AVX2 CPU, the same
    # 3,752 iterations in 1,530-1,910 s of training, as fast as the shared machine ran; seed 0 unless stated; the
    # README's cfg_afhq.py section has the table):
    #   * linear schedule, lr 2e-3 (an earlier version of this preset): 17.75 / 39.65; sampled with DDIM-20 and
    #     eta = 0, 38.69 / 48.73 (the fresh noise of eta = 1 washes out the grey speckle a briefly trained model
    #     leaves);
    #   * the cosine schedule (Nichol & Dhariwal 2021): 16.91 / 37.53. The linear one keeps under 4% of the image,
    #     sqrt(abar_t) < 0.04, in its last 200 of 1,000 steps: a fifth of its training is spent on near pure noise;
    #   * and a higher learning rate: 4e-3 gives 16.60 / 35.19 (seed 1: 16.29 / 42.42); 6e-3, this preset, 16.08 /
    #     34.24 (seed 1: 16.76 / 34.68), lower and steadier at w = 7.5; 8e-3 (one seed): 16.87 / 36.99;
    #   * all 60,000 digits for 4,560 iterations, the first version's training time (three channels, one thread,
    #     2,814 iterations; both timed on the same hour): 16.17 +- 0.42 / 34.46 +- 2.32 over five seeds, no better;
    #   * 25 or 100 DDIM steps instead of 50: no better (39.73, 37.10 on the cosine run).
    # Guidance multiplies the model's error by w, so more training gains most at w = 7.5: the earlier version with
    # --epochs 24 (about an hour of training) gives 14.56 / 31.04, and this preset with --epochs 24 14.97 +- 0.31 /
    # 30.06 +- 1.74 over five seeds, each under 33.0 at w = 7.5.
    "cpu": dict(device="cpu", image_size=28, channels=1, flip=False, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1,
                attn_res=7, dropout=0.0, max_per_class=3000, epochs=8, batch_size=64, lr=6e-3, lr_decay="cosine",
                warmup=200, ema_decay=0.999, schedule="cosine", sampler="ddim", steps=50, eta=1.0,
                sample_batch_size=250),
    # KAIST CS492(D) assignment 2: its fixed UNet and training (Adam 2e-4, 200 warm-up steps, batch 16, 100,000
    # steps, 3,000 images per class, no EMA, no clipping), DDPM sampling, the course's scales 0.0 and 7.5.
    "course": dict(ch=128, ch_mult=[1, 2, 2, 2], attn_levels=[1], num_res_blocks=4, dropout=0.1, batch_size=16,
                   lr=2e-4, warmup=200, iters=100000, max_per_class=3000, ema_decay=0.0, grad_clip=0.0,
                   cfg_scales=[-1.0, 7.5], sampler="ddpm"),
}
# The flags that define a training run: --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("data_dir", "classes", "image_size", "channels", "max_per_class", "flip", "ch", "ch_mult", "num_res_blocks",
            "attn_res", "attn_levels", "dropout", "timesteps", "schedule", "label_dropout", "batch_size", "lr",
            "lr_decay", "warmup", "grad_clip", "ema_decay", "seed")
NULL_LABEL = 0  # "no class": the label the unconditional model sees; real classes are 1..K
EVAL_MARKER = "cfg_afhq_eval.json"  # written into folders that --prepare-eval made (and may therefore replace)
DELIBERATELY_DIFFERENT = {
    "build_model": "wraps the UNet with a class embedding",
    "check_args": "adds the guidance scales, label dropout, classes and the class check",
}


# =================================================================================================================
# Flags
# =================================================================================================================
def guidance_scale(text):
    """A value of --cfg-scales: a number w, or "uncond" for w = -1 (the unconditional model alone)."""
    return -1.0 if text == "uncond" else float(text)


def build_parser():
    p = FlagParser(description="Classifier-free guidance on AFHQ or any folder of class folders "
                                            "(see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default=None, help="cpu: sized for a 2-core CPU; course: KAIST's settings")
    a("--data-dir", default="./data/afhq", help="AFHQ's layout (DIR/train/CLASS, DIR/val/CLASS) or DIR/CLASS/*")
    a("--classes", nargs="+", default=None, help="the class folders to use, in label order (default: all, sorted)")
    a("--image-size", type=int, default=64, help="side of the square RGB images")
    a("--max-per-class", type=int, default=3000, help="train on the first N images of each class (0: all)")
    a("--flip", action=argparse.BooleanOptionalAction, default=True, help="random mirroring (off for digits)")
    a("--channels", type=int, choices=[1, 3], default=3, help="1: grey images (e.g. digits), a one-channel model")
    a("--prepare-eval", action="store_true", help="write DIR/val at --image-size into --eval-dir: FID's reference")
    a("--eval-dir", default=None, help="the FID reference folder (default: eval_<data>_<size>px beside --out)")
    a("--ch", type=int, default=128, help="base channel width of the UNet")
    a("--ch-mult", type=int, nargs="+", default=None, help="width per resolution (default 1 2 2; 1 2 2 2 above 32 px)")
    a("--num-res-blocks", type=int, default=2, help="residual blocks per resolution")
    a("--attn-res", type=int, default=16, help="self-attention on feature maps of this side or smaller")
    a("--attn-levels", type=int, nargs="+", default=None, help="self-attention at these levels instead (0 = full size)")
    a("--dropout", type=float, default=0.1, help="dropout inside the residual blocks")
    a("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    a("--schedule", choices=["linear", "cosine"], default="linear", help="linear 1e-4 -> 0.02, or cosine")
    a("--cfg-dropout", "--label-dropout", dest="label_dropout", type=float, default=0.1,
      help="p_uncond: probability that a training label becomes the null label")
    a("--epochs", type=int, default=400, help="passes over the training images (9,000 for AFHQ)")
    a("--iters", type=int, default=None, help="stop after this many optimiser steps instead (overrides --epochs)")
    a("--batch-size", type=int, default=64, help="images per optimiser step (all GPUs together under torchrun)")
    a("--lr", type=float, default=2e-4, help="AdamW learning rate after warm-up")
    a("--lr-decay", choices=["constant", "cosine"], default="constant", help="after warm-up: keep it, or decay to 0")
    a("--warmup", type=int, default=500, help="linear learning-rate warm-up, in steps")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    a("--ema-decay", type=float, default=0.9995, help="decay of the weights' moving average (0: none)")
    a("--seed", type=int, default=0,
      help="seeds the training and the sampling noise (with --sample-only: the sampling alone)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    a("--compile", action="store_true", help="torch.compile the model for training and for sampling (sampling gains most: README)")
    a("--fp32-sampling", action="store_true",
      help="sample in float32 on a GPU too (default there: bf16 autocast, faster, a little less exact)")
    a("--out", default="runs/cfg_afhq", help="folder for checkpoint, images and metrics")
    a("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    a("--sample-only", action="store_true", help="skip training: sample from --ckpt")
    a("--ckpt", default=None, help="checkpoint for --sample-only (default OUT/ckpt.pt)")
    a("--cfg-scales", type=guidance_scale, nargs="*", default=[0.0, 7.5], metavar="W",
      help="guidance scales w (0: the conditional model; -1 or uncond: the unconditional one)")
    a("--num-samples", type=int, default=500, help="images per guidance scale, classes balanced (0: none)")
    a("--sample-batch-size", type=int, default=500, help="images denoised at once")
    a("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="ancestral DDPM (all T steps) or DDIM")
    a("--steps", type=int, default=None, help="DDIM steps (default: all T)")
    a("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like noise")
    a("--grid-cols", type=int, default=8, help="samples per class (row) in the grids")
    a("--handin-images", type=int, default=32, help="samples per scale copied to handin_w*/, classes in turn")
    a("--fid", action=argparse.BooleanOptionalAction, default=True, help="FID of each scale's samples")
    a("--fid-stats", default=None, help="reference statistics .npz, used instead of --eval-dir")
    a("--inception", default=None, help="FID Inception weights (default: pytorch-fid's file, via torch.hub)")
    a("--save-as", nargs="+", default=None, metavar="OUTPUT=FILE",
      help="also save outputs under a course's names, e.g. grid.png=result_mnist.jpg loss.png=loss_mnist.jpg")
    a("--classifier", default=None,
      help="a class check: a torch.export program (.pt2) from float N x 3 x S x S images in [0, 1] to N x K logits")
    return p


def parse_args(argv=None):
    args = parse_with_preset(build_parser(), argv)
    if args.ch_mult is None:
        args.ch_mult = [1, 2, 2] if args.image_size <= 32 else [1, 2, 2, 2]
    args.cfg_scales = list(dict.fromkeys(args.cfg_scales))  # each scale once, in the order given
    args.ckpt = args.ckpt or os.path.join(args.out, "ckpt.pt")
    check_args(args)
    return args


# =================================================================================================================
# Data: one sub-folder of images per class, read once into a uint8 tensor N x 3 x S x S with labels 1..K
# =================================================================================================================
def find_class_folders(data_dir, classes=None):
    """{class name: sorted image files} from AFHQ's DIR/train/CLASS/ or, without a train folder, DIR/CLASS/.

    Every chosen class must exist and hold images; the order of `classes` (default: sorted names) sets the labels."""
    root = os.path.join(data_dir, "train") if os.path.isdir(os.path.join(data_dir, "train")) else data_dir
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not found:
        fail(f"{root} has no class sub-folders; put each class's images in a folder of its own, {root}/CLASS/")
    if classes and len(set(classes)) < len(classes):
        fail(f"--classes names a class twice ({' '.join(classes)})")
    for name in classes or []:
        if name not in found:
            fail(f"--classes names {name!r} but {root} has no such folder (it has {', '.join(found)})")
    files = {name: list_images(os.path.join(root, name)) for name in classes or found}
    for name, paths in files.items():
        if not paths:
            fail(f"the class folder {os.path.join(root, name)} holds no .png/.jpg/.jpeg images")
    return files


def load_class_images(files, size, max_per_class, channels=3):
    """uint8 images N x C x size x size (C = 3, or 1 for grey) and int64 labels N (class k -> label k + 1)."""
    images, labels = [], []
    for label, (name, paths) in enumerate(files.items(), start=1):
        paths = paths[:max_per_class or None]
        say(f"reading {len(paths)} images of class {label} ({name}) at {size}x{size} ...")
        images += [load_image(p, size, "RGB" if channels == 3 else "L") for p in paths]
        labels += [label] * len(paths)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


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
# Model: ddpm_mnist.py's UNet, with a learned vector per class added to its time embedding
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


class ClassConditionalUNet(nn.Module):
    """eps_theta(x_t, t, c): the UNet with a learned vector per label added to its time embedding.

    The table has K + 1 rows: row 0 is the null label (no class), rows 1..K the classes."""

    def __init__(self, unet, num_classes):
        super().__init__()
        self.unet = unet
        self.class_emb = nn.Embedding(num_classes + 1, unet.emb_dim)

    def forward(self, x, t, y):
        return self.unet(x, t, extra_emb=self.class_emb(y))


def build_model(args):
    levels = args.attn_levels if args.attn_levels is not None else attention_levels(args.image_size, args.ch_mult, args.attn_res)
    unet = UNet(args.channels, args.ch, args.ch_mult, args.num_res_blocks, levels, args.dropout)
    return ClassConditionalUNet(unet, len(args.classes))


# =================================================================================================================
# Diffusion maths, and what classifier-free guidance adds to it
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


def drop_labels(labels, p):
    """Each label becomes the null label 0 (no class; no object) with probability p, so that the same network also
    learns the unconditional eps_theta(x_t, t, 0). Works for class indices (N) and multi-hot rows (N x K)."""
    drop = torch.rand(len(labels), device=labels.device) < p
    return torch.where(drop.reshape(-1, *[1] * (labels.dim() - 1)), torch.zeros_like(labels), labels)


def guided_eps(eps_cond, eps_uncond, w):
    """Ho & Salimans, eq. 6: (1 + w) eps_theta(x_t, t, c) - w eps_theta(x_t, t, 0)."""
    return (1 + w) * eps_cond - w * eps_uncond


def make_cfg_eps_fn(model, labels, w, bf16):
    """The guided noise for fixed labels as eps_fn(x, t) for `sample`: the conditional and the unconditional
    prediction from one forward pass over the doubled batch, float32 out; in bf16 autocast if bf16 (see
    sample_in_bf16: guidance multiplies bf16's rounding of eps(x, c) - eps(x) by w too)."""
    null = torch.full_like(labels, NULL_LABEL)

    def eps_fn(x, t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            if w == 0:  # the unconditional half would be multiplied by 0: skip it, at half the cost
                return model(x, t, labels).float()
            if w == -1:  # likewise the conditional half: the unconditional model alone
                return model(x, t, null).float()
            eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float()
        eps_cond, eps_uncond = eps.chunk(2)
        return guided_eps(eps_cond, eps_uncond, w)
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


def balanced_labels(n, num_classes):
    """n labels in 1..K grouped by class, as equal as possible (the first n mod K classes get one more)."""
    counts = torch.tensor([n // num_classes + (k < n % num_classes) for k in range(num_classes)])
    return torch.repeat_interleave(torch.arange(1, num_classes + 1), counts)


def sample_at_scale(model, sched, labels, w, args, timesteps, device):
    """uint8 samples for the given labels at guidance scale w. Batch b's noise comes from a generator seeded from
    --seed and b, the same at every scale: sample i starts from the same x_T (and, for DDPM, sees the same noise at
    every step) at every w. Under torchrun each process denoises every world-th batch; rank 0 gets them all."""
    mine = {}
    for b, start in enumerate(range(0, len(labels), args.sample_batch_size)):
        if b % world_size() != rank():
            continue
        y = labels[start:start + args.sample_batch_size].to(device)
        g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + b)
        x_T = torch.randn((len(y), args.channels, args.image_size, args.image_size), generator=g, device=device)
        eps_fn = make_cfg_eps_fn(model, y, w, sample_in_bf16(args, device))
        mine[b] = to_uint8(sample(eps_fn, sched, x_T, timesteps, args.sampler, args.eta, g))
        say(f"w = {w:g}: sampled {start + len(y)}/{len(labels)} ({args.sampler}, {len(timesteps)} steps)")
    batches = gather_dicts(mine)
    return torch.cat([batches[b] for b in sorted(batches)]) if batches else None


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


def train(args, data, labels, model, ema, optimizer, sched, device, state, after_epoch=None):
    """Algorithm 1 of Ho & Salimans: epochs of shuffled batches, each image with its label, a share of the labels
    (--cfg-dropout) replaced by the null label. state holds what a checkpoint needs to resume exactly; after_epoch,
    if given, is called with state at the end of each epoch, before its checkpoint.

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
            y = drop_labels(labels[idx].to(device), args.label_dropout)
            t = torch.randint(0, sched.T, (len(idx),), device=device)
            noise = torch.randn_like(x0)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, state["step"], total)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = diffusion_loss(net, sched, my_share(x0), my_share(t), my_share(noise), y=my_share(y))
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
                if after_epoch is not None:  # first, so that the checkpoint holds what it records
                    graded = time.time()
                    after_epoch(state)
                    start += time.time() - graded  # grading during training is not training
                save_run(args, model, ema, optimizer, state)
            progress.show(state, f"loss {np.mean(state['losses'][-50:]):.4f}", bs, iters_per_epoch)
            if ctrl_c.stop_requested():
                save_run(args, model, ema, optimizer, state)
                say(f"\ninterrupted: saved {args.out}/ckpt.pt at step {state['step']}; continue with --resume")
                sys.exit(130)
    if state["batch_in_epoch"]:  # --iters stopped in the middle of an epoch
        save_run(args, model, ema, optimizer, state)


# =================================================================================================================
# main: check every input, train (or load), then sample at every guidance scale and write every output
# =================================================================================================================
def main(argv=None):
    args = parse_args(argv)
    start_distributed(args)
    device = torch.device(args.device)
    saved = load_run(args) if (args.resume or args.sample_only) else None
    # Everything the run reads is found and checked here, before anything is written.
    train_files = None
    if not args.sample_only:
        train_files = find_class_folders(args.data_dir, args.classes)
        args.classes = list(train_files)
    num_classes = len(args.classes)
    check_guidance(args, num_classes)
    fid_setup = prepare_fid_per_scale(args) if args.fid and args.num_samples > 0 and rank() == 0 else None
    classifier = load_classifier(args.classifier, num_classes, args.image_size) if args.classifier else None
    data, labels = (load_class_images(train_files, args.image_size, args.max_per_class, args.channels) if train_files
                    else (None, None))
    check_out_folder(args.out)

    torch.manual_seed(args.seed)
    if fid_setup is not None and args.prepare_eval:
        prepare_eval(args, fid_setup["val_files"])
    sched = NoiseSchedule(make_betas(args.schedule, args.timesteps)).to(device)
    model = build_model(args).to(device, memory_format=channels_last(device))
    ema = make_ema(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "epoch_perm": None, "losses": []}
    if saved is not None:
        restore_run(saved, args, model, ema, optimizer, state)
    # Seconds of training over every resume: kept in the checkpoint, so a resumed run reports its whole training.
    state["train_seconds"] = float(saved.get("train_seconds", 0.0)) if saved is not None else 0.0
    say(f"class-conditional UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}; "
        f"labels: 0 = null, {', '.join(f'{k} = {name}' for k, name in enumerate(args.classes, start=1))}")

    metrics = {"device": str(device), "hardware": device_name(device), "torch": torch.__version__,
               "processes": world_size(), "classes": args.classes}
    t0 = time.time()
    if not args.sample_only:
        warn_if_slow_on_cpu(args, model, sched, data[:args.batch_size], device, math.ceil(len(data) / args.batch_size),
                            y=labels[:args.batch_size].to(device))
        train(args, data, labels, model, ema, optimizer, sched, device, state)
        metrics.update(train_seconds=round(state["train_seconds"], 1), steps=state["step"], epochs=state["epoch"],
                       train_images=len(data))
        write_loss(args, {"training loss": state["losses"]},
                   f"classifier-free guidance: training loss ({num_classes} classes, batch {args.batch_size})")
    if args.num_samples == 0:
        return write_metrics(os.path.join(args.out, "metrics.json"), {**metrics, "args": vars(args)})

    eps_model = sampling_network(ema.module.eval(), args)
    steps = args.steps or args.timesteps
    timesteps = sampling_timesteps(args.timesteps, steps if args.sampler == "ddim" else args.timesteps)
    sample_labels = balanced_labels(args.num_samples, num_classes)
    images_by_scale, per_scale = {}, {}
    for w in args.cfg_scales:
        t1 = time.time()
        images_by_scale[w] = sample_at_scale(eps_model, sched, sample_labels, w, args, timesteps, device)
        seconds = time.time() - t1
        per_scale[w] = {"num_samples": args.num_samples, "sample_seconds": round(seconds, 1),
                        "samples_per_second": round(args.num_samples / seconds, 2)}
    if rank() != 0:
        return None  # the other processes are done: rank 0 writes and grades
    remove_stale(os.path.join(args.out, "metrics.json"))  # it described the samples about to be replaced
    write_scale_outputs(args, images_by_scale, sample_labels, num_classes)

    scores, fid_reference = fid_per_scale(args, images_by_scale, fid_setup, device) if fid_setup else (None, None)
    for w in args.cfg_scales:
        per_scale[w]["fid"] = scores[w] if scores else None
    if classifier is not None:
        for w, images in images_by_scale.items():
            accuracy, per_class = class_accuracy(classifier, images, sample_labels, num_classes)
            per_scale[w].update(class_accuracy=accuracy, class_accuracy_per_class=dict(zip(args.classes, per_class)))
    print_scale_table(args, per_scale, sample_labels, num_classes, timesteps, fid_reference, scores)

    metrics.update(sampler=args.sampler, sampling_steps=len(timesteps), eta=args.eta if args.sampler == "ddim" else None,
                   sampling_precision="bf16" if sample_in_bf16(args, device) else "float32",
                   num_samples_per_scale=args.num_samples, fid_num_samples=args.num_samples if scores else None,
                   fid_reference=fid_reference, classifier=args.classifier,
                   scales={f"{w:g}": per_scale[w] for w in args.cfg_scales},
                   total_seconds=round(time.time() - t0, 1), args=vars(args))
    write_metrics(os.path.join(args.out, "metrics.json"), metrics)
    say(f"wrote {args.out}: samples_w*/CLASS/*.png, handin_w*/ and grid_w*.png per scale, grid_scales.png, "
        f"{'loss.png, ' if not args.sample_only else ''}metrics.json")
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
        must(len(args.cfg_scales) > 0, "--cfg-scales needs at least one guidance scale, e.g. --cfg-scales 0 7.5"),
        must(all(math.isfinite(w) for w in args.cfg_scales), f"--cfg-scales must be finite numbers, got {args.cfg_scales}"),
        must(all(w >= -1 for w in args.cfg_scales),
             f"--cfg-scales below -1 push samples away from their class (-1 is the unconditional model), got {args.cfg_scales}"),
        between("--cfg-dropout", args.label_dropout, 0, 1, high_included=False),
        at_least("--epochs", args.epochs, 0), at_least("--iters", args.iters, 1),
        at_least("--batch-size", args.batch_size, 1), must(args.lr > 0, f"--lr must be positive, got {args.lr}"),
        at_least("--warmup", args.warmup, 0), between("--ema-decay", args.ema_decay, 0, 1, high_included=False),
        between("--dropout", args.dropout, 0, 1, high_included=False), at_least("--timesteps", args.timesteps, 2),
        at_least("--ch", args.ch, 1), at_least("--ch-mult", min(args.ch_mult), 1),
        must(args.attn_levels is None or all(0 <= k < len(args.ch_mult) for k in args.attn_levels),
             f"--attn-levels must be levels 0..{len(args.ch_mult) - 1} of --ch-mult, got {args.attn_levels}"),
        at_least("--num-res-blocks", args.num_res_blocks, 1), at_least("--image-size", args.image_size, 8),
        at_least("--max-per-class", args.max_per_class, 0), at_least("--num-samples", args.num_samples, 0),
        at_least("--sample-batch-size", args.sample_batch_size, 1), at_least("--grid-cols", args.grid_cols, 1),
        at_least("--handin-images", args.handin_images, 0), at_least("--grad-clip", args.grad_clip, 0),
        between("--steps", args.steps, 1, args.timesteps),
        must(args.steps is None or args.sampler == "ddim",
             "--steps applies to --sampler ddim; DDPM takes all T steps (use --sampler ddim --eta 1 for a shorter noisy chain)"),
        between("--eta", args.eta, 0, 1), device_problem(args.device), compile_problem(args), save_as_problem(args.save_as),
        must(args.sample_only or os.path.isdir(args.data_dir),
             f"--data-dir {args.data_dir} is not a folder (it should hold one sub-folder of images per class)"),
        must(not (args.resume and args.sample_only), "--resume and --sample-only exclude each other"),
        must(args.classifier is None or os.path.isfile(args.classifier), f"--classifier {args.classifier} does not exist"),
        must(not (args.resume or args.sample_only) or os.path.isfile(args.ckpt),
             f"checkpoint {args.ckpt} not found (train first, or pass --ckpt)"),
    ]
    for message in problems:
        if message:
            fail(message)


def check_guidance(args, num_classes):
    """Guidance needs the unconditional model, which only label dropout trains; balanced samples need one per class."""
    guided = [w for w in args.cfg_scales if w != 0]
    if guided and args.label_dropout == 0 and args.num_samples > 0:
        fail(f"--cfg-scales {' '.join(f'{w:g}' for w in guided)} needs the unconditional model, but this model "
             f"{'was' if args.sample_only else 'is'} trained without label dropout (--cfg-dropout 0); sample at w = 0 "
             f"or train with --cfg-dropout 0.1")
    if 0 < args.num_samples < num_classes:
        fail(f"--num-samples {args.num_samples} leaves some of the {num_classes} classes without a sample; "
             f"use 0 or at least {num_classes}")


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


def save_class_samples(images, labels, class_names, folder):
    """FOLDER/CLASS/00001.png, ...: one sub-folder per class, so the folder reads back like the training data.
    Written beside FOLDER and swapped in, so it never mixes two runs' images."""
    tmp = folder.rstrip("/\\") + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        for label, name in enumerate(class_names, start=1):
            os.makedirs(os.path.join(tmp, name))
            for i, img in enumerate(images[labels == label], start=1):
                Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").save(os.path.join(tmp, name, f"{i:05d}.png"))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def first_per_class(images, labels, num_classes, m):
    """The first m samples of each class, class after class (rows of a grid)."""
    return torch.cat([images[labels == label][:m] for label in range(1, num_classes + 1)])


def classes_in_turn(images, labels, num_classes, n):
    """n samples taking the classes in turn (cat, dog, wild, cat, ...): the hand-in set of a scale."""
    per_class = [images[labels == label] for label in range(1, num_classes + 1)]
    order = [c[i] for i in range(max(len(c) for c in per_class)) for c in per_class if i < len(c)]
    return torch.stack(order[:n])


def labelled_grid(panels, row_labels, ncol):
    """Panels side by side, each a grid of len(row_labels) rows x ncol images with its title above, and the row
    labels (class names) on the left; panels = [(title, uint8 images row after row), ...]."""
    font = get_font(14)
    grids = [make_grid(images, nrow=ncol) for _, images in panels]
    h = panels[0][1].shape[-2]
    scale = max(1, 64 // h)  # the enlargement make_grid chose
    label_w = 12 + max(int(ImageDraw.Draw(grids[0]).textlength(name, font=font)) for name in row_labels)
    head, gap = 24, 12
    canvas = Image.new("RGB", (label_w + sum(g.width for g in grids) + gap * (len(grids) - 1),
                               head + max(g.height for g in grids)), "white")
    draw, x = ImageDraw.Draw(canvas), label_w
    for (title, _), grid in zip(panels, grids):
        canvas.paste(grid, (x, head))
        draw.text((x + grid.width / 2, 4), title, fill="black", font=font, anchor="ma")
        x += grid.width + gap
    for r, name in enumerate(row_labels):  # make_grid puts row r at 2 + r (h + 2), padding 2
        draw.text((label_w - 6, head + (2 + r * (h + 2) + h / 2) * scale), name, fill="black", font=font, anchor="rm")
    return canvas


def write_scale_outputs(args, images_by_scale, sample_labels, num_classes):
    """Per scale: samples_w{w}/CLASS/*.png, handin_w{w}/00001.png ... (--handin-images, classes in turn) and
    grid_w{w}.png; and grid_scales.png, every scale side by side on the same noise."""
    m = min(args.grid_cols, args.num_samples // num_classes) or 1
    panels = []
    for w, images in images_by_scale.items():
        save_class_samples(images, sample_labels, args.classes, os.path.join(args.out, f"samples_w{w:g}"))
        if args.handin_images:
            handin = classes_in_turn(images, sample_labels, num_classes, args.handin_images)
            save_samples(handin, os.path.join(args.out, f"handin_w{w:g}"), os.path.join(args.out, f"handin_w{w:g}.zip"))
        shown = first_per_class(images, sample_labels, num_classes, m)
        labelled_grid([(f"w = {w:g}", shown)], args.classes, m).save(os.path.join(args.out, f"grid_w{w:g}.png"))
        panels.append((f"w = {w:g}", first_per_class(images, sample_labels, num_classes, min(m, 4))))
    labelled_grid(panels, args.classes, min(m, 4)).save(os.path.join(args.out, "grid_scales.png"))


def print_scale_table(args, per_scale, sample_labels, num_classes, timesteps, fid_reference, scores):
    print(f"\n{'w':>6}  {'FID':>8}  {'right class':>11}")
    for w in args.cfg_scales:
        fid_value, accuracy = per_scale[w].get("fid"), per_scale[w].get("class_accuracy")
        print(f"{w:>6g}  {'-' if fid_value is None else f'{fid_value:.2f}':>8}  "
              f"{'-' if accuracy is None else f'{100 * accuracy:.1f}%':>11}")
    counts = ", ".join(str(n) for n in torch.bincount(sample_labels, minlength=num_classes + 1)[1:].tolist())
    print(f"{args.num_samples} samples per scale ({counts} of {', '.join(args.classes)}), "
          f"{args.sampler}, {len(timesteps)} steps")
    if scores:
        print(f"FID: pytorch-fid protocol (fid.py), N = {args.num_samples} per scale vs {fid_reference}")
    elif fid_reference:
        print(f"FID {fid_reference}")
    if args.classifier:
        print(f"right class: the share of samples that {args.classifier} assigns to the requested class")


# ---- FID per guidance scale (fid.py, the pytorch-fid protocol) --------------------------------------------------
def default_eval_dir(args):
    name = os.path.basename(os.path.normpath(os.path.abspath(args.data_dir)))
    return os.path.join(os.path.dirname(os.path.normpath(args.out)), f"eval_{name}_{args.image_size}px")


def eval_stats_path(eval_dir):
    return eval_dir.rstrip("/\\") + "_fid_stats.npz"


def find_val_folders(data_dir, classes):
    """{class name: sorted image files} of the validation split DIR/val/CLASS/, for every class of the run."""
    root = os.path.join(data_dir, "val")
    if not os.path.isdir(root):
        fail(f"--prepare-eval needs the validation images in {root}/CLASS/ (AFHQ's layout), but {root} does not exist")
    files = {name: list_images(os.path.join(root, name)) for name in classes}
    for name, paths in files.items():
        if not paths:
            fail(f"--prepare-eval found no validation images of class {name!r} in {os.path.join(root, name)}")
    return files


def prepare_fid_per_scale(args):
    """What FID will need, checked now rather than after training: the Inception weights (a given --inception must
    load; without weights FID is skipped, said now) and the reference: --fid-stats (must hold a covariance of
    Inception features), or the eval folder (written by --prepare-eval, or there already at this image size)."""
    import fid  # imported here so training never needs the Inception network
    setup = {"val_files": None}
    if args.fid_stats:
        try:
            fid.load_statistics(args.fid_stats, dim=fid.FEATURE_DIM)
        except fid.FIDError as e:
            fail(f"--fid-stats: {e}")
    else:
        if args.prepare_eval and not os.path.isdir(args.data_dir):
            fail(f"--prepare-eval reads {args.data_dir}/val, but {args.data_dir} is not a folder")
        setup["val_files"] = find_val_folders(args.data_dir, args.classes) if args.prepare_eval else None
        args.eval_dir = args.eval_dir or default_eval_dir(args)
        marker = os.path.join(args.eval_dir, EVAL_MARKER)
        if args.prepare_eval and os.path.isdir(args.eval_dir) and os.listdir(args.eval_dir) and not os.path.isfile(marker):
            fail(f"--prepare-eval would replace {args.eval_dir}, which it did not write; pass another --eval-dir")
        if not args.prepare_eval:
            if not os.path.isdir(args.eval_dir):
                fail(f"FID needs its reference images in {args.eval_dir}: add --prepare-eval (writes {args.data_dir}/val "
                     f"there at {args.image_size}x{args.image_size}), or pass --eval-dir, --fid-stats or --no-fid")
            if os.path.isfile(marker):
                with open(marker) as fh:
                    eval_size = json.load(fh)["image_size"]
                if eval_size != args.image_size:
                    fail(f"{args.eval_dir} holds {eval_size}x{eval_size} images but this run makes "
                         f"{args.image_size}x{args.image_size} ones; add --prepare-eval or pass another --eval-dir")
    try:
        setup["inception"] = fid.load_inception(args.inception, "cpu")
    except fid.FIDError as e:
        if args.inception:
            fail(f"--inception: {e}")
        say(f"note: FID will be skipped: {e}")
        setup.update(inception=None, note=str(e))
    return setup


def prepare_eval(args, val_files):
    """FID's reference set: the validation images resized as the training images are (RGB, short side to
    --image-size, centre crop, bicubic), written as PNGs to EVAL/CLASS/00001.png, ... (the course's dataset.py
    writes the same 64x64 files). Built in a temporary folder, then moved into place."""
    tmp = args.eval_dir.rstrip("/\\") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    try:
        for name, paths in val_files.items():
            os.makedirs(os.path.join(tmp, name))
            for i, path in enumerate(paths, start=1):
                Image.fromarray(load_image(path, args.image_size).permute(1, 2, 0).numpy(), "RGB").save(
                    os.path.join(tmp, name, f"{i:05d}.png"))
            counts[name] = len(paths)
        with open(os.path.join(tmp, EVAL_MARKER), "w") as fh:
            json.dump({"source": os.path.join(args.data_dir, "val"), "image_size": args.image_size, "counts": counts}, fh)
        if os.path.isdir(args.eval_dir):
            shutil.rmtree(args.eval_dir)  # only folders holding EVAL_MARKER get here (checked before)
        os.replace(tmp, args.eval_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    remove_stale(eval_stats_path(args.eval_dir))  # statistics of the old images
    say(f"wrote {sum(counts.values())} validation images ({', '.join(f'{n} {k}' for k, n in counts.items())}) "
        f"at {args.image_size}x{args.image_size} to {args.eval_dir}")


def fid_per_scale(args, images_by_scale, fid_setup, device):
    """{w: FID} of each scale's samples against --fid-stats or the eval folder (its statistics are computed once
    and kept next to it), and a description of the reference; (None, note) without Inception weights."""
    import fid
    if fid_setup["inception"] is None:
        return None, "skipped: " + fid_setup["note"]
    inception = fid_setup["inception"].to(device)
    if args.fid_stats:
        stats_path, reference = args.fid_stats, args.fid_stats
    else:
        stats_path = eval_stats_path(args.eval_dir)
        reference = f"{args.eval_dir} ({len(list_images(args.eval_dir))} images)"
        if not os.path.isfile(stats_path):
            say(f"computing the statistics of {args.eval_dir} into {stats_path} (once)")
            mu, sigma = fid.compute_statistics(args.eval_dir, model=inception, device=device)
            fid.save_statistics(stats_path, mu, sigma)
    mu_ref, sigma_ref = fid.load_statistics(stats_path)
    scores = {}
    for w, images in images_by_scale.items():
        mu, sigma = fid.compute_statistics(images, model=inception, device=device)
        scores[w] = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
        say(f"FID at w = {w:g}: {scores[w]:.2f}  ({len(images)} samples vs {reference})")
    return scores, reference


# ---- the class check --------------------------------------------------------------------------------------------
def load_classifier(path, num_classes, size):
    """The class check: a torch.export program mapping float images in [0, 1], N x 3 x size x size, to N x K
    logits (column k for label k + 1). Tried on a blank batch now, so a wrong file stops the run before work."""
    if not zipfile.is_zipfile(path):  # checked first: torch.export logs a traceback for any other file
        fail(f"--classifier {path} is not a torch.export program (a .pt2 archive)")
    try:
        classifier = torch.export.load(path).module()
        with torch.inference_mode():
            logits = classifier(torch.zeros(2, 3, size, size))
    except Exception as e:
        fail(f"--classifier {path} is not a torch.export program taking N x 3 x {size} x {size} images "
             f"({type(e).__name__}: {first_line(e)})")
    if tuple(logits.shape) != (2, num_classes):
        fail(f"--classifier {path} gives outputs of shape {tuple(logits.shape[1:])} per image, not the "
             f"{num_classes} logits of the run's classes")
    return classifier


@torch.inference_mode()
def class_accuracy(classifier, images, labels, num_classes, batch_size=500):
    """The fraction of samples the classifier assigns to their requested class: overall, and per class (None for a
    class without samples). Runs on the CPU, where the exported program was made."""
    predicted = torch.cat([classifier(images[i:i + batch_size].float() / 255).argmax(1) + 1
                           for i in range(0, len(images), batch_size)])
    correct = (predicted == labels).float()
    per_class = [correct[labels == k].mean().item() if (labels == k).any() else None for k in range(1, num_classes + 1)]
    return correct.mean().item(), per_class


if __name__ == "__main__":  # last, so that main() finds every function of the appendix
    main()
    leave_distributed()
