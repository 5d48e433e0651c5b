"""GAN baseline: the GAN every diffusion result in these courses is compared against, DCGAN- or StyleGAN-style.

The homework
------------
Three assignments ask for a GAN next to the diffusion model, judged on the same protocol:
  * DCGAN vs DDPM on MNIST and anime faces: 10,000 samples 00001.png ... 10000.png in a zip with no folder
    inside, FID against the training set (the pytorch-fid protocol of `fid.py`, the reference of ddpm_mnist.py),
    plus a 5x5 grid and the loss curves of both networks;
  * a conditional GAN vs a conditional DDPM on iCLEVR (24 objects, 1-3 per image): an 8x4 grid for each of
    test.json and new_test.json and the course evaluator's accuracy on them;
  * StyleGAN vs DDPM on cat faces (--arch stylegan; --dataset classes for a folder per class, e.g. AFHQ).
Weak baselines (FID 45-47, accuracies 0.14-0.68) make the comparison meaningless; this file is a strong one:
residual blocks, spectral norm in D, hinge loss, an exponential moving average of G.

The maths (Goodfellow et al. 2014; Miyato et al. 2018; Miyato & Koyama 2018; Karras et al. 2019, 2020)
-----------------------------------------------------------------------------------------------------
  G maps noise z ~ N(0, I) (and a condition y) to an image; D scores an image with a real number f(x, y).
  original game     min_G max_D  E_x[log sigmoid(f(x))] + E_z[log(1 - sigmoid(f(G(z))))]
  non-saturating    L_D = E_x[softplus(-f(x))] + E_z[softplus(f(G(z)))],   L_G = E_z[softplus(-f(G(z)))]
  hinge (default)   L_D = E_x[max(0, 1 - f(x))] + E_z[max(0, 1 + f(G(z)))],   L_G = -E_z[f(G(z))]
                                                                       (discriminator_loss, generator_loss)
  spectral norm     every weight of D is used as W / sigma(W), sigma(W) its largest singular value, estimated
                    by one power iteration per step: u <- W v / |W v|, v <- W^T u / |W^T u|, sigma = u^T W v
                    (a convolution's kernel is reshaped to out x (in*k*k)); this keeps D smooth (about
                    1-Lipschitz), so its gradients stay useful to G.                             (spectral_norm)
  projection D      f(x, y) = psi(phi(x)) + y^T V phi(x): phi the features, V one row per class (or object).
                    One-hot y (classes) picks its class's row; multi-hot y (iCLEVR) adds the rows of every object.
  conditional BN    G normalises each feature map and rescales it per condition: BN(h) * (1 + gamma(y)) + beta(y),
                    gamma and beta linear in y (a per-class embedding for one-hot y, a sum over objects for multi-hot).
  EMA of G          theta_EMA <- d theta_EMA + (1 - d) theta after each G step; samples come from theta_EMA.
  StyleGAN (--arch stylegan; Karras et al. 2020, StyleGAN2):
    mapping         w = MLP(normalise(z) [, normalise(E y)]): a style vector per sample          (MappingNetwork)
    modulation      w'_{o,i,k} = s_i w_{o,i,k}, s = A(w) an affine map of the style, one scale per input channel
    demodulation    w''_{o,i,k} = w'_{o,i,k} / sqrt(sum_{i,k} w'_{o,i,k}^2 + eps): unit-variance outputs
                                                                                           (ModulatedConv2d)
    noise           h <- h + b_c n, n ~ N(0, I) per pixel, b_c a learned strength per channel    (StyleBlock)
    style mixing    with probability --mixing-prob the layers before a random crossover take w_1, the rest w_2
                                                                                                (mix_styles)
    R1 penalty      L_D += (gamma / 2) E_x[ |grad_x f(x)|^2 ] on real images, instead of spectral norm
                                                                                                (r1_penalty)

Commands
--------
  python gan_baseline.py --data-dir ../shared/data         # MNIST on a GPU: train, 10k samples, FID (the benchmark)
  python gan_baseline.py --preset cpu                      # MNIST on a 2-core CPU (the README's numbers)
  python gan_baseline.py --dataset folder --data-dir anime_faces --epochs 100         # unconditional, 64x64 RGB
  python gan_baseline.py --dataset folder --data-dir cat_faces --arch stylegan --epochs 100    # StyleGAN vs DDPM
  python gan_baseline.py --dataset classes --data-dir afhq/train --epochs 100         # one sub-folder per class
  python gan_baseline.py --dataset iclevr --data-dir iclevr_data --evaluator-dir course_files --epochs 300
  python gan_baseline.py --sample-only                     # resample from runs/gan_baseline/ckpt.pt
  python benchmarks/gan_mnist.py                           # times the MNIST run and checks FID <= 10
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

SCRIPT = "gan_baseline"  # written into every checkpoint, so that another script's checkpoint is recognised
# A preset changes defaults only; an explicit flag still wins. Measured numbers are in the README.
PRESETS = {
    # MNIST on a 2-core CPU in about 24 minutes of training (both cores: 0.43 s per D + G step): a narrow G and D,
    # 3,283 steps, and an EMA of G short enough (0.998) to follow a generator that is still improving.
    "cpu": dict(device="cpu", ch=12, batch_size=64, limit=30000, epochs=7, ema_decay=0.998, num_samples=2000,
                fid_ref_limit=10000, out="runs/gan_cpu"),
    # The conditional GAN on iCLEVR on a 2-core CPU: 32x32 images upsampled to 64 for the evaluator, as the DDPM's.
    # Width 16 (a D + G step takes about 1.1 s on both cores; width 32 took 3.4 s), 10 epochs = 2,820 steps: about
    # 51 minutes of training, measured (README, iCLEVR section; the DDPM preset trains 1.5 hours).
    "cpu_iclevr": dict(device="cpu", dataset="iclevr", image_size=32, output_size=64, ch=16, batch_size=64,
                       epochs=10, ema_decay=0.999, test_sets=4, out="runs/gan_iclevr_cpu"),
}
# The flags that define a training run: --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("dataset", "data_dir", "image_size", "limit", "flip", "arch", "ch", "z_dim", "w_dim", "mapping_layers",
            "loss", "batch_size", "lr", "d_lr", "beta1", "beta2", "n_dis", "r1_gamma", "mixing_prob", "ema_decay",
            "seed", "label_names", "label_counts")
DELIBERATELY_DIFFERENT = {
    "load_training_data": "a GAN reads every kind of data set: MNIST, folders, class folders and iCLEVR",
    "train": "a D step on every batch and a G step after every --n-dis of them, two networks, two optimisers",
    "check_args": "the flags of the two networks and the four kinds of data",
    "warn_if_slow_on_cpu": "times a D step and a G step instead of a diffusion step",
    "save_run": "two networks and two optimisers to save",
    "restore_run": "two networks and two optimisers to restore",
}


# =================================================================================================================
# Flags
# =================================================================================================================
def build_parser():
    p = FlagParser(description="DCGAN- or StyleGAN-style GAN, unconditional or (multi-)label conditional "
                                            "(see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default=None, help="cpu: the MNIST configuration measured on a 2-core CPU")
    a("--dataset", choices=["mnist", "folder", "classes", "iclevr"], default="mnist",
      help="mnist (28x28 grey); folder (any images); classes (a sub-folder per class); iclevr (the course's files)")
    a("--data-dir", default="./data", help="MNIST root (holds MNIST/raw), the image folder, or iCLEVR's folder")
    a("--objects", default=None, help="iclevr: the objects file (default DATA_DIR/objects.json or object.json)")
    a("--image-size", type=int, default=64, help="side of the square images G makes (not MNIST: 28)")
    a("--output-size", type=int, default=64, help="iclevr: side of the graded images (upsampled from --image-size)")
    a("--limit", type=int, default=None, help="train on the first N images only (per class with --dataset classes)")
    a("--flip", action=argparse.BooleanOptionalAction, default=None, help="random mirroring (default: not for MNIST)")
    a("--test-files", nargs="+", default=["test.json", "new_test.json"], help="iclevr: condition lists in DATA_DIR")
    a("--test-sets", type=int, default=1, help="iclevr: sets of images per test file; the first is handed in")
    a("--arch", choices=["dcgan", "stylegan"], default="dcgan", help="DCGAN-style residual G, or StyleGAN2-style G")
    a("--ch", type=int, default=64, help="base width: G and D have ch * 2^k channels at 1/2^k of the size (k <= 3)")
    a("--z-dim", type=int, default=128, help="length of the noise vector z")
    a("--w-dim", type=int, default=128, help="stylegan: length of the style vector w")
    a("--mapping-layers", type=int, default=4, help="stylegan: layers of the mapping network z -> w")
    a("--mixing-prob", type=float, default=0.9, help="stylegan: probability of style mixing in a G step")
    a("--r1-gamma", type=float, default=None, help="R1 penalty weight on D (default: 0 for dcgan, 1 for stylegan)")
    a("--loss", choices=["hinge", "nonsat"], default=None, help="GAN loss (default: hinge for dcgan, nonsat for stylegan)")
    a("--epochs", type=int, default=30, help="passes over the data, counted in D steps")
    a("--iters", type=int, default=None, help="stop after this many D steps instead (overrides --epochs)")
    a("--batch-size", type=int, default=128, help="images per D step (all GPUs together under torchrun)")
    a("--lr", type=float, default=2e-4, help="Adam learning rate of G")
    a("--d-lr", type=float, default=None, help="Adam learning rate of D (default: --lr)")
    a("--beta1", type=float, default=0.5, help="Adam beta1 (DCGAN: 0.5; SNGAN/BigGAN/StyleGAN: 0)")
    a("--beta2", type=float, default=0.999, help="Adam beta2")
    a("--n-dis", type=int, default=1, help="D steps per G step")
    a("--ema-decay", type=float, default=0.999, help="decay of the moving average of G's weights (0: none)")
    a("--seed", type=int, default=0,
      help="seeds the training and the sampling noise (with --sample-only: the sampling alone)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    a("--compile", action="store_true", help="torch.compile G and D for training (GPU)")
    a("--out", default="runs/gan_baseline", help="folder for checkpoint, images and metrics")
    a("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    a("--sample-only", action="store_true", help="skip training: sample from --ckpt")
    a("--ckpt", default=None, help="checkpoint for --sample-only (default OUT/ckpt.pt)")
    a("--num-samples", type=int, default=10000, help="images written to OUT/samples and graded by FID (not iclevr)")
    a("--sample-batch-size", type=int, default=1000, help="images generated at once")
    a("--stats-samples", type=int, default=4096, help="samples that re-estimate the EMA generator's batch-norm statistics")
    a("--fid", action=argparse.BooleanOptionalAction, default=True, help="FID of the samples against the training set")
    a("--fid-stats", default=None, help="reference statistics .npz (default: the training set's, computed once)")
    a("--fid-ref-limit", type=int, default=None, help="the default reference: only the first N training images")
    a("--inception", default=None, help="FID Inception weights (default: pytorch-fid's file, via torch.hub)")
    a("--save-as", nargs="+", default=None, metavar="OUTPUT=FILE",
      help="also save outputs under a course's names, e.g. grid.png=result_mnist.jpg loss.png=loss_mnist.jpg")
    a("--evaluator-dir", nargs="+", default=None, metavar="DIR",
      help="iclevr: folders with evaluator.py + checkpoint.pth; the first grades, every one is reported")
    return p


def parse_args(argv=None):
    args = parse_with_preset(build_parser(), argv)
    if args.flip is None:
        args.flip = args.dataset != "mnist"
    args.d_lr = args.lr if args.d_lr is None else args.d_lr
    args.loss = args.loss or ("hinge" if args.arch == "dcgan" else "nonsat")
    args.r1_gamma = (0.0 if args.arch == "dcgan" else 1.0) if args.r1_gamma is None else args.r1_gamma
    args.ckpt = args.ckpt or os.path.join(args.out, "ckpt.pt")
    args.label_names = args.label_counts = None  # filled from the data (or the checkpoint)
    check_args(args)
    return args


# =================================================================================================================
# Data: every training image as one uint8 tensor N x C x H x W, labels as N x K floats (one-hot or multi-hot)
# =================================================================================================================
def load_mnist(data_dir, limit=None):
    """The 60,000 training digits, N x 1 x 28 x 28 uint8 (downloaded by torchvision if they are not there)."""
    return mnist_digits(data_dir)[:limit].unsqueeze(1)


def load_class_folders(root, size, limit=None):
    """One sub-folder per class (AFHQ: cat/, dog/, wild/): images, one-hot labels, class names, images per class."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if len(classes) < 2:
        fail(f"--dataset classes needs at least two sub-folders of images in {root}, found {len(classes)}")
    paths, index, counts = [], [], []
    for k, name in enumerate(classes):
        found = list_images(os.path.join(root, name))[:limit]
        if not found:
            fail(f"class folder {os.path.join(root, name)} holds no .png/.jpg/.jpeg images")
        paths, index, counts = paths + found, index + [k] * len(found), counts + [len(found)]
    say(f"reading {len(paths)} images of {len(classes)} classes from {root} at {size}x{size} ...")
    images = torch.stack([load_image(p, size) for p in paths])
    return images, F.one_hot(torch.tensor(index), len(classes)).float(), classes, counts


