"""GAN baselines, DCGAN- and StyleGAN-style: the GAN a diffusion homework is compared against, on the same protocol.

The homework
------------
  * DCGAN vs DDPM on MNIST and anime faces: 10,000 samples 00001.png ... 10000.png in a zip with no folder inside,
    FID against the training set (`fid.py`, ddpm_mnist.py's reference), a 5x5 grid, the losses of G and D;
  * a conditional GAN vs a conditional DDPM on iCLEVR (24 objects, 1-3 per image): an 8x4 grid for each of
    test.json and new_test.json and the course evaluator's accuracy on them;
  * StyleGAN vs DDPM on cat faces (--arch stylegan); --dataset classes takes a folder per class (AFHQ).

The maths (Goodfellow et al. 2014; Miyato et al. 2018; Miyato & Koyama 2018; Karras et al. 2020)
-----------------------------------------------------------------------------------------------
  G maps noise z ~ N(0, I) (and a condition y) to an image; D scores an image with a real number f(x, y).
  non-saturating    L_D = E_x[softplus(-f(x))] + E_z[softplus(f(G(z)))],   L_G = E_z[softplus(-f(G(z)))]
  hinge (default)   L_D = E_x[max(0, 1 - f(x))] + E_z[max(0, 1 + f(G(z)))],   L_G = -E_z[f(G(z))]
                                                                       (discriminator_loss, generator_loss)
  spectral norm     W / sigma(W) in D, sigma by one power iteration a step: u <- W v / |W v|, v <- W^T u / |W^T u|,
                    sigma = u^T W v. D stays about 1-Lipschitz, so its gradients stay useful to G. (spectral_norm)
  projection D      f(x, y) = psi(phi(x)) + y^T V phi(x): V one row per class; a multi-hot y adds several rows.
  conditional BN    BN(h) * (1 + gamma(y)) + beta(y), gamma and beta linear in y.          (ConditionalBatchNorm)
  EMA of G          theta_EMA <- d theta_EMA + (1 - d) theta after each G step; samples come from theta_EMA.  (EMA)
  StyleGAN2 (--arch stylegan):
    mapping         w = MLP(normalise(z) [, normalise(E y)]): a style vector per sample          (MappingNetwork)
    modulation      w'_{o,i,k} = s_i w_{o,i,k}, s = A(w): one scale per input channel, an affine map of the style
    demodulation    w''_{o,i,k} = w'_{o,i,k} / sqrt(sum_{i,k} w'_{o,i,k}^2 + eps): unit variance (ModulatedConv2d)
    noise           h <- h + b_c n, n ~ N(0, I) per pixel, b_c a learned strength per channel    (StyleBlock)
    style mixing    with probability --mixing-prob, layers before a random crossover take w_1, the rest w_2 (mix_styles)
    R1 penalty      L_D += (gamma / 2) E_x[ |grad_x f(x)|^2 ] on real images, instead of spectral norm (r1_penalty)

Commands
--------
  python gan_baseline.py --data-dir ../shared/data         # MNIST on a GPU: train, 10k samples, FID
  python gan_baseline.py --preset cpu                      # MNIST sized for a 2-core CPU
  python gan_baseline.py --dataset folder --data-dir cat_faces --arch stylegan --epochs 100    # StyleGAN vs DDPM
  python gan_baseline.py --dataset classes --data-dir afhq/train --epochs 100         # one sub-folder per class
  python gan_baseline.py --dataset iclevr --data-dir iclevr_data --evaluator-dir course_files --epochs 300

On a GPU the network computes in bf16 where the GPU has native bf16, else in fp16 with a gradient scaler (T4, V100);
on a CPU in float32 (plumbing.Precision: printed, and kept in metrics.json). A checkpoint is written at an epoch's
end if the last is a minute old, at the end, and on Ctrl-C.
"""

import argparse
import copy
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import numpy as np
from PIL import Image

import plumbing

SCRIPT = "gan_baseline"  # written into every checkpoint, so that another script's checkpoint is recognised
PRESETS = {  # a preset changes defaults only: `--preset cpu --epochs 2` trains 2 epochs
    "cpu": dict(device="cpu", ch=12, batch_size=64, limit=30000, epochs=7, ema_decay=0.998, num_samples=2000,
                fid_ref_limit=10000, out="runs/gan_cpu"),
    "cpu_iclevr": dict(device="cpu", dataset="iclevr", image_size=32, output_size=64, ch=16, batch_size=64,
                       epochs=10, ema_decay=0.999, out="runs/gan_iclevr_cpu"),
}
# The flags that define a training run: --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("dataset", "data_dir", "image_size", "limit", "arch", "ch", "z_dim", "w_dim", "mapping_layers",
            "loss", "batch_size", "lr", "beta1", "beta2", "r1_gamma", "mixing_prob", "ema_decay", "seed", "label_names")
