"""GAN baseline: the DCGAN-style GAN every diffusion result in this course is compared against.

The homework
------------
Three assignments ask for a GAN next to the diffusion model, judged on the same protocol:
  * DCGAN vs DDPM on MNIST and anime faces: 10,000 samples 00001.png ... 10000.png in a zip with no folder
    inside, FID against the training set (the pytorch-fid protocol of `fid.py`, the reference of ddpm_mnist.py),
    plus a 5x5 grid and the loss curves of both networks;
  * a conditional GAN vs a conditional DDPM on iCLEVR (24 objects, 1-3 per image): an 8x4 grid for each of
    test.json and new_test.json and the course evaluator's accuracy on them;
  * StyleGAN vs DDPM on cat faces (here: the class-conditional mode on a folder per class, e.g. AFHQ).
Weak baselines (FID 45-47, accuracies 0.14-0.68) make the comparison meaningless; this file is a strong one:
residual blocks, spectral norm in D, hinge loss, an exponential moving average of G.

The maths (Goodfellow et al. 2014; Miyato et al. 2018; Miyato & Koyama 2018; Lim & Ye 2017)
------------------------------------------------------------------------------------------
  G maps noise z ~ N(0, I) (and a condition y) to an image; D scores an image with a real number f(x, y).
  original game     min_G max_D  E_x[log sigmoid(f(x))] + E_z[log(1 - sigmoid(f(G(z))))]
  non-saturating    L_D = E_x[softplus(-f(x))] + E_z[softplus(f(G(z)))],   L_G = E_z[softplus(-f(G(z)))]
  hinge (default)   L_D = E_x[max(0, 1 - f(x))] + E_z[max(0, 1 + f(G(z)))],   L_G = -E_z[f(G(z))]
  spectral norm     every weight of D is used as W / sigma(W), sigma(W) its largest singular value, estimated
                    by one power iteration per step: u <- W v / |W v|, v <- W^T u / |W^T u|, sigma = u^T W v
                    (a convolution's kernel is reshaped to out x (in*k*k)); this keeps D smooth (about
                    1-Lipschitz), so its gradients stay useful to G.
  projection D      f(x, y) = psi(phi(x)) + y^T V phi(x): phi the features, V one row per class (or object).
                    One-hot y (classes) picks its class's row; multi-hot y (iCLEVR) adds the rows of every object.
  conditional BN    G normalises each feature map and rescales it per condition: BN(h) * (1 + gamma(y)) + beta(y),
                    gamma and beta linear in y (a per-class embedding for one-hot y, a sum over objects for multi-hot).
  EMA of G          theta_EMA <- d theta_EMA + (1 - d) theta after each G step; samples come from theta_EMA.

Commands
--------
  python gan_baseline.py --data-dir ../shared/data         # MNIST on a GPU: train, 10k samples, FID (the benchmark)
  python gan_baseline.py --device cpu --data-dir ../shared/data --ch 12 --batch-size 64 --limit 30000 --epochs 3 \
      --ema-decay 0.995 --num-samples 2000 --fid-stats ../shared/fid-reference/mnist_train10k_stats.npz  # CPU preset
  python gan_baseline.py --dataset folder --data-dir anime_faces --epochs 100         # unconditional, 64x64 RGB
  python gan_baseline.py --dataset classes --data-dir afhq/train --epochs 100         # one sub-folder per class
  python gan_baseline.py --dataset iclevr --data-dir iclevr_data --evaluator-dir course_files --epochs 300
  python gan_baseline.py --sample-only                     # resample from runs/gan_baseline/ckpt.pt
  python benchmarks/gan_mnist.py                           # times the MNIST run and checks FID <= 10
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
from PIL import Image, ImageDraw, ImageFont, ImageOps

# Keys that define a training run; --resume and --sample-only take them from the checkpoint.
RUN_KEYS = ("dataset", "data_dir", "image_size", "limit", "flip", "ch", "z_dim", "loss", "batch_size",
            "lr", "d_lr", "beta1", "beta2", "n_dis", "ema_decay", "seed", "label_names", "label_counts")


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DCGAN-style GAN, unconditional or (multi-)label conditional "
                                            "(see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["mnist", "folder", "classes", "iclevr"], default="mnist",
                   help="mnist (torchvision, 28x28 grey); folder (any images, recursive); classes (one sub-folder "
                        "per class); iclevr (objects.json, train.json, test files, images in DATA_DIR/iclevr)")
    g.add_argument("--data-dir", default="./data", help="MNIST root (holds MNIST/raw), the image folder, or iCLEVR's folder")
    g.add_argument("--image-size", type=int, default=64, help="side of the square images (not MNIST: 28)")
    g.add_argument("--limit", type=int, default=None,
                   help="train on the first N images only (per class with --dataset classes)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: off for MNIST, whose digits are not symmetric; on otherwise)")
    g.add_argument("--test-files", nargs="+", default=["test.json", "new_test.json"],
                   help="iCLEVR condition lists in DATA_DIR, each drawn as an 8-column grid and scored")
    g = p.add_argument_group("model and loss")
    g.add_argument("--ch", type=int, default=64, help="base width: G and D have ch * 2^k channels at 1/2^k of the size (k <= 3)")
    g.add_argument("--z-dim", type=int, default=128, help="length of the noise vector z")
    g.add_argument("--loss", choices=["hinge", "nonsat"], default="hinge", help="hinge or non-saturating GAN loss")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=30, help="passes over the data, counted in D steps")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of G")
    g.add_argument("--d-lr", type=float, default=None, help="Adam learning rate of D (default: --lr)")
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (DCGAN: 0.5; SNGAN/BigGAN: 0)")
    g.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    g.add_argument("--n-dis", type=int, default=1, help="D steps per G step")
    g.add_argument("--ema-decay", type=float, default=0.999, help="decay of the moving average of G's weights")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--compile", action="store_true", help="torch.compile G and D for training (GPU)")
    g.add_argument("--out", default="runs/gan_baseline", help="folder for checkpoint, images and metrics")
    g.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    g = p.add_argument_group("sampling and outputs")
    g.add_argument("--sample-only", action="store_true", help="skip training: sample from --ckpt")
    g.add_argument("--ckpt", default=None, help="checkpoint for --sample-only (default OUT/ckpt.pt)")
    g.add_argument("--num-samples", type=int, default=10000,
                   help="images written to OUT/samples and scored by FID (0: none; not for iclevr)")
    g.add_argument("--sample-batch-size", type=int, default=1000)
    g.add_argument("--stats-samples", type=int, default=4096,
                   help="samples of the EMA generator that re-estimate its batch-norm statistics before sampling")
    g.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                   help="FID of the samples against the training set (skipped with a note if no weights)")
    g.add_argument("--fid-stats", default=None,
                   help="reference statistics .npz (default runs/fid_stats_<data>.npz, computed once if missing)")
    g.add_argument("--inception", default=None, help="FID Inception weights (default: pytorch-fid's, via torch.hub)")
    g.add_argument("--evaluator-dir", default=None,
                   help="iclevr: folder with the course's evaluator.py and its checkpoint.pth (accuracy is skipped without)")
    args = p.parse_args(argv)

    # Bad values stop here, before anything is read or written.
    if args.flip is None:
        args.flip = args.dataset != "mnist"
    args.d_lr = args.lr if args.d_lr is None else args.d_lr
    checks = [
        (args.epochs >= 0, f"--epochs must be 0 or more, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.lr > 0 and args.d_lr > 0, f"--lr and --d-lr must be positive, got {args.lr} and {args.d_lr}"),
        (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1, f"--beta1 and --beta2 must be in [0, 1), got {args.beta1} and {args.beta2}"),
        (args.n_dis >= 1, f"--n-dis must be at least 1, got {args.n_dis}"),
        (0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1), got {args.ema_decay}"),
        (args.ch >= 1 and args.z_dim >= 1, f"--ch and --z-dim must be positive, got {args.ch} and {args.z_dim}"),
        (args.dataset == "mnist" or (args.image_size >= 16 and args.image_size % 4 == 0),
         f"--image-size must be a multiple of 4 and at least 16, got {args.image_size}"),
        (args.limit is None or args.limit >= 1, f"--limit must be at least 1, got {args.limit}"),
        (args.num_samples >= 0, f"--num-samples must be 0 or more, got {args.num_samples}"),
        (args.sample_batch_size >= 1, f"--sample-batch-size must be at least 1, got {args.sample_batch_size}"),
        (args.stats_samples >= 1, f"--stats-samples must be at least 1, got {args.stats_samples}"),
        (args.device == "cpu" or not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device} was asked for but CUDA is not available"),
        (args.dataset == "mnist" or os.path.isdir(args.data_dir), f"--data-dir {args.data_dir} is not a folder"),
        (not (args.resume and args.sample_only), "--resume and --sample-only exclude each other"),
        (args.evaluator_dir is None or os.path.isfile(os.path.join(args.evaluator_dir, "evaluator.py")),
         f"--evaluator-dir {args.evaluator_dir} holds no evaluator.py"),
    ]
    for ok, message in checks:
        if not ok:
            p.exit(2, f"error: {message}\n")
    args.ckpt = args.ckpt or os.path.join(args.out, "ckpt.pt")
    if (args.resume or args.sample_only) and not os.path.isfile(args.ckpt):
        p.exit(2, f"error: checkpoint {args.ckpt} not found (train first, or pass --ckpt)\n")
    args.label_names = args.label_counts = None  # filled from the data (or the checkpoint)
    return args


def fail(message):
    """One clear sentence and a non-zero exit: how every script reports bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# Data: every training image as one uint8 tensor N x C x H x W, labels as N x K floats (one-hot or multi-hot)
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
    return data[:limit].unsqueeze(1)


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
    print(f"reading {len(paths)} images of {len(classes)} classes from {root} at {size}x{size} ...", flush=True)
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


