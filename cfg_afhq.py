"""Classifier-free guidance on AFHQ 64x64 (cat, dog, wild): one class-conditional DDPM, FID per guidance scale.

The homework
------------
Train one UNet both as a class-conditional and as an unconditional noise predictor (Ho & Salimans 2022) by
replacing the class label with a null label with probability 0.1, then sample with classifier-free guidance.
AFHQ (cat, dog, wild) at 64x64; 500 samples per guidance scale, classes balanced; FID at w = 0 and w = 7.5
against the AFHQ validation images resized to 64x64 (full marks below 30 at both scales); a grid per scale
with one row per class. Any folder with one sub-folder of images per class works the same way.

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

Commands
--------
  python cfg_afhq.py --data-dir afhq --prepare-eval   # the homework on a GPU: eval folder, train, 500 samples at
                                                      # w = 0 and 7.5, grids, FID per scale
  python cfg_afhq.py --data-dir afhq --sample-only --cfg-scales 0 1 3 7.5 --sampler ddim --steps 100
  python benchmarks/cfg_mnist_classes.py --preset cpu   # the README's MNIST numbers (~30 min of one CPU core)
  python benchmarks/cfg_mnist_classes.py --preset gpu   # MNIST targets: FID <= 5 at w = 0, >= 99% right digit at 7.5
"""

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont, ImageOps

# Keys that define a training run; --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("data_dir", "classes", "image_size", "max_per_class", "flip", "ch", "ch_mult", "num_res_blocks",
            "attn_res", "dropout", "timesteps", "schedule", "cfg_dropout", "batch_size", "lr", "warmup", "grad_clip",
            "ema_decay", "seed")