DELIBERATELY_DIFFERENT = {"train": "a D step and a G step on every batch: two networks, two optimisers"}


# ---- flags ------------------------------------------------------------------------------------------------------
def build_parser():
    p = plumbing.FlagParser(description="DCGAN- or StyleGAN-style GANs (see the module docstring).",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default=None, help="cpu (MNIST) and cpu_iclevr: sized for a 2-core CPU")
    a("--dataset", choices=["mnist", "folder", "classes", "iclevr"], default="mnist", help="classes: folder per class")
    a("--data-dir", default="./data", help="MNIST root (holds MNIST/raw), the image folder, or iCLEVR's folder")
    a("--image-size", type=int, default=64, help="side of the square images G makes (not MNIST: 28)")
    a("--output-size", type=int, default=64, help="iclevr: side of the graded images (upsampled from --image-size)")
    a("--limit", type=int, default=None, help="train on the first N images only (per class with --dataset classes)")
    a("--evaluator-dir", default=None, help="iclevr: the folder of the course's evaluator.py and checkpoint.pth")
    a("--arch", choices=["dcgan", "stylegan"], default="dcgan", help="DCGAN-style residual G, or StyleGAN2-style G")
    a("--ch", type=int, default=64, help="base width: G and D have ch * 2^k channels at 1/2^k of the size (k <= 3)")
    a("--z-dim", type=int, default=128, help="length of the noise vector z")
    a("--w-dim", type=int, default=128, help="stylegan: length of the style vector w")
    a("--mapping-layers", type=int, default=4, help="stylegan: layers of the mapping network z -> w")
    a("--mixing-prob", type=float, default=0.9, help="stylegan: probability of style mixing in a G step")
    a("--r1-gamma", type=float, default=None, help="R1 penalty weight on D (default: 0 for dcgan, 1 for stylegan)")
    a("--loss", choices=["hinge", "nonsat"], default=None, help="default: hinge for dcgan, nonsat for stylegan")
    a("--epochs", type=int, default=30, help="passes over the training images")
    a("--iters", type=int, default=None, help="stop after this many steps (a D and a G step each) instead")
    a("--batch-size", type=int, default=128, help="images per step (all GPUs together under torchrun)")
    a("--lr", type=float, default=2e-4, help="Adam learning rate of G and D")
    a("--beta1", type=float, default=0.5, help="Adam beta1 (DCGAN: 0.5; SNGAN/BigGAN/StyleGAN: 0)")
    a("--beta2", type=float, default=0.999, help="Adam beta2")
    a("--ema-decay", type=float, default=0.999, help="decay of the moving average of G's weights")
    a("--seed", type=int, default=0, help="seeds the training and the sampling (with --sample-only: the sampling)")
    a("--num-samples", type=int, default=10000, help="images written to OUT/samples and graded by FID (not iclevr)")
    a("--sample-batch-size", type=int, default=1000, help="images generated at once")
    a("--stats-samples", type=int, default=4096, help="samples that re-estimate the EMA G's batch-norm statistics")
    plumbing.add_run_flags(p, out="runs/gan_baseline")
    return p


def parse_args(argv=None):
    args = plumbing.parse_with_preset(build_parser(), PRESETS, argv)
    args.loss = args.loss or ("hinge" if args.arch == "dcgan" else "nonsat")
    args.r1_gamma = (1.0 if args.arch == "stylegan" else 0.0) if args.r1_gamma is None else args.r1_gamma
    args.label_names = None  # the classes or objects: from the data (or the checkpoint)
    check_args(args)
    return args


def check_args(args):
    """The flags a student may get wrong, before anything is read or written (again with a checkpoint's values)."""
    plumbing.check(
        plumbing.at_least("--epochs", args.epochs, 0), plumbing.at_least("--iters", args.iters, 1),
        plumbing.at_least("--batch-size", args.batch_size, 1), plumbing.at_least("--limit", args.limit, 1),
        plumbing.must(args.lr > 0, "--lr must be positive"), plumbing.between("--beta1", args.beta1, 0, 1, False),
        plumbing.between("--ema-decay", args.ema_decay, 0, 1, False),
        plumbing.must(args.dataset == "mnist" or args.sample_only or os.path.isdir(args.data_dir),
                      f"--data-dir {args.data_dir} is not a folder"),
        plumbing.must(not args.evaluator_dir or args.dataset == "iclevr", "--evaluator-dir is for --dataset iclevr"),
        plumbing.must(not args.evaluator_dir or os.path.isfile(os.path.join(args.evaluator_dir, "evaluator.py")),
                      f"--evaluator-dir {args.evaluator_dir} holds no evaluator.py"),
        *plumbing.run_flag_problems(args),
    )


