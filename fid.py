"""fid.py: the Fréchet Inception Distance, written out in one file.

What FID measures
-----------------
Push N real and N generated images through a fixed ImageNet classifier (Inception-v3) and keep the
2048 numbers of its last pooling layer ("pool3") for every image. Fit one Gaussian to each set of
feature vectors, with mean μ and covariance Σ, and report the Fréchet (2-Wasserstein) distance
between the two Gaussians:

    FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})

Lower is better; 0 means the two feature distributions have the same mean and covariance.

The protocol (identical to pytorch-fid and pytorch_gan_metrics, so this number is the grader's)
--------------------------------------------------------------------------------------------
1. Images are uint8 RGB. Files are read with PIL and `.convert("RGB")` (grayscale is replicated to
   3 channels). In-memory samples are first quantised to uint8 exactly as saving them as PNG with
   torchvision's `save_image` would: floor(255 · clamp(x, 0, 1) + 0.5).
2. x / 255, bilinear resize to 299×299 (`align_corners=False`), then 2x − 1.
3. The FID variant of Inception-v3 with the TensorFlow 2015-12-05 weights (`FIDInceptionA/C/E`,
   below), in float32 with TF32 off; the 2048-d pool3 output is the feature vector.
4. μ = mean and Σ = `np.cov(rowvar=False)` of the features, in float64.
5. (Σ₁Σ₂)^{1/2} by `scipy.linalg.sqrtm`, with pytorch-fid's ε retry and imaginary-part check.
Statistics files are `.npz` with arrays `mu` and `sigma`, interchangeable with both tools.
FID is biased upward for small N and needs N > 2048 for a full-rank Σ: grade with 10,000 samples.

Usage
-----
    python fid.py samples/ reference_stats.npz              # folder or .npz on either side
    python fid.py --save-stats samples/ samples_stats.npz   # folder -> statistics file
    python fid.py --mnist-stats mnist_train_stats.npz --data-dir ./data
    python fid.py real/ fake/ --limit 500 --device cpu      # quick check on the first 500 images
    python fid.py a/ b/ --inception ../shared/weights/pt_inception-2015-12-05-nofc.pth

From Python (how the training scripts use it):

    import fid
    mu, sigma = fid.compute_statistics(samples, value_range=(-1, 1))  # N×C×H×W tensor
    ref_mu, ref_sigma = fid.load_statistics("mnist_train_stats.npz")
    score = fid.frechet_distance(mu, sigma, ref_mu, ref_sigma)
"""

import argparse
import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
# The protocol's fixed numbers live here, next to the flags; nothing below hides another constant.
# fid.py is the library the other scripts import; these two differ from ddpm_mnist.py's copies on purpose.
DELIBERATELY_DIFFERENT = {
    "to_uint8": "takes any value range and checks it, since a wrong range silently gives a wrong FID",
    "list_images": "raises FIDError for callers to catch instead of exiting the program",
    "Progress": "counts images through the network, on stderr, for a library's callers",
    "FlagParser": "its command line exits with status 1 and the message, as every other error of fid.py does",
}
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_ENV = "FID_INCEPTION_WEIGHTS"
INCEPTION_SIZE = 299          # the resolution the TF graph was trained at
FEATURE_DIM = 2048            # pool3 width
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}
PROGRESS_EVERY_S = 5.0
BATCH_SIZE = {"cuda": 250, "cpu": 50}  # 50 as in pytorch-fid; any size gives the same FID


class FlagParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is told in one line instead of the usage block."""

    def error(self, message):
        sys.exit(f"error: {message} (see --help)")


def build_parser():
    p = FlagParser(
        description="Fréchet Inception Distance between two image folders or .npz statistics files "
                    "(the pytorch-fid protocol).")
    p.add_argument("paths", nargs="*", metavar="A B",
                   help="two inputs, each a folder of .png/.jpg/.jpeg images (searched "
                        "recursively) or an .npz file with mu and sigma")
    p.add_argument("--save-stats", nargs=2, metavar=("FOLDER", "OUT.npz"),
                   help="compute the statistics of FOLDER and write them to OUT.npz")
    p.add_argument("--mnist-stats", metavar="OUT.npz",
                   help="write the statistics of the 60,000 MNIST training digits (28×28, as RGB)")
    p.add_argument("--data-dir", default="./data",
                   help="where torchvision finds or downloads MNIST (for --mnist-stats)")
    p.add_argument("--inception", metavar="PATH", default=None,
                   help=f"Inception weights file (default: ${WEIGHTS_ENV}, else download "
                        f"pytorch-fid's release file into the torch hub cache)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per forward pass (default: {BATCH_SIZE['cuda']} on cuda, "
                        f"{BATCH_SIZE['cpu']} on cpu)")
    p.add_argument("--device", default=None,
                   help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image-decoding worker processes (default: min(8, CPUs) on cuda, 0 on cpu)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use only the first N images of each folder (sorted by path)")
    return p


class FIDError(Exception):
    """A problem with the user's input, told in one sentence; the CLI prints it, no traceback."""


class FIDWarning(UserWarning):
    """The number is computed but should be read with care (few samples, singular covariance)."""


# ----------------------------------------------------------------------------------------------
# The network: Inception-v3 as the 2015-12-05 TensorFlow graph computes it
# ----------------------------------------------------------------------------------------------
# Attribute names are the keys of the weights file (Conv2d_1a_3x3.conv.weight,
# Mixed_5b.branch1x1.bn.running_mean, ...). Three details differ from torchvision's Inception-v3,
# and each changes the features: TF's average pools ignore the zero padding
# (count_include_pad=False), the last block uses a max pool in its pool branch, and the input is
# scaled to [-1, 1] rather than normalised with ImageNet's mean and std.

class BasicConv2d(nn.Module):
    """Convolution without bias (the BatchNorm shift replaces it), BatchNorm with TF's eps, ReLU."""

    def __init__(self, in_channels, out_channels, **conv_args):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_args)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TF divides each window by the number of real pixels in it, not by 9.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35×35 block: 1×1, 5×5, double 3×3 and pool branches side by side."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35×35 → 17×17 (strided convolutions next to a max pool)."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3dbl, bp], dim=1)


class FIDInceptionC(nn.Module):
    """17×17 block: 7×7 convolutions factored into 1×7 and 7×1 to save compute."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        bp = self.branch_pool(tf_avg_pool(x))
        return torch.cat([b1, b7, b7dbl, bp], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17×17 → 8×8."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class FIDInceptionE(nn.Module):
    """8×8 block whose 3×3 branches split into parallel 1×3 and 3×1 halves.

    The TF graph's first E block (E_1) averages in its pool branch; the last one (E_2) takes the
    maximum, a quirk of the 2015 graph that pytorch-fid reproduces and so must we.
    """

    def __init__(self, in_channels, max_pool_branch):
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], dim=1)
        if self.max_pool_branch:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3dbl, bp], dim=1)


class FIDInceptionV3(nn.Module):
    """Maps float images in [0, 1], N×C×H×W (any H, W; C = 1 or 3), to N×2048 pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool_branch=False)   # E_1
        self.Mixed_7c = FIDInceptionE(2048, max_pool_branch=True)    # E_2

    def forward(self, images):
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        # Resizing the float image (not the uint8 one) and align_corners=False are part of the
        # protocol: both change pixel values and hence the FID.
        x = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False)
        x = 2 * x - 1
        # channels_last makes convolutions 1.5-2× faster (oneDNN on CPU, cuDNN on GPU); the
        # features agree with the default layout to float32 rounding.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))     # 147×147
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # 73×73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                         # 71×71
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # 35×35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)                                                  # 17×17
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7a(x)                                                  # 8×8
        x = self.Mixed_7c(self.Mixed_7b(x))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)                        # pool3: N×2048