# iCLEVR: the same loaders as cond_iclevr.py, copied so that this file reads alone (a test keeps them identical)
def read_json(path):
    if not os.path.isfile(path):
        fail(f"{path} not found (iCLEVR needs objects.json, train.json and the --test-files in --data-dir)")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"{path} is not valid JSON ({e})")


def objects_file(data_dir, given=None):
    """--objects, else DATA_DIR/objects.json, else the spec's spelling DATA_DIR/object.json."""
    if given:
        return given
    plural, singular = os.path.join(data_dir, "objects.json"), os.path.join(data_dir, "object.json")
    return singular if not os.path.isfile(plural) and os.path.isfile(singular) else plural


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
    """An iCLEVR render (320x240 RGBA) as uint8 3 x size x size: 8-bit RGB, the whole frame squashed to a square
    (bilinear), which is what transforms.Resize((size, size)) does to a PIL image; a crop could cut objects off."""
    try:
        with Image.open(path) as img:
            img = to_rgb8(img).resize((size, size), Image.BILINEAR)
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
    say(f"reading {len(paths)} images at {size}x{size} ...")
    t0, images = time.time(), []
    for i, path in enumerate(paths):
        images.append(load_iclevr_image(path, size))
        if i % 2000 == 1999 and time.time() - t0 > 10:
            say(f"  {i + 1}/{len(paths)}")
    return torch.stack(images)