# ---- data: images as uint8 N x C x H x W, labels as N x K floats (one-hot or multi-hot) --------------------------
def iclevr_multi_hot(conditions, objects):
    """Lists of 1-3 object names -> M x K multi-hot vectors over objects.json's indices."""
    y = torch.zeros(len(conditions), len(objects))
    for i, names in enumerate(conditions):
        y[i, [objects[name] for name in names]] = 1
    return y


def load_iclevr(args, limit, with_images):
    """(uint8 images or None, N x K training labels, {test file: M x K conditions}, object names in index order).
    A render (320x240) is squashed to a square, as transforms.Resize((size, size)) does: a crop could cut objects."""
    names = ("objects.json", "train.json", "test.json", "new_test.json")
    missing = [n for n in names if not os.path.isfile(os.path.join(args.data_dir, n))]
    plumbing.check(plumbing.must(not missing, f"--data-dir {args.data_dir} lacks iCLEVR's {', '.join(missing)}"))
    objects, train, *tests = [json.loads(open(os.path.join(args.data_dir, n)).read()) for n in names]
    files = list(train)[:limit]
    labels = iclevr_multi_hot([train[f] for f in files], objects)
    tests = {n: iclevr_multi_hot(conditions, objects) for n, conditions in zip(names[2:], tests)}
    images = []
    for f in files if with_images else []:
        with Image.open(os.path.join(args.data_dir, "iclevr", f)) as img:
            rgb = img.convert("RGB").resize((args.image_size, args.image_size), Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(images) if images else None, labels, tests, sorted(objects, key=objects.get)


def load_training_data(args, limit, with_images=True):
    """(images, labels, iCLEVR test conditions, label names); --sample-only reads only what sampling needs."""
    if args.dataset == "iclevr":
        return load_iclevr(args, limit, with_images)
    if not with_images:
        return None, None, {}, None
    if args.dataset == "classes":  # one sub-folder per class (AFHQ: cat/, dog/, wild/), one-hot labels
        classes = sorted(d for d in os.listdir(args.data_dir) if os.path.isdir(os.path.join(args.data_dir, d)))
        plumbing.check(plumbing.must(len(classes) >= 2, f"--data-dir {args.data_dir} holds fewer than two classes"))
        images = [plumbing.load_image_folder(os.path.join(args.data_dir, c), args.image_size, limit) for c in classes]
        index = torch.cat([torch.full((len(x),), k) for k, x in enumerate(images)])
        return torch.cat(images), F.one_hot(index, len(classes)).float(), {}, classes
    if args.dataset == "mnist":
        return plumbing.load_mnist(args.data_dir, limit), None, {}, None
    return plumbing.load_image_folder(args.data_dir, args.image_size, limit), None, {}, None


def to_model_input(images, flip):
    """uint8 images -> floats in [-1, 1], each mirrored with probability 1/2 if flip."""
    x = images.float() / 127.5 - 1
    if flip:
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
    return x


# ---- model: a residual generator with conditional batch norm, a spectrally normalised projection discriminator --
def resolution_levels(size):
    """(How often G doubles its first feature map, that map's side): 28 -> (2, 7), 64 -> (4, 4), 48 -> (4, 3)."""
    levels = 0
    while size % 2 == 0 and size > 4:
        size, levels = size // 2, levels + 1
    return levels, size


def width(ch, level):
    """Channels at 1/2^level of the image size, in G and D alike: ch, 2ch, 4ch, then 8ch from level 3 on."""
    return ch * min(2 ** level, 8)


class ConditionalBatchNorm(nn.Module):
    """BN(h) * (1 + gamma(y)) + beta(y), gamma and beta linear in the condition y (N x K, one- or multi-hot).
    Without classes (K = 0) it is ordinary batch norm with a learned scale and shift."""

    def __init__(self, ch, num_classes):
        super().__init__()
        self.bn = nn.BatchNorm2d(ch, affine=num_classes == 0)
        self.gamma_beta = nn.Linear(num_classes, 2 * ch, bias=False) if num_classes else None
        if num_classes:
            nn.init.zeros_(self.gamma_beta.weight)  # starts as plain batch norm for every condition

    def forward(self, x, y=None):
        if self.gamma_beta is None:
            return self.bn(x)
        gamma, beta = self.gamma_beta(y)[:, :, None, None].chunk(2, dim=1)
        return self.bn(x) * (1 + gamma) + beta


class GBlock(nn.Module):
    """Residual up-block (Miyato et al.'s ResNet G): BN-ReLU-upsample-conv-BN-ReLU-conv plus an upsampled 1x1 skip."""

    def __init__(self, in_ch, out_ch, num_classes):
        super().__init__()
        self.norm1 = ConditionalBatchNorm(in_ch, num_classes)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = ConditionalBatchNorm(out_ch, num_classes)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, y=None):
        h = F.interpolate(F.relu(self.norm1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.norm2(self.conv1(h), y)))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class Generator(nn.Module):
    """G(z, y): a linear map to a small feature map, residual up-blocks to full size, then a 3x3 conv and tanh,
    so images lie in [-1, 1]. y: N x num_classes (one-hot or multi-hot), or None when num_classes is 0."""

    def __init__(self, out_ch, ch, z_dim, image_size, num_classes=0):
        super().__init__()
        levels, self.start = resolution_levels(image_size)
        self.fc = nn.Linear(z_dim, width(ch, levels) * self.start ** 2)
        self.blocks = nn.ModuleList(GBlock(width(ch, k), width(ch, k - 1), num_classes) for k in range(levels, 0, -1))
        self.norm_out = ConditionalBatchNorm(ch, num_classes)
        self.conv_out = nn.Conv2d(ch, out_ch, 3, padding=1)

    def forward(self, z, y=None):
        h = self.fc(z).view(z.shape[0], -1, self.start, self.start)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.conv_out(F.relu(self.norm_out(h, y))))


