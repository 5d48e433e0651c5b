"""Classifier-free guidance on AFHQ 64x64 (cat, dog, wild) or any class folders: FID per guidance scale.

The homework
------------
Train one UNet both as a class-conditional and as an unconditional noise predictor (Ho & Salimans 2021) by replacing
the class label with a null label with probability 0.1, sample with classifier-free guidance, and hand in
  * 500 samples per guidance scale, classes balanced, graded by FID at w = 0 and w = 7.5 against the AFHQ validation
    images at 64x64 (full marks below 30 at both scales);
  * a grid per scale with a row per class, and 32 samples per scale (handin_w*/).

The maths, in the paper's notation (t runs over {0, ..., T-1} in the code; the paper's t = code's t + 1)
------------------------------------------------------------------------------------------------------
  labels            c in {1, ..., K}, the class folders in sorted order; c = 0 is the null label (no class)
  forward process   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)                 (q_sample)
  training          c~ = 0 with probability p_uncond (--cfg-dropout 0.1), else c                  (drop_labels)
                    L = E_{t, (x_0, c), eps} || eps - eps_theta(x_t, t, c~) ||^2   (Ho & Salimans, Algorithm 1: train)
                    so one network learns both eps_theta(x_t, t, c) and the unconditional eps_theta(x_t, t, 0)
  guidance          eps~ = (1 + w) eps_theta(x_t, t, c) - w eps_theta(x_t, t, 0)               (eq. 6: guided_eps)
                    w = 0 is the conditional model, w = -1 the unconditional one; a larger w gives samples more
                    typical of their class and less varied. Both predictions come from one forward pass over the
                    doubled batch [x_t; x_t] with labels [c; 0]                               (make_cfg_eps_fn)
  sampling          eps~ in place of eps_theta in DDPM's Algorithm 2 (ddpm_step) or in DDIM (ddim_step)
  The KAIST course applies the formula only to scales above 1 and samples without the label at 1 or less: its
  "scale 0.0 (no CFG)" is our w = -1, its 7.5 our 7.5. --preset course samples at both (handin_w-1/, handin_w7.5/).

Commands
--------
  python cfg_afhq.py --data-dir afhq --prepare-eval   # the homework on a GPU: train, 500 samples at w = 0 and 7.5, FID
  python cfg_afhq.py --preset course --data-dir afhq --prepare-eval   # the course's fixed UNet and 100,000 steps
  python cfg_afhq.py --data-dir afhq --sample-only --cfg-scales 0 1 3 7.5 --sampler ddim --steps 100
  python benchmarks/cfg_mnist_classes.py --preset cpu   # --preset cpu on MNIST as ten class folders (a 2-core CPU)
  torchrun --nproc_per_node 4 cfg_afhq.py --data-dir afhq --prepare-eval   # several GPUs: each a share of every batch

On a GPU the network computes in bf16 where the GPU has native bf16, else in fp16 with a gradient scaler (T4, V100);
on a CPU in float32 (plumbing.Precision: printed, and kept in metrics.json). A checkpoint is written at an epoch's
end if the last is a minute old, at the end, and on Ctrl-C; --compile uses CUDA graphs for training on one GPU.
"""

import argparse
import copy
import math
import os
import shutil
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import plumbing

SCRIPT = "cfg_afhq"  # written into every checkpoint, so that another script's checkpoint is recognised
PRESETS = {  # a preset changes defaults only: `--preset cpu --epochs 2` trains 2 epochs
    "cpu": dict(device="cpu", image_size=28, channels=1, flip=False, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1,
                attn_res=7, dropout=0.0, max_per_class=3000, epochs=8, batch_size=64, lr=6e-3, lr_decay="cosine",
                warmup=200, ema_decay=0.999, schedule="cosine", sampler="ddim", steps=50, eta=1, sample_batch_size=250),
    "course": dict(ch=128, ch_mult=[1, 2, 2, 2], attn_levels=[1], num_res_blocks=4, dropout=0.1, batch_size=16, lr=2e-4,
                   warmup=200, iters=100000, max_per_class=3000, ema_decay=0.0, cfg_scales=[-1.0, 7.5], sampler="ddpm"),
}
# The flags that define a training run: --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("data_dir", "classes", "image_size", "channels", "max_per_class", "flip", "ch", "ch_mult", "num_res_blocks",
            "attn_res", "attn_levels", "dropout", "timesteps", "schedule", "label_dropout", "batch_size", "lr",
            "lr_decay", "warmup", "ema_decay", "seed")