def pick_device(device=None):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise FIDError(f"unknown device {device!r}; use cuda or cpu.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FIDError("device cuda was asked for but no CUDA GPU is available; use cpu.")
    return device


def load_inception(weights=None, device=None):
    """The FID Inception network in eval mode, from `weights`, $FID_INCEPTION_WEIGHTS or the URL."""
    device = pick_device(device)
    source = weights or os.environ.get(WEIGHTS_ENV)
    if source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FIDError(f"the Inception weights file {path} does not exist.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FIDError(f"cannot read Inception weights from {path} "
                           f"({_first_line(e)}).") from None
    else:
        source = FID_WEIGHTS_URL
        try:
            with contextlib.redirect_stderr(sys.stdout):  # torch.hub's "Downloading ..." is news, not an error
                state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu",
                                                           progress=True, weights_only=True)
        except Exception as e:
            raise FIDError(f"no Inception weights: could not download {FID_WEIGHTS_URL} "
                           f"({_first_line(e)}), so pass --inception PATH or set {WEIGHTS_ENV} "
                           f"to a local copy of that file.") from None
    if not isinstance(state, dict):
        raise FIDError(f"{source} does not hold a state dict of the FID Inception network.")
    # The official file also carries the 1008-way ImageNet logits; pool3 features never use them.
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    model = FIDInceptionV3()
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise FIDError(f"{source} is not the FID Inception state dict "
                       f"({len(missing)} keys missing, {len(unexpected)} unexpected, e.g. "
                       f"{(missing + unexpected)[0]}).")
    try:
        model.load_state_dict(state)  # BatchNorm fills in the absent num_batches_tracked itself
    except RuntimeError as e:
        raise FIDError(f"{source} has tensors of the wrong shape ({_first_line(e)}).") from None
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def exact_float32():
    """Turn TF32 off while features are taken, and restore the caller's setting afterwards.

    TF32 rounds float32 matmul/conv inputs to 10 mantissa bits on recent GPUs: fine for training,
    but it moves the features and so the FID away from the reference implementation.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------
# Preprocessing: everything becomes a batch of uint8 RGB images first
# ----------------------------------------------------------------------------------------------

def to_uint8(images, value_range=(0, 1)):
    """Quantise float images to uint8 the way torchvision's `save_image` writes a PNG.

    x is mapped from value_range to [0, 1], clamped, and rounded half up: floor(255·x + 0.5).
    Grading reads PNG files, so the features must see the same 256 levels the files hold; a
    uint8 tensor is returned unchanged.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise FIDError(f"images must be uint8 or floating point, not {images.dtype}.")
    low, high = value_range
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    if x.numel():
        # A wrong range clamps away half the image and gives a plausible-looking, wrong FID.
        seen_low, seen_high = (v.item() for v in torch.aminmax(x))
        span = high - low
        if seen_low < low - span / 4 or seen_high > high + span / 4:
            raise FIDError(f"images hold values in [{seen_low:.3g}, {seen_high:.3g}], far outside "
                           f"value_range={tuple(value_range)}; pass the range they were made in, "
                           f"e.g. value_range=(-1, 1), or uint8 images.")
    x = ((x - low) / (high - low)).clamp(0, 1)
    return (x * 255 + 0.5).floor().to(torch.uint8)