def spectral_norm(module, enabled=True):
    """W / sigma(W) with one power iteration per training forward pass (u, v kept as buffers between steps)."""
    return nn.utils.parametrizations.spectral_norm(module) if enabled else module


class DBlock(nn.Module):
    """Residual down-block (Miyato et al.'s ResNet D), spectrally normalised unless sn is off (StyleGAN's D has R1):
    ReLU-conv-ReLU-conv and a 1x1 skip, both average-pooled to half size; the first block sees pixels: no ReLU."""

    def __init__(self, in_ch, out_ch, down=True, first=False, sn=True):
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(in_ch, out_ch, 3, padding=1), sn)
        self.conv2 = spectral_norm(nn.Conv2d(out_ch, out_ch, 3, padding=1), sn)
        self.skip = spectral_norm(nn.Conv2d(in_ch, out_ch, 1), sn) if in_ch != out_ch or down else nn.Identity()
        self.down, self.first = down, first

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.down:  # a 1x1 conv commutes with average pooling: pool first, convolve a quarter of the pixels
            return F.avg_pool2d(h, 2) + self.skip(F.avg_pool2d(x, 2))
        return h + self.skip(x)


class Discriminator(nn.Module):
    """f(x, y) = psi(phi(x)) + y^T V phi(x): residual down-blocks mirroring G, ReLU, global sum pooling (phi),
    a linear score psi, and the projection of the condition y onto phi (Miyato & Koyama 2018)."""

    def __init__(self, in_ch, ch, image_size, num_classes=0, sn=True):
        super().__init__()
        levels, _ = resolution_levels(image_size)
        blocks = [DBlock(in_ch, width(ch, 1), first=True, sn=sn)]
        blocks += [DBlock(width(ch, k - 1), width(ch, k), sn=sn) for k in range(2, levels + 1)]
        blocks += [DBlock(width(ch, levels), width(ch, levels), down=False, sn=sn)]
        self.blocks = nn.Sequential(*blocks)
        self.linear = spectral_norm(nn.Linear(width(ch, levels), 1), sn)
        self.embed = spectral_norm(nn.Linear(num_classes, width(ch, levels), bias=False), sn) if num_classes else None

    def forward(self, x, y=None):
        phi = F.relu(self.blocks(x)).sum(dim=(2, 3))
        out = self.linear(phi).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * phi).sum(1)
        return out