NULL_LABEL = 0  # "no class": the label the unconditional model sees; real classes are 1..K
EVAL_MARKER = "cfg_afhq_eval.json"  # written into folders that --prepare-eval made (and may therefore replace)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Classifier-free guidance on AFHQ or any folder of class folders "
                                            "(see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="./data/afhq",
                   help="AFHQ's layout (DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg) or any folder holding one "
                        "sub-folder of images per class")
    g.add_argument("--classes", nargs="+", default=None,
                   help="the class folders to use, in label order (default: every sub-folder, sorted)")
    g.add_argument("--image-size", type=int, default=64, help="side of the square RGB images")
    g.add_argument("--max-per-class", type=int, default=3000,
                   help="train on the first N images (sorted by name) of each class; 0: all")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips (turn off for data that is not mirror-symmetric, e.g. digits)")
    g.add_argument("--prepare-eval", action="store_true",
                   help="write DIR/val's images, resized to --image-size, as PNGs into --eval-dir: FID's reference")
    g.add_argument("--eval-dir", default=None,
                   help="the FID reference folder (default: eval_<data folder>_<size>px next to --out)")
    g = p.add_argument_group("model and noise schedule")
    g.add_argument("--ch", type=int, default=128, help="base channel width of the UNet")
    g.add_argument("--ch-mult", type=int, nargs="+", default=None,
                   help="width multiplier per resolution (default: 1 2 2 up to 32 px, 1 2 2 2 above)")
    g.add_argument("--num-res-blocks", type=int, default=2, help="residual blocks per resolution")
    g.add_argument("--attn-res", type=int, default=16, help="self-attention on feature maps of this side or smaller")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout inside the residual blocks")
    g.add_argument("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    g.add_argument("--schedule", choices=["linear", "cosine"], default="linear",
                   help="linear: beta 1e-4 -> 0.02 (Ho et al.); cosine: Nichol & Dhariwal 2021")
    g.add_argument("--cfg-dropout", type=float, default=0.1,
                   help="p_uncond: probability that a training label is replaced by the null label")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=400, help="passes over the training images (9,000 for AFHQ)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate after warm-up")
    g.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up, in iterations")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    g.add_argument("--ema-decay", type=float, default=0.9995, help="decay of the exponential moving average of the weights")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training (GPU)")
    g.add_argument("--out", default="runs/cfg_afhq", help="folder for checkpoint, images and metrics")
    g.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    g = p.add_argument_group("sampling and outputs")
    g.add_argument("--sample-only", action="store_true", help="skip training: sample from --ckpt")
    g.add_argument("--ckpt", default=None, help="checkpoint for --sample-only (default OUT/ckpt.pt)")
    g.add_argument("--cfg-scales", type=float, nargs="*", default=[0.0, 7.5], metavar="W",
                   help="guidance scales w to sample at (0: conditional model, -1: unconditional)")
    g.add_argument("--num-samples", type=int, default=500, help="images per guidance scale, classes balanced (0: none)")
    g.add_argument("--sample-batch-size", type=int, default=500)
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    g.add_argument("--steps", type=int, default=None, help="DDIM steps (default: all T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    g.add_argument("--grid-cols", type=int, default=8, help="samples per class (row) in the grids")
    g.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                   help="FID of each scale's samples against --fid-stats or the --eval-dir images")
    g.add_argument("--fid-stats", default=None, help="reference statistics .npz, used instead of --eval-dir")
    g.add_argument("--inception", default=None, help="FID Inception weights (default: pytorch-fid's, via torch.hub)")
    g.add_argument("--classifier", default=None,
                   help="a class check: a torch.export program (.pt2) taking float N x 3 x S x S images in [0, 1] "
                        "and giving N x K logits, one per class in label order; its accuracy is reported per scale")
    args = p.parse_args(argv)

    # Bad values stop here, before anything is read or written.
    if args.ch_mult is None:
        args.ch_mult = [1, 2, 2] if args.image_size <= 32 else [1, 2, 2, 2]
    args.cfg_scales = list(dict.fromkeys(args.cfg_scales))  # each scale once, in the order given
    checks = [
        (len(args.cfg_scales) > 0, "--cfg-scales needs at least one guidance scale, e.g. --cfg-scales 0 7.5"),
        (all(math.isfinite(w) for w in args.cfg_scales), f"--cfg-scales must be finite numbers, got {args.cfg_scales}"),
        (0 <= args.cfg_dropout < 1, f"--cfg-dropout must be in [0, 1), got {args.cfg_dropout}"),
        (args.epochs >= 0, f"--epochs must be 0 or more, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.warmup >= 0, f"--warmup must be 0 or more, got {args.warmup}"),
        (0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1), got {args.ema_decay}"),
        (0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
        (args.timesteps >= 2, f"--timesteps must be at least 2, got {args.timesteps}"),
        (args.ch >= 1 and min(args.ch_mult) >= 1, "--ch and --ch-mult must be positive"),
        (args.num_res_blocks >= 1, f"--num-res-blocks must be at least 1, got {args.num_res_blocks}"),
        (args.image_size >= 8, f"--image-size must be at least 8, got {args.image_size}"),
        (args.max_per_class >= 0, f"--max-per-class must be 0 (all) or more, got {args.max_per_class}"),
        (args.num_samples >= 0, f"--num-samples must be 0 or more, got {args.num_samples}"),
        (args.sample_batch_size >= 1, f"--sample-batch-size must be at least 1, got {args.sample_batch_size}"),
        (args.grid_cols >= 1, f"--grid-cols must be at least 1, got {args.grid_cols}"),
        (args.steps is None or 1 <= args.steps <= args.timesteps,
         f"--steps must be between 1 and --timesteps ({args.timesteps}), got {args.steps}"),
        (args.steps is None or args.sampler == "ddim",
         "--steps applies to --sampler ddim; DDPM takes all T steps (use --sampler ddim --eta 1 for a shorter noisy chain)"),
        (args.eta >= 0, f"--eta must be 0 or more, got {args.eta}"),
        (args.device == "cpu" or not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device} was asked for but CUDA is not available"),
        (args.sample_only or os.path.isdir(args.data_dir),
         f"--data-dir {args.data_dir} is not a folder (it should hold one sub-folder of images per class)"),
        (not (args.resume and args.sample_only), "--resume and --sample-only exclude each other"),
        (args.fid_stats is None or os.path.isfile(args.fid_stats), f"--fid-stats {args.fid_stats} does not exist"),
        (args.classifier is None or os.path.isfile(args.classifier), f"--classifier {args.classifier} does not exist"),
    ]
    for ok, message in checks:
        if not ok:
            p.exit(2, f"error: {message}\n")
    args.ckpt = args.ckpt or os.path.join(args.out, "ckpt.pt")
    if (args.resume or args.sample_only) and not os.path.isfile(args.ckpt):
        p.exit(2, f"error: checkpoint {args.ckpt} not found (train first, or pass --ckpt)\n")
    return args


def fail(message):
    """One clear sentence and a non-zero exit: how every script reports bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# Data: one sub-folder of images per class, read once into a uint8 tensor N x 3 x S x S with labels 1..K
# ---------------------------------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def list_images(root):
    """Image files below root (recursive, any case of .png/.jpg/.jpeg), sorted so runs are reproducible."""
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def load_image(path, size, mode="RGB"):
    """One image as uint8 C x H x W: converted to mode, resized on its short side and centre-cropped to size."""
    try:
        with Image.open(path) as img:
            img = ImageOps.fit(img.convert(mode), (size, size), Image.BICUBIC)
    except Exception as e:  # PIL raises several types for broken files; all mean the same to the user
        fail(f"cannot read image {path} ({type(e).__name__}: {e})")
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.reshape(size, size, -1).copy()).permute(2, 0, 1)


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


def load_class_images(files, size, max_per_class):
    """uint8 images N x 3 x size x size and int64 labels N (class k of the dict -> label k + 1)."""
    images, labels = [], []
    for label, (name, paths) in enumerate(files.items(), start=1):
        paths = paths[:max_per_class or None]
        print(f"reading {len(paths)} images of class {label} ({name}) at {size}x{size} ...", flush=True)
        images += [load_image(p, size) for p in paths]
        labels += [label] * len(paths)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def default_eval_dir(args):
    name = os.path.basename(os.path.normpath(os.path.abspath(args.data_dir)))
    return os.path.join(os.path.dirname(os.path.normpath(args.out)), f"eval_{name}_{args.image_size}px")


def prepare_eval(args, val_files):
    """FID's reference set: the validation images resized as the training images are (RGB, short side to
    --image-size, centre crop, bicubic), written as PNGs to EVAL/CLASS/00001.png, ... (the course's dataset.py
    writes the same 64x64 files). Built in a temporary folder, then moved into place."""
    tmp = args.eval_dir.rstrip("/\\") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    for name, paths in val_files.items():
        os.makedirs(os.path.join(tmp, name))
        for i, path in enumerate(paths, start=1):
            Image.fromarray(load_image(path, args.image_size).permute(1, 2, 0).numpy(), "RGB").save(
                os.path.join(tmp, name, f"{i:05d}.png"))
        counts[name] = len(paths)
    with open(os.path.join(tmp, EVAL_MARKER), "w") as fh:
        json.dump({"source": os.path.join(args.data_dir, "val"), "image_size": args.image_size, "counts": counts}, fh)
    if os.path.isdir(args.eval_dir):
        shutil.rmtree(args.eval_dir)  # only folders holding EVAL_MARKER get here (checked in main)
    os.replace(tmp, args.eval_dir)
    stats = eval_stats_path(args.eval_dir)
    if os.path.isfile(stats):
        os.remove(stats)  # statistics of the old images
    print(f"wrote {sum(counts.values())} validation images ({', '.join(f'{n} {k}' for k, n in counts.items())}) "
          f"at {args.image_size}x{args.image_size} to {args.eval_dir}", flush=True)


def eval_stats_path(eval_dir):
    return eval_dir.rstrip("/\\") + "_fid_stats.npz"


# ---------------------------------------------------------------------------------------------------------------
# Noise schedule: every per-step constant, computed once in float64
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
# Model: the UNet of ddpm_mnist.py, and a class embedding added to its time embedding
# ---------------------------------------------------------------------------------------------------------------
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

    extra_emb, if given, is added to the time embedding: how the conditional scripts feed in labels."""

    def __init__(self, in_ch, ch, ch_mult, num_res_blocks, attn_res, dropout, image_size):
        super().__init__()
        self.ch, self.emb_dim = ch, 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, skip_chs, cur, res = nn.ModuleList(), [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(cur, ch * mult, self.emb_dim, dropout, attention=res <= attn_res))
                cur = ch * mult
                skip_chs.append(cur)
            if level < len(ch_mult) - 1:
                self.down.append(Downsample(cur))
                skip_chs.append(cur)
                res = (res + 1) // 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, self.emb_dim, dropout, attention=True),
                                  ResBlock(cur, cur, self.emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(cur + skip_chs.pop(), ch * mult, self.emb_dim, dropout, attention=res <= attn_res))
                cur = ch * mult
            if level > 0:
                self.up.append(Upsample(cur))
                res = res * 2
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


class ClassConditionalUNet(nn.Module):
    """eps_theta(x_t, t, c): the UNet with a learned vector per label added to its time embedding.

    The table has K + 1 rows: row 0 is the null label (no class), rows 1..K the classes."""

    def __init__(self, unet, num_classes):
        super().__init__()
        self.unet = unet
        self.class_emb = nn.Embedding(num_classes + 1, unet.emb_dim)

    def forward(self, x, t, y):
        return self.unet(x, t, extra_emb=self.class_emb(y))


def build_cfg_model(args):
    unet = UNet(3, args.ch, args.ch_mult, args.num_res_blocks, args.attn_res, args.dropout, args.image_size)
    return ClassConditionalUNet(unet, len(args.classes))


# ---------------------------------------------------------------------------------------------------------------
# Diffusion maths, and what classifier-free guidance adds to it
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


def drop_labels(labels, p):
    """Each label becomes the null label with probability p, so the same network also learns eps_theta(x_t, t, 0)."""
    drop = torch.rand(labels.shape, device=labels.device) < p
    return labels.masked_fill(drop, NULL_LABEL)


def guided_eps(eps_cond, eps_uncond, w):
    """Ho & Salimans, eq. 6: (1 + w) eps_theta(x_t, t, c) - w eps_theta(x_t, t, 0)."""
    return (1 + w) * eps_cond - w * eps_uncond


def make_cfg_eps_fn(model, labels, w, device):
    """The guided noise for fixed labels as eps_fn(x, t) for `sample`: the conditional and the unconditional
    prediction from one forward pass over the doubled batch, in bf16 autocast on a GPU and float32 out."""
    null = torch.full_like(labels, NULL_LABEL)

    def eps_fn(x, t):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if w == 0:  # the unconditional half would be multiplied by 0: skip it, at half the cost
                return model(x, t, labels).float()
            eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float()
        eps_cond, eps_uncond = eps.chunk(2)
        return guided_eps(eps_cond, eps_uncond, w)
    return eps_fn


def balanced_labels(n, num_classes):
    """n labels in 1..K grouped by class, as equal as possible (the first n mod K classes get one more)."""
    counts = torch.tensor([n // num_classes + (k < n % num_classes) for k in range(num_classes)])
    return torch.repeat_interleave(torch.arange(1, num_classes + 1), counts)


def sample_at_scale(eps_model, sched, labels, w, args, timesteps, device):
    """uint8 samples for the given labels at guidance scale w. The generator restarts from --seed at every scale,
    so sample i starts from the same noise (and, for DDPM, sees the same noise at every step) at every w."""
    g = torch.Generator(device).manual_seed(args.seed)
    chunks = []
    for start in range(0, len(labels), args.sample_batch_size):
        y = labels[start:start + args.sample_batch_size].to(device)
        x_T = torch.randn((len(y), 3, args.image_size, args.image_size), generator=g, device=device)
        eps_fn = make_cfg_eps_fn(eps_model, y, w, device)
        chunks.append(to_uint8(sample(eps_fn, sched, x_T, timesteps, args.sampler, args.eta, g)))
        print(f"w = {w:g}: sampled {start + len(y)}/{len(labels)} ({args.sampler}, {len(timesteps)} steps)", flush=True)
    return torch.cat(chunks)


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


def to_model_input(batch_uint8, device, flip):
    """uint8 images -> floats in [-1, 1] on device, randomly mirrored if flip."""
    x = batch_uint8.to(device, non_blocking=True).float() / 127.5 - 1
    if flip:
        mirror = torch.rand(x.shape[0], device=device) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train_cfg(args, data, labels, model, ema, optimizer, sched, device, state):
    """Algorithm 1 of Ho & Salimans: ddpm_mnist.py's training loop with labels, a tenth of them dropped."""
    n, bs = len(data), args.batch_size
    iters_per_epoch = math.ceil(n / bs)
    total = iters_per_epoch * args.epochs
    train_model = torch.compile(model) if args.compile else model
    model.train()
    t_start, t_print, step_start = time.time(), time.time(), state["step"]

    def checkpoint():
        save_checkpoint(os.path.join(args.out, "ckpt.pt"), {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "args": vars(args), "rng": rng_state(), "losses": torch.tensor(state["losses"]), **{
                k: state[k] for k in ("step", "epoch", "batch_in_epoch", "epoch_perm")}})

    try:
        while state["epoch"] < args.epochs:
            if state["epoch_perm"] is None:
                state["epoch_perm"] = torch.randperm(n)
            while state["batch_in_epoch"] < iters_per_epoch:
                idx = state["epoch_perm"][state["batch_in_epoch"] * bs:(state["batch_in_epoch"] + 1) * bs]
                x0 = to_model_input(data[idx], device, args.flip)
                y = drop_labels(labels[idx].to(device), args.cfg_dropout)
                for group in optimizer.param_groups:  # linear warm-up, then constant
                    group["lr"] = args.lr * min(1.0, (state["step"] + 1) / max(1, args.warmup))
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = diffusion_loss(train_model, sched, x0, y=y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                ema.update_parameters(model)
                state["losses"].append(loss.item())
                state["step"] += 1
                state["batch_in_epoch"] += 1
                if time.time() - t_print > 5 or state["step"] == total:
                    t_print, elapsed = time.time(), time.time() - t_start
                    rate = (state["step"] - step_start) / elapsed
                    print(f"epoch {state['epoch'] + 1}/{args.epochs}  step {state['step']}/{total}  "
                          f"loss {np.mean(state['losses'][-50:]):.4f}  {rate * bs:.0f} img/s  "
                          f"left {format_seconds((total - state['step']) / max(rate, 1e-9))}", flush=True)
            state["epoch"] += 1
            state["batch_in_epoch"], state["epoch_perm"] = 0, None
            checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        print(f"\ninterrupted: saved {args.out}/ckpt.pt at step {state['step']}; continue with --resume", flush=True)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------
def to_uint8(x):
    """[-1, 1] floats -> uint8 RGB N x 3 x H x W, rounded as a PNG writer would; grey is replicated to 3 channels."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def make_grid(images, nrow, pad=2, scale=None):
    """uint8 N x 3 x H x W -> one PIL image, nrow images per row, small images enlarged (nearest) to be seen."""
    n, _, h, w = images.shape
    scale = scale or max(1, 64 // h)
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=pad, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


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


def save_class_samples(images, labels, class_names, folder):
    """FOLDER/CLASS/00001.png, ...: one sub-folder per class, so the folder reads back like the training data."""
    shutil.rmtree(folder, ignore_errors=True)  # no stale images from an earlier, larger run
    for label, name in enumerate(class_names, start=1):
        os.makedirs(os.path.join(folder, name))
        for i, img in enumerate(images[labels == label], start=1):
            Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").save(os.path.join(folder, name, f"{i:05d}.png"))


def first_per_class(images, labels, num_classes, m):
    """The first m samples of each class, class after class (rows of a grid)."""
    return torch.cat([images[labels == label][:m] for label in range(1, num_classes + 1)])


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


# ---------------------------------------------------------------------------------------------------------------
# FID per guidance scale (fid.py, the pytorch-fid protocol) and the class check
# ---------------------------------------------------------------------------------------------------------------
def fid_per_scale(args, images_by_scale, device):
    """{w: FID} of each scale's samples against --fid-stats or the eval folder (its statistics are computed once
    and kept next to it), and a description of the reference; (None, note) without Inception weights."""
    import fid  # imported here so training never needs the Inception network
    try:
        inception = fid.load_inception(args.inception, device)
    except fid.FIDError as e:
        print(f"FID skipped: {e}", flush=True)
        return None, f"skipped: {e}"
    if args.fid_stats:
        stats_path, reference = args.fid_stats, args.fid_stats
    else:
        stats_path = eval_stats_path(args.eval_dir)
        reference = f"{args.eval_dir} ({len(list_images(args.eval_dir))} images)"
        if not os.path.isfile(stats_path):
            print(f"computing the statistics of {args.eval_dir} into {stats_path} (once)", flush=True)
            mu, sigma = fid.compute_statistics(args.eval_dir, model=inception, device=device)
            fid.save_statistics(stats_path, mu, sigma)
    mu_ref, sigma_ref = fid.load_statistics(stats_path)
    scores = {}
    for w, images in images_by_scale.items():
        mu, sigma = fid.compute_statistics(images, model=inception, device=device)
        scores[w] = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
        print(f"FID at w = {w:g}: {scores[w]:.2f}  ({len(images)} samples vs {reference})", flush=True)
    return scores, reference


def load_classifier(path, num_classes, size):
    """The class check: a torch.export program mapping float images in [0, 1], N x 3 x size x size, to N x K
    logits (column k for label k + 1). Tried on a blank batch now, so a wrong file stops the run before work."""
    try:
        classifier = torch.export.load(path).module()
        with torch.inference_mode():
            logits = classifier(torch.zeros(2, 3, size, size))
    except Exception as e:
        fail(f"--classifier {path} is not a torch.export program taking N x 3 x {size} x {size} images "
             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
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


# ---------------------------------------------------------------------------------------------------------------
# main: train (or load), then sample at every guidance scale and write every output
# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    saved = None
    if args.resume or args.sample_only:
        saved = load_checkpoint(args.ckpt)
        for key in RUN_KEYS:  # the model, classes and run are the checkpoint's; only --epochs and outputs can change
            setattr(args, key, saved["args"][key])
        if args.steps is not None and args.steps > args.timesteps:
            fail(f"--steps {args.steps} is more than the checkpoint's {args.timesteps} diffusion steps")
    # Everything the run reads is found and checked here, before anything is written.
    train_files = None
    if not args.sample_only:
        train_files = find_class_folders(args.data_dir, args.classes)
        args.classes = list(train_files)
    if args.prepare_eval and not os.path.isdir(args.data_dir):
        fail(f"--prepare-eval reads {args.data_dir}/val, but {args.data_dir} is not a folder")
    val_files = find_val_folders(args.data_dir, args.classes) if args.prepare_eval else None
    args.eval_dir = args.eval_dir or default_eval_dir(args)
    marker = os.path.join(args.eval_dir, EVAL_MARKER)
    if args.prepare_eval and os.path.isdir(args.eval_dir) and os.listdir(args.eval_dir) and not os.path.isfile(marker):
        fail(f"--prepare-eval would replace {args.eval_dir}, which it did not write; pass another --eval-dir")
    wants_fid = args.fid and args.num_samples > 0 and not args.fid_stats
    if wants_fid and not args.prepare_eval:
        if not os.path.isdir(args.eval_dir):
            fail(f"FID needs its reference images in {args.eval_dir}: add --prepare-eval (writes {args.data_dir}/val "
                 f"there at {args.image_size}x{args.image_size}), or pass --eval-dir, --fid-stats or --no-fid")
        if os.path.isfile(marker):
            with open(marker) as fh:
                eval_size = json.load(fh)["image_size"]
            if eval_size != args.image_size:
                fail(f"{args.eval_dir} holds {eval_size}x{eval_size} images but this run makes "
                     f"{args.image_size}x{args.image_size} ones; add --prepare-eval or pass another --eval-dir")
    num_classes = len(args.classes)
    if 0 < args.num_samples < num_classes:
        fail(f"--num-samples {args.num_samples} leaves some of the {num_classes} classes without a sample; "
             f"use 0 or at least {num_classes}")
    classifier = load_classifier(args.classifier, num_classes, args.image_size) if args.classifier else None
    data, labels = load_class_images(train_files, args.image_size, args.max_per_class) if train_files else (None, None)

    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    if args.prepare_eval:
        prepare_eval(args, val_files)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sched = NoiseSchedule(make_betas(args.schedule, args.timesteps)).to(device)
    model = build_cfg_model(args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = make_ema(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "epoch_perm": None, "losses": []}
    if saved is not None:
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update({k: saved[k] for k in ("step", "epoch", "batch_in_epoch", "epoch_perm")})
        state["losses"] = saved["losses"].tolist()
        if args.resume:
            set_rng_state(saved["rng"])
            print(f"resuming {args.ckpt} at epoch {state['epoch']}, step {state['step']}", flush=True)
    print(f"class-conditional UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}; "
          f"labels: 0 = null, {', '.join(f'{k} = {name}' for k, name in enumerate(args.classes, start=1))}", flush=True)

    metrics = {"device": str(device), "torch": torch.__version__, "classes": args.classes}
    t0 = time.time()
    if not args.sample_only:
        train_cfg(args, data, labels, model, ema, optimizer, sched, device, state)
        metrics.update(train_seconds=round(time.time() - t0, 1), steps=state["step"], epochs=state["epoch"],
                       train_images=len(data))
        with open(os.path.join(args.out, "loss.csv"), "w", newline="") as fh:
            csv.writer(fh).writerows([("iteration", "loss")] + list(enumerate(state["losses"], 1)))
        if state["losses"]:
            plot_loss({"training loss": state["losses"]}, os.path.join(args.out, "loss.png"),
                      f"classifier-free guidance: training loss ({num_classes} classes, batch {args.batch_size})")
    if args.num_samples == 0:
        return write_metrics(os.path.join(args.out, "metrics.json"), {**metrics, "args": vars(args)})

    eps_model = ema.module.eval()
    steps = args.steps or args.timesteps
    timesteps = sampling_timesteps(args.timesteps, steps if args.sampler == "ddim" else args.timesteps)
    sample_labels = balanced_labels(args.num_samples, num_classes)
    m = min(args.grid_cols, args.num_samples // num_classes) or 1
    images_by_scale, per_scale, panels = {}, {}, []
    for w in args.cfg_scales:
        t1 = time.time()
        images = sample_at_scale(eps_model, sched, sample_labels, w, args, timesteps, device)
        seconds = time.time() - t1
        images_by_scale[w] = images
        save_class_samples(images, sample_labels, args.classes, os.path.join(args.out, f"samples_w{w:g}"))
        shown = first_per_class(images, sample_labels, num_classes, m)
        panels.append((f"w = {w:g}", first_per_class(images, sample_labels, num_classes, min(m, 4))))
        labelled_grid([(f"w = {w:g}", shown)], args.classes, m).save(os.path.join(args.out, f"grid_w{w:g}.png"))
        per_scale[w] = {"num_samples": len(images), "sample_seconds": round(seconds, 1),
                        "samples_per_second": round(len(images) / seconds, 2)}
    labelled_grid(panels, args.classes, min(m, 4)).save(os.path.join(args.out, "grid_scales.png"))

    scores, fid_reference = fid_per_scale(args, images_by_scale, device) if args.fid else (None, None)
    for w in args.cfg_scales:
        per_scale[w]["fid"] = scores[w] if scores else None
    if classifier is not None:
        for w, images in images_by_scale.items():
            accuracy, per_class = class_accuracy(classifier, images, sample_labels, num_classes)
            per_scale[w].update(class_accuracy=accuracy, class_accuracy_per_class=dict(zip(args.classes, per_class)))

    # The table: one line per guidance scale.
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
    if classifier is not None:
        print(f"right class: the share of samples that {args.classifier} assigns to the requested class")

    metrics.update(sampler=args.sampler, sampling_steps=len(timesteps), eta=args.eta if args.sampler == "ddim" else None,
                   num_samples_per_scale=args.num_samples, fid_num_samples=args.num_samples if args.fid else None,
                   fid_reference=fid_reference, classifier=args.classifier,
                   scales={f"{w:g}": per_scale[w] for w in args.cfg_scales},
                   total_seconds=round(time.time() - t0, 1), args=vars(args))
    write_metrics(os.path.join(args.out, "metrics.json"), metrics)
    print(f"wrote {args.out}: samples_w*/CLASS/*.png and grid_w*.png per scale, grid_scales.png, "
          f"{'loss.png, ' if not args.sample_only else ''}metrics.json", flush=True)


if __name__ == "__main__":
    main()