def load_iclevr_dataset(root, size, test_files, limit=None, with_images=True):
    """cond_iclevr.py's loaders, gathered into what this script needs: (uint8 images or None, N x K training labels,
    {test file: M x K conditions}, object names in index order). Every file is checked before any image is read."""
    objects = load_objects(os.path.join(root, "objects.json"))
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
        return (*load_iclevr_dataset(args.data_dir, args.image_size, args.test_files, args.limit, with_images), None)
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


# ---------------------------------------------------------------------------------------------------------------
# Model: a residual generator with conditional batch norm, a spectrally normalised projection discriminator
# ---------------------------------------------------------------------------------------------------------------
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


def spectral_norm(module):
    """W / sigma(W) with one power iteration per training forward pass (u, v kept as buffers between steps)."""
    return nn.utils.parametrizations.spectral_norm(module)


class DBlock(nn.Module):
    """Residual down-block (Miyato et al.'s ResNet D), every weight spectrally normalised: ReLU-conv-ReLU-conv and
    a 1x1 skip, both average-pooled to half size. The first block sees pixels, so it starts without the ReLU."""

    def __init__(self, in_ch, out_ch, down=True, first=False):
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = spectral_norm(nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch or down else nn.Identity()
        self.down, self.first = down, first

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.down:  # a 1x1 conv commutes with average pooling: pool first, convolve a quarter of the pixels
            return F.avg_pool2d(h, 2) + self.skip(F.avg_pool2d(x, 2))
        return h + self.skip(x)


class Discriminator(nn.Module):
    """f(x, y) = psi(phi(x)) + y^T V phi(x): residual down-blocks mirroring G, ReLU, global sum pooling (phi),
    a linear score psi, and the projection of the condition y onto phi (Miyato & Koyama 2018)."""

    def __init__(self, in_ch, ch, image_size, num_classes=0):
        super().__init__()
        levels, _ = resolution_levels(image_size)
        blocks = [DBlock(in_ch, width(ch, 1), first=True)]
        blocks += [DBlock(width(ch, k - 1), width(ch, k)) for k in range(2, levels + 1)]
        blocks += [DBlock(width(ch, levels), width(ch, levels), down=False)]
        self.blocks = nn.Sequential(*blocks)
        self.linear = spectral_norm(nn.Linear(width(ch, levels), 1))
        self.embed = spectral_norm(nn.Linear(num_classes, width(ch, levels), bias=False)) if num_classes else None

    def forward(self, x, y=None):
        phi = F.relu(self.blocks(x)).sum(dim=(2, 3))
        out = self.linear(phi).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * phi).sum(1)
        return out


