"""Multi-label conditional DDPM on iCLEVR 64x64, graded by the course's pretrained evaluator.

The homework
------------
Generate 64x64 images that contain exactly the requested objects: 1 to 3 of 24 (8 colours x 3 shapes),
for the 32 conditions of test.json and the 32 of new_test.json. The course grades them with its ResNet18
(evaluator.py + checkpoint.pth, used as they are): for an image with k requested objects, the k largest of
its 24 sigmoid outputs are compared with the requested ones, and accuracy = hits / requested objects over the
file. Full marks at 0.8 on both files. Hand in per file the 32 images and an 8-per-row grid, and the
denoising process of ["red sphere", "yellow cube", "cyan cylinder"].

The data (the course's formats; the object order is read from objects.json, never assumed)
------------------------------------------------------------------------------------------
  objects.json      {"gray cube": 0, "red cube": 1, ..., "yellow cylinder": 23}
  train.json        {"CLEVR_train_001032_0.png": ["yellow sphere"], ...}   (18,009 images, 1-3 objects each)
  test.json, new_test.json   [["gray cube"], ["red cube"], ["blue cube", "green cube"], ...]   (32 each)
  iclevr/           the 320x240 RGBA PNGs named in train.json
Each image is converted to RGB and resized (squashed, bilinear) to 64x64, exactly what the usual recipe
transforms.Resize((64, 64)) does to a PIL image: the evaluator saw whole scenes, so cropping would cut
objects off. Pixels go to [-1, 1] = Normalize(mean 0.5, std 0.5), the evaluator's input convention.

The maths (t runs over {0, ..., T-1}; the DDPM parts are ddpm_mnist.py's, unchanged)
------------------------------------------------------------------------------------
  condition         y in {0, 1}^24, the multi-hot vector of the requested objects; y = 0 (no object) is the
                    "null" condition, which no real image has.
  model             eps_theta(x_t, t, y) = UNet(x_t, t, extra_emb = MLP(W y + b)): W y is the sum of the
                    requested objects' embeddings; the MLP lets objects interact; the result is added to the
                    time embedding of every residual block.
  training          L = E || eps - eps_theta(x_t, t, y') ||^2,  y' = 0 with probability p_uncond, else y
                    (label dropout: one network learns both eps(x_t, t, y) and eps(x_t, t, 0); Ho & Salimans 2022)
  classifier-free   eps~ = eps_theta(x_t, t, 0) + s (eps_theta(x_t, t, y) - eps_theta(x_t, t, 0))        (--guidance s)
  guidance          s = 1 is the plain conditional model; Ho & Salimans write (1 + w) eps_c - w eps_u, w = s - 1.
  classifier        Dhariwal & Nichol 2021 move eps along grad log p(y | x_t). The course's evaluator was trained on
  guidance          clean images only, so it is asked about the current estimate x0_hat instead of the noisy x_t:
                    log p(y | x) = sum_j [y_j log sigma_j(x) + (1 - y_j) log(1 - sigma_j(x))]   (its 24 sigmoids)
                    x0_hat' = x0_hat + S grad_{x0_hat} log p(y | x0_hat),                    (--classifier-guidance S)
                    eps^ = (x_t - sqrt(abar_t) x0_hat') / sqrt(1 - abar_t) = eps - S sqrt(abar_t / (1 - abar_t)) grad,
                    so every sampler uses the guided estimate unchanged. Grading with the network that guided the
                    samples flatters the number: report accuracy without it first, and check the course's rules.
  accuracy          acc = sum_i |topk_{k_i}(sigma(x_i)) n y_i| / sum_i k_i,   k_i = number of objects requested for i

Commands
--------
  python cond_iclevr.py --data-dir file --evaluator-dir file                    # the homework on a GPU
  python cond_iclevr.py --data-dir file --evaluator-dir file --sample-only --guidance 3    # resample, regrade
  python cond_iclevr.py --data-dir file --evaluator-dir file --epochs 300 --eval-every 10  # accuracy.csv per 10 epochs
  python benchmarks/cond_iclevr.py --preset gpu --data-dir file --evaluator-dir file      # accuracy per epoch and scale
  # CPU demo on a miniature dataset (flat coloured shapes; a stand-in evaluator whose number means nothing);
  # about 2.5 CPU minutes, far too short to draw objects: it shows that every output is written
  python tests/iclevr_fixtures.py runs/mini_iclevr --num-train 512
  python cond_iclevr.py --data-dir runs/mini_iclevr --evaluator-dir runs/mini_iclevr/stand_in_evaluator \\
      --out runs/cond_iclevr_cpu16 --device cpu --image-size 16 --ch 16 --ch-mult 1 2 --num-res-blocks 1 \\
      --attn-res 8 --timesteps 100 --epochs 45 --batch-size 32 --lr 1e-3 --warmup 50 --ema-decay 0.995 \\
      --sampler ddim --steps 25
"""