def as_nchw(images):
    """N×C×H×W with C = 1 or 3; an N×H×W tensor (e.g. MNIST's `.data`) is one channel."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise FIDError(f"images must be N×C×H×W with 1 or 3 channels, got shape "
                       f"{tuple(images.shape)}.")
    return images


def list_images(folder):
    """All .png/.jpg/.jpeg files under `folder` (any case, recursively), sorted by path."""
    folder = Path(folder)
    if not folder.exists():
        raise FIDError(f"{folder} does not exist.")
    if not folder.is_dir():
        raise FIDError(f"{folder} is not a folder.")
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FIDError(f"{folder} holds no .png, .jpg or .jpeg images.")
    return files


def to_rgb8(img):
    """Any PIL image as 8-bit RGB. PIL's own convert("RGB") clips 16- and 32-bit grey at 255, so a 16-bit PNG
    would come out almost white: those are scaled to 8 bits first. Palette, RGBA, CMYK, LA, 1-bit: convert."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0  # 16-bit data, or 8-bit in a wide mode
        img = Image.fromarray(np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


class ImageFiles(torch.utils.data.Dataset):
    """Decodes one file to a 3×H×W uint8 tensor, as PIL's convert("RGB") + ToTensor (before its /255)
    do for 8-bit images (16-bit ones are scaled to 8 bits first, see `to_rgb8`; pytorch-fid would clip
    them to almost white). With check_only, decodes the file and returns no pixels: the check of every
    file before the first batch goes through the network.

    A file that fails to decode is returned as an error message rather than raised, because an
    exception inside a DataLoader worker reaches the main process wrapped in a long traceback.
    """

    def __init__(self, files, check_only=False):
        self.files, self.check_only = files, check_only

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as image:
                pixels = np.array(to_rgb8(image))
        except Exception as e:
            return None, f"cannot read image {self.files[i]} ({_first_line(e)})."
        return (None if self.check_only else torch.from_numpy(pixels).permute(2, 0, 1)), None


def check_image_files(files, num_workers=0):
    """Decode every file once, before any of them goes through Inception: a broken file late in a
    folder of 10,000 is reported now, not after half an hour of features."""
    loader = torch.utils.data.DataLoader(ImageFiles(files, check_only=True), batch_size=64,
                                         num_workers=num_workers, collate_fn=_keep_list)
    for items in loader:
        for _, error in items:
            if error:
                raise FIDError(error)


def _keep_list(items):
    return items  # images may differ in size, so they cannot always be stacked in the worker


def _stack_runs(images):
    """Stack consecutive images of equal size; a folder of mixed sizes becomes several batches."""
    start = 0
    for end in range(1, len(images) + 1):
        if end == len(images) or images[end].shape != images[start].shape:
            yield torch.stack(images[start:end])
            start = end


def uint8_batches(source, batch_size, num_workers=0, value_range=(0, 1), limit=None, pin=False):
    """(iterator of uint8 N×C×H×W batches, number of images or None) for any kind of source."""
    if isinstance(source, (str, os.PathLike)):
        files = list_images(source)[:limit]
        check_image_files(files, num_workers)
        loader = torch.utils.data.DataLoader(ImageFiles(files), batch_size=batch_size,
                                             num_workers=num_workers, collate_fn=_keep_list,
                                             pin_memory=pin)

        def from_files():
            for items in loader:
                for _, error in items:
                    if error:
                        raise FIDError(error)
                yield from _stack_runs([image for image, _ in items])
        return from_files(), len(files)

    if isinstance(source, (torch.Tensor, np.ndarray)):
        images = as_nchw(source)[:limit]
        return (to_uint8(images[i:i + batch_size], value_range)
                for i in range(0, len(images), batch_size)), len(images)

    def from_iterator():
        seen = 0
        for batch in source:
            if isinstance(batch, (tuple, list)):  # (images, labels) from a DataLoader
                batch = batch[0]
            batch = to_uint8(as_nchw(batch), value_range)
            if limit is not None:
                batch = batch[:limit - seen]
            if len(batch):
                yield batch
            seen += len(batch)
            if limit is not None and seen >= limit:
                return
    return from_iterator(), limit


# ----------------------------------------------------------------------------------------------
# Statistics: features → (μ, Σ)
# ----------------------------------------------------------------------------------------------

class Progress:
    """One line on stderr every few seconds: images done / total and images per second."""

    def __init__(self, total, enabled):
        self.total, self.enabled = total, enabled
        self.done, self.start = 0, time.time()
        self.last_print = self.start

    def update(self, n):
        self.done += n
        now = time.time()
        if self.enabled and now - self.last_print >= PROGRESS_EVERY_S:
            self.last_print = now
            of_total = f"/{self.total}" if self.total else ""
            rate = self.done / (now - self.start)
            print(f"fid: {self.done}{of_total} images, {rate:.1f} images/s",
                  file=sys.stderr, flush=True)


def compute_features(source, model=None, batch_size=None, device=None, num_workers=None,
                     progress=True, value_range=(0, 1), limit=None, weights=None):
    """N×2048 float32 pool3 features of a folder, an image tensor or an iterator of batches.

    Tensors may be uint8 (taken as they are) or float in `value_range`, e.g. (0, 1) or (-1, 1),
    which are quantised to uint8 first (see `to_uint8`).
    """
    if device is None and model is not None:
        device = next(model.parameters()).device
    device = pick_device(device)
    on_gpu = device.type == "cuda"
    batch_size = batch_size or BATCH_SIZE.get(device.type, BATCH_SIZE["cpu"])
    if num_workers is None:
        # On a CPU the network, not PNG decoding, is the bottleneck; workers would only compete.
        num_workers = min(8, os.cpu_count() or 1) if on_gpu else 0
    if batch_size < 1 or num_workers < 0 or (limit is not None and limit < 1):
        raise FIDError("batch size and limit must be at least 1, and num_workers at least 0.")
    batches, total = uint8_batches(source, batch_size, num_workers, value_range, limit, on_gpu)
    if model is None:
        model = load_inception(weights, device)
    meter = Progress(total, progress)
    features = []
    with torch.inference_mode(), exact_float32():
        for batch in batches:
            # Same arithmetic as ToTensor: float32 then divide by 255.
            x = batch.to(device, non_blocking=True).float() / 255
            features.append(model(x).float().cpu().numpy())
            meter.update(len(x))
    if not features:
        raise FIDError("there were no images to compute features from.")
    return np.concatenate(features)


def statistics_from_features(features):
    """(μ, Σ) in float64, the mean and the unbiased covariance (divided by N − 1)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise FIDError(f"need at least 2 images to estimate a covariance, got {len(features)}.")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def compute_statistics(source, model=None, batch_size=None, device=None, num_workers=None,
                       progress=True, value_range=(0, 1), limit=None, weights=None):
    """(μ, Σ) float64 of the pool3 features of `source`; arguments as in `compute_features`."""
    features = compute_features(source, model, batch_size, device, num_workers, progress,
                                value_range, limit, weights)
    return statistics_from_features(features)


def save_statistics(path, mu, sigma):
    """Write an .npz with `mu` and `sigma`, the format pytorch-fid and pytorch_gan_metrics read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:  # a file object stops np.savez from appending ".npz"
        np.savez(f, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
    os.replace(partial, path)  # an interrupted run never leaves half a file under the real name


def load_statistics(path, dim=None):
    """(μ, Σ) as float64 from an .npz holding `mu` and `sigma`, checked to be a mean and a covariance
    (finite, Σ symmetric and positive semi-definite; of dimension `dim` if given)."""
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"the statistics file {path} does not exist.")
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a plain array: an .npy file, not an archive
            raise FIDError(f"{path} is not an .npz archive with mu and sigma.")
        with data:
            missing = [key for key in ("mu", "sigma") if key not in data.files]
            if missing:
                raise FIDError(f"{path} has no {' and no '.join(missing)} array; a statistics file "
                               f"holds both mu and sigma.")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except FIDError:
        raise
    except Exception as e:  # not a zip, object arrays (allow_pickle is off), strings that are not numbers
        raise FIDError(f"cannot read the statistics file {path} ({_first_line(e)}).") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise FIDError(f"{path} holds mu of shape {mu.shape} and sigma of shape {sigma.shape}; "
                       f"expected (d,) and (d, d).")
    if dim is not None and len(mu) != dim:
        raise FIDError(f"{path} holds {len(mu)}-dimensional statistics, but Inception features have "
                       f"{dim} dimensions.")
    check_covariance(mu, sigma, path)
    return mu, sigma


def check_covariance(mu, sigma, path):
    """Refuse statistics that cannot be a mean and a covariance: they would give a negative or NaN FID."""
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{path} holds values that are not finite numbers (inf or nan).")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if not np.allclose(sigma, sigma.T, rtol=1e-6, atol=1e-9 * scale):
        raise FIDError(f"{path}: sigma is not symmetric, so it is not a covariance matrix.")
    smallest = float(np.linalg.eigvalsh(sigma)[0])
    if smallest < -1e-6 * scale:
        raise FIDError(f"{path}: sigma has a negative eigenvalue ({smallest:.3g}), so it is not a "
                       f"covariance matrix.")


# ----------------------------------------------------------------------------------------------
# The distance
# ----------------------------------------------------------------------------------------------

def _sqrtm(matrix):
    # SciPy ≥ 1.16 deprecates `disp` and will stop returning (sqrt, error) pairs, so call it
    # without and accept either form. Failures are handled by the caller, so silence SciPy's own.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = scipy.linalg.sqrtm(matrix)
        except (np.linalg.LinAlgError, ValueError):
            return np.full_like(matrix, np.nan)
    return result[0] if isinstance(result, tuple) else result


def trace_sqrt_product(sigma1, sigma2):
    """Tr((Σ₁Σ₂)^{1/2}) from eigenvalues, stable when the covariances are singular.

    With R = Σ₁^{1/2} (symmetric), Σ₁Σ₂ = R(RΣ₂) is similar to RΣ₂R, which is symmetric positive
    semi-definite; so Σ₁Σ₂ has real eigenvalues λᵢ ≥ 0 and Tr((Σ₁Σ₂)^{1/2}) = Σᵢ √λᵢ. Rounding
    makes some tiny λᵢ negative; they are clipped to 0.
    """
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}), step for step as pytorch-fid computes it.

    Where pytorch-fid raises (a matrix square root with a clearly complex diagonal, which happens
    when Σ is singular because there were fewer samples than dimensions), this warns and takes the
    trace from `trace_sqrt_product` instead: the same quantity, computed stably.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    d = len(mu1)
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(f"the two statistics have different dimensions (mu {mu1.shape} vs "
                       f"{mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}).")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise FIDError("the statistics hold values that are not finite numbers (inf or nan).")
    diff = mu1 - mu2

    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"sqrtm(Σ₁Σ₂) is not finite (singular product); adding {eps} to the "
                      f"diagonal of both covariances, as pytorch-fid does.", FIDWarning)
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))

    trusted = np.isfinite(covmean).all()
    if trusted and np.iscomplexobj(covmean):
        # Rounding leaves small imaginary parts on a real answer; a large one means sqrtm failed.
        trusted = np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    if trusted:
        tr_covmean = np.trace(covmean)
    else:
        warnings.warn("the covariance is singular (fewer samples than dimensions?), so FID is "
                      "biased; Tr((Σ₁Σ₂)^½) was computed from eigenvalues instead of sqrtm.",
                      FIDWarning)
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    # From two covariances the distance is >= 0; rounding can take an FID of ~0 a hair below it.
    if not np.isfinite(value) or value < -1e-6 * max(1.0, np.trace(sigma1) + np.trace(sigma2)):
        raise FIDError(f"the Fréchet distance came out as {value}: the statistics are not valid means "
                       f"and covariances.")
    return max(value, 0.0)