# ---- StyleGAN2-style generator (--arch stylegan) ----------------------------------------------------------------
class MappingNetwork(nn.Module):
    """w = MLP(normalise(z) [, normalise(E y)]): each input scaled to unit mean square, then `layers` Linear +
    LeakyReLU(0.2) layers. The condition y (one- or multi-hot) enters through an embedding E."""

    def __init__(self, z_dim, w_dim, layers, num_classes=0):
        super().__init__()
        self.embed = nn.Linear(num_classes, z_dim, bias=False) if num_classes else None
        dims = [z_dim * (2 if num_classes else 1)] + [w_dim] * layers
        self.net = nn.Sequential(*[nn.Sequential(nn.Linear(a, b), nn.LeakyReLU(0.2)) for a, b in zip(dims, dims[1:])])

    def forward(self, z, y=None):
        parts = [z] if self.embed is None else [z, self.embed(y)]
        return self.net(torch.cat([v * torch.rsqrt(v.pow(2).mean(dim=1, keepdim=True) + 1e-8) for v in parts], dim=1))


class ModulatedConv2d(nn.Module):
    """A convolution with weights w' = s_i w_{o,i,k} per sample, s = A(w) (demodulate: / sqrt(sum_{i,k} w'^2 + eps)).
    Every sample has its own weights, applied at once as a grouped convolution (groups = batch size)."""

    def __init__(self, in_ch, out_ch, kernel, w_dim, demodulate=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.scale = 1 / math.sqrt(in_ch * kernel * kernel)  # He's constant, applied at run time (equalised rate)
        self.affine = nn.Linear(w_dim, in_ch)
        nn.init.ones_(self.affine.bias)  # styles start at 1: the plain convolution
        self.demodulate, self.padding = demodulate, kernel // 2

    def modulated_weight(self, w):
        """The per-sample weights, N x out x in x k x k."""
        s = self.affine(w)
        weight = self.scale * self.weight[None] * s[:, None, :, None, None]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        return weight

    def forward(self, x, w):
        n, c, h, wd = x.shape
        weight = self.modulated_weight(w)
        out = F.conv2d(x.reshape(1, n * c, h, wd), weight.reshape(-1, c, *weight.shape[3:]), padding=self.padding,
                       groups=n)
        return out.reshape(n, -1, h, wd)


class StyleBlock(nn.Module):
    """(Upsampling), modulated 3x3 conv, per-pixel noise of a learned strength per channel, bias, LeakyReLU."""

    def __init__(self, in_ch, out_ch, w_dim, up=False):
        super().__init__()
        self.up = up
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim)
        self.noise_strength = nn.Parameter(torch.zeros(out_ch))
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x, w):
        h = self.conv(F.interpolate(x, scale_factor=2, mode="bilinear") if self.up else x, w)
        noise = torch.randn(h.shape[0], 1, *h.shape[2:], device=h.device, dtype=h.dtype)
        h = h + self.noise_strength[None, :, None, None] * noise + self.bias[None, :, None, None]
        return F.leaky_relu(h, 0.2) * math.sqrt(2)


