"""Multi-label conditional DDPM on iCLEVR 64x64, graded by the course's pretrained evaluator.

The homework: for each of the 32 conditions (1 to 3 of 24 objects) of test.json and of new_test.json, an image holding
exactly those objects, graded by the course's ResNet18 (evaluator.py + checkpoint.pth): an image with k requested
objects answers with its k highest outputs; accuracy = hits / requested objects, full marks at 0.8. Hand in per file the
32 images and an 8-per-row grid, and the denoising process of ["red sphere", "yellow cube", "cyan cylinder"]. Renders
are squashed as Resize((64, 64)) does (a crop could cut objects off); at --image-size 32 (CPU preset) upsampled to 64.

The maths (t in {0, ..., T-1}; the DDPM pieces are ddpm_mnist.py's; y the multi-hot vector of the requested objects)
  model           eps_theta(x_t, t, y) = UNet(x_t, t, extra_emb = MLP(W y + b)); y = 0: no object   (MultiLabelUNet)
  training        L = E || eps - eps_theta(x_t, t, y') ||^2, y' = 0 with probability p_uncond, else y, so that one
                  network learns eps(x_t, t, y) and eps(x_t, t, 0) (Ho & Salimans)      (drop_conditions, train)
  classifier-free eps~ = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, 0), both in one batch; w = 0: the
  guidance        conditional model alone (--cfg-w w)                                (guided_eps, sample_conditions)
  classifier      eps^ = eps - S sqrt(1 - abar_t) grad_{x_t} log p(y | x_t) (Dhariwal & Nichol, Algorithm 2 in eps
  guidance        form), log p(y | x) = sum_j y_j logsigmoid(l_j) + (1 - y_j) logsigmoid(-l_j), l the logits of our
                  classifier at x0_hat(x_t), eps held fixed              (classifier_guided_eps, train_classifier)
  accuracy        sum_i |topk_{k_i}(scores_i) n y_i| / sum_i k_i, k_i = |y_i|                      (top_k_accuracy)

Commands
  python cond_iclevr.py --data-dir file --evaluator-dir file                    # the homework on a GPU
  python cond_iclevr.py --preset cpu --data-dir file --evaluator-dir file       # sized for a 2-core CPU
  python cond_iclevr.py --data-dir file --classifier-epochs 12 --classifier-guidance 4   # guided by our classifier
  python cond_iclevr.py --data-dir file --evaluator-dir file --eval-every 10   # OUT/accuracy.csv every 10 epochs

On a GPU the network computes in bf16 where the GPU has native bf16, else in fp16 with a gradient scaler (T4, V100);
on a CPU in float32 (plumbing.Precision: printed, and kept in metrics.json). A checkpoint is written at an epoch's
end if the last is a minute old, at the end, and on Ctrl-C; --compile uses CUDA graphs for training on one GPU.
"""

import argparse
import copy
import csv
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import numpy as np
from PIL import Image

import plumbing

SCRIPT = "cond_iclevr"  # written into every checkpoint, so that another script's checkpoint is recognised
PRESETS = {  # a preset changes defaults only: `--preset cpu --epochs 2` trains 2 epochs
    "cpu": dict(device="cpu", image_size=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_res=8, dropout=0.0,
                epochs=13, batch_size=64, lr=2e-3, lr_decay="cosine", warmup=300, ema_decay=0.999, sampler="ddim",
                steps=50, eta=1.0, cfg_w=1.0, classifier_epochs=12, classifier_guidance=4.0, num_samples=4),
}
# The flags that define a training run: --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("image_size", "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout", "timesteps", "schedule",
            "label_dropout", "batch_size", "lr", "lr_decay", "warmup", "ema_decay", "seed", "classifier_epochs")
DELIBERATELY_DIFFERENT = {"train": "conditional: multi-hot labels, our classifier saved along, grading during training"}