def build_gan(args, channels):
    size = 28 if args.dataset == "mnist" else args.image_size
    num_classes = len(args.label_names or [])
    return (Generator(channels, args.ch, args.z_dim, size, num_classes),
            Discriminator(channels, args.ch, size, num_classes))


# ---------------------------------------------------------------------------------------------------------------
# GAN losses: f = D's raw score (a logit)
# ---------------------------------------------------------------------------------------------------------------
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


def discriminator_step(G, D, opt_d, x, y, args, device):
    """One step on L_D: real images x against as many fakes from G (held fixed) with the same conditions."""
    z = torch.randn(x.shape[0], args.z_dim, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        with torch.no_grad():
            fake = G(z, y)
        # One pass over real and fake together: one power iteration per step, and D has no batch norm to mix them.
        scores = D(torch.cat([x, fake.to(x.dtype)]), None if y is None else torch.cat([y, y])).float()
    real_scores, fake_scores = scores.chunk(2)
    loss = discriminator_loss(real_scores, fake_scores, args.loss)
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return loss.item()


def generator_step(G, D, opt_g, y, n, args, device):
    """One step on L_G for n fresh samples: gradients flow through D into G; D's own weights stay put."""
    z = torch.randn(n, args.z_dim, device=device)
    D.requires_grad_(False)  # no gradients for D's weights: they are not updated here, so do not compute them
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = generator_loss(D(G(z, y), y).float(), args.loss)
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    D.requires_grad_(True)
    return loss.item()


def train_gan(args, data, labels, G, D, ema, opt_g, opt_d, device, state):
    """Epochs of shuffled batches: a D step on every batch, a G step (and an EMA update) after every n_dis of them.
    state holds what a checkpoint needs to resume exactly; losses are recorded once per G step."""
    n, bs = len(data), args.batch_size
    iters_per_epoch = math.ceil(n / bs)
    total = iters_per_epoch * args.epochs
    G_train, D_train = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    G.train(), D.train()
    t_start, t_print, step_start = time.time(), time.time(), state["step"]

    def checkpoint():
        save_checkpoint(os.path.join(args.out, "ckpt.pt"), {
            "G": G.state_dict(), "D": D.state_dict(), "ema": ema.state_dict(), "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(), "args": vars(args), "rng": rng_state(),
            "d_losses": torch.tensor(state["d_losses"]), "g_losses": torch.tensor(state["g_losses"]), **{
                k: state[k] for k in ("step", "epoch", "batch_in_epoch", "epoch_perm")}})

    try:
        while state["epoch"] < args.epochs:
            if state["epoch_perm"] is None:
                state["epoch_perm"] = torch.randperm(n)
            while state["batch_in_epoch"] < iters_per_epoch:
                idx = state["epoch_perm"][state["batch_in_epoch"] * bs:(state["batch_in_epoch"] + 1) * bs]
                x = to_model_input(data[idx], device, args.flip)
                y = None if labels is None else labels[idx].to(device)
                d_loss = discriminator_step(G_train, D_train, opt_d, x, y, args, device)
                state["step"] += 1
                state["batch_in_epoch"] += 1
                if state["step"] % args.n_dis == 0:
                    g_loss = generator_step(G_train, D_train, opt_g, y, len(idx), args, device)
                    ema.update_parameters(G)
                    state["d_losses"].append(d_loss)
                    state["g_losses"].append(g_loss)
                if time.time() - t_print > 5 or state["step"] == total:
                    t_print, elapsed = time.time(), time.time() - t_start
                    rate = (state["step"] - step_start) / elapsed
                    print(f"epoch {state['epoch'] + 1}/{args.epochs}  step {state['step']}/{total}  "
                          f"D {np.mean(state['d_losses'][-50:]):.3f}  G {np.mean(state['g_losses'][-50:]):.3f}  "
                          f"{rate * bs:.0f} img/s  left {format_seconds((total - state['step']) / max(rate, 1e-9))}",
                          flush=True)
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


def draw_labels(pool, n, generator):
    """n conditions drawn from the pool (rows of training labels), or None for an unconditional G."""
    if pool is None:
        return None
    return pool[torch.randint(len(pool), (n,), generator=generator, device=generator.device).to(pool.device)]


@torch.no_grad()
def standing_stats(G, pool, z_dim, generator, batch_size, n):
    """Re-estimate G's batch-norm statistics from n of its own samples, then switch G to eval mode.
    The EMA copy holds moving averages of the *trained* G's running statistics, which describe other weights;
    statistics measured on the averaged weights themselves make its samples match its training-mode behaviour."""
    device = next(G.parameters()).device
    norms = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a plain average over the batches below
    G.train()
    for start in range(0, n, batch_size):
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
            chunks.append(to_uint8(G(z, y)))
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------------------------
# FID (fid.py, the pytorch-fid protocol) and the iCLEVR evaluator's accuracy
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


def load_course_evaluator(folder):
    """The course's `evaluation_model` from folder/evaluator.py. Its constructor loads ./checkpoint.pth, a path
    relative to the working directory, so it is built from inside folder; we return to where we were after."""
    sys.path.insert(0, os.path.abspath(folder))  # whatever evaluator.py imports from beside itself
    cwd = os.getcwd()
    try:
        spec = importlib.util.spec_from_file_location("evaluator", os.path.join(folder, "evaluator.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        os.chdir(folder)
        return module.evaluation_model()
    except Exception as e:  # the course's file can fail in many ways (no CUDA, no checkpoint); all stop us here
        fail(f"could not load the evaluator from {folder} ({type(e).__name__}: {e})")
    finally:
        os.chdir(cwd)


def iclevr_accuracy(evaluator, images, conditions, device):
    """The course's protocol: eval(images N x 3 x 64 x 64 in [-1, 1], multi-hot N x 24). For each image, the top-k
    of its 24 scores (k = objects asked for) that were asked for, over all objects asked for. The images are the
    quantised ones of the grid, so the number is the one a grader gets from the saved picture."""
    x = images.to(device).float() / 127.5 - 1
    with torch.no_grad():
        return float(evaluator.eval(x, conditions.to(device)))


# ---------------------------------------------------------------------------------------------------------------
# main: train (or load), then write every output
# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    saved = None
    if args.resume or args.sample_only:
        saved = load_checkpoint(args.ckpt)
        for key in RUN_KEYS:  # the model and run are the checkpoint's; only --epochs and outputs can change
            setattr(args, key, saved["args"][key])
    if args.evaluator_dir and args.dataset != "iclevr":
        fail(f"--evaluator-dir scores iCLEVR conditions; this run is --dataset {args.dataset}")
    if args.evaluator_dir and args.image_size != 64:
        fail(f"the course's evaluator takes 64x64 images; this run is --image-size {args.image_size}")
    data, labels, tests, names, counts = load_training_data(args, with_images=not args.sample_only)  # bad data stops here
    if saved is None:
        args.label_names, args.label_counts = names, counts
    elif names is not None and names != args.label_names:
        fail(f"the labels in {args.data_dir} ({', '.join(names[:5])}, ...) differ from the checkpoint's "
             f"({', '.join(args.label_names[:5])}, ...)")
    evaluator = load_course_evaluator(args.evaluator_dir) if args.evaluator_dir else None
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    channels = 1 if args.dataset == "mnist" else 3
    G, D = build_gan(args, channels)
    G, D = G.to(device), D.to(device)
    if device.type == "cuda":
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    ema = make_ema(G, args.ema_decay)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.d_lr, betas=(args.beta1, args.beta2))
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "epoch_perm": None, "d_losses": [], "g_losses": []}
    if saved is not None:
        G.load_state_dict(saved["G"])
        D.load_state_dict(saved["D"])
        ema.load_state_dict(saved["ema"])
        opt_g.load_state_dict(saved["opt_g"])
        opt_d.load_state_dict(saved["opt_d"])
        state.update({k: saved[k] for k in ("step", "epoch", "batch_in_epoch", "epoch_perm")})
        state["d_losses"], state["g_losses"] = saved["d_losses"].tolist(), saved["g_losses"].tolist()
        if args.resume:
            set_rng_state(saved["rng"])
            print(f"resuming {args.ckpt} at epoch {state['epoch']}, step {state['step']}", flush=True)
    print(f"G {sum(p.numel() for p in G.parameters()) / 1e6:.2f}M and D {sum(p.numel() for p in D.parameters()) / 1e6:.2f}M "
          f"parameters on {device}", flush=True)

    metrics = {"device": str(device), "torch": torch.__version__}
    t0 = time.time()
    if not args.sample_only:
        train_gan(args, data, labels, G, D, ema, opt_g, opt_d, device, state)
        metrics.update(train_seconds=round(time.time() - t0, 1), d_steps=state["step"],
                       g_steps=len(state["g_losses"]), epochs=state["epoch"])
        with open(os.path.join(args.out, "loss.csv"), "w", newline="") as fh:
            rows = zip(range(1, len(state["d_losses"]) + 1), state["d_losses"], state["g_losses"])
            csv.writer(fh).writerows([("iteration", "d_loss", "g_loss")] + list(rows))
        if state["g_losses"]:
            plot_loss({"D loss": state["d_losses"], "G loss": state["g_losses"]}, os.path.join(args.out, "loss.png"),
                      f"GAN losses ({args.loss}, {args.dataset}, batch {args.batch_size}, one point per G step)")

    G_ema, pool = ema.module, label_pool(args, labels)
    pool = None if pool is None else pool.to(device)
    g = torch.Generator(device).manual_seed(args.seed)
    standing_stats(G_ema, pool, args.z_dim, g, args.sample_batch_size, args.stats_samples)
    written = ["grid.png"]
    if args.dataset == "classes":  # one class per row, cycling through the classes
        grid_labels = F.one_hot(torch.arange(25) // 5 % len(args.label_names), len(args.label_names)).float()
        grid = generate_images(G_ema, 25, args.z_dim, g, args.sample_batch_size, labels=grid_labels)
    else:
        grid = generate_images(G_ema, 25, args.z_dim, g, args.sample_batch_size, pool)
    make_grid(grid, nrow=5).save(os.path.join(args.out, "grid.png"))
    if args.dataset == "iclevr":
        accuracy = {}
        for name, conditions in tests.items():
            images = generate_images(G_ema, len(conditions), args.z_dim, g, args.sample_batch_size, labels=conditions)
            png = os.path.splitext(os.path.basename(name))[0] + ".png"
            make_grid(images, nrow=8).save(os.path.join(args.out, png))
            written.append(png)
            if evaluator is not None:
                accuracy[name] = iclevr_accuracy(evaluator, images, conditions, device)
                print(f"accuracy on {name}: {accuracy[name]:.4f} ({len(conditions)} conditions)", flush=True)
        if evaluator is None:
            print("note: accuracy skipped; pass --evaluator-dir DIR, the folder holding the course's evaluator.py "
                  "and checkpoint.pth", flush=True)
        metrics.update(accuracy=accuracy or None, evaluator_dir=args.evaluator_dir)
    elif args.num_samples > 0:
        t1 = time.time()
        images = generate_images(G_ema, args.num_samples, args.z_dim, g, args.sample_batch_size, pool)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t1
        metrics.update(num_samples=len(images), sample_seconds=round(seconds, 2),
                       samples_per_second=round(len(images) / seconds, 1))
        save_samples(images, os.path.join(args.out, "samples"), os.path.join(args.out, "samples.zip"))
        written += [f"samples/ and samples.zip ({len(images)} images)"]
        if args.fid:
            metrics.update(compute_fid(args, images, device) or {"fid": None})
    metrics.update(total_seconds=round(time.time() - t0, 1), args=vars(args))
    write_metrics(os.path.join(args.out, "metrics.json"), metrics)
    written += ["loss.png", "loss.csv"] if not args.sample_only else []
    print(f"wrote {args.out}: {', '.join(written + ['metrics.json'])}", flush=True)


if __name__ == "__main__":
    main()