NULL_LABEL = 0  # "no class": the label the unconditional model sees; the classes are 1..K
DELIBERATELY_DIFFERENT = {
    "build_model": "the UNet with a class embedding (and --attn-levels)",
    "train": "each batch with its labels, some of them dropped (--cfg-dropout)",
}


# ---- flags ------------------------------------------------------------------------------------------------------
def build_parser():
    p = plumbing.FlagParser(description="Classifier-free guidance on folders of classes (see the module docstring).",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default=None, help="cpu: sized for a 2-core CPU; course: KAIST's settings")
    a("--data-dir", default="./data/afhq", help="AFHQ's layout (DIR/train/CLASS, DIR/val/CLASS) or DIR/CLASS/*")
    a("--image-size", type=int, default=64, help="side of the square images")
    a("--max-per-class", type=int, default=3000, help="train on the first N images of each class (0: all)")
    a("--flip", action=argparse.BooleanOptionalAction, default=True, help="random mirroring (off for digits)")
    a("--channels", type=int, choices=[1, 3], default=3, help="1: grey images (e.g. digits), a one-channel model")
    a("--ch", type=int, default=128, help="base channel width of the UNet")
    a("--ch-mult", type=int, nargs="+", default=None, help="width per resolution (default 1 2 2; 1 2 2 2 above 32 px)")
    a("--num-res-blocks", type=int, default=2, help="residual blocks per resolution")
    a("--attn-res", type=int, default=16, help="self-attention on feature maps of this side or smaller")
    a("--attn-levels", type=int, nargs="+", default=None, help="self-attention at these levels instead (0 = full size)")
    a("--dropout", type=float, default=0.1, help="dropout inside the residual blocks")
    a("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    a("--schedule", choices=["linear", "cosine"], default="linear", help="linear 1e-4 -> 0.02, or cosine")
    a("--cfg-dropout", dest="label_dropout", type=float, default=0.1, help="p_uncond: a label's chance to become null")
    a("--epochs", type=int, default=400, help="passes over the training images")
    a("--iters", type=int, default=None, help="stop after this many optimiser steps instead (overrides --epochs)")
    a("--batch-size", type=int, default=64, help="images per optimiser step (all GPUs together under torchrun)")
    a("--lr", type=float, default=2e-4, help="AdamW learning rate after warm-up")
    a("--lr-decay", choices=["constant", "cosine"], default="constant", help="after warm-up: keep it, or decay to 0")
    a("--warmup", type=int, default=500, help="linear learning-rate warm-up, in steps")
    a("--ema-decay", type=float, default=0.9995, help="decay of the weights' moving average (0: none)")
    a("--seed", type=int, default=0, help="seeds the training and the sampling (with --sample-only: the sampling)")
    a("--cfg-scales", type=float, nargs="+", default=[0.0, 7.5], help="scales w (0: conditional, -1: unconditional)")
    a("--num-samples", type=int, default=500, help="images per guidance scale, classes balanced (0: none)")
    a("--sample-batch-size", type=int, default=500, help="images denoised at once")
    a("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="ancestral DDPM (all T steps) or DDIM")
    a("--steps", type=int, default=None, help="DDIM steps (default: all T)")
    a("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like noise")
    a("--handin-images", type=int, default=32, help="samples per scale copied to handin_w*/, classes in turn")
    a("--prepare-eval", action="store_true", help="compute FID's reference statistics from DIR/val (once)")
    plumbing.add_run_flags(p, out="runs/cfg_afhq")
    return p


def parse_args(argv=None):
    args = plumbing.parse_with_preset(build_parser(), PRESETS, argv)
    if args.ch_mult is None:
        args.ch_mult = [1, 2, 2] if args.image_size <= 32 else [1, 2, 2, 2]
    args.classes = None  # the class folders' names, read from --data-dir (or from the checkpoint)
    check_args(args)
    return args


def check_args(args):
    """The flags a student may get wrong, before anything is read or written (again with a checkpoint's values)."""
    plumbing.check(
        *plumbing.run_flag_problems(args), plumbing.at_least("--timesteps", args.timesteps, 2),
        plumbing.between("--steps", args.steps, 1, args.timesteps), plumbing.between("--eta", args.eta, 0, 1),
        plumbing.must(args.steps is None or args.sampler == "ddim", "--steps applies to --sampler ddim only"),
        plumbing.must(args.label_dropout > 0 or not args.num_samples or set(args.cfg_scales) == {0},
                      "--cfg-scales other than 0 need the unconditional model, which --cfg-dropout 0 does not train"),
        plumbing.must(not args.classes or not args.num_samples or args.num_samples >= len(args.classes),
                      f"--num-samples {args.num_samples} leaves some of the classes {args.classes} without a sample"),
    )


# ---- data: every training image as one uint8 tensor N x C x H x W, kept on the training device -------------------
def find_class_folders(data_dir, split):
    """{class name: sorted image files}, classes sorted: AFHQ's DIR/SPLIT/CLASS/, or DIR/CLASS/ without DIR/train."""
    root = os.path.join(data_dir, split) if split == "val" or os.path.isdir(os.path.join(data_dir, split)) else data_dir
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    files = {name: plumbing.list_images(os.path.join(root, name)) for name in names}
    empty = [name for name, paths in files.items() if not paths]
    plumbing.check(plumbing.must(files and not empty, f"{root} must hold a folder of images per class, empty: {empty}"))
    return files


def load_class_images(files, args, max_per_class):
    """uint8 images N x C x S x S (C = --channels) and int64 labels N: the k-th class gets label k."""
    images, labels = [], []
    for label, (name, paths) in enumerate(files.items(), start=1):
        paths = paths[:max_per_class or None]
        plumbing.say(f"reading {len(paths)} images of class {label} ({name}) at {args.image_size} px ...")
        images += [plumbing.load_image(p, args.image_size, "RGB" if args.channels == 3 else "L") for p in paths]
        labels += [label] * len(paths)
    return torch.stack(images), torch.tensor(labels)


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


class ClassConditionalUNet(nn.Module):
    """eps_theta(x_t, t, c): the UNet with a learned vector per label (row 0: null) added to its time embedding."""

    def __init__(self, unet, num_classes):
        super().__init__()
        self.unet = unet
        self.class_emb = nn.Embedding(num_classes + 1, unet.emb_dim)

    def forward(self, x, t, y):
        return self.unet(x, t, extra_emb=self.class_emb(y))


def build_model(args):
    """The UNet with a class embedding, self-attention at --attn-levels or on feature maps of --attn-res px or less."""
    sides = [math.ceil(args.image_size / 2 ** level) for level in range(len(args.ch_mult))]  # stride 2 rounds up
    levels = args.attn_levels or [level for level, side in enumerate(sides) if side <= args.attn_res]
    unet = UNet(args.channels, args.ch, args.ch_mult, args.num_res_blocks, levels, args.dropout)
    return ClassConditionalUNet(unet, len(args.classes))


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


def drop_labels(labels, p):
    """Each label becomes the null label with probability p, so that the network also learns eps_theta(x_t, t, 0)."""
    return torch.where(torch.rand(len(labels), device=labels.device) < p, NULL_LABEL, labels)


def guided_eps(eps_cond, eps_uncond, w):
    """Classifier-free guidance (Ho & Salimans 2021, eq. 6): (1 + w) eps(x, c) - w eps(x)."""
    return (1 + w) * eps_cond - w * eps_uncond


def make_cfg_eps_fn(model, labels, w, amp):
    """The guided noise for fixed labels as eps_fn(x, t), float32 out, under amp's autocast (a plumbing.Precision).
    Both predictions come from one forward pass over the doubled batch [x_t; x_t] with labels [c; 0]."""
    def eps_fn(x, t):
        null = torch.full_like(labels, NULL_LABEL)
        with amp.autocast():
            if w in (0, -1):  # one half is multiplied by 0: the conditional (w = 0) or unconditional model alone
                return model(x, t, labels if w == 0 else null).float()
            eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float()
        eps_cond, eps_uncond = eps.chunk(2)
        return guided_eps(eps_cond, eps_uncond, w)
    return eps_fn


def class_progress_samples(model, sched, shape, num_classes, seed, device):
    """16 samples (classes in turn, w = 0) from the same noise after every epoch (DDIM, 20 steps), to see it learn. Its
    own generator leaves the training's random state alone."""
    g = torch.Generator(device).manual_seed(seed)
    x_T = torch.randn((16, *shape), generator=g, device=device)
    labels = torch.arange(16, device=device) % num_classes + 1
    eps_fn = make_cfg_eps_fn(model, labels, 0.0, plumbing.Precision(device, "float32"))
    return sample(eps_fn, sched, x_T, sampling_timesteps(sched.T, min(20, sched.T)), "ddim", 0.0, g)


def balanced_labels(n, num_classes):
    """n labels in 1..K grouped by class, as equal as possible: sample i gets label floor(i K / n) + 1."""
    return torch.arange(n) * num_classes // n + 1


def sample_at_scale(model, sched, labels, w, timesteps, args, device, amp):
    """uint8 samples for labels (grouped by class, as balanced_labels gives them) at guidance scale w, a class at a
    time. The noise depends on the seed and the class, not on w: sample i starts from the same x_T at every scale."""
    def draw(count, g):  # count samples of the class `label` (the loop below)
        x_T = torch.randn((count, args.channels, args.image_size, args.image_size), generator=g, device=device)
        eps_fn = make_cfg_eps_fn(model, torch.full((count,), label, device=device), w, amp)
        return plumbing.to_uint8(sample(eps_fn, sched, x_T, timesteps, args.sampler, args.eta, g))
    per_class = []
    for label in labels.unique().tolist():
        n = (labels == label).sum().item()
        per_class.append(plumbing.sample_in_batches(draw, n, args.sample_batch_size, args.seed * 1000 + label, device))
    return torch.cat(per_class) if plumbing.rank() == 0 else None


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


def train(args, data, labels, model, ema, optimizer, sched, state, amp):
    """Ho & Salimans' Algorithm 1: repeat { (x_0, c) ~ data, c <- 0 with probability p_uncond, t ~ Uniform({0..T-1}),
    eps ~ N(0, I); step on ||eps - eps_theta(x_t, t, c)||^2 }.

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
            batch = order[i * bs:(i + 1) * bs].to(device)
            x0 = to_model_input(data[batch], args.flip)
            y = drop_labels(labels[batch], args.label_dropout)
            t = torch.randint(0, sched.T, (bs,), device=device)
            noise = torch.randn_like(x0)
            optimizer.param_groups[0]["lr"] = learning_rate(args, state["step"], total)
            with amp.autocast():
                loss = diffusion_loss(net, sched, plumbing.my_share(x0), plumbing.my_share(t), plumbing.my_share(noise),
                                      y=plumbing.my_share(y))
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
                images = class_progress_samples(ema.module, sched, data.shape[1:], len(args.classes), args.seed, device)
                plumbing.save_progress(images, args.out, epoch + 1)
            stop = ctrl_c.stop_requested()
            if progress.checkpoint_due(state, stop):  # at the end, on Ctrl-C, at an epoch's end once a minute
                plumbing.save_run(args, SCRIPT, state, stop, model=model, ema=ema, optimizer=optimizer,
                                  scaler=amp.scaler)


# ---- the homework: train, then write every deliverable -----------------------------------------------------------
def classes_in_turn(images, labels):
    """The samples reordered to take the classes in turn (cat, dog, wild, cat, ...)."""
    place_in_class = torch.arange(len(labels)) - torch.searchsorted(labels, labels)  # labels are sorted
    return images[torch.argsort(place_in_class, stable=True)]


def write_scale_outputs(args, images_by_scale, labels):
    """Per scale w: samples_w{w}/CLASS/*.png, handin_w{w}/ and .zip (--handin-images, classes in turn), grid_w{w}.png (a
    row per class); grid_scales.png, a row per scale, a column per starting noise. The old metrics.json goes first."""
    plumbing.remove_old_metrics(args.out)
    m = min(8, args.num_samples // len(args.classes))
    for w, images in images_by_scale.items():
        folder = os.path.join(args.out, f"samples_w{w:g}")
        shutil.rmtree(folder, ignore_errors=True)  # the previous run's set goes first: two runs never mix
        for label, name in enumerate(args.classes, start=1):  # samples_w{w}/CLASS/: reads back like the training data
            os.makedirs(os.path.join(folder, name))
            for i, image in enumerate(images[labels == label], start=1):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, name, f"{i:05d}.png"))
        folder = os.path.join(args.out, f"handin_w{w:g}")
        plumbing.save_samples(classes_in_turn(images, labels)[:args.handin_images], folder, folder + ".zip")
        rows = torch.cat([images[labels == label][:m] for label in labels.unique()])
        plumbing.make_grid(rows, nrow=m).save(os.path.join(args.out, f"grid_w{w:g}.png"))
    rows = torch.cat([classes_in_turn(images, labels)[:8] for images in images_by_scale.values()])
    plumbing.make_grid(rows, nrow=min(8, args.num_samples)).save(os.path.join(args.out, "grid_scales.png"))


def fid_reference(args):
    """FID's reference statistics: --fid-stats, or those of the validation images DIR/val/CLASS/ resized as the
    training images are, computed once (--prepare-eval) into fid_stats_<data>_val_<size>px.npz beside --out."""
    name = f"fid_stats_{os.path.basename(os.path.abspath(args.data_dir))}_val_{args.image_size}px.npz"
    stats = args.fid_stats or os.path.join(os.path.dirname(os.path.abspath(args.out)), name)
    if not os.path.isfile(stats):
        plumbing.check(plumbing.must(args.prepare_eval, f"FID needs {stats}: add --prepare-eval (computes it from "
                                                        f"{args.data_dir}/val), or pass --fid-stats or --no-fid"))
        find_class_folders(args.data_dir, "val")  # stops here if DIR/val/CLASS/ is missing
    return stats


def fid_per_scale(args, images_by_scale, inception, stats, device):
    """{w: the FID of that scale's samples, N and the reference}."""
    validation = lambda: load_class_images(find_class_folders(args.data_dir, "val"), args, None)[0]  # noqa: E731
    scores = {}
    for w, images in images_by_scale.items():
        plumbing.say(f"w = {w:g}:")
        scores[f"{w:g}"] = plumbing.compute_fid(images, inception, stats, validation, device)
    return scores


def main(argv=None):
    args = parse_args(argv)
    plumbing.start_distributed(args)
    if args.device == "cpu" and args.preset is None and not args.sample_only:
        plumbing.say("note: these defaults are sized for a GPU (days on a CPU); on a CPU run --preset cpu instead")
    saved = None
    if args.resume or args.sample_only:
        saved = plumbing.load_run(args, SCRIPT, RUN_KEYS, parse_args([]))
    files = None if args.sample_only else find_class_folders(args.data_dir, "train")
    args.classes = list(files) if files else args.classes
    check_args(args)  # again: the checkpoint's T bounds --steps; its classes and label dropout bound the sampling
    fid_stats = fid_reference(args) if args.fid and args.num_samples else None
    inception = plumbing.prepare_fid(args, fid_stats) if fid_stats else None
    device = torch.device(args.device)
    data, labels = load_class_images(files, args, args.max_per_class) if files else (None, None)
    plumbing.make_out_folder(args.out)

    torch.manual_seed(args.seed)
    sched = NoiseSchedule(make_betas(args.schedule, args.timesteps)).to(device)
    model = build_model(args).to(device)
    ema = EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    amp = plumbing.Precision(device)  # bf16, or fp16 with a gradient scaler on GPUs without bf16, float32 on a CPU
    state = {"step": 0, "seconds": 0.0, "losses": {"loss": []}}
    if saved is not None:
        plumbing.restore_run(saved, args, state, model=model, ema=ema, optimizer=optimizer, scaler=amp.scaler)
    plumbing.say(f"UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}, {amp.name}")

    metrics = {"device": plumbing.device_name(device), "torch": torch.__version__, "processes": plumbing.world_size(),
               "precision": amp.name}
    if not args.sample_only:
        train(args, data.to(device), labels.to(device), model, ema, optimizer, sched, state, amp)
        plumbing.write_loss(args.out, state["losses"], f"CFG training loss ({args.data_dir}, batch {args.batch_size})")
        metrics.update(train_seconds=round(state["seconds"], 1), steps=state["step"])
    timesteps = sampling_timesteps(args.timesteps, args.steps or args.timesteps)
    start = time.time()
    if args.num_samples:
        labels = balanced_labels(args.num_samples, len(args.classes))
        network = torch.compile(ema.module) if args.compile else ema.module
        images = {w: sample_at_scale(network, sched, labels, w, timesteps, args, device, amp)
                  for w in args.cfg_scales}
    if not plumbing.leave_distributed():
        return None  # under torchrun the other processes stop here: process 0 writes and grades
    if args.num_samples:
        write_scale_outputs(args, images, labels)
        metrics.update(sampler=args.sampler, sampling_steps=len(timesteps), eta=args.eta, num_samples=args.num_samples,
                       sample_seconds=round(time.time() - start, 1))
    if args.num_samples and inception is not None:
        metrics["fid_per_scale"] = fid_per_scale(args, images, inception, fid_stats, device)
    plumbing.write_metrics(os.path.join(args.out, "metrics.json"), {**metrics, "args": vars(args)})
    plumbing.save_as(args)
    plumbing.say(f"wrote {args.out}: ckpt.pt, loss.png, samples_w*/, handin_w*/, grid_w*.png, grid_scales.png")
    return metrics


if __name__ == "__main__":
    main()