import argparse
import csv
import importlib.util
import json
import math
import os
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont

# Keys that define a training run; --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("image_size", "limit", "flip", "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout", "timesteps",
            "schedule", "label_dropout", "batch_size", "lr", "warmup", "grad_clip", "ema_decay", "seed")
DELIBERATELY_DIFFERENT = {
    "build_model": "wraps the UNet with the multi-hot label embedding",
    "train": "batches carry multi-hot labels, dropped for classifier-free guidance",
}


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Multi-label conditional DDPM on iCLEVR (see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="file",
                   help="folder holding objects.json, train.json and the test files (the course's file/ folder)")
    g.add_argument("--image-dir", default=None, help="folder of the training PNGs (default DATA_DIR/iclevr)")
    g.add_argument("--test-files", nargs="+", default=["test.json", "new_test.json"],
                   help="condition files to generate and grade (relative to --data-dir unless absolute)")
    g.add_argument("--image-size", type=int, default=64, help="side of the square images (the evaluator takes 64)")
    g.add_argument("--limit", type=int, default=None, help="train on the first N images of train.json only")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False,
                   help="random horizontal flips (off: they mirror the scene's fixed lighting and shadows)")
    g = p.add_argument_group("model and noise schedule")
    g.add_argument("--ch", type=int, default=128, help="base channel width of the UNet (128: 37M parameters; 64: 9.4M)")
    g.add_argument("--ch-mult", type=int, nargs="+", default=None,
                   help="width multiplier per resolution (default: 1 2 2 up to 32 px, 1 2 2 2 above)")
    g.add_argument("--num-res-blocks", type=int, default=2, help="residual blocks per resolution")
    g.add_argument("--attn-res", type=int, default=16, help="self-attention on feature maps of this side or smaller")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    g.add_argument("--schedule", choices=["linear", "cosine"], default="linear",
                   help="linear: beta 1e-4 -> 0.02 (Ho et al.); cosine: Nichol & Dhariwal 2021")
    g.add_argument("--label-dropout", type=float, default=0.1,
                   help="probability of training on the null condition (needed for --guidance other than 1)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=200)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate after warm-up")
    g.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up, in iterations")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    g.add_argument("--ema-decay", type=float, default=0.999, help="decay of the exponential moving average of the weights")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training (GPU)")
    g.add_argument("--out", default="runs/cond_iclevr", help="folder for checkpoint, images and metrics")
    g.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    g = p.add_argument_group("sampling, guidance and grading")
    g.add_argument("--sample-only", action="store_true", help="skip training: sample from --ckpt")
    g.add_argument("--ckpt", default=None, help="checkpoint for --sample-only (default OUT/ckpt.pt)")
    g.add_argument("--num-samples", type=int, default=1,
                   help="sets of images per test file: the first is handed in, all are graded (mean and spread)")
    g.add_argument("--sample-batch-size", type=int, default=256)
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    g.add_argument("--steps", type=int, default=None, help="DDIM steps (default: all T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    g.add_argument("--guidance", type=float, default=2.0,
                   help="classifier-free guidance scale s: 1 = conditional model alone, 0 = unconditional")
    g.add_argument("--classifier-guidance", type=float, default=0.0, metavar="S",
                   help="step size S of guidance by the evaluator's gradient at x0_hat (needs --evaluator-dir)")
    g.add_argument("--evaluator-dir", default=None,
                   help="folder with the course's evaluator.py and checkpoint.pth (accuracy is skipped without it)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="during training, grade every K epochs into OUT/accuracy.csv (0: only at the end)")
    g.add_argument("--eval-steps", type=int, default=None,
                   help="DDIM steps of the images graded during training (default: 50, or T if smaller)")
    g.add_argument("--process-labels", nargs="+", default=["red sphere", "yellow cube", "cyan cylinder"],
                   help="objects of the denoising-process row")
    args = p.parse_args(argv)

    # Bad values stop here, before anything is read or written.
    if args.ch_mult is None:
        args.ch_mult = [1, 2, 2] if args.image_size <= 32 else [1, 2, 2, 2]
    checks = [
        (args.epochs >= 0, f"--epochs must be 0 or more, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.warmup >= 0, f"--warmup must be 0 or more, got {args.warmup}"),
        (0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1), got {args.ema_decay}"),
        (0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
        (0 <= args.label_dropout < 1, f"--label-dropout must be in [0, 1), got {args.label_dropout}"),
        (args.timesteps >= 2, f"--timesteps must be at least 2, got {args.timesteps}"),
        (args.schedule != "linear" or args.timesteps > 20,  # make_betas scales 0.02 by 1000 / T: beta_{T-1} = 20 / T
         f"--timesteps {args.timesteps} with the linear schedule makes beta reach 1 or more; use more steps or --schedule cosine"),
        (args.ch >= 1 and min(args.ch_mult) >= 1, "--ch and --ch-mult must be positive"),
        (args.num_res_blocks >= 1, f"--num-res-blocks must be at least 1, got {args.num_res_blocks}"),
        (args.image_size >= 8, f"--image-size must be at least 8, got {args.image_size}"),
        (args.limit is None or args.limit >= 1, f"--limit must be at least 1, got {args.limit}"),
        (args.num_samples >= 1, f"--num-samples must be at least 1, got {args.num_samples}"),
        (args.sample_batch_size >= 1, f"--sample-batch-size must be at least 1, got {args.sample_batch_size}"),
        (args.steps is None or 1 <= args.steps <= args.timesteps,
         f"--steps must be between 1 and --timesteps ({args.timesteps}), got {args.steps}"),
        (args.steps is None or args.sampler == "ddim",
         "--steps applies to --sampler ddim; DDPM takes all T steps (use --sampler ddim --eta 1 for a shorter noisy chain)"),
        (args.eta >= 0, f"--eta must be 0 or more, got {args.eta}"),
        (args.guidance >= 0, f"--guidance must be 0 or more, got {args.guidance}"),
        (args.classifier_guidance >= 0, f"--classifier-guidance must be 0 or more, got {args.classifier_guidance}"),
        (args.classifier_guidance == 0 or args.evaluator_dir,
         "--classifier-guidance needs the course's evaluator: pass --evaluator-dir"),
        (args.eval_every >= 0, f"--eval-every must be 0 or more, got {args.eval_every}"),
        (args.eval_every == 0 or args.evaluator_dir, "--eval-every needs the course's evaluator: pass --evaluator-dir"),
        (args.eval_steps is None or 1 <= args.eval_steps <= args.timesteps,
         f"--eval-steps must be between 1 and --timesteps ({args.timesteps}), got {args.eval_steps}"),
        (args.device == "cpu" or not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device} was asked for but CUDA is not available"),
        (os.path.isdir(args.data_dir), f"--data-dir {args.data_dir} is not a folder"),
        (args.evaluator_dir is None or os.path.isdir(args.evaluator_dir),
         f"--evaluator-dir {args.evaluator_dir} is not a folder"),
        (not (args.resume and args.sample_only), "--resume and --sample-only exclude each other"),
    ]
    for ok, message in checks:
        if not ok:
            p.exit(2, f"error: {message}\n")
    args.image_dir = args.image_dir or os.path.join(args.data_dir, "iclevr")
    args.test_files = [f if os.path.isabs(f) else os.path.join(args.data_dir, f) for f in args.test_files]
    args.ckpt = args.ckpt or os.path.join(args.out, "ckpt.pt")
    if (args.resume or args.sample_only) and not os.path.isfile(args.ckpt):
        p.exit(2, f"error: checkpoint {args.ckpt} not found (train first, or pass --ckpt)\n")
    return args


def fail(message):
    """One clear sentence and a non-zero exit: how every script reports bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# Data: the course's JSON files, checked entry by entry; every training image as one uint8 tensor N x 3 x H x W
# ---------------------------------------------------------------------------------------------------------------
def read_json(path):
    if not os.path.isfile(path):
        fail(f"{path} not found (iCLEVR needs objects.json, train.json and the --test-files in --data-dir)")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"{path} is not valid JSON ({e})")


def multi_hot(names, objects, where):
    """One iCLEVR condition, a list of 1-3 distinct object names, as a 0/1 vector over the objects."""
    if not isinstance(names, list) or not 1 <= len(names) <= 3:
        fail(f"{where} must list 1 to 3 objects, got {names!r}")
    for name in names:
        if not isinstance(name, str) or name not in objects:
            fail(f"{where} names {name!r}, which is not in objects.json")
    if len(set(names)) < len(names):
        fail(f"{where} repeats an object: {names!r}")
    y = torch.zeros(len(objects))
    y[[objects[name] for name in names]] = 1
    return y


def load_iclevr_image(path, size):
    """An iCLEVR render (320x240 RGBA) as uint8 3 x size x size: alpha dropped, the whole frame squashed to a square
    (bilinear), which is what transforms.Resize((size, size)) does to a PIL image; a crop could cut objects off."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    except Exception as e:
        fail(f"cannot read image {path} ({type(e).__name__}: {e})")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_objects(path):
    """objects.json: name -> index, the indices exactly 0 ... K-1. The order is the file's, whatever it is."""
    objects = read_json(path)
    if not (isinstance(objects, dict) and objects and all(type(i) is int for i in objects.values())
            and sorted(objects.values()) == list(range(len(objects)))):
        fail(f"{path} must map each object name to a distinct index 0, 1, ..., K-1")
    return objects


def load_conditions(path, objects):
    """test.json / new_test.json: a list of conditions -> (the lists, their multi-hot vectors M x K)."""
    conditions = read_json(path)
    if not isinstance(conditions, list) or not conditions:
        fail(f"{path} must be a non-empty list of conditions (lists of object names)")
    name = os.path.basename(path)
    return conditions, torch.stack([multi_hot(c, objects, f"{name}[{i}]") for i, c in enumerate(conditions)])


def load_train_index(path, image_dir, objects, limit=None, check_images=True):
    """train.json: image file name -> objects. Every entry is checked, and (unless check_images is False: only the
    labels are needed) every image must exist, before any image is read. Returns (image paths, multi-hot labels
    N x K), in the file's order."""
    index = read_json(path)
    if not isinstance(index, dict) or not index:
        fail(f"{path} must map image file names to lists of objects")
    names = list(index)[:limit]
    labels = torch.stack([multi_hot(index[n], objects, f"train.json[{n!r}]") for n in names])
    for name in names if check_images else []:
        if not os.path.isfile(os.path.join(image_dir, name)):
            fail(f"image {os.path.join(image_dir, name)} listed in train.json does not exist")
    return [os.path.join(image_dir, n) for n in names], labels


def load_iclevr_images(paths, size):
    print(f"reading {len(paths)} images at {size}x{size} ...", flush=True)
    t0, images = time.time(), []
    for i, path in enumerate(paths):
        images.append(load_iclevr_image(path, size))
        if i % 2000 == 1999 and time.time() - t0 > 10:
            print(f"  {i + 1}/{len(paths)}", flush=True)
    return torch.stack(images)


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
# Model: ddpm_mnist.py's UNet, with the multi-hot condition added to its time embedding
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


class MultiLabelUNet(nn.Module):
    """eps_theta(x_t, t, y): the UNet, plus an embedding of the multi-hot y added to its time embedding.

    The first Linear sums one learned vector per requested object (plus a bias, which alone encodes the null
    condition y = 0); the MLP after it lets a set of objects mean more than the sum of its parts."""

    def __init__(self, unet, num_classes):
        super().__init__()
        self.unet, self.num_classes, self.emb_dim = unet, num_classes, unet.emb_dim
        self.label_mlp = nn.Sequential(nn.Linear(num_classes, self.emb_dim), nn.SiLU(),
                                       nn.Linear(self.emb_dim, self.emb_dim))

    def forward(self, x, t, y):
        return self.unet(x, t, extra_emb=self.label_mlp(y.float()))


def build_model(args, num_classes):
    unet = UNet(3, args.ch, args.ch_mult, args.num_res_blocks, args.attn_res, args.dropout, args.image_size)
    return MultiLabelUNet(unet, num_classes)


# ---------------------------------------------------------------------------------------------------------------
# Diffusion maths
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


def make_guided_eps_fn(model, sched, y, guidance=1.0, classifier=None, classifier_scale=0.0):
    """eps_fn(x, t) for sample(): the conditional model for the multi-hot rows y (one per image), with
    classifier-free guidance (one batched pass over [y, null]) and optionally classifier guidance at x0_hat."""
    null = torch.zeros_like(y)

    def eps_fn(x, t):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            if guidance == 1:
                eps = model(x, t, y).float()
            else:
                eps_cond, eps_null = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
                eps = eps_null + guidance * (eps_cond - eps_null)
        if classifier is not None and classifier_scale > 0:
            eps = classifier_guided_eps(classifier, sched, x, t, eps, y, classifier_scale)
        return eps
    return eps_fn


def classifier_guided_eps(classifier, sched, x_t, t, eps, y, scale):
    """Move x0_hat up the gradient of log p(y | x0_hat) under the classifier's sigmoids, and return the eps that
    the moved x0_hat implies. eps itself is held fixed: no gradient flows through the diffusion model."""
    with torch.inference_mode(False), torch.enable_grad():  # sample() runs in inference mode; this step needs autograd
        x_t, eps = x_t.clone(), eps.clone()  # ordinary tensors: inference tensors cannot enter autograd
        x0 = predict_x0(sched, x_t, t, eps).clamp(-1, 1).requires_grad_(True)
        device = next(classifier.parameters()).device
        probs = classifier(x0.to(device)).float().clamp(1e-6, 1 - 1e-6)
        target = y.to(device).float()
        log_p = (target * probs.log() + (1 - target) * (1 - probs).log()).sum()
        grad, = torch.autograd.grad(log_p, x0)
        x0 = x0.detach() + scale * grad.to(x0.device)
        return ((x_t - extract(sched.sqrt_alphas_cumprod, t, x_t) * x0)
                / extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t))


def sample_for_conditions(model, sched, y, size, timesteps, sampler, eta, seed, guidance, classifier=None, classifier_scale=0.0,
             batch_size=256, record=0):
    """One image per row of y, in [-1, 1], from a generator seeded with seed. With record, also the frames of
    the (single) batch, as sample() returns them."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    images, frames = [], None
    for start in range(0, len(y), batch_size):
        y_batch = y[start:start + batch_size].to(device)
        x_T = torch.randn((len(y_batch), 3, size, size), generator=g, device=device)
        eps_fn = make_guided_eps_fn(model, sched, y_batch, guidance, classifier, classifier_scale)
        out = sample(eps_fn, sched, x_T, timesteps, sampler, eta, g, record=record)
        if record:
            out, frames = out
        images.append(out)
    images = torch.cat(images)
    return (images, frames) if record else images


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
    return torch.load(path, map_location="cpu", weights_only=True)  # a checkpoint is data, never code


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


def train(args, data, labels, model, ema, optimizer, sched, device, state, extra=None, on_epoch_end=None):
    """Algorithm 1 over epochs of shuffled batches, each image with its multi-hot labels, replaced by the null
    condition with probability --label-dropout. state holds what a checkpoint needs to resume exactly;
    extra is saved with it; on_epoch_end(state) runs after each epoch's checkpoint."""
    n, bs = len(data), args.batch_size
    iters_per_epoch = math.ceil(n / bs)
    total = iters_per_epoch * args.epochs
    train_model = torch.compile(model) if args.compile else model
    labels = labels.to(device)
    model.train()
    t_start, t_print, step_start = time.time(), time.time(), state["step"]

    def checkpoint():
        save_checkpoint(os.path.join(args.out, "ckpt.pt"), {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "args": vars(args), "rng": rng_state(), "losses": torch.tensor(state["losses"]), **(extra or {}), **{
                k: state[k] for k in ("step", "epoch", "batch_in_epoch", "epoch_perm")}})

    try:
        while state["epoch"] < args.epochs:
            if state["epoch_perm"] is None:
                state["epoch_perm"] = torch.randperm(n)
            while state["batch_in_epoch"] < iters_per_epoch:
                idx = state["epoch_perm"][state["batch_in_epoch"] * bs:(state["batch_in_epoch"] + 1) * bs]
                x0 = to_model_input(data[idx], device, args.flip)
                y = labels[idx.to(device)]
                drop = torch.rand(len(y), device=device) < args.label_dropout
                y = torch.where(drop[:, None], torch.zeros_like(y), y)
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
            if on_epoch_end is not None:
                on_epoch_end(state)
    except KeyboardInterrupt:
        checkpoint()
        print(f"\ninterrupted: saved {args.out}/ckpt.pt at step {state['step']}; continue with --resume", flush=True)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------------------------
# Grading: the course's evaluator, loaded from its folder and used exactly as the course uses it
# ---------------------------------------------------------------------------------------------------------------
def load_evaluator(folder):
    """Import folder/evaluator.py and construct its evaluation_model() with folder as the working directory,
    since it loads './checkpoint.pth'. Neither file is changed. The course's class moves its network to the
    GPU (.cuda()) when constructed, so without CUDA it cannot be built: we say so and stop."""
    path, ckpt = os.path.join(folder, "evaluator.py"), os.path.join(folder, "checkpoint.pth")
    for needed in (path, ckpt):
        if not os.path.isfile(needed):
            fail(f"--evaluator-dir {folder} has no {os.path.basename(needed)} (the course's evaluator.py and checkpoint.pth)")
    spec = importlib.util.spec_from_file_location("course_evaluator", path)
    module = importlib.util.module_from_spec(spec)
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        spec.loader.exec_module(module)
        if not hasattr(module, "evaluation_model"):
            fail(f"{path} defines no evaluation_model class")
        evaluator = module.evaluation_model()
    except Exception as e:
        if not torch.cuda.is_available():
            fail(f"the course's evaluator needs a GPU (its evaluation_model() moves the network there with .cuda()) "
                 f"and CUDA is not available here: constructing it from {path} failed ({type(e).__name__}: {e}); "
                 f"grade on a machine with CUDA, e.g. with --sample-only")
        fail(f"could not construct evaluation_model from {path} ({type(e).__name__}: {e})")
    finally:
        os.chdir(cwd)
    return evaluator


def evaluator_network(evaluator):
    """The torch network inside evaluation_model (the course names it resnet18): its device, and the classifier
    that --classifier-guidance differentiates."""
    net = getattr(evaluator, "resnet18", None)
    if not isinstance(net, nn.Module):
        net = next((v for v in vars(evaluator).values() if isinstance(v, nn.Module)), None)
    if net is None:
        fail("found no torch network inside evaluation_model (expected an attribute such as resnet18)")
    return net


def evaluate(evaluator, images, y):
    """The course's protocol: the images as their PNGs hold them (uint8), as ToTensor + Normalize(0.5, 0.5) would
    load them, i.e. u / 127.5 - 1, on the evaluator's device, with the multi-hot labels; eval(images, labels)
    returns hits / requested objects. Also the hits per image (one image per call; the network is in eval mode,
    so the batch does not change an image's outputs)."""
    device = next(evaluator_network(evaluator).parameters()).device
    x = (images.float() / 255 - 0.5) / 0.5
    x, y = x.to(device), y.float().to(device)
    accuracy = float(evaluator.eval(x, y))
    hits = [round(float(evaluator.eval(x[i:i + 1], y[i:i + 1])) * int(y[i].sum().item())) for i in range(len(x))]
    return accuracy, hits


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


def save_samples(images, folder, zip_path):
    """00001.png, 00002.png, ... and a zip holding exactly those files at its root (what graders unpack)."""
    os.makedirs(folder, exist_ok=True)
    names = [f"{i + 1:05d}.png" for i in range(len(images))]
    for name, img in zip(names, images):
        Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").save(os.path.join(folder, name))
    with zipfile.ZipFile(zip_path + ".tmp", "w", zipfile.ZIP_STORED) as zf:
        for name in names:
            zf.write(os.path.join(folder, name), arcname=name)
    os.replace(zip_path + ".tmp", zip_path)


def save_process(frames, png_path, gif_path, columns=8):
    """frames: list of N x C x H x W states from noise to image. PNG: one row per sample, `columns` evenly spaced
    frames (first pure noise, last the result). GIF: every frame, the samples side by side."""
    every = (len(frames) - 1) // (columns - 1)
    chosen = torch.stack([to_uint8(f) for f in frames[::every]], dim=1)  # N x columns x 3 x H x W
    make_grid(chosen.flatten(0, 1), nrow=columns).save(png_path)
    gif = [make_grid(to_uint8(f), nrow=len(f)) for f in frames] + [make_grid(to_uint8(frames[-1]), nrow=len(frames[-1]))] * 10
    gif[0].save(gif_path, save_all=True, append_images=gif[1:], duration=60, loop=0)


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


# ---------------------------------------------------------------------------------------------------------------
# main: check every input, train (or load), then generate, grade and write every output
# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    saved = None
    if args.resume or args.sample_only:
        saved = load_checkpoint(args.ckpt)
        for key in RUN_KEYS:  # the model and run are the checkpoint's; only --epochs and outputs can change
            setattr(args, key, saved["args"][key])
        if args.steps is not None and args.steps > args.timesteps:
            fail(f"--steps {args.steps} is more than the checkpoint's {args.timesteps} diffusion steps")
        if args.eval_steps is not None and args.eval_steps > args.timesteps:
            fail(f"--eval-steps {args.eval_steps} is more than the checkpoint's {args.timesteps} diffusion steps")

    # Every input is checked before any work starts and before anything is written.
    objects = load_objects(os.path.join(args.data_dir, "objects.json"))
    object_names = sorted(objects, key=objects.get)
    if saved is not None and saved["objects"] != object_names:
        fail(f"objects.json in {args.data_dir} does not match the checkpoint's objects (names or order differ)")
    tests = {}
    for path in args.test_files:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in tests:
            fail(f"two test files are named {stem}.json; their outputs would overwrite each other")
        tests[stem] = load_conditions(path, objects)
    y_process = multi_hot(args.process_labels, objects, "--process-labels")[None]
    if not args.sample_only:
        paths, labels = load_train_index(os.path.join(args.data_dir, "train.json"), args.image_dir, objects, args.limit)
    evaluator = load_evaluator(args.evaluator_dir) if args.evaluator_dir else None
    if evaluator is not None and args.image_size != 64:
        print(f"note: the course's evaluator was trained on 64x64 images; these are {args.image_size}x{args.image_size}")
    data = None if args.sample_only else load_iclevr_images(paths, args.image_size)

    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    if not (args.resume or args.sample_only) and os.path.isfile(os.path.join(args.out, "accuracy.csv")):
        os.remove(os.path.join(args.out, "accuracy.csv"))  # a new run starts a new curve
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    size = args.image_size
    sched = NoiseSchedule(make_betas(args.schedule, args.timesteps)).to(device)
    model = build_model(args, len(objects)).to(device)
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
    print(f"UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}, "
          f"{len(objects)} objects", flush=True)

    eps_model = ema.module.eval()
    classifier = evaluator_network(evaluator) if evaluator is not None and args.classifier_guidance > 0 else None
    steps = args.steps or args.timesteps
    timesteps = sampling_timesteps(args.timesteps, steps if args.sampler == "ddim" else args.timesteps)

    def grade_during_training(state):
        if not args.eval_every or state["epoch"] % args.eval_every:
            return
        eval_steps = args.eval_steps or min(50, args.timesteps)
        eval_timesteps, row = sampling_timesteps(args.timesteps, eval_steps), [state["epoch"], state["step"]]
        for k, (stem, (_, y)) in enumerate(tests.items()):
            x = sample_for_conditions(eps_model, sched, y, size, eval_timesteps, "ddim", 0.0, args.seed + 1000 * k,
                                      args.guidance, classifier, args.classifier_guidance, args.sample_batch_size)
            row.append(evaluate(evaluator, to_uint8(x), y)[0])
        csv_path = os.path.join(args.out, "accuracy.csv")
        new = not os.path.isfile(csv_path)
        with open(csv_path, "a", newline="") as fh:
            csv.writer(fh).writerows(([["epoch", "step", *tests]] if new else []) + [row])
        print(f"epoch {state['epoch']}: accuracy " + ", ".join(f"{s} {a:.3f}" for s, a in zip(tests, row[2:]))
              + f" (DDIM {eval_steps} steps, guidance {args.guidance})", flush=True)

    metrics = {"device": str(device), "torch": torch.__version__, "checkpoint_epoch": state["epoch"]}
    t0 = time.time()
    if not args.sample_only:
        train(args, data, labels, model, ema, optimizer, sched, device, state, extra={"objects": object_names},
              on_epoch_end=grade_during_training if evaluator is not None else None)
        metrics.update(train_seconds=round(time.time() - t0, 1), steps=state["step"], epochs=state["epoch"],
                       train_images=len(data))
        with open(os.path.join(args.out, "loss.csv"), "w", newline="") as fh:
            csv.writer(fh).writerows([("iteration", "loss")] + list(enumerate(state["losses"], 1)))
        if state["losses"]:
            plot_loss({"training loss": state["losses"]}, os.path.join(args.out, "loss.png"),
                      f"conditional DDPM training loss (iCLEVR, batch {args.batch_size})")

    # The denoising process of one condition: a row of 8 frames, pure noise to the final image.
    _, frames = sample_for_conditions(eps_model, sched, y_process, size, timesteps, args.sampler, args.eta, args.seed,
                                      args.guidance, classifier, args.classifier_guidance, 1, record=56)  # 7 * 8 frames
    save_process(frames, os.path.join(args.out, "process.png"), os.path.join(args.out, "process.gif"))

    t1 = time.time()
    metrics.update(sampler=args.sampler, sampling_steps=len(timesteps), eta=args.eta if args.sampler == "ddim" else None,
                   guidance=args.guidance, classifier_guidance=args.classifier_guidance,
                   process_labels=args.process_labels, evaluator=args.evaluator_dir, accuracy={}, results={})
    if evaluator is None:
        hint = (f" ({args.data_dir} holds an evaluator.py: pass --evaluator-dir {args.data_dir})"
                if os.path.isfile(os.path.join(args.data_dir, "evaluator.py")) else "")
        metrics["accuracy_note"] = "skipped: no --evaluator-dir (the course's evaluator.py and checkpoint.pth)" + hint
        print(f"accuracy {metrics['accuracy_note']}", flush=True)
    for k, (stem, (conditions, y)) in enumerate(tests.items()):
        draws, per_condition = [], None
        for draw in range(args.num_samples):
            x = to_uint8(sample_for_conditions(eps_model, sched, y, size, timesteps, args.sampler, args.eta,
                                               args.seed + 1000 * k + draw, args.guidance, classifier,
                                               args.classifier_guidance, args.sample_batch_size))
            if draw == 0:  # the first set is the hand-in
                make_grid(x, nrow=8).save(os.path.join(args.out, f"{stem}_grid.png"))
                save_samples(x, os.path.join(args.out, stem), os.path.join(args.out, f"{stem}.zip"))
            if evaluator is not None:
                accuracy, hits = evaluate(evaluator, x, y)
                draws.append(accuracy)
                per_condition = per_condition or [{"objects": c, "hits": h} for c, h in zip(conditions, hits)]
            print(f"{stem}: sampled set {draw + 1}/{args.num_samples} ({len(x)} images, {args.sampler}, "
                  f"{len(timesteps)} steps, guidance {args.guidance})"
                  + (f"  accuracy {draws[-1]:.4f}" if draws else ""), flush=True)
        metrics["results"][stem] = {"conditions": len(conditions), "requested_objects": int(y.sum().item()),
                                    "images": f"{stem}/00001.png ... (entry i of {stem}.json is image i + 1)",
                                    "per_condition": per_condition, "accuracy_per_set": draws or None}
        if draws:
            metrics["accuracy"][stem] = draws[0]
            if len(draws) > 1:
                metrics["results"][stem].update(accuracy_mean=float(np.mean(draws)), accuracy_std=float(np.std(draws)))
    for stem, value in metrics["accuracy"].items():
        print(f"accuracy on {stem}.json: {value:.4f}  (the course's evaluator; full marks at 0.8)", flush=True)
    metrics.update(accuracy=metrics["accuracy"] or None, sample_seconds=round(time.time() - t1, 1),
                   total_seconds=round(time.time() - t0, 1), args=vars(args))
    write_metrics(os.path.join(args.out, "metrics.json"), metrics)
    print(f"wrote {args.out}: " + ", ".join(f"{s}_grid.png, {s}/" for s in tests)
          + ", process.png, process.gif, metrics.json" + ("" if args.sample_only else ", loss.png, ckpt.pt"), flush=True)
    return metrics


if __name__ == "__main__":
    main()