# ---- flags ------------------------------------------------------------------------------------------------------
def build_parser():
    p = plumbing.FlagParser(description="Multi-label conditional DDPM on iCLEVR (see the module docstring).",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default=None, help="cpu: sized for a 2-core CPU")
    a("--data-dir", default="file", help="objects.json, train.json, the test files and iclevr/ (the course's file/)")
    a("--image-size", type=int, default=64, help="side of the images the model makes (32: upsampled for grading)")
    a("--output-size", type=int, default=64, help="side of the handed-in and graded images (the evaluator takes 64)")
    a("--ch", type=int, default=128, help="base channel width of the UNet")
    a("--ch-mult", type=int, nargs="+", default=None, help="width per resolution (default 1 2 2; 1 2 2 2 above 32 px)")
    a("--num-res-blocks", type=int, default=2, help="residual blocks per resolution")
    a("--attn-res", type=int, default=16, help="self-attention on feature maps of this side or smaller")
    a("--dropout", type=float, default=0.1, help="dropout inside the residual blocks")
    a("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    a("--schedule", choices=["linear", "cosine"], default="linear", help="linear 1e-4 -> 0.02, or cosine")
    a("--label-dropout", type=float, default=0.1, help="probability of the null condition in training (for --cfg-w)")
    a("--epochs", type=int, default=200, help="passes over the training images")
    a("--iters", type=int, default=None, help="stop after this many optimiser steps instead (overrides --epochs)")
    a("--batch-size", type=int, default=128, help="images per optimiser step (all GPUs together under torchrun)")
    a("--lr", type=float, default=2e-4, help="AdamW learning rate after warm-up")
    a("--lr-decay", choices=["constant", "cosine"], default="constant", help="after warm-up: keep it, or decay to 0")
    a("--warmup", type=int, default=500, help="linear learning-rate warm-up, in steps")
    a("--ema-decay", type=float, default=0.999, help="decay of the weights' moving average (0: none)")
    a("--seed", type=int, default=0, help="seeds the training and the sampling (with --sample-only: the sampling)")
    a("--num-samples", type=int, default=1, help="sets of images per test file: the first is handed in, all graded")
    a("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="ancestral DDPM (all T steps) or DDIM")
    a("--steps", type=int, default=None, help="DDIM steps (default: all T)")
    a("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like noise")
    a("--cfg-w", type=float, default=1.0, help="classifier-free guidance weight w: 0 = the conditional model alone")
    a("--classifier-epochs", type=int, default=0, help="first train our object classifier E epochs, to guide with")
    a("--classifier-guidance", type=float, default=0.0, metavar="S", help="scale S of guidance by our classifier")
    a("--evaluator-dir", default=None, help="the folder of the course's evaluator.py + checkpoint.pth, to grade")
    a("--eval-every", type=int, default=0, help="during training, grade every K epochs into OUT/accuracy.csv")
    plumbing.add_run_flags(p, out="runs/cond_iclevr")
    p.set_defaults(fid=False)  # graded by the evaluator's accuracy, not by FID
    return p


def parse_args(argv=None):
    args = plumbing.parse_with_preset(build_parser(), PRESETS, argv)
    args.ch_mult = args.ch_mult or ([1, 2, 2] if args.image_size <= 32 else [1, 2, 2, 2])
    check_args(args)
    return args


def check_args(args):
    """The flags a student may get wrong, before anything is read or written (again with a checkpoint's values)."""
    plumbing.check(
        plumbing.at_least("--timesteps", args.timesteps, 2), plumbing.at_least("--num-samples", args.num_samples, 1),
        plumbing.between("--steps", args.steps, 1, args.timesteps), plumbing.between("--eta", args.eta, 0, 1),
        plumbing.must(args.steps is None or args.sampler == "ddim", "--steps applies to --sampler ddim only"),
        plumbing.must(not args.eval_every or args.evaluator_dir, "--eval-every needs --evaluator-dir to grade with"),
        plumbing.must(os.path.isdir(args.data_dir), f"--data-dir {args.data_dir} is not a folder"),
        plumbing.must(args.evaluator_dir is None or os.path.isfile(os.path.join(args.evaluator_dir, "evaluator.py")),
                      f"--evaluator-dir {args.evaluator_dir} holds no evaluator.py"),
        *plumbing.run_flag_problems(args))


# ---- data: the course's JSON files, checked, and every training image as uint8 N x 3 x H x W ---------------------
def read_json(args, name):
    path = os.path.join(args.data_dir, name)
    plumbing.check(plumbing.must(os.path.isfile(path), f"{path} not found (see --data-dir)"))
    with open(path) as fh:
        return json.load(fh)


def multi_hot(conditions, objects, where):
    """Lists of object names -> M x K multi-hot rows in objects.json's order; an unknown name stops the run."""
    y = torch.zeros(len(conditions), len(objects))
    for i, names in enumerate(conditions):
        for name in names:
            plumbing.check(plumbing.must(name in objects, f"{where}[{i}] names {name!r}, which is not in objects.json"))
            y[i, objects[name]] = 1
    return y


def load_iclevr_training_set(args, objects, device):
    """train.json's images as uint8 N x 3 x S x S (each render RGB and squashed, bilinear, as transforms.Resize((S, S))
    does to a PIL image) and its labels as N x K, on device."""
    train = read_json(args, "train.json")
    labels = multi_hot(list(train.values()), objects, "train.json")
    images = []
    for file in train:
        with Image.open(os.path.join(args.data_dir, "iclevr", file)) as img:
            rgb = img.convert("RGB").resize((args.image_size, args.image_size), Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(images).to(device), labels.to(device)


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


# ---- model: ddpm_mnist.py's UNet, with the multi-hot condition added to its time embedding -----------------------
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


class MultiLabelUNet(UNet):
    """eps_theta(x_t, t, y): the UNet plus an embedding of the multi-hot y added to its time embedding. The first
    Linear sums one vector per requested object (plus a bias, which alone encodes y = 0); the MLP lets them interact."""

    def __init__(self, num_objects, *unet_args):
        super().__init__(*unet_args)
        emb_dim = self.emb_dim
        self.label_mlp = nn.Sequential(nn.Linear(num_objects, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, x, t, y):
        return super().forward(x, t, extra_emb=self.label_mlp(y.float()))


def build_conditional_model(args, num_objects):
    """The UNet, with self-attention at the levels whose feature maps are --attn-res pixels or smaller."""
    # level k's feature maps have side ceil(image_size / 2^k): a stride-2 convolution with padding 1 rounds up
    levels = [k for k in range(len(args.ch_mult)) if math.ceil(args.image_size / 2 ** k) <= args.attn_res]
    return MultiLabelUNet(num_objects, 3, args.ch, args.ch_mult, args.num_res_blocks, levels, args.dropout)


# ---- diffusion maths, and the two kinds of guidance ---------------------------------------------------------------
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


def drop_conditions(y, p):
    """Each multi-hot row becomes the null condition 0 with probability p, so the model learns eps(x_t, t, 0) too."""
    return y * (torch.rand(len(y), 1, device=y.device) >= p)


def guided_eps(eps_cond, eps_uncond, w):
    """Classifier-free guidance (Ho & Salimans 2021, eq. 6): (1 + w) eps(x, c) - w eps(x)."""
    return (1 + w) * eps_cond - w * eps_uncond


def classifier_guided_eps(classifier, sched, x_t, t, eps, y, scale):
    """Dhariwal & Nichol's shift, log p(y | x0_hat(x_t)) the Bernoulli log-likelihood of the multi-hot y (logsigmoid,
    never clamped: an object scored near 0 still gets its push); eps held fixed, no gradient through the model."""
    with torch.inference_mode(False), torch.enable_grad():  # sample() runs in inference mode; this step needs autograd
        x_t = x_t.clone().requires_grad_(True)  # ordinary tensors: inference tensors cannot enter autograd
        logits = classifier(predict_x0(sched, x_t, t, eps.clone())).float()
        log_p = (y * F.logsigmoid(logits) + (1 - y) * F.logsigmoid(-logits)).sum()
        grad, = torch.autograd.grad(log_p, x_t)
    return eps - scale * extract(sched.sqrt_one_minus_alphas_cumprod, t, eps) * grad


def sample_conditions(model, sched, y, timesteps, sampler, args, seed, guide=None, record=0):
    """One image per multi-hot row of y, in [-1, 1] at --image-size, from a generator seeded with seed; guided."""
    amp = plumbing.Precision(y.device)  # the training's number format (bf16, fp16 or float32)

    def eps_fn(x, t):
        with amp.autocast():
            if args.cfg_w == 0:
                eps = model(x, t, y).float()
            else:
                both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.zeros_like(y)])).float()
                eps = guided_eps(*both.chunk(2), args.cfg_w)
        return eps if guide is None else classifier_guided_eps(guide, sched, x, t, eps, y, args.classifier_guidance)
    g = torch.Generator(y.device).manual_seed(seed)
    x_T = torch.randn((len(y), 3, args.image_size, args.image_size), generator=g, device=y.device)
    return sample(eps_fn, sched, x_T, timesteps, sampler, args.eta, g, record=record)


# ---- our own object classifier, to guide with ---------------------------------------------------------------------
def build_classifier(num_objects, ch=32):
    """Our object classifier: the K objects' logits for an image at --image-size (six 3x3 convolutions, a mean)."""
    layers, cur = [], 3
    for out, stride in ((ch, 1), (2 * ch, 2), (2 * ch, 1), (4 * ch, 2), (4 * ch, 1), (8 * ch, 2)):
        layers += [nn.Conv2d(cur, out, 3, stride, padding=1), group_norm(out), nn.SiLU()]
        cur = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cur, num_objects))