class StyleGenerator(nn.Module):
    """StyleGAN2's G in small: a learned constant, then per level an upsampling and a plain StyleBlock; each level
    adds its 1x1 "toRGB" image to the upsampled image so far (the skip architecture). Layer k takes style ws[k]."""

    def __init__(self, out_ch, ch, z_dim, w_dim, mapping_layers, image_size, num_classes=0):
        super().__init__()
        levels, start = resolution_levels(image_size)
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, num_classes)
        self.const = nn.Parameter(torch.randn(1, width(ch, levels), start, start))
        self.blocks = nn.ModuleList([StyleBlock(width(ch, levels), width(ch, levels), w_dim)])
        self.to_rgb = nn.ModuleList([ModulatedConv2d(width(ch, levels), out_ch, 1, w_dim, demodulate=False)])
        for k in range(levels, 0, -1):
            self.blocks.append(StyleBlock(width(ch, k), width(ch, k - 1), w_dim, up=True))
            self.blocks.append(StyleBlock(width(ch, k - 1), width(ch, k - 1), w_dim))
            self.to_rgb.append(ModulatedConv2d(width(ch, k - 1), out_ch, 1, w_dim, demodulate=False))
        self.num_layers = len(self.blocks)

    def synthesis(self, ws):
        """Images from one style per layer, ws: num_layers x N x w_dim. Blocks 0, 2, 4, ... end a level: toRGB."""
        x, rgb = self.const.expand(ws.shape[1], -1, -1, -1), 0
        for k, block in enumerate(self.blocks):
            x = block(x, ws[k])
            if k % 2 == 0:
                rgb = self.to_rgb[k // 2](x, ws[k]) + (F.interpolate(rgb, scale_factor=2, mode="bilinear") if k else 0)
        return torch.tanh(rgb)

    def forward(self, z, y=None, z2=None, crossover=None):
        w = self.mapping(z, y)
        ws = mix_styles(w, self.mapping(z2, y) if z2 is not None else w, crossover or self.num_layers, self.num_layers)
        return self.synthesis(ws)


def mix_styles(w1, w2, crossover, num_layers):
    """Style mixing: layers 0 .. crossover-1 take w1, the rest w2 (crossover = num_layers: w1 everywhere)."""
    return torch.stack([w1 if k < crossover else w2 for k in range(num_layers)])


def build_gan(args):
    """(G, D); a StyleGAN's D is kept smooth by the R1 penalty instead of spectral norm."""
    channels, size, k = (1, 28, 0) if args.dataset == "mnist" else (3, args.image_size, len(args.label_names or []))
    D = Discriminator(channels, args.ch, size, k, sn=args.arch == "dcgan")
    if args.arch == "stylegan":
        return StyleGenerator(channels, args.ch, args.z_dim, args.w_dim, args.mapping_layers, size, k), D
    return Generator(channels, args.ch, args.z_dim, size, k), D


# ---- GAN losses: f = D's raw score (a logit) ----------------------------------------------------------------------
def discriminator_loss(real_scores, fake_scores, kind):
    """hinge: E[max(0, 1 - f(x))] + E[max(0, 1 + f(G(z)))]; nonsat: E[softplus(-f(x))] + E[softplus(f(G(z)))]."""
    if kind == "hinge":
        return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()
    return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()


def generator_loss(fake_scores, kind):
    """hinge: -E[f(G(z))]; nonsat: E[softplus(-f(G(z)))] = -E[log sigma(f(G(z)))], strong gradients early on."""
    if kind == "hinge":
        return -fake_scores.mean()
    return F.softplus(-fake_scores).mean()


def r1_penalty(D, x, y, gamma):
    """(gamma / 2) E_x[ |grad_x f(x, y)|^2 ] on real images (Mescheder et al. 2018): D is kept flat on the data."""
    x = x.detach().requires_grad_(True)
    grad, = torch.autograd.grad(D(x, y).sum(), x, create_graph=True)
    return gamma / 2 * grad.pow(2).flatten(1).sum(1).mean()


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


def fake_images(G, z, y, args):
    """G(z, y); a StyleGAN G mixes styles with probability --mixing-prob (a second z, a random crossover)."""
    if args.arch == "stylegan" and torch.rand(()) < args.mixing_prob:
        return G(z, y, z2=torch.randn_like(z), crossover=int(torch.randint(1, G.num_layers, ())))
    return G(z, y)


def descend(loss, model, optimizer, scaler):
    """One step down loss. Under torchrun, the gradients averaged by hand: DDP's hooks miss R1's double backward.
    scaler: the gradient scaler of plumbing.Precision (it passes everything through unless fp16)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # fp16: the loss scaled up, so that small gradients stay above zero
    for p in model.parameters() if plumbing.world_size() > 1 else []:
        dist.all_reduce(p.grad)
        p.grad /= plumbing.world_size()
    scaler.step(optimizer)  # unscales the gradients first; fp16: skipped if one overflowed


def gan_step(G, D, opt_g, opt_d, x, y, z, args, amp):
    """A D step on L_D (+ R1): real images x against fakes G(z[0], y), G held fixed; then a G step on L_G for fresh
    fakes G(z[1], y): the gradients flow through D into G, D's weights stay put. Returns both losses. amp: the number
    format (plumbing.Precision); R1's double backward runs in float32."""
    with amp.autocast():
        with torch.no_grad():
            fake = fake_images(G, z[0], y, args)
        # One pass over real and fake together: one power iteration per step, and D has no batch norm to mix them.
        scores = D(torch.cat([x, fake.to(x.dtype)]), None if y is None else torch.cat([y, y])).float()
    d_loss = discriminator_loss(*scores.chunk(2), args.loss)
    if args.r1_gamma > 0:
        d_loss = d_loss + r1_penalty(D, x, y, args.r1_gamma)
    descend(d_loss, D, opt_d, amp.scaler)
    D.requires_grad_(False)  # no gradients for D's weights: they are not updated here, so do not compute them
    with amp.autocast():
        g_loss = generator_loss(D(fake_images(G, z[1], y, args), y).float(), args.loss)
    descend(g_loss, G, opt_g, amp.scaler)
    amp.scaler.update()  # once per step, after both optimisers (fp16: the scale shrinks if either overflowed)
    D.requires_grad_(True)
    return plumbing.mean_over_processes(d_loss), plumbing.mean_over_processes(g_loss)


def progress_images(G, args, y, device):
    """16 samples from the same z (and conditions y) after every epoch, so a student sees G learn. fork_rng: the
    training's random state is left as it was (a StyleGAN's noise inputs draw from the global generator)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        return generate_images(G, 16, args.z_dim, torch.Generator(device).manual_seed(args.seed), y=y)


def train(args, data, labels, G, D, ema, opt_g, opt_d, state, amp):
    """On every batch a D step, a G step, an EMA update. The state is the step: the epoch and the batch follow by
    divmod, each epoch's order from the seed and the epoch, so a resumed run is the same run. amp: the number format
    (plumbing.Precision)."""
    bs, device = min(args.batch_size, len(data)), data.device  # a data set smaller than a batch: all of it
    steps_per_epoch = len(data) // bs  # whole batches only: every step has the same shape
    total = args.iters or args.epochs * steps_per_epoch
    # R1's double backward does not go through a compiled D.
    G_net, D_net = (torch.compile(G), D if args.r1_gamma > 0 else torch.compile(D)) if args.compile else (G, D)
    y16 = None if labels is None else labels[torch.linspace(0, len(labels) - 1, 16).long()]  # spread over the set
    progress = plumbing.Progress(state, total, steps_per_epoch, bs)
    G.train()
    D.train()
    with plumbing.CtrlC() as ctrl_c:
        while state["step"] < total:
            epoch, i = divmod(state["step"], steps_per_epoch)
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            batch = order[i * bs:(i + 1) * bs].to(device)
            x = plumbing.my_share(to_model_input(data[batch], flip=args.dataset != "mnist"))
            y = None if labels is None else plumbing.my_share(labels[batch])
            z = plumbing.my_share(torch.randn(bs, 2, args.z_dim, device=device)).unbind(1)  # for the D and the G step
            d_loss, g_loss = gan_step(G_net, D_net, opt_g, opt_d, x, y, z, args, amp)
            ema.update()
            state["losses"]["D"].append(d_loss)
            state["losses"]["G"].append(g_loss)
            state["step"] += 1
            progress.show(state)  # also counts the training seconds
            if state["step"] % steps_per_epoch == 0:  # an epoch ends: samples from fixed z, to see G learn
                plumbing.save_progress(progress_images(ema.module, args, y16, device), args.out, epoch + 1)
            stop = ctrl_c.stop_requested()
            if progress.checkpoint_due(state, stop):  # at the end, on Ctrl-C, at an epoch's end once a minute
                plumbing.save_run(args, SCRIPT, state, stop, G=G, D=D, ema=ema, opt_g=opt_g, opt_d=opt_d,
                                  scaler=amp.scaler)


# ---- sampling from the EMA generator ------------------------------------------------------------------------------
@torch.no_grad()
def generate_images(G, n, z_dim, g, pool=None, y=None):
    """n images G(z, y) in float32 (computed in the training's number format), z ~ N(0, I) from the generator g;
    y the given conditions, or drawn from the pool (rows of labels), or None for an unconditional G."""
    if y is None and pool is not None:
        y = pool[torch.randint(len(pool), (n,), generator=g, device=g.device).cpu()]
    z = torch.randn(n, z_dim, generator=g, device=g.device)
    with plumbing.Precision(g.device).autocast():
        return G(z, None if y is None else y.to(g.device)).float()


@torch.no_grad()
def standing_stats(G, pool, z_dim, generator, batch_size, n):
    """Re-estimate G's batch-norm statistics from n of its own samples, then switch G to eval mode. The EMA copy
    holds averages of the trained G's running statistics, which describe other weights; statistics measured on the
    averaged weights themselves make its samples match its training-mode behaviour."""
    norms = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a plain average over the batches below
    G.train()
    for start in range(0, n if norms else 0, batch_size):
        generate_images(G, min(batch_size, n - start), z_dim, generator, pool)
    G.eval()


def generate_samples(G, n, pool, args, device):
    """n samples as uint8 RGB, --sample-batch-size at a time, each batch from its own generator."""
    def draw(count, g):
        return plumbing.to_uint8(generate_images(G, count, args.z_dim, g, pool))
    return plumbing.sample_in_batches(draw, n, args.sample_batch_size, args.seed, device)


def grade_iclevr(G, tests, evaluator, args, device):
    """For each test file, one image per condition, upsampled to --output-size and handed in as FILE.png (8 a row).
    The course's protocol grades them: the uint8 images as ToTensor + Normalize(0.5, 0.5) load them (u / 127.5 - 1)
    with the multi-hot labels, on the evaluator's device; eval returns hits / requested objects."""
    g = torch.Generator(device).manual_seed(args.seed)
    accuracy = {}
    for name, conditions in tests.items():
        x = generate_images(G, len(conditions), args.z_dim, g, y=conditions)
        images = plumbing.to_uint8(F.interpolate(x, size=args.output_size, mode="bilinear"))
        plumbing.make_grid(images, nrow=8).save(os.path.join(args.out, name.replace(".json", ".png")))
        if evaluator is not None:
            on = next(evaluator.resnet18.parameters()).device
            accuracy[name] = float(evaluator.eval((images.float() / 127.5 - 1).to(on), conditions.to(on)))
            plumbing.say(f"accuracy on {name}: {accuracy[name]:.4f} ({len(conditions)} conditions)")
    return {"accuracy": accuracy or None, "num_samples": sum(len(c) for c in tests.values())}


# ---- the homework ---------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    plumbing.start_distributed(args)
    saved = None
    if args.resume or args.sample_only:
        saved = plumbing.load_run(args, SCRIPT, RUN_KEYS, parse_args([]))
        check_args(args)
    fid_stats = args.fid_stats or plumbing.training_set_stats(args)
    grade_fid = args.fid and args.num_samples and args.dataset != "iclevr"
    inception = plumbing.prepare_fid(args, fid_stats) if grade_fid else None
    evaluator = plumbing.load_course_evaluator(args.evaluator_dir) if args.evaluator_dir else None
    device = torch.device(args.device)
    data, labels, tests, names = load_training_data(args, args.limit, with_images=not args.sample_only)
    args.label_names = args.label_names or names
    plumbing.make_out_folder(args.out)

    torch.manual_seed(args.seed)
    G, D = (net.to(device) for net in build_gan(args))
    ema = EMA(G, args.ema_decay)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")
    amp = plumbing.Precision(device)  # bf16, or fp16 with a gradient scaler on GPUs without bf16, float32 on a CPU
    plumbing.say(f"precision: {amp.name}")
    state = {"step": 0, "seconds": 0.0, "losses": {"D": [], "G": []}}
    if saved is not None:
        plumbing.restore_run(saved, args, state, G=G, D=D, ema=ema, opt_g=opt_g, opt_d=opt_d, scaler=amp.scaler)

    metrics = {"device": plumbing.device_name(device), "torch": torch.__version__, "processes": plumbing.world_size(),
               "precision": amp.name}
    if not args.sample_only:
        train(args, data.to(device), labels if labels is None else labels.to(device), G, D, ema, opt_g, opt_d, state,
              amp)
        plumbing.write_loss(args.out, state["losses"], f"GAN losses ({args.arch}, {args.loss} loss, {args.dataset})")
        metrics.update(train_seconds=round(state["seconds"], 1), steps=state["step"])
    pool = torch.eye(len(args.label_names)) if args.dataset == "classes" else labels  # classes: each equally often
    torch.manual_seed(args.seed)  # a StyleGAN's noise inputs draw from the global generator
    standing_stats(ema.module, pool, args.z_dim, torch.Generator(device).manual_seed(args.seed),
                   args.sample_batch_size, args.stats_samples)
    start = time.time()
    if args.dataset != "iclevr" and args.num_samples:
        images = generate_samples(ema.module, args.num_samples, pool, args, device)
    if not plumbing.leave_distributed():
        return None  # under torchrun the other processes stop here: process 0 writes and grades
    plumbing.remove_old_metrics(args.out)
    if args.dataset == "iclevr":
        metrics.update(grade_iclevr(ema.module, tests, evaluator, args, device))
    elif args.num_samples:
        plumbing.save_samples(images, os.path.join(args.out, "samples"), os.path.join(args.out, "samples.zip"))
        plumbing.make_grid(images[:25], nrow=5).save(os.path.join(args.out, "grid.png"))
        metrics.update(num_samples=len(images), sample_seconds=round(time.time() - start, 2))
    if inception is not None:
        reference = lambda: load_training_data(args, args.fid_ref_limit)[0]  # noqa: E731 (read only if not cached)
        metrics.update(plumbing.compute_fid(images, inception, fid_stats, reference, device))
    plumbing.write_metrics(os.path.join(args.out, "metrics.json"), {**metrics, "args": vars(args)})
    plumbing.save_as(args)
    plumbing.say(f"wrote {args.out}: ckpt.pt, loss.png, progress/, the samples or grids, metrics.json")
    return metrics


if __name__ == "__main__":
    main()
