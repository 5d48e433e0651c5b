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
  training          L_simple = E_{t, x_0, eps} || eps - eps_theta(x_t, t) ||^2                 (Algorithm 1)
  posterior         q(x_{t-1} | x_t, x_0) = N(mu_t, beta~_t I),
                    mu_t = [beta_t sqrt(abar_{t-1}) / (1 - abar_t)] x_0 + [(1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)] x_t,
                    beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
  sampling          x_0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)                (predict_x0)
                    x_{t-1} = mu_t(x_t, x_0_hat) + sqrt(beta~_t) z                            (Algorithm 2, ddpm_step)
  DDIM (Song et al. 2021, eq. 12), over a sub-sequence of steps t > t':
                    x_{t'} = sqrt(abar_{t'}) x_0_hat + sqrt(1 - abar_{t'} - sigma^2) eps_theta + sigma z,
                    sigma = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'})   (ddim_step)
  With eta = 1 and t' = t - 1, sigma^2 = beta~_t and the DDIM step is the DDPM step (a test checks this).

Commands
--------
  python ddpm_mnist.py --epochs 30                      # the homework on a GPU: train, 10k samples, FID
  python ddpm_mnist.py --device cpu --ch 32 --ch-mult 1 2 --num-res-blocks 1 --epochs 6 \
      --sampler ddim --steps 50 --fid-stats ../shared/fid-reference/mnist_train10k_stats.npz   # CPU preset
  python ddpm_mnist.py --dataset folder --data-dir anime_faces --image-size 64 --epochs 50
  python ddpm_mnist.py --dataset folder --data-dir cat_faces --fuse a.png b.png --lam 0.5 --fuse-t 500
  python ddpm_mnist.py --sample-only --sampler ddim --steps 100 --eta 0   # resample from runs/ddpm_mnist/ckpt.pt
"""

import argparse
import csv
import json
import math
import os
import signal
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont, ImageOps

# Keys that define a training run; --resume takes them from the checkpoint so the run continues unchanged.
RUN_KEYS = ("dataset", "data_dir", "image_size", "limit", "flip", "ch", "ch_mult", "num_res_blocks", "attn_res",
            "dropout", "timesteps", "schedule", "batch_size", "lr", "warmup", "grad_clip", "ema_decay", "seed")


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DDPM on MNIST or a folder of images (see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["mnist", "folder"], default="mnist",
                   help="mnist (torchvision, 28x28 grey) or folder (any images, recursive, RGB at --image-size)")
    g.add_argument("--data-dir", default="./data", help="MNIST root (holds MNIST/raw) or the image folder")
    g.add_argument("--image-size", type=int, default=64, help="side of the square images for --dataset folder")
    g.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on for folders, off for MNIST, whose digits are not symmetric)")
    g = p.add_argument_group("model and noise schedule")
    g.add_argument("--ch", type=int, default=64, help="base channel width of the UNet")
    g.add_argument("--ch-mult", type=int, nargs="+", default=None,
                   help="width multiplier per resolution (default: 1 2 2 up to 32 px, 1 2 2 2 above)")
    g.add_argument("--num-res-blocks", type=int, default=2, help="residual blocks per resolution")
    g.add_argument("--attn-res", type=int, default=16, help="self-attention on feature maps of this side or smaller")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    g.add_argument("--schedule", choices=["linear", "cosine"], default="linear",
                   help="linear: beta 1e-4 -> 0.02 (Ho et al.); cosine: Nichol & Dhariwal 2021")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=4e-4, help="AdamW learning rate after warm-up")
    g.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up, in iterations")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    g.add_argument("--ema-decay", type=float, default=0.999, help="decay of the exponential moving average of the weights")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training (GPU)")
    g.add_argument("--out", default="runs/ddpm_mnist", help="folder for checkpoint, images and metrics")
    g.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    g = p.add_argument_group("sampling and outputs")
    g.add_argument("--sample-only", action="store_true", help="skip training: sample from --ckpt")
    g.add_argument("--ckpt", default=None, help="checkpoint for --sample-only / --fuse (default OUT/ckpt.pt)")
    g.add_argument("--num-samples", type=int, default=10000, help="images written to OUT/samples (0: none)")
    g.add_argument("--sample-batch-size", type=int, default=1000)
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    g.add_argument("--steps", type=int, default=None, help="DDIM steps (default: all T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    g.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                   help="FID of the samples against the training set (skipped with a note if no weights)")
    g.add_argument("--fid-stats", default=None,
                   help="reference statistics .npz (default runs/fid_stats_<data>.npz, computed once if missing)")
    g.add_argument("--inception", default=None, help="FID Inception weights (default: pytorch-fid's, via torch.hub)")
    g = p.add_argument_group("fusion")
    g.add_argument("--fuse", nargs="+", default=None, metavar="IMG",
                   help="two images A B, or a folder whose sorted images are taken in pairs")
    g.add_argument("--lam", type=float, default=0.5, help="fusion weight: (1 - lam) * A + lam * B")
    g.add_argument("--fuse-t", type=int, default=None, help="step t to which both images are noised (default T/2)")
    args = p.parse_args(argv)

    # Bad values stop here, before anything is read or written.
    if args.ch_mult is None:
        args.ch_mult = [1, 2, 2] if (28 if args.dataset == "mnist" else args.image_size) <= 32 else [1, 2, 2, 2]
    if args.flip is None:
        args.flip = args.dataset == "folder"
    checks = [
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
        (args.limit is None or args.limit >= 1, f"--limit must be at least 1, got {args.limit}"),
        (args.num_samples >= 0, f"--num-samples must be 0 or more, got {args.num_samples}"),
        (args.sample_batch_size >= 1, f"--sample-batch-size must be at least 1, got {args.sample_batch_size}"),
        (args.steps is None or 1 <= args.steps <= args.timesteps,
         f"--steps must be between 1 and --timesteps ({args.timesteps}), got {args.steps}"),
        (args.steps is None or args.sampler == "ddim",
         "--steps applies to --sampler ddim; DDPM takes all T steps (use --sampler ddim --eta 1 for a shorter noisy chain)"),
        (args.eta >= 0, f"--eta must be 0 or more, got {args.eta}"),
        (0 <= args.lam <= 1, f"--lam must be in [0, 1], got {args.lam}"),
        (args.fuse_t is None or 0 <= args.fuse_t < args.timesteps,
         f"--fuse-t must be in [0, {args.timesteps - 1}], got {args.fuse_t}"),
        (args.device == "cpu" or not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device} was asked for but CUDA is not available"),
        (args.dataset != "folder" or os.path.isdir(args.data_dir),
         f"--data-dir {args.data_dir} is not a folder of images"),
        (not (args.resume and args.sample_only), "--resume and --sample-only exclude each other"),
        (args.fuse is None or len(args.fuse) == 2 or (len(args.fuse) == 1 and os.path.isdir(args.fuse[0])),
         "--fuse takes two images or one folder of images"),
    ]
    for ok, message in checks:
        if not ok:
            p.exit(2, f"error: {message}\n")
    for path in args.fuse or []:
        if not os.path.exists(path):
            p.exit(2, f"error: --fuse input {path} does not exist\n")
    args.ckpt = args.ckpt or os.path.join(args.out, "ckpt.pt")
    if (args.resume or args.sample_only or args.fuse) and not os.path.isfile(args.ckpt):
        p.exit(2, f"error: checkpoint {args.ckpt} not found (train first, or pass --ckpt)\n")
    return args


def fail(message):
    """One clear sentence and a non-zero exit: how every script reports bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# Data: every training image as one uint8 tensor N x C x H x W, kept in (GPU) memory
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


def load_image_folder(root, size, limit=None):
    paths = list_images(root)[:limit]
    if not paths:
        fail(f"no .png/.jpg/.jpeg images found in {root}")
    print(f"reading {len(paths)} images from {root} at {size}x{size} ...", flush=True)
    return torch.stack([load_image(p, size) for p in paths])


def load_mnist(data_dir, limit=None):
    try:
        data = torchvision.datasets.MNIST(data_dir, train=True, download=True).data
    except Exception as e:
        fail(f"could not load or download MNIST into {data_dir} ({e}); put the four MNIST files in "
             f"{os.path.join(data_dir, 'MNIST', 'raw')} or pass --data-dir pointing at a folder that has MNIST/raw")
    return data[:limit].unsqueeze(1)  # N x 1 x 28 x 28 uint8


def load_training_images(args):
    if args.dataset == "mnist":
        return load_mnist(args.data_dir, args.limit)
    return load_image_folder(args.data_dir, args.image_size, args.limit)


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
# Model: a UNet that predicts the noise eps_theta(x_t, t)
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


def build_model(args, in_ch):
    size = 28 if args.dataset == "mnist" else args.image_size
    return UNet(in_ch, args.ch, args.ch_mult, args.num_res_blocks, args.attn_res, args.dropout, size)


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


def make_eps_fn(model, device):
    """The model as eps_fn(x, t), in bf16 autocast on a GPU and float32 out."""
    def eps_fn(x, t):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(x, t).float()
    return eps_fn


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


def train(args, data, model, ema, optimizer, sched, device, state):
    """Algorithm 1 over epochs of shuffled batches. state holds what a checkpoint needs to resume exactly."""
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

    # Ctrl-C asks to stop; the batch in flight finishes first, so the checkpoint is always a consistent state.
    # A second Ctrl-C stops at once.
    stop = []

    def request_stop(signum, frame):
        stop.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    try:
        while state["epoch"] < args.epochs:
            if state["epoch_perm"] is None:
                state["epoch_perm"] = torch.randperm(n)
            while state["batch_in_epoch"] < iters_per_epoch:
                idx = state["epoch_perm"][state["batch_in_epoch"] * bs:(state["batch_in_epoch"] + 1) * bs]
                x0 = to_model_input(data[idx], device, args.flip)
                for group in optimizer.param_groups:  # linear warm-up, then constant
                    group["lr"] = args.lr * min(1.0, (state["step"] + 1) / max(1, args.warmup))
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = diffusion_loss(train_model, sched, x0)
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
                if stop:
                    checkpoint()
                    print(f"\ninterrupted: saved {args.out}/ckpt.pt at step {state['step']}; continue with --resume")
                    sys.exit(130)
            state["epoch"] += 1
            state["batch_in_epoch"], state["epoch_perm"] = 0, None
            checkpoint()
    finally:
        signal.signal(signal.SIGINT, previous_handler)


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
# FID (fid.py, the pytorch-fid protocol) and fusion
# ---------------------------------------------------------------------------------------------------------------
def compute_fid(args, images, device):
    """FID of uint8 RGB samples against the training set's statistics; None (with a note) without weights."""
    import fid  # imported here so training never needs the Inception network
    try:
        inception = fid.load_inception(args.inception, device)
    except fid.FIDError as e:
        print(f"FID skipped: {e}", flush=True)
        return None
    stats_path = args.fid_stats or os.path.join(os.path.dirname(os.path.abspath(args.out)), "fid_stats_" + (
        "mnist_train60k.npz" if args.dataset == "mnist" else
        f"{os.path.basename(os.path.abspath(args.data_dir))}_{args.image_size}px.npz"))
    if not os.path.isfile(stats_path):
        print(f"computing reference statistics of the training images into {stats_path} (once; slow on a CPU)", flush=True)
        reference = load_mnist(args.data_dir) if args.dataset == "mnist" else load_image_folder(args.data_dir, args.image_size)
        mu, sigma = fid.compute_statistics(reference, model=inception, device=device)
        fid.save_statistics(stats_path, mu, sigma)
    mu_ref, sigma_ref = fid.load_statistics(stats_path)
    mu, sigma = fid.compute_statistics(images, model=inception, device=device)
    value = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    print(f"FID {value:.3f}  ({len(images)} samples vs {stats_path})", flush=True)
    return {"fid": value, "fid_num_samples": len(images), "fid_reference": stats_path}


def fuse(args, eps_fn, sched, in_ch, size, device):
    """Noise A and B to step t with the same eps, mix (1 - lam) x_A + lam x_B, and denoise from t (DDPM)."""
    paths = args.fuse if len(args.fuse) == 2 else list_images(args.fuse[0])
    if len(paths) < 2:
        fail(f"--fuse needs at least two images, found {len(paths)} in {args.fuse[0]}")
    mode = "L" if in_ch == 1 else "RGB"
    images = torch.stack([load_image(p, size, mode) for p in paths[:len(paths) // 2 * 2]]).to(device).float() / 127.5 - 1
    a, b = images[0::2], images[1::2]
    g = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn(a.shape, generator=g, device=device)  # shared noise keeps the mix at the variance of step t
    t = torch.full((len(a),), args.fuse_t, device=device)
    x_t = (1 - args.lam) * q_sample(sched, a, t, noise) + args.lam * q_sample(sched, b, t, noise)
    fused = sample(eps_fn, sched, x_t, list(range(args.fuse_t + 1)), "ddpm", generator=g)
    rows = torch.stack([to_uint8(a), to_uint8(b), to_uint8(fused)], dim=1).flatten(0, 1)
    make_grid(rows, nrow=3).save(os.path.join(args.out, "fusion.png"))
    print(f"wrote {args.out}/fusion.png: {len(a)} pair(s), rows of A | B | fused (lam {args.lam}, t {args.fuse_t})")


# ---------------------------------------------------------------------------------------------------------------
# main: train (or load), then write every output
# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    saved = None
    if args.resume or args.sample_only or args.fuse:
        saved = load_checkpoint(args.ckpt)
        for key in RUN_KEYS:  # the model and run are the checkpoint's; only --epochs and outputs can change
            setattr(args, key, saved["args"][key])
        if args.steps is not None and args.steps > args.timesteps:
            fail(f"--steps {args.steps} is more than the checkpoint's {args.timesteps} diffusion steps")
    if args.fuse:
        args.fuse_t = args.timesteps // 2 if args.fuse_t is None else args.fuse_t
        if not 0 <= args.fuse_t < args.timesteps:
            fail(f"--fuse-t must be in [0, {args.timesteps - 1}] for this checkpoint, got {args.fuse_t}")
    data = None if (args.sample_only or args.fuse) else load_training_images(args)  # bad data stops us here
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    in_ch = 1 if args.dataset == "mnist" else 3
    size = 28 if args.dataset == "mnist" else args.image_size
    sched = NoiseSchedule(make_betas(args.schedule, args.timesteps)).to(device)
    model = build_model(args, in_ch).to(device)
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
    print(f"UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}", flush=True)

    eps_fn = make_eps_fn(ema.module.eval(), device)
    if args.fuse:
        fuse(args, eps_fn, sched, in_ch, size, device)
        return
    metrics = {"device": str(device), "torch": torch.__version__}
    t0 = time.time()
    if not args.sample_only:
        train(args, data, model, ema, optimizer, sched, device, state)
        metrics.update(train_seconds=round(time.time() - t0, 1), steps=state["step"], epochs=state["epoch"])
        with open(os.path.join(args.out, "loss.csv"), "w", newline="") as fh:
            csv.writer(fh).writerows([("iteration", "loss")] + list(enumerate(state["losses"], 1)))
        if state["losses"]:
            plot_loss({"training loss": state["losses"]}, os.path.join(args.out, "loss.png"),
                      f"DDPM training loss ({args.dataset}, batch {args.batch_size})")
    if args.num_samples == 0:
        return write_metrics(os.path.join(args.out, "metrics.json"), {**metrics, "args": vars(args)})

    steps = args.steps or args.timesteps
    timesteps = sampling_timesteps(args.timesteps, steps if args.sampler == "ddim" else args.timesteps)
    g = torch.Generator(device).manual_seed(args.seed)
    x_T = torch.randn((8, in_ch, size, size), generator=g, device=device)
    _, frames = sample(eps_fn, sched, x_T, timesteps, args.sampler, args.eta, g, record=56)  # 56 = 7 * 8 frames
    save_process(frames, os.path.join(args.out, "process.png"), os.path.join(args.out, "process.gif"))
    t1, chunks = time.time(), []
    for start in range(0, args.num_samples, args.sample_batch_size):
        n = min(args.sample_batch_size, args.num_samples - start)
        x_T = torch.randn((n, in_ch, size, size), generator=g, device=device)
        chunks.append(to_uint8(sample(eps_fn, sched, x_T, timesteps, args.sampler, args.eta, g)))
        print(f"sampled {start + n}/{args.num_samples} ({args.sampler}, {len(timesteps)} steps)", flush=True)
    images = torch.cat(chunks)
    metrics.update(sampler=args.sampler, sampling_steps=len(timesteps), eta=args.eta if args.sampler == "ddim" else None,
                   num_samples=len(images), sample_seconds=round(time.time() - t1, 1),
                   samples_per_second=round(len(images) / (time.time() - t1), 2))
    make_grid(images[:25], nrow=5).save(os.path.join(args.out, "grid.png"))
    save_samples(images, os.path.join(args.out, "samples"), os.path.join(args.out, "samples.zip"))
    if args.fid:
        metrics.update(compute_fid(args, images, device) or {"fid": None})
    metrics.update(total_seconds=round(time.time() - t0, 1), args=vars(args))
    write_metrics(os.path.join(args.out, "metrics.json"), metrics)
    print(f"wrote {args.out}: grid.png, process.png, process.gif, samples/ and samples.zip ({len(images)} images), "
          f"loss.png, metrics.json", flush=True)


if __name__ == "__main__":
    main()