def fid_from_paths(a, b, model=None, batch_size=None, device=None, num_workers=None,
                   progress=True, limit=None, weights=None, report=None):
    """FID between two inputs, each a folder of images or an .npz statistics file.

    `report`, if given, is called with one line per input saying what it was (the CLI prints them).
    """
    inputs = [_open_input(path, limit) for path in (a, b)]  # fail on bad input before any work
    has_images = any(kind == "images" for kind, _, _ in inputs)
    for kind, content, path in inputs:
        if kind == "stats" and has_images and len(content[0]) != FEATURE_DIM:
            raise FIDError(f"{path} holds {len(content[0])}-dimensional statistics, but images "
                           f"give {FEATURE_DIM}-dimensional Inception features.")
    say = report or (lambda line: None)
    stats, image_counts = [], []
    for name, (kind, content, path) in zip("AB", inputs):
        if kind == "stats":
            say(f"{name}: statistics file {path}")
            stats.append(content)
            continue
        say(f"{name}: {len(content)} images in {path}")
        if model is None:
            model = load_inception(weights, device)
        stats.append(compute_statistics(path, model, batch_size, device, num_workers, progress,
                                        limit=limit))
        image_counts.append(len(content))
    with warnings.catch_warnings():
        if image_counts and min(image_counts) <= FEATURE_DIM:
            warnings.warn(f"FID from {min(image_counts)} images is biased upward and its "
                          f"{FEATURE_DIM}×{FEATURE_DIM} covariance is singular; grade with "
                          f"10,000 or more.", FIDWarning)
            warnings.simplefilter("ignore", FIDWarning)  # said once is enough
        return frechet_distance(*stats[0], *stats[1])