def load_iclevr_dataset(root, size, test_files, limit=None, with_images=True, objects_path=None):
    """cond_iclevr.py's loaders, gathered into what this script needs: (uint8 images or None, N x K training labels,
    {test file: M x K conditions}, object names in index order). Every file is checked before any image is read."""
    objects = load_objects(objects_file(root, objects_path))
    # Without images (--sample-only) G is sampled with the training labels, but the images need not be there.
    paths, labels = load_train_index(os.path.join(root, "train.json"), os.path.join(root, "iclevr"), objects, limit,
                                     check_images=with_images)
    tests = {name: load_conditions(os.path.join(root, name), objects)[1] for name in test_files}
    images = load_iclevr_images(paths, size) if with_images else None
    return images, labels, tests, sorted(objects, key=objects.get)


def load_training_data(args, with_images=True):
    """(images, labels, iCLEVR test conditions, label names, images per label) for the chosen --dataset;
    labels is None for the unconditional modes. Without images only what sampling needs is read."""
    if args.dataset == "iclevr":
        return (*load_iclevr_dataset(args.data_dir, args.image_size, args.test_files, args.limit, with_images,
                                     args.objects), None)
    if not with_images:
        return None, None, {}, None, None
    if args.dataset == "mnist":
        return load_mnist(args.data_dir, args.limit), None, {}, None, None
    if args.dataset == "folder":
        return load_image_folder(args.data_dir, args.image_size, args.limit), None, {}, None, None
    images, labels, classes, counts = load_class_folders(args.data_dir, args.image_size, args.limit)
    return images, labels, {}, classes, counts


def label_pool(args, labels):
    """The conditions G is sampled with (grids, FID samples, batch-norm statistics): the training labels, one row
    per image, so samples follow the training set's class frequencies. None for unconditional G."""
    if args.dataset in ("mnist", "folder"):
        return None
    if labels is not None:
        return labels
    eye = torch.eye(len(args.label_names))  # --sample-only with classes: rebuilt from the per-class counts
    return eye.repeat_interleave(torch.tensor(args.label_counts), dim=0)