def train_classifier(args, data, labels, classifier, batch_size=128, lr=2e-3):
    """Binary cross-entropy per object, half of each batch blurred (guidance reads it at x0_hat, blurred while the
    layout forms), 5% (at most 900 images) held out. Seeded on its own: the DDPM is the same with it or without it."""
    n = len(data) - min(900, len(data) // 20)
    bs = min(batch_size, n)
    total = args.classifier_epochs * (n // bs)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4, fused=data.device.type == "cuda")
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        for step in range(total):
            epoch, i = divmod(step, n // bs)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            x, y = data[order[i * bs:(i + 1) * bs]].float() / 127.5 - 1, labels[order[i * bs:(i + 1) * bs]]
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)  # the same objects
            side = int(torch.randint(max(2, x.shape[-1] // 5), max(3, x.shape[-1] * 3 // 4), ()))
            blurred = F.interpolate(F.interpolate(x, size=side, mode="area"), size=x.shape[-1], mode="bilinear")
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, blurred, x)
            optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.binary_cross_entropy_with_logits(classifier(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = top_k_accuracy(torch.cat([classifier(p / 127.5 - 1) for p in data[n:].split(256)]), labels[n:])
    plumbing.say(f"our classifier: top-k accuracy {accuracy:.3f} on the {len(data) - n} held-out images")


def top_k_accuracy(scores, y):
    """The course's rule: an image with k requested objects answers with its k highest scores; hits / requested."""
    hits = [int(row[s.topk(int(row.sum())).indices].sum()) for s, row in zip(scores, y)]
    return sum(hits) / max(1, int(y.sum()))


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


def train(args, data, labels, model, ema, optimizer, classifier, sched, state, tests, evaluator, guide, amp):
    """Algorithm 1 with label dropout. The run's state is its step: the epoch and the batch follow by divmod, and each
    epoch's order comes from the seed and the epoch, so a resumed run is the same run. amp: the number format
    (plumbing.Precision; its scaler does nothing unless fp16)."""
    bs, device = min(args.batch_size, len(data)), data.device  # a data set smaller than a batch: all of it
    steps_per_epoch = len(data) // bs  # whole batches only: every step has the same shape
    total = args.iters or args.epochs * steps_per_epoch
    net = plumbing.parallel_model(model, args)
    progress = plumbing.Progress(state, total, steps_per_epoch, bs)
    with plumbing.CtrlC() as ctrl_c:
        while state["step"] < total:
            epoch, i = divmod(state["step"], steps_per_epoch)
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            idx = order[i * bs:(i + 1) * bs].to(device)
            x0, y = data[idx].float() / 127.5 - 1, drop_conditions(labels[idx], args.label_dropout)
            t = torch.randint(0, sched.T, (bs,), device=device)
            noise = torch.randn_like(x0)
            optimizer.param_groups[0]["lr"] = learning_rate(args, state["step"], total)
            with amp.autocast():
                loss = diffusion_loss(net, sched, plumbing.my_share(x0), plumbing.my_share(t), plumbing.my_share(noise),
                                      y=plumbing.my_share(y))
            optimizer.zero_grad(set_to_none=True)
            amp.scaler.scale(loss).backward()  # fp16: the loss scaled up, so that small gradients stay above zero
            amp.scaler.unscale_(optimizer)  # the true gradients again, for the clipping
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            amp.scaler.step(optimizer)  # fp16: skipped if a gradient overflowed
            amp.scaler.update()
            ema.update()
            state["losses"]["loss"].append(plumbing.mean_over_processes(loss))
            state["step"] += 1
            progress.show(state)  # also counts the training seconds
            if state["step"] % steps_per_epoch == 0:  # an epoch ends: samples from fixed noise, to see the model learn
                y16, fast = next(iter(tests.values()))[:16], sampling_timesteps(sched.T, min(20, sched.T))
                images = sample_conditions(ema.module, sched, y16, fast, "ddim", args, args.seed)
                plumbing.save_progress(images, args.out, epoch + 1)
                if args.eval_every and (epoch + 1) % args.eval_every == 0 and plumbing.rank() == 0:
                    grade_during_training(args, ema.module, sched, epoch + 1, state, tests, evaluator, guide)
            stop = ctrl_c.stop_requested()
            if progress.checkpoint_due(state, stop):  # at the end, on Ctrl-C, at an epoch's end once a minute
                plumbing.save_run(args, SCRIPT, state, stop, model=model, ema=ema, optimizer=optimizer,
                                  classifier=classifier, scaler=amp.scaler)


def grade_during_training(args, model, sched, epoch, state, tests, evaluator, guide):
    """A row of accuracy.csv (the run's first starts it anew): the hand-in's images as the model stands, graded."""
    accuracy = write_and_grade(args, model, sched, tests, evaluator, guide)
    first = epoch == args.eval_every
    row = [epoch, state["step"], round(state["seconds"]), *(a[0] for a in accuracy.values())]
    with open(os.path.join(args.out, "accuracy.csv"), "w" if first else "a", newline="") as fh:
        csv.writer(fh).writerows(([["epoch", "step", "train_seconds", *tests]] if first else []) + [row])
    plumbing.say(f"epoch {epoch}: accuracy " + ", ".join(f"{stem} {a[0]:.3f}" for stem, a in accuracy.items()))


# ---- the homework's deliverables, graded by the course's evaluator ------------------------------------------------
def write_and_grade(args, model, sched, tests, evaluator, guide, sets=1):
    """Per test file, `sets` sets of images: the first written as STEM/00001.png ..., STEM.zip and STEM_grid.png; each
    graded as the course does (the PNGs' uint8 as Normalize(0.5, 0.5) loads them). Returns {stem: [accuracies]}."""
    timesteps = sampling_timesteps(args.timesteps, args.steps or args.timesteps)
    accuracy = {stem: [] for stem in tests}
    for k, (stem, y) in enumerate(tests.items()):
        for s in range(sets):
            x = sample_conditions(model, sched, y, timesteps, args.sampler, args, args.seed + 1000 * k + s, guide)
            x = plumbing.to_uint8(F.interpolate(x, size=args.output_size, mode="bilinear", align_corners=False))
            if s == 0:  # the first set is the hand-in
                plumbing.save_samples(x, os.path.join(args.out, stem), os.path.join(args.out, f"{stem}.zip"))
                plumbing.make_grid(x, nrow=8).save(os.path.join(args.out, f"{stem}_grid.png"))
            if evaluator is not None:
                where = next(evaluator.resnet18.parameters()).device
                accuracy[stem].append(float(evaluator.eval((x.float() / 127.5 - 1).to(where), y.to(where))))
    return accuracy


def main(argv=None):
    args = parse_args(argv)
    plumbing.start_distributed(args)
    saved = None
    if args.resume or args.sample_only:
        saved = plumbing.load_run(args, SCRIPT, RUN_KEYS, build_parser().parse_args([]))
        check_args(args)  # again: the checkpoint's T bounds --steps
    plumbing.check(plumbing.must(args.classifier_epochs or not args.classifier_guidance, "--classifier-guidance: no "
                                 "classifier (--classifier-epochs)"))  # the checkpoint's, with --sample-only
    device = torch.device(args.device)
    objects = read_json(args, "objects.json")  # its order is read, never assumed
    tests = {os.path.splitext(name)[0]: multi_hot(read_json(args, name), objects, name).to(device)
             for name in ("test.json", "new_test.json")}
    evaluator = plumbing.load_course_evaluator(args.evaluator_dir) if args.evaluator_dir else None
    if not args.sample_only:
        data, labels = load_iclevr_training_set(args, objects, device)
        plumbing.check(plumbing.must(len(data) >= args.batch_size, "--batch-size is above the number of images"))
    plumbing.make_out_folder(args.out)
    plumbing.remove_old_metrics(args.out)

    torch.manual_seed(args.seed)
    sched = NoiseSchedule(make_betas(args.schedule, args.timesteps)).to(device)
    model = build_conditional_model(args, len(objects)).to(device)
    ema = EMA(model, args.ema_decay)
    classifier = build_classifier(len(objects)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    amp = plumbing.Precision(device)  # bf16, or fp16 with a gradient scaler on GPUs without bf16, float32 on a CPU
    plumbing.say(f"precision: {amp.name}")
    state = {"step": 0, "seconds": 0.0, "losses": {"loss": []}}
    if saved is not None:
        plumbing.restore_run(saved, args, state, model=model, ema=ema, optimizer=optimizer, classifier=classifier,
                             scaler=amp.scaler)
    elif args.classifier_epochs:  # first: it guides the grading during training too
        train_classifier(args, data, labels, classifier)
    guide = classifier if args.classifier_guidance else None
    metrics = {"device": plumbing.device_name(device), "torch": torch.__version__, "processes": plumbing.world_size(),
               "precision": amp.name}
    if not args.sample_only:
        train(args, data, labels, model, ema, optimizer, classifier, sched, state, tests, evaluator, guide, amp)
        plumbing.write_loss(args.out, state["losses"], f"conditional DDPM loss (iCLEVR, batch {args.batch_size})")
        metrics.update(train_seconds=round(state["seconds"], 1), steps=state["step"])
    if not plumbing.leave_distributed():
        return None  # under torchrun the other processes stop here: process 0 samples, writes and grades
    timesteps = sampling_timesteps(args.timesteps, args.steps or args.timesteps)
    y = multi_hot([["red sphere", "yellow cube", "cyan cylinder"]], objects, "the process row").to(device)
    _, frames = sample_conditions(ema.module, sched, y, timesteps, args.sampler, args, args.seed, guide, record=56)
    frames = [F.interpolate(f, size=args.output_size, mode="bilinear", align_corners=False) for f in frames]
    plumbing.save_process(frames, args.out)  # one row: pure noise, then 7 equal parts of the trajectory
    accuracy = write_and_grade(args, ema.module, sched, tests, evaluator, guide, args.num_samples)
    metrics.update(sampler=args.sampler, sampling_steps=len(timesteps), eta=args.eta, cfg_w=args.cfg_w,
                   classifier_guidance=args.classifier_guidance, sets=args.num_samples, accuracy_per_set=accuracy,
                   accuracy={stem: a[0] for stem, a in accuracy.items()} if evaluator else None)
    plumbing.say(f"accuracy (full marks at 0.8): {metrics['accuracy']}" if evaluator else "no --evaluator-dir")
    plumbing.write_metrics(os.path.join(args.out, "metrics.json"), {**metrics, "args": vars(args)})
    plumbing.save_as(args)
    return metrics


if __name__ == "__main__":
    main()
