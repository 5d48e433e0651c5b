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
  training          L_simple = E_{t, x_0, eps} || eps - eps_theta(x_t, t) ||^2   (Algorithm 1: diffusion_loss, train)
  posterior         q(x_{t-1} | x_t, x_0) = N(mu_t, beta~_t I),
                    mu_t = [beta_t sqrt(abar_{t-1}) / (1 - abar_t)] x_0
                           + [(1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)] x_t,
                    beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)                               (NoiseSchedule)
  sampling          x_0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)                (predict_x0)
                    x_{t-1} = mu_t(x_t, x_0_hat) + sqrt(beta~_t) z                   (Algorithm 2: ddpm_step)
  DDIM (Song et al. 2021, eq. 12), over a sub-sequence of steps t > t', 0 <= eta <= 1:
                    x_{t'} = sqrt(abar_{t'}) x_0_hat + sqrt(1 - abar_{t'} - sigma^2) eps_theta + sigma z,
                    sigma = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'})   (ddim_step)
  With eta = 1 and t' = t - 1, sigma^2 = beta~_t and the DDIM step is the DDPM step (a test checks this).
  fusion            x_t = (1 - lam) q_sample(x_A, t, eps) + lam q_sample(x_B, t, eps), then Algorithm 2 from t  (fuse)

Commands
--------
  python ddpm_mnist.py --epochs 30                      # the homework on a GPU: train, 10k DDIM-50 samples, FID
  python ddpm_mnist.py --preset cpu                     # the same sized for a 2-core CPU (about an hour)
  python ddpm_mnist.py --dataset folder --data-dir anime_faces --image-size 64 --epochs 50 --out runs/anime
  python ddpm_mnist.py --dataset folder --data-dir cat_faces --out runs/cats --fuse a.png b.png --lam 0.5 --fuse-t 500
  python ddpm_mnist.py --sample-only --sampler ddpm     # resample from runs/ddpm_mnist/ckpt.pt with all T DDPM steps
  torchrun --nproc_per_node 4 ddpm_mnist.py --epochs 30   # several GPUs: each GPU a share of every batch

On a GPU the network computes in bf16 where the GPU has native bf16, else in fp16 with a gradient scaler (T4, V100);
on a CPU in float32 (plumbing.Precision: printed, and kept in metrics.json). A checkpoint is written at an epoch's
end if the last is a minute old, at the end, and on Ctrl-C; --compile uses CUDA graphs for training on one GPU.
"""

import argparse
import copy
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import plumbing

SCRIPT = "ddpm_mnist"  # written into every checkpoint, so that another script's checkpoint is recognised
# The default sampler: DDIM (eta 0) with this many of the T steps, chosen by measurement (benchmarks/samplers.py; the
# table is in benchmarks/RESULTS.md). --sampler ddpm takes all T.
DDIM_STEPS = 50
PRESETS = {  # a preset changes defaults only: `--preset cpu --epochs 2` trains 2 epochs
    "cpu": dict(device="cpu", ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_res=7, dropout=0.0, epochs=6,
                batch_size=64, lr=2e-3, lr_decay="cosine", warmup=200, ema_decay=0.999, sampler="ddim", steps=20,
                eta=0.0, sample_batch_size=500, fid_ref_limit=10000, out="runs/cpu_mnist"),
}
# The flags that define a training run: --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("dataset", "data_dir", "image_size", "limit", "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout",
            "timesteps", "schedule", "batch_size", "lr", "lr_decay", "warmup", "ema_decay", "seed")
DELIBERATELY_DIFFERENT = {
    "train": "unconditional: batches of images without labels (cfg_afhq.py and cond_iclevr.py add them)",
}


# ---- flags ------------------------------------------------------------------------------------------------------
def build_parser():
    p = plumbing.FlagParser(description="DDPM on MNIST or a folder of images (see the module docstring).",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default=None, help="cpu: sized for a 2-core CPU")
    a("--dataset", choices=["mnist", "folder"], default="mnist", help="mnist (28x28 grey) or folder (any images, RGB)")
    a("--data-dir", default="./data", help="MNIST root (holds MNIST/raw; downloaded if missing) or the image folder")
    a("--image-size", type=int, default=64, help="side of the square images for --dataset folder")
    a("--limit", type=int, default=None, help="train on the first N images only")
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
    a("--ema-decay", type=float, default=0.999, help="decay of the weights' moving average (0: none)")
    a("--seed", type=int, default=0, help="seeds the training and the sampling (with --sample-only: the sampling)")
    a("--num-samples", type=int, default=10000, help="images written to OUT/samples (0: none)")
    a("--sample-batch-size", type=int, default=1000, help="images denoised at once")
    a("--sampler", choices=["ddim", "ddpm"], default="ddim", help="DDIM (--steps of the T) or ancestral DDPM (all T)")
    a("--steps", type=int, default=None, help=f"DDIM steps (default {DDIM_STEPS}, at most T)")
    a("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like noise")
    a("--fuse", nargs="+", default=None, metavar="IMG", help="fuse two images A B, or a folder's images in pairs")
    a("--lam", type=float, default=0.5, help="fusion weight: (1 - lam) * A + lam * B")
    a("--fuse-t", type=int, nargs="+", default=None, metavar="T",
      help="noise both images to step t (default T/2), or to a random t in [LO, HI) per pair with two numbers")
    plumbing.add_run_flags(p, out="runs/ddpm_mnist")
    return p


def parse_args(argv=None):
    args = plumbing.parse_with_preset(build_parser(), PRESETS, argv)
    if args.ch_mult is None:
        args.ch_mult = [1, 2, 2] if (28 if args.dataset == "mnist" else args.image_size) <= 32 else [1, 2, 2, 2]
    check_args(args)
    return args


def check_args(args):
    """The flags a student may get wrong, before anything is read or written (again with a checkpoint's values)."""
    fuse_t = args.fuse_t or [args.timesteps // 2]
    plumbing.check(
        *plumbing.run_flag_problems(args), plumbing.at_least("--timesteps", args.timesteps, 2),
        plumbing.between("--steps", args.steps, 1, args.timesteps), plumbing.between("--eta", args.eta, 0, 1),
        plumbing.must(args.steps is None or args.sampler == "ddim", "--steps applies to --sampler ddim only"),
        plumbing.between("--lam", args.lam, 0, 1),
        plumbing.must(len(fuse_t) <= 2 and 0 <= fuse_t[0] < args.timesteps and fuse_t[0] <= fuse_t[-1] <= args.timesteps
                      and (len(fuse_t) == 1 or fuse_t[0] < fuse_t[1]),
                      f"--fuse-t must be a step in [0, {args.timesteps - 1}] or a range LO < HI, got {fuse_t}"),
        plumbing.must(args.dataset == "mnist" or args.sample_only or args.fuse or os.path.isdir(args.data_dir),
                      f"--data-dir {args.data_dir} is not a folder of images"),
        plumbing.must(args.fuse is None or os.path.isfile(args.ckpt), f"checkpoint {args.ckpt} not found"),
        plumbing.must(args.fuse is None or len(args.fuse) == 2 or os.path.isdir(args.fuse[0]),
                      "--fuse takes two images or one folder of images"),
        *[plumbing.must(os.path.exists(path), f"--fuse input {path} does not exist") for path in args.fuse or []],
    )


# ---- data: every training image as one uint8 tensor N x C x H x W, kept on the training device -------------------
def load_training_images(args, limit):
    """MNIST's training digits (N x 1 x 28 x 28), or the folder's images (N x 3 x S x S), the first limit of them."""
    if args.dataset == "mnist":
        return plumbing.load_mnist(args.data_dir, limit)
    return plumbing.load_image_folder(args.data_dir, args.image_size, limit)


def to_model_input(images, flip):
    """uint8 images -> floats in [-1, 1], each mirrored with probability 1/2 if flip."""
    x = images.float() / 127.5 - 1
    if flip:
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
    return x


# ---- noise schedule: every per-step constant, computed once in float64 -------------------------------------------
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


# ---- model: a UNet that predicts the noise eps_theta(x_t, t) -----------------------------------------------------
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
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))  # halves the side
                skip_chs.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, self.emb_dim, dropout, attention=True),
                                  ResBlock(cur, cur, self.emb_dim, dropout)])
        # Decoder: one more block per level than the encoder, each eating one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                block = ResBlock(cur + skip_chs.pop(), ch * mult, self.emb_dim, dropout, attention=level in attn_levels)
                self.up.append(block)
                cur = ch * mult
            if level > 0:
                self.up.append(nn.Conv2d(cur, cur, 3, padding=1))  # after doubling the side (forward)
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
            else:  # up to the skip connection's size (7 -> 4 -> 7 needs a size, not a factor of 2)
                h = layer(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def build_model(args, in_ch):
    """The UNet, with self-attention at the levels whose feature maps are --attn-res pixels or smaller."""
    sides = [28 if args.dataset == "mnist" else args.image_size]
    for _ in args.ch_mult[1:]:
        sides.append((sides[-1] + 1) // 2)  # a stride-2 convolution with padding 1 rounds up: 28, 14, 7
    levels = [level for level, side in enumerate(sides) if side <= args.attn_res]
    return UNet(in_ch, args.ch, args.ch_mult, args.num_res_blocks, levels, args.dropout)


# ---- diffusion maths ----------------------------------------------------------------------------------------------
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


def make_eps_fn(model, amp):
    """The model as eps_fn(x, t), float32 out, under amp's autocast (a plumbing.Precision: bf16, fp16 or float32)."""
    def eps_fn(x, t):
        with amp.autocast():
            return model(x, t).float()
    return eps_fn


def progress_samples(model, sched, shape, seed, device):
    """16 samples from the same noise after every epoch (DDIM, 20 steps), so a student sees the model learn. Its
    own generator leaves the training's random state alone."""
    g = torch.Generator(device).manual_seed(seed)
    x_T = torch.randn((16, *shape), generator=g, device=device)
    eps_fn = make_eps_fn(model, plumbing.Precision(device, "float32"))
    return sample(eps_fn, sched, x_T, sampling_timesteps(sched.T, min(20, sched.T)), "ddim", 0.0, g)


def generate(eps_fn, sched, n, shape, timesteps, args, device):
    """n samples as uint8 RGB, --sample-batch-size at a time, each batch from its own generator."""
    def draw(count, g):
        x_T = torch.randn((count, *shape), generator=g, device=device)
        return plumbing.to_uint8(sample(eps_fn, sched, x_T, timesteps, args.sampler, args.eta, g))
    return plumbing.sample_in_batches(draw, n, args.sample_batch_size, args.seed, device)


def fuse(args, eps_fn, sched, in_ch, size, device):
    """Noise A and B to step t with the same eps, mix (1 - lam) x_A + lam x_B, and denoise from t (DDPM).
    t is --fuse-t, or drawn per pair from [LO, HI). Returns the images A, B, the fused ones and each pair's t."""
    a, b = (to_model_input(x.to(device), flip=False) for x in plumbing.load_pairs(args.fuse, size, in_ch))
    g = torch.Generator(device).manual_seed(args.seed)
    fuse_t = args.fuse_t or [args.timesteps // 2]
    low, high = fuse_t if len(fuse_t) == 2 else (fuse_t[0], fuse_t[0] + 1)
    ts = torch.randint(low, high, (len(a),), generator=g, device=device)
    noise = torch.randn(a.shape, generator=g, device=device)  # shared by A and B: the mix keeps step t's variance
    x_t = (1 - args.lam) * q_sample(sched, a, ts, noise) + args.lam * q_sample(sched, b, ts, noise)
    fused = torch.empty_like(x_t)
    for t in ts.unique().tolist():  # the pairs noised to the same step share one chain
        pick = ts == t
        fused[pick] = sample(eps_fn, sched, x_t[pick], list(range(t + 1)), "ddpm", generator=g)
    return plumbing.to_uint8(a), plumbing.to_uint8(b), plumbing.to_uint8(fused), ts.tolist()


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


def train(args, data, model, ema, optimizer, sched, state, amp):
    """Algorithm 1: repeat { x_0 ~ data, t ~ Uniform({0..T-1}), eps ~ N(0, I); step on ||eps - eps_theta(x_t, t)||^2 }.
    The run's state is its step: the epoch and the batch follow by divmod, and each epoch's order comes from the seed
    and the epoch, so a resumed run is the same run. Under torchrun every process draws the whole batch's randomness,
    computes the loss on its share, and DistributedDataParallel averages the gradients. amp: the number format
    (plumbing.Precision; its scaler does nothing unless fp16)."""
    bs, device = min(args.batch_size, len(data)), data.device  # a data set smaller than a batch: all of it
    steps_per_epoch = len(data) // bs  # whole batches only: every step has the same shape
    total = args.iters or args.epochs * steps_per_epoch
    net = plumbing.parallel_model(model, args)
    progress = plumbing.Progress(state, total, steps_per_epoch, bs)
    model.train()
    with plumbing.CtrlC() as ctrl_c:
        while state["step"] < total:
            epoch, i = divmod(state["step"], steps_per_epoch)
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            x0 = to_model_input(data[order[i * bs:(i + 1) * bs].to(device)], flip=args.dataset == "folder")
            t = torch.randint(0, sched.T, (bs,), device=device)
            noise = torch.randn_like(x0)
            optimizer.param_groups[0]["lr"] = learning_rate(args, state["step"], total)
            with amp.autocast():
                loss = diffusion_loss(net, sched, plumbing.my_share(x0), plumbing.my_share(t), plumbing.my_share(noise))
            optimizer.zero_grad(set_to_none=True)
            amp.scaler.scale(loss).backward()  # fp16: the loss scaled up, so that small gradients stay above zero
            amp.scaler.unscale_(optimizer)  # the true gradients again, for the clipping
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # one bad batch cannot throw the weights far
            amp.scaler.step(optimizer)  # fp16: skipped if a gradient overflowed
            amp.scaler.update()
            ema.update()
            state["losses"]["loss"].append(plumbing.mean_over_processes(loss))
            state["step"] += 1
            progress.show(state)  # also counts the training seconds
            if state["step"] % steps_per_epoch == 0:  # an epoch ends: samples from fixed noise, to see the model learn
                images = progress_samples(ema.module, sched, data.shape[1:], args.seed, device)
                plumbing.save_progress(images, args.out, epoch + 1)
            stop = ctrl_c.stop_requested()
            if progress.checkpoint_due(state, stop):  # at the end, on Ctrl-C, at an epoch's end once a minute
                plumbing.save_run(args, SCRIPT, state, stop, model=model, ema=ema, optimizer=optimizer,
                                  scaler=amp.scaler)


# ---- the homework: train, then write every deliverable -----------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    plumbing.start_distributed(args)
    if args.device == "cpu" and args.preset is None and not (args.sample_only or args.fuse):
        plumbing.say("note: these defaults are sized for a GPU (hours on a CPU); on a CPU run --preset cpu instead")
    saved = None
    if args.resume or args.sample_only or args.fuse:
        saved = plumbing.load_run(args, SCRIPT, RUN_KEYS, parse_args([]))
        check_args(args)  # again: the checkpoint's T bounds --steps and --fuse-t
    fid_stats = args.fid_stats or plumbing.training_set_stats(args)
    inception = plumbing.prepare_fid(args, fid_stats) if args.fid and args.num_samples and not args.fuse else None
    device = torch.device(args.device)
    data = None if args.sample_only or args.fuse else load_training_images(args, args.limit).to(device)
    plumbing.make_out_folder(args.out)

    torch.manual_seed(args.seed)
    in_ch, size = (1, 28) if args.dataset == "mnist" else (3, args.image_size)
    sched = NoiseSchedule(make_betas(args.schedule, args.timesteps)).to(device)
    model = build_model(args, in_ch).to(device)
    ema = EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    amp = plumbing.Precision(device)  # bf16, or fp16 with a gradient scaler on GPUs without bf16, float32 on a CPU
    state = {"step": 0, "seconds": 0.0, "losses": {"loss": []}}
    if saved is not None:
        plumbing.restore_run(saved, args, state, model=model, ema=ema, optimizer=optimizer, scaler=amp.scaler)
    plumbing.say(f"UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}, {amp.name}")
    if args.fuse:
        return plumbing.write_fusion(args, *fuse(args, make_eps_fn(ema.module, amp), sched, in_ch, size, device))

    metrics = {"device": plumbing.device_name(device), "torch": torch.__version__, "processes": plumbing.world_size(),
               "precision": amp.name}
    if not args.sample_only:
        train(args, data, model, ema, optimizer, sched, state, amp)
        plumbing.write_loss(args.out, state["losses"], f"DDPM training loss ({args.dataset}, batch {args.batch_size})")
        metrics.update(train_seconds=round(state["seconds"], 1), steps=state["step"])
    steps = args.timesteps if args.sampler == "ddpm" else args.steps or min(DDIM_STEPS, args.timesteps)
    timesteps = sampling_timesteps(args.timesteps, steps)
    start = time.time()
    if args.num_samples:
        g = torch.Generator(device).manual_seed(args.seed)
        x_T = torch.randn((8, in_ch, size, size), generator=g, device=device)
        _, frames = sample(make_eps_fn(ema.module, amp), sched, x_T, timesteps, args.sampler, args.eta, g, record=56)
        network = torch.compile(ema.module) if args.compile else ema.module  # the 8 above are not worth compiling
        images = generate(make_eps_fn(network, amp), sched, args.num_samples, x_T.shape[1:], timesteps, args, device)
    if not plumbing.leave_distributed():
        return None  # under torchrun the other processes stop here: process 0 writes and grades
    if args.num_samples:
        plumbing.write_samples(args.out, images, frames)  # 56 frames + noise: 8 columns of 8 samples in process.png
        metrics.update(sampler=args.sampler, sampling_steps=len(timesteps), eta=args.eta, num_samples=len(images),
                       sample_seconds=round(time.time() - start, 1))
    if args.num_samples and inception is not None:
        reference = lambda: load_training_images(args, args.fid_ref_limit)  # noqa: E731 (read only if not cached)
        metrics.update(plumbing.compute_fid(images, inception, fid_stats, reference, device))
    plumbing.write_metrics(os.path.join(args.out, "metrics.json"), {**metrics, "args": vars(args)})
    plumbing.save_as(args)
    plumbing.say(f"wrote {args.out}: ckpt.pt, loss.png, grid.png, process.png, samples/, samples.zip, metrics.json")
    return metrics


if __name__ == "__main__":
    main()