def _open_input(path, limit):
    path = Path(path)
    if path.suffix.lower() == ".npz" and not path.is_dir():
        return "stats", load_statistics(path), path
    if path.is_file():
        raise FIDError(f"{path} is neither a folder of images nor an .npz statistics file.")
    return "images", list_images(path)[:limit], path


def check_writable(path):
    """The statistics file can be written there: tried now, before the features take minutes or hours."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / (path.name + ".probe"), "wb"):
            pass
        os.remove(folder / (path.name + ".probe"))
    except OSError as e:
        raise FIDError(f"cannot write {path} ({e.strerror or e}).") from None
    if path.is_dir():
        raise FIDError(f"{path} is a folder, not a file name.")


def mnist_train_digits(data_dir):
    """The 60,000 MNIST training digits as a uint8 N×3×28×28 tensor (gray replicated to RGB)."""
    import torchvision  # here, not at the top: importing it takes seconds, and only MNIST needs it
    try:
        digits = torchvision.datasets.MNIST(data_dir, train=True, download=True).data
    except Exception as e:
        raise FIDError(f"could not get MNIST into {data_dir} ({_first_line(e)}); download the four "
                       f"MNIST IDX files into {Path(data_dir) / 'MNIST' / 'raw'} on a machine with "
                       f"internet and point --data-dir at {data_dir}.") from None
    return digits.unsqueeze(1).expand(-1, 3, -1, -1)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def run(args):
    if (args.batch_size is not None and args.batch_size < 1) or \
            (args.num_workers is not None and args.num_workers < 0) or \
            (args.limit is not None and args.limit < 1):
        raise FIDError("--batch-size and --limit must be at least 1, --num-workers at least 0.")
    device = pick_device(args.device)
    common = dict(batch_size=args.batch_size, device=device, num_workers=args.num_workers)

    if args.save_stats or args.mnist_stats:
        if args.paths or (args.save_stats and args.mnist_stats):
            raise FIDError("use either A B, --save-stats FOLDER OUT.npz or --mnist-stats OUT.npz.")
        out = Path(args.mnist_stats or args.save_stats[1])
        if out.suffix.lower() != ".npz":
            raise FIDError(f"the output file {out} must end in .npz.")
        check_writable(out)
        if args.mnist_stats:
            source = mnist_train_digits(args.data_dir)[:args.limit]
            what = f"{len(source)} MNIST training digits from {args.data_dir}"
        else:
            source = args.save_stats[0]
            what = f"{len(list_images(source)[:args.limit])} images in {source}"
        mu, sigma = compute_statistics(source, load_inception(args.inception, device),
                                       limit=args.limit, **common)
        save_statistics(out, mu, sigma)
        print(f"statistics of {what} written to {out}")
        return

    if len(args.paths) != 2:
        raise FIDError(f"expected two inputs A B (folders or .npz files), got {len(args.paths)}; "
                       f"see --help.")
    value = fid_from_paths(*args.paths, limit=args.limit, weights=args.inception, report=print,
                           **common)
    print(f"FID: {value:.4f}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    warnings.showwarning = _print_warning  # one line each, no source excerpt
    try:
        run(args)
    except FIDError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted.")


if __name__ == "__main__":
    main()