# =================================================================================================================
# Model: a residual generator with conditional batch norm, a spectrally normalised projection discriminator
# =================================================================================================================
def resolution_levels(size):
    """How often G doubles its feature maps: size halved while even and above 4 (28 -> 14 -> 7: 2; 64 -> 4: 4).
    Returns (levels, side of G's first feature map)."""
    levels = 0
    while size % 2 == 0 and size > 4:
        size, levels = size // 2, levels + 1
    return levels, size


def width(ch, level):
    """Channels at 1/2^level of the image size, in G and D alike: ch, 2ch, 4ch, then 8ch from level 3 on."""
    return ch * min(2 ** level, 8)


class ConditionalBatchNorm(nn.Module):
    """BN(h) * (1 + gamma(y)) + beta(y): batch norm whose scale and shift depend on the condition y (N x K).
    Without classes (K = 0) it is ordinary batch norm with a learned scale and shift."""

    def __init__(self, ch, num_classes):
        super().__init__()
        self.bn = nn.BatchNorm2d(ch, affine=num_classes == 0)
        self.conditional = num_classes > 0
        if self.conditional:
            self.gain = nn.Linear(num_classes, ch, bias=False)
            self.bias = nn.Linear(num_classes, ch, bias=False)
            nn.init.zeros_(self.gain.weight)  # starts as plain batch norm for every condition
            nn.init.zeros_(self.bias.weight)

    def forward(self, x, y=None):
        h = self.bn(x)
        if not self.conditional:
            return h
        return h * (1 + self.gain(y)[:, :, None, None]) + self.bias(y)[:, :, None, None]


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
    """Residual down-block (Miyato et al.'s ResNet D), every weight spectrally normalised (unless sn is off, as
    with StyleGAN's R1 penalty): ReLU-conv-ReLU-conv and a 1x1 skip, both average-pooled to half size. The first
    block sees pixels, so it starts without the ReLU."""

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
    """w = MLP(normalise(z) [, normalise(E y)]): each of the inputs scaled to unit mean square, then
    `layers` Linear + LeakyReLU(0.2) layers. The condition y (one- or multi-hot) enters through an embedding E."""

    def __init__(self, z_dim, w_dim, layers, num_classes=0):
        super().__init__()
        self.embed = nn.Linear(num_classes, z_dim, bias=False) if num_classes else None
        widths = [z_dim * (2 if num_classes else 1)] + [w_dim] * layers
        self.net = nn.Sequential(*[m for a, b in zip(widths[:-1], widths[1:]) for m in (nn.Linear(a, b), nn.LeakyReLU(0.2))])

    def forward(self, z, y=None):
        normalise = lambda v: v * torch.rsqrt(v.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        h = normalise(z) if self.embed is None else torch.cat([normalise(z), normalise(self.embed(y))], dim=1)
        return self.net(h)


class ModulatedConv2d(nn.Module):
    """A convolution whose weights are scaled per sample by its style: w' = s_i w_{o,i,k} with s = A(w), then
    (demodulate) divided by sqrt(sum_{i,k} w'^2 + eps), so that unit-variance inputs give unit-variance outputs.
    Every sample has its own weights, applied at once as a grouped convolution (groups = batch size)."""

    def __init__(self, in_ch, out_ch, kernel, w_dim, demodulate=True, up=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.scale = 1 / math.sqrt(in_ch * kernel * kernel)  # He's constant, applied at run time (equalised rate)
        self.affine = nn.Linear(w_dim, in_ch)
        nn.init.ones_(self.affine.bias)  # styles start at 1: the plain convolution
        self.demodulate, self.up, self.padding = demodulate, up, kernel // 2

    def modulated_weight(self, w):
        """The per-sample weights, N x out x in x k x k."""
        s = self.affine(w)
        weight = self.scale * self.weight[None] * s[:, None, :, None, None]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        return weight

    def forward(self, x, w):
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        n, c, h, wd = x.shape
        weight = self.modulated_weight(w)
        out = F.conv2d(x.reshape(1, n * c, h, wd), weight.reshape(-1, c, *weight.shape[3:]), padding=self.padding,
                       groups=n)
        return out.reshape(n, -1, h, wd)


class StyleBlock(nn.Module):
    """Modulated 3x3 conv, per-pixel noise with a learned strength per channel, bias, LeakyReLU(0.2) * sqrt(2)."""

    def __init__(self, in_ch, out_ch, w_dim, up=False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(out_ch))
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x, w):
        h = self.conv(x, w)
        noise = torch.randn(h.shape[0], 1, *h.shape[2:], device=h.device, dtype=h.dtype)
        h = h + self.noise_strength[None, :, None, None] * noise + self.bias[None, :, None, None]
        return F.leaky_relu(h, 0.2) * math.sqrt(2)


class StyleGenerator(nn.Module):
    """StyleGAN2's G in small: a learned constant at the first feature map's size, then per level an upsampling and
    a plain StyleBlock, each level adding its 1x1 "toRGB" image to the upsampled image so far (the skip
    architecture). Layer k takes style ws[k]; style mixing hands different w's to the layers before and after
    a crossover. y: N x num_classes, or None."""

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
        x = self.const.expand(ws.shape[1], -1, -1, -1)
        rgb = None
        for k, block in enumerate(self.blocks):
            x = block(x, ws[k])
            if k % 2 == 0:
                level_rgb = self.to_rgb[k // 2](x, ws[k])
                rgb = level_rgb if rgb is None else F.interpolate(rgb, scale_factor=2, mode="bilinear",
                                                                   align_corners=False) + level_rgb
        return torch.tanh(rgb)

    def forward(self, z, y=None, z2=None, crossover=None):
        w = self.mapping(z, y)
        ws = mix_styles(w, self.mapping(z2, y) if z2 is not None else w, crossover or self.num_layers, self.num_layers)
        return self.synthesis(ws)


def mix_styles(w1, w2, crossover, num_layers):
    """Style mixing: layers 0 .. crossover-1 take w1, the rest w2 (crossover = num_layers: w1 everywhere)."""
    return torch.stack([w1 if k < crossover else w2 for k in range(num_layers)])


def build_gan(args, channels):
    size = 28 if args.dataset == "mnist" else args.image_size
    num_classes = len(args.label_names or [])
    if args.arch == "stylegan":
        return (StyleGenerator(channels, args.ch, args.z_dim, args.w_dim, args.mapping_layers, size, num_classes),
                Discriminator(channels, args.ch, size, num_classes, sn=False))
    return (Generator(channels, args.ch, args.z_dim, size, num_classes),
            Discriminator(channels, args.ch, size, num_classes))


# =================================================================================================================
# GAN losses: f = D's raw score (a logit)
# =================================================================================================================
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


def fake_images(G, z, y, args):
    """G(z, y); a StyleGAN G mixes styles with probability --mixing-prob (a second z, a random crossover)."""
    if args.arch == "stylegan" and torch.rand(()) < args.mixing_prob:
        crossover = int(torch.randint(1, G.num_layers, ()))
        return G(z, y, z2=torch.randn_like(z), crossover=crossover)
    return G(z, y)


def discriminator_step(G, D, opt_d, x, y, args, device):
    """One step on L_D (+ R1): real images x against as many fakes from G (held fixed) with the same conditions."""
    z = torch.randn(x.shape[0], args.z_dim, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        with torch.no_grad():
            fake = fake_images(G, z, y, args)
        # One pass over real and fake together: one power iteration per step, and D has no batch norm to mix them.
        scores = D(torch.cat([x, fake.to(x.dtype)]), None if y is None else torch.cat([y, y])).float()
    real_scores, fake_scores = scores.chunk(2)
    loss = discriminator_loss(real_scores, fake_scores, args.loss)
    if args.r1_gamma > 0:
        loss = loss + r1_penalty(D, x, y, args.r1_gamma)
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(D)
    opt_d.step()
    return mean_over_processes(loss)


def generator_step(G, D, opt_g, y, n, args, device):
    """One step on L_G for n fresh samples: gradients flow through D into G; D's own weights stay put."""
    z = torch.randn(n, args.z_dim, device=device)
    D.requires_grad_(False)  # no gradients for D's weights: they are not updated here, so do not compute them
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = generator_loss(D(fake_images(G, z, y, args), y).float(), args.loss)
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(G)
    opt_g.step()
    D.requires_grad_(True)
    return mean_over_processes(loss)


def train(args, data, labels, G, D, ema, opt_g, opt_d, device, state):
    """Epochs of shuffled batches: a D step on every batch, a G step (and an EMA update) after every n_dis of them.
    state holds what a checkpoint needs to resume exactly; losses are recorded once per G step.

    Under torchrun each process takes its share of every batch and the gradients are averaged by hand
    (average_gradients) rather than by DistributedDataParallel, whose hooks do not follow R1's second backward
    pass; batch norm then normalises over each process's share."""
    n, bs = len(data), args.batch_size
    iters_per_epoch = math.ceil(n / bs)
    total = total_steps(args, iters_per_epoch)
    if world_size() > 1:
        check_shares(n, bs)
    G_train, D_train = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    G.train(), D.train()
    progress = Progress(state["step"], total)
    start = time.time() - state["train_seconds"]  # the training clock goes on from where a resumed run stopped
    with CtrlC() as ctrl_c:
        while state["step"] < total:
            if state["epoch_perm"] is None:
                state["epoch_perm"] = torch.randperm(n)
            first = state["batch_in_epoch"] * bs
            idx = state["epoch_perm"][first:first + bs]
            x = to_model_input(data[idx], device, args.flip)
            y = None if labels is None else labels[idx].to(device)
            d_loss = discriminator_step(G_train, D_train, opt_d, my_share(x), None if y is None else my_share(y), args, device)
            state["step"] += 1
            state["train_seconds"] = time.time() - start
            state["batch_in_epoch"] += 1
            if state["step"] % args.n_dis == 0:
                g_loss = generator_step(G_train, D_train, opt_g, None if y is None else my_share(y), len(my_share(x)),
                                        args, device)
                ema.update_parameters(G)
                state["d_losses"].append(d_loss)
                state["g_losses"].append(g_loss)
            if state["batch_in_epoch"] == iters_per_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"], state["epoch_perm"] = 0, None
                save_run(args, G, D, ema, opt_g, opt_d, state)
            progress.show(state, f"D {np.mean(state['d_losses'][-50:]):.3f}  G {np.mean(state['g_losses'][-50:]):.3f}",
                          bs, iters_per_epoch)
            if ctrl_c.stop_requested():
                save_run(args, G, D, ema, opt_g, opt_d, state)
                say(f"\ninterrupted: saved {args.out}/ckpt.pt at step {state['step']}; continue with --resume")
                sys.exit(130)
    if state["batch_in_epoch"]:  # --iters stopped in the middle of an epoch
        save_run(args, G, D, ema, opt_g, opt_d, state)


# =================================================================================================================
# Sampling from the EMA generator
# =================================================================================================================
def draw_labels(pool, n, generator):
    """n conditions drawn from the pool (rows of training labels), or None for an unconditional G."""
    if pool is None:
        return None
    return pool[torch.randint(len(pool), (n,), generator=generator, device=generator.device).to(pool.device)]


@torch.no_grad()
def standing_stats(G, pool, z_dim, generator, batch_size, n):
    """Re-estimate G's batch-norm statistics from n of its own samples, then switch G to eval mode.
    The EMA copy holds moving averages of the *trained* G's running statistics, which describe other weights;
    statistics measured on the averaged weights themselves make its samples match its training-mode behaviour.
    (A StyleGAN G has no batch norm: it only switches to eval mode.)"""
    device = next(G.parameters()).device
    norms = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a plain average over the batches below
    G.train()
    for start in range(0, n if norms else 0, batch_size):
        m = min(batch_size, n - start)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            G(torch.randn(m, z_dim, generator=generator, device=device), draw_labels(pool, m, generator))
    for norm in norms:
        norm.momentum = 0.1
    G.eval()


@torch.no_grad()
def generate_images(G, n, z_dim, generator, batch_size, pool=None, labels=None):
    """n samples as uint8 RGB N x 3 x H x W (what a PNG holds): z ~ N(0, I) and the conditions `labels`, or
    conditions drawn from the pool, or none."""
    device = next(G.parameters()).device
    chunks = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        z = torch.randn(m, z_dim, generator=generator, device=device)
        y = labels[start:start + m].to(device) if labels is not None else draw_labels(pool, m, generator)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            chunks.append(G(z, y).float())
    return torch.cat(chunks)


# =================================================================================================================
# main: check every input, train (or load), then write every output
# =================================================================================================================
def main(argv=None):
    args = parse_args(argv)
    start_distributed(args)
    device = torch.device(args.device)
    saved = load_run(args) if (args.resume or args.sample_only) else None
    if args.evaluator_dir and args.dataset != "iclevr":
        fail(f"--evaluator-dir scores iCLEVR conditions; this run is --dataset {args.dataset}")
    fid_setup = (prepare_fid(args) if args.fid and args.num_samples > 0 and args.dataset != "iclevr" and rank() == 0
                 else None)
    data, labels, tests, names, counts = load_training_data(args, with_images=not args.sample_only)  # bad data stops here
    if saved is None:
        args.label_names, args.label_counts = names, counts
    elif names is not None and names != args.label_names:
        fail(f"the labels in {args.data_dir} ({', '.join(names[:5])}, ...) differ from the checkpoint's "
             f"({', '.join(args.label_names[:5])}, ...)")
    evaluators = {d: load_evaluator(d) for d in args.evaluator_dir or []} if rank() == 0 else {}
    check_out_folder(args.out)

    torch.manual_seed(args.seed)
    channels = 1 if args.dataset == "mnist" else 3
    G, D = build_gan(args, channels)
    G, D = G.to(device, memory_format=channels_last(device)), D.to(device, memory_format=channels_last(device))
    ema = make_ema(G, args.ema_decay)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.d_lr, betas=(args.beta1, args.beta2))
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "epoch_perm": None, "d_losses": [], "g_losses": []}
    if saved is not None:
        restore_run(saved, args, G, D, ema, opt_g, opt_d, state)
    # Seconds of training over every resume: kept in the checkpoint, so a resumed run reports its whole training.
    state["train_seconds"] = float(saved.get("train_seconds", 0.0)) if saved is not None else 0.0
    say(f"{args.arch} G {sum(p.numel() for p in G.parameters()) / 1e6:.2f}M and D "
        f"{sum(p.numel() for p in D.parameters()) / 1e6:.2f}M parameters on {device}")

    metrics = {"device": str(device), "hardware": device_name(device), "torch": torch.__version__,
               "processes": world_size(), "arch": args.arch}
    t0 = time.time()
    if not args.sample_only:
        warn_if_slow_on_cpu(args, G, D, data[:args.batch_size], labels, device, math.ceil(len(data) / args.batch_size))
        train(args, data, labels, G, D, ema, opt_g, opt_d, device, state)
        metrics.update(train_seconds=round(state["train_seconds"], 1), d_steps=state["step"],
                       g_steps=len(state["g_losses"]), epochs=state["epoch"])
        write_loss(args, {"d_loss": state["d_losses"], "g_loss": state["g_losses"]},
                   f"GAN losses ({args.arch}, {args.loss}, {args.dataset}, batch {args.batch_size}, one point per G step)")
    if rank() != 0:
        return None  # rank 0 samples, writes and grades

    G_ema, pool = ema.module, label_pool(args, labels)
    pool = None if pool is None else pool.to(device)
    g = torch.Generator(device).manual_seed(args.seed)
    torch.manual_seed(args.seed)  # a StyleGAN's noise inputs come from the global generator
    standing_stats(G_ema, pool, args.z_dim, g, args.sample_batch_size, args.stats_samples)
    written = ["grid.png"]
    if args.dataset == "classes":  # one class per row, cycling through the classes
        grid_labels = F.one_hot(torch.arange(25) // 5 % len(args.label_names), len(args.label_names)).float()
        grid = generate_images(G_ema, 25, args.z_dim, g, args.sample_batch_size, labels=grid_labels)
    else:
        grid = generate_images(G_ema, 25, args.z_dim, g, args.sample_batch_size, pool)
    make_grid(to_uint8(grid), nrow=5).save(os.path.join(args.out, "grid.png"))
    remove_stale(os.path.join(args.out, "metrics.json"))  # it described the samples about to be replaced
    if args.dataset == "iclevr":
        metrics.update(accuracy={}, results={}, evaluators=args.evaluator_dir, image_size=args.image_size,
                       output_size=args.output_size)
        generated, generate_seconds = 0, 0.0  # the generator's time alone, not the evaluators'
        for name, conditions in tests.items():
            draws = {d: [] for d in evaluators}
            for k in range(args.test_sets):
                t1 = time.time()
                images = to_uint8(to_output_size(generate_images(G_ema, len(conditions), args.z_dim, g,
                                                                 args.sample_batch_size, labels=conditions),
                                                 args.output_size))
                generated, generate_seconds = generated + len(images), generate_seconds + time.time() - t1
                if k == 0:  # the first set is the hand-in
                    png = os.path.splitext(os.path.basename(name))[0] + ".png"
                    make_grid(images, nrow=8).save(os.path.join(args.out, png))
                    written.append(png)
                for d, evaluator in evaluators.items():
                    draws[d].append(evaluate(evaluator, images, conditions)[0])
            if evaluators:
                first = draws[args.evaluator_dir[0]]
                metrics["accuracy"][name] = first[0]
                metrics["results"][name] = {"accuracy_per_set": first, **spread(first),
                                            "by_evaluator": {d: spread(v) for d, v in draws.items()}}
                say(f"accuracy on {name}: {first[0]:.4f} ({len(conditions)} conditions)"
                    + (f"; {len(first)} sets: {np.mean(first):.4f} +- {np.std(first, ddof=1):.4f}" if len(first) > 1 else ""))
        metrics.update(num_samples=generated, sample_seconds=round(generate_seconds, 2),
                       samples_per_second=round(generated / max(generate_seconds, 1e-9), 1))
        if not evaluators:
            say("note: accuracy skipped; pass --evaluator-dir DIR, the folder holding the course's evaluator.py "
                "and checkpoint.pth")
        metrics["accuracy"] = metrics["accuracy"] or None
    elif args.num_samples > 0:
        t1 = time.time()
        images = to_uint8(generate_images(G_ema, args.num_samples, args.z_dim, g, args.sample_batch_size, pool))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t1
        metrics.update(num_samples=len(images), sample_seconds=round(seconds, 2),
                       samples_per_second=round(len(images) / seconds, 1))
        save_samples(images, os.path.join(args.out, "samples"), os.path.join(args.out, "samples.zip"))
        written += [f"samples/ and samples.zip ({len(images)} images)"]
        if fid_setup is not None:
            metrics.update(compute_fid(args, images, fid_setup, device))
    metrics.update(total_seconds=round(time.time() - t0, 1), args=vars(args))
    write_metrics(os.path.join(args.out, "metrics.json"), metrics)
    written += ["loss.png", "loss.csv"] if not args.sample_only else []
    say(f"wrote {args.out}: {', '.join(written + ['metrics.json'])}")
    save_as(args)
    return metrics


# =================================================================================================================
# =================================================================================================================
# APPENDIX: plumbing. Everything above is the method; what follows checks inputs, saves and restores runs,
# handles Ctrl-C and torchrun, reads and writes images, and wires in FID and the iCLEVR evaluator. Python looks
# these names up when they are called, so they may live below main().
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
    folders = args.evaluator_dir or []
    problems = [
        at_least("--epochs", args.epochs, 0), at_least("--iters", args.iters, 1),
        at_least("--batch-size", args.batch_size, 1 if world_size() == 1 else world_size()),
        must(args.lr > 0 and args.d_lr > 0, f"--lr and --d-lr must be positive, got {args.lr} and {args.d_lr}"),
        must(0 <= args.beta1 < 1 and 0 <= args.beta2 < 1,
             f"--beta1 and --beta2 must be in [0, 1), got {args.beta1} and {args.beta2}"),
        at_least("--n-dis", args.n_dis, 1), between("--ema-decay", args.ema_decay, 0, 1, high_included=False),
        must(args.ch >= 1 and args.z_dim >= 1, f"--ch and --z-dim must be positive, got {args.ch} and {args.z_dim}"),
        at_least("--w-dim", args.w_dim, 1), at_least("--mapping-layers", args.mapping_layers, 1),
        between("--mixing-prob", args.mixing_prob, 0, 1), at_least("--r1-gamma", args.r1_gamma, 0),
        must(args.dataset == "mnist" or (args.image_size >= 16 and args.image_size % 4 == 0),
             f"--image-size must be a multiple of 4 and at least 16, got {args.image_size}"),
        at_least("--output-size", args.output_size, 8), at_least("--test-sets", args.test_sets, 1),
        at_least("--limit", args.limit, 1), at_least("--num-samples", args.num_samples, 0),
        at_least("--fid-ref-limit", args.fid_ref_limit, 2),
        at_least("--sample-batch-size", args.sample_batch_size, 1), at_least("--stats-samples", args.stats_samples, 1),
        device_problem(args.device), compile_problem(args), save_as_problem(args.save_as),
        must(args.dataset == "mnist" or args.sample_only or os.path.isdir(args.data_dir),
             f"--data-dir {args.data_dir} is not a folder"),
        must(not (args.resume and args.sample_only), "--resume and --sample-only exclude each other"),
        *[must(os.path.isfile(os.path.join(d, "evaluator.py")), f"--evaluator-dir {d} holds no evaluator.py")
          for d in folders],
        must(not (args.resume or args.sample_only) or os.path.isfile(args.ckpt),
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


def average_gradients(model):
    """Under torchrun: every parameter's gradient replaced by its mean over the processes, in one all-reduce of one
    flat buffer. Nothing in a plain run."""
    if world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


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


def save_run(args, G, D, ema, opt_g, opt_d, state):
    if rank() == 0:
        save_checkpoint(os.path.join(args.out, "ckpt.pt"), {
            "script": SCRIPT, "G": G.state_dict(), "D": D.state_dict(), "ema": ema.module.state_dict(),
            "ema_updates": ema.updates, "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "args": vars(args),
            "rng": rng_state(), "d_losses": torch.tensor(state["d_losses"]), "g_losses": torch.tensor(state["g_losses"]),
            **{k: state[k] for k in ("step", "epoch", "batch_in_epoch", "epoch_perm", "train_seconds")}})


def restore_run(saved, args, G, D, ema, opt_g, opt_d, state):
    G.load_state_dict(saved["G"])
    D.load_state_dict(saved["D"])
    ema.module.load_state_dict(saved["ema"])
    ema.updates = saved["ema_updates"]
    opt_g.load_state_dict(saved["opt_g"])
    opt_d.load_state_dict(saved["opt_d"])
    state.update({k: saved[k] for k in ("step", "epoch", "batch_in_epoch", "epoch_perm")})
    state["d_losses"], state["g_losses"] = saved["d_losses"].tolist(), saved["g_losses"].tolist()
    if args.resume:
        set_rng_state(saved["rng"])
        say(f"resuming {args.ckpt} at epoch {state['epoch']}, step {state['step']}")


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


def warn_if_slow_on_cpu(args, G, D, batch, labels, device, steps_per_epoch):
    """On the CPU without --preset cpu, time one D step and one G step on copies of the networks and, if the run
    would take more than an hour, say so at once with the estimate and the preset sized for a CPU. The random
    state is restored, so the run itself is unchanged."""
    if device.type != "cpu" or (args.preset or "").startswith("cpu"):
        return
    saved_rng, G_copy, D_copy = torch.get_rng_state(), copy.deepcopy(G), copy.deepcopy(D)
    x = to_model_input(batch, device, False)
    y = None if labels is None else labels[:len(x)].to(device)
    start = time.time()
    discriminator_step(G_copy, D_copy, torch.optim.SGD(D_copy.parameters(), lr=0.0), x, y, args, device)
    generator_step(G_copy, D_copy, torch.optim.SGD(G_copy.parameters(), lr=0.0), y, len(x), args, device)
    seconds = time.time() - start
    torch.set_rng_state(saved_rng)
    steps = total_steps(args, steps_per_epoch)
    if seconds * steps > 3600:
        say(f"note: this is a GPU-sized run: on this CPU about {format_seconds(seconds * steps)} of training "
            f"({steps} steps of {seconds:.1f} s); --preset cpu is the configuration measured on a 2-core CPU (README)")


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


def to_output_size(x, size):
    """Images in [-1, 1] upsampled (bilinear) to size x size: what the evaluator and the hand-in take."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


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


# ---- the course's iCLEVR evaluator (as cond_iclevr.py) ----------------------------------------------------------
def load_evaluator(folder):
    """Import folder/evaluator.py and construct its evaluation_model() with folder as the working directory,
    since it loads './checkpoint.pth'. Neither file is changed. The course's class moves its network to the
    GPU (.cuda()) when constructed, so without CUDA it cannot be built: we say so and stop."""
    path, ckpt = os.path.join(folder, "evaluator.py"), os.path.join(folder, "checkpoint.pth")
    for needed in (path, ckpt):
        if not os.path.isfile(needed):
            fail(f"--evaluator-dir {folder} has no {os.path.basename(needed)} (the course's evaluator.py and checkpoint.pth)")
    spec = importlib.util.spec_from_file_location(f"course_evaluator_{abs(hash(os.path.abspath(folder)))}", path)
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


def evaluator_network(evaluator, required=True):
    """The torch network inside evaluation_model (the course names it resnet18): its device, and the classifier
    that --classifier-guidance differentiates. None (if not required) for an evaluator without one."""
    net = getattr(evaluator, "resnet18", None)
    if not isinstance(net, nn.Module):
        net = next((v for v in vars(evaluator).values() if isinstance(v, nn.Module)), None)
    if net is None and required:
        fail("found no torch network inside evaluation_model (expected an attribute such as resnet18)")
    return net


def evaluate(evaluator, images, y):
    """The course's protocol: the images as their PNGs hold them (uint8), as ToTensor + Normalize(0.5, 0.5) would
    load them, i.e. u / 127.5 - 1, on the evaluator's device, with the multi-hot labels; eval(images, labels)
    returns hits / requested objects. Also the hits per image (one image per call; the network is in eval mode,
    so the batch does not change an image's outputs)."""
    net = evaluator_network(evaluator, required=False)
    device = next(net.parameters()).device if net is not None else torch.device("cpu")
    x = (images.float() / 255 - 0.5) / 0.5
    x, y = x.to(device), y.float().to(device)
    accuracy = float(evaluator.eval(x, y))
    hits = [round(float(evaluator.eval(x[i:i + 1], y[i:i + 1])) * int(y[i].sum().item())) for i in range(len(x))]
    return accuracy, hits


def spread(values):
    """Mean and standard deviation of the accuracies of several sets (32 images make a noisy number)."""
    if not values:
        return {}
    return {"accuracy_mean": float(np.mean(values)), "accuracy_std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "sets": len(values)}


if __name__ == "__main__":  # last, so that main() finds every function of the appendix
    main()
    leave_distributed()
