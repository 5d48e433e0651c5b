"""fid.py: the Fréchet Inception Distance (FID), written out in one file.

Push N real and N generated images through a fixed ImageNet classifier (Inception-v3), keep the 2048 numbers of its
last pooling layer ("pool3") for each image, fit a Gaussian (mean μ, covariance Σ) to each set of feature vectors
and report the Fréchet distance between the two Gaussians (lower is better; 0 for equal statistics):

    FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})                                       frechet_distance

The protocol is pytorch-fid's (and pytorch_gan_metrics 0.5.3's), so the number printed is the number a grader gets:
    uint8 RGB (grey replicated) / 255, bilinear resize to 299×299, then 2x − 1          FIDInceptionV3.forward
    the FID Inception (TF 2015-12-05 weights) in float32 with TF32 off: N×2048 pool3    compute_features
    μ and Σ = np.cov(rowvar=False) in float64, kept in .npz files as `mu` and `sigma`   compute_statistics
    (Σ₁Σ₂)^{1/2} by scipy.linalg.sqrtm, with pytorch-fid's ε retry and imaginary check  frechet_distance

    python fid.py samples/ reference_stats.npz             # a folder or an .npz on either side
    python fid.py --save-stats samples/ samples_stats.npz   # folder -> statistics file (mu, sigma)
    python fid.py --mnist-stats mnist_train_stats.npz --data-dir ./data
    python fid.py real/ fake/ --limit 500 --device cpu --inception pt_inception-2015-12-05-6726825d.pth
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
import numpy as np
from PIL import Image
import scipy.linalg

FEATURE_DIM = 2048  # the width of pool3
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")


class FIDError(Exception):
    """A problem with the user's input, told in one sentence (the command line prints it, no traceback)."""


# The network: torchvision's Inception-v3 with the TensorFlow 2015-12-05 weights, changed in the three ways the TF
# graph differs from it (pytorch-fid's FIDInception blocks), since each one changes the features:
# 1. TF's average pools ignore the zero padding (count_include_pad=False), in blocks A, C and E_1;
# 2. the last block, E_2, takes a max pool in its pool branch, a quirk of the 2015 graph;
# 3. the input is scaled to [-1, 1] (see FIDInceptionV3.forward), not normalised with ImageNet's mean and std.
# The attribute names are the keys of the weights file (Mixed_5b.branch1x1.conv.weight, ...).

def tf_avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(torchvision.models.inception.InceptionA):
    """35×35 block: 1×1, 5×5, double 3×3 and pool branches side by side."""

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], dim=1)


class FIDInceptionC(torchvision.models.inception.InceptionC):
    """17×17 block: 7×7 convolutions factored into 1×7 and 7×1."""

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        b7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(b7dbl))
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_avg_pool(x))], dim=1)


class FIDInceptionE_1(torchvision.models.inception.InceptionE):
    """8×8 block whose 3×3 branches split into parallel 1×3 and 3×1 halves."""

    def pool(self, x):
        return tf_avg_pool(x)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], dim=1)
        return torch.cat([self.branch1x1(x), b3, b3dbl, self.branch_pool(self.pool(x))], dim=1)


class FIDInceptionE_2(FIDInceptionE_1):
    """The last 8×8 block: the same, with a max pool in its pool branch."""

    def pool(self, x):
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInceptionV3(torchvision.models.inception.Inception3):
    """Maps uint8 N×C×H×W images (C = 1 or 3, any H×W) to N×2048 pool3 features, as pytorch-fid computes them."""

    def __init__(self):
        super().__init__(aux_logits=False, init_weights=False)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        del self.fc  # the ImageNet logits come after pool3, so FID never uses them

    def forward(self, images):
        x = images.expand(-1, 3, -1, -1).float() / 255  # grey replicated to RGB, as PIL's convert("RGB") does
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))  # N×64×73×73
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))  # N×192×35×35
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))  # N×768×17×17
        x = self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))))  # N×1280×8×8
        x = self.Mixed_7c(self.Mixed_7b(x))  # N×2048×8×8
        return self.avgpool(x).flatten(1)  # pool3: N×2048


def load_inception(weights=None, device=None):
    """The FID Inception in eval mode, from the file `weights`, else $FID_INCEPTION_WEIGHTS, else pytorch-fid's
    release file (downloaded once into torch.hub's cache)."""
    source = weights or os.environ.get("FID_INCEPTION_WEIGHTS")
    model = FIDInceptionV3()
    try:
        if source:
            state = torch.load(source, map_location="cpu", weights_only=True)
        else:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", weights_only=True)
        # pytorch-fid's file also holds the 1008-way ImageNet logits (fc.*), which pool3 never uses.
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    except Exception as e:
        raise FIDError(f"could not load the FID Inception weights from {source or FID_WEIGHTS_URL} "
                       f"({type(e).__name__}); pass --inception PATH or set FID_INCEPTION_WEIGHTS.") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # channels_last: convolutions run faster in this memory layout, with the same features up to float32 rounding.
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


def image_files(folder):
    """The .png/.jpg/.jpeg files under `folder` and its subfolders, sorted by path."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise FIDError(f"{folder} is not a folder of .png, .jpg or .jpeg images.")
    return files


def uint8_batches(source, batch_size):
    """N×C×H×W uint8 batches of a tensor, or of the images in a folder (or in a list of image files)."""
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.uint8 or source.ndim != 4 or source.shape[1] not in (1, 3):
            raise FIDError(f"images must be a uint8 N×C×H×W tensor with C = 1 or 3, not {source.dtype} "
                           f"{tuple(source.shape)}; quantise as a PNG does: (255 * x + 0.5).clamp(0, 255).byte().")
        yield from source.split(batch_size)
        return
    files = image_files(source) if isinstance(source, (str, os.PathLike)) else source
    for i in range(0, len(files), batch_size):
        images = []
        for path in files[i:i + batch_size]:
            try:  # as pytorch-fid reads a file: PIL's convert("RGB") replicates grey
                with Image.open(path) as image:
                    images.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
            except (OSError, ValueError):
                raise FIDError(f"cannot read the image {path}.") from None
        if any(image.shape != images[0].shape for image in images):
            raise FIDError(f"the images from {files[i]} on differ in size; give images of one size.")
        yield torch.stack(images)


def compute_features(source, model=None, batch_size=50, device=None):
    """N×2048 float32 pool3 features of a uint8 N×C×H×W tensor (C = 1 or 3) or of a folder of images.
    Without a model, the network is loaded (see `load_inception`) onto `device`."""
    if model is None:
        model = load_inception(device=device)
    device = next(model.parameters()).device
    # TF32, on by default for convolutions on recent NVIDIA GPUs, rounds float32 inputs to 10 bits of mantissa:
    # fine for training, but it moves the features away from the float32 ones every FID implementation uses.
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    features = []
    try:
        with torch.inference_mode():
            for batch in uint8_batches(source, batch_size):
                features.append(model(batch.to(device)).cpu().numpy())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32
    return np.concatenate(features)


def compute_statistics(source, model=None, batch_size=50, device=None):
    """(μ, Σ) in float64 of the pool3 features of `source` (as in `compute_features`). Σ from N images has rank
    at most N − 1, so for N ≤ 2048 it is singular and sqrtm may fail, and FID is biased upward for small N:
    compare FIDs at the same N only, and grade with 10,000 images or more."""
    features = compute_features(source, model, batch_size, device).astype(np.float64)
    if len(features) < 2:
        raise FIDError(f"a covariance needs at least 2 images, got {len(features)}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_statistics(path, mu, sigma):
    """Write an .npz with `mu` and `sigma`, the file pytorch-fid and pytorch_gan_metrics read."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object stops np.savez from adding ".npz" to the name
        np.savez(f, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))


def load_statistics(path):
    """(μ, Σ) in float64 from an .npz with `mu` (2048) and `sigma` (2048×2048)."""
    try:
        with np.load(path) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except KeyError:
        raise FIDError(f"{path} has no mu or no sigma array; a statistics file holds both.") from None
    except Exception as e:
        raise FIDError(f"cannot read the statistics file {path} ({type(e).__name__}).") from None
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise FIDError(f"{path} holds mu of shape {mu.shape} and sigma of shape {sigma.shape}, not Inception's "
                       f"({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM}).")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}), step for step as pytorch-fid computes it."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FIDError(f"the two statistics have different dimensions ({mu1.shape} and {mu2.shape}).")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product may have no finite square root; a small ridge on both covariances gives one.
        print(f"fid: singular product of covariances; adding {eps} to their diagonals", file=sys.stderr)
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # The exact root is real; rounding leaves small imaginary parts, and a large one means sqrtm failed.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FIDError(f"sqrtm(Σ₁Σ₂) has an imaginary part of {np.abs(covmean.imag).max():.3g}; use more images.")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class FIDArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag: one sentence and exit status 2, like every other bad input
        raise FIDError(f"{message} (see --help)")


def build_parser():
    p = FIDArgumentParser(description="FID between two image folders or .npz statistics files (pytorch-fid's).")
    p.add_argument("paths", nargs="*", metavar="A B", help="two folders of .png/.jpg/.jpeg images or .npz files")
    p.add_argument("--save-stats", nargs=2, metavar=("FOLDER", "OUT.npz"), help="write FOLDER's statistics")
    p.add_argument("--mnist-stats", metavar="OUT.npz", help="write the statistics of the 60,000 MNIST train digits")
    p.add_argument("--data-dir", default="./data", help="where torchvision finds or downloads MNIST")
    p.add_argument("--inception", metavar="PATH", help="weights file (default: $FID_INCEPTION_WEIGHTS, else download)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass")
    p.add_argument("--limit", type=int, metavar="N", help="use only the first N images of each input")
    return p


def run(args):
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise FIDError("--batch-size and --limit must be at least 1.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise FIDError("--device cuda was asked for, but this machine has no CUDA GPU.")
    if args.save_stats or args.mnist_stats:
        if args.paths or (args.save_stats and args.mnist_stats):
            raise FIDError("give one of A B, --save-stats FOLDER OUT.npz and --mnist-stats OUT.npz.")
        if args.save_stats:
            out, source = args.save_stats[1], image_files(args.save_stats[0])[:args.limit]
        else:
            try:
                digits = torchvision.datasets.MNIST(args.data_dir, train=True, download=True).data
            except Exception as e:
                raise FIDError(f"could not find or download MNIST in {args.data_dir} ({type(e).__name__}).") from None
            out, source = args.mnist_stats, digits[:args.limit].unsqueeze(1)
        save_statistics(out, *compute_statistics(source, load_inception(args.inception, args.device), args.batch_size))
        print(f"statistics of {len(source)} images written to {out}")
        return
    if len(args.paths) != 2:
        raise FIDError(f"expected two inputs A B (folders or .npz files), got {len(args.paths)}.")
    # Both inputs are checked (statistics read, folders listed) before the network runs.
    inputs = [load_statistics(p) if p.lower().endswith(".npz") else image_files(p)[:args.limit] for p in args.paths]
    model = None if all(isinstance(x, tuple) for x in inputs) else load_inception(args.inception, args.device)
    stats = [x if isinstance(x, tuple) else compute_statistics(x, model, args.batch_size) for x in inputs]
    names = [f"{p} (statistics file)" if isinstance(x, tuple) else f"{p} (N = {len(x)} images)"
             for p, x in zip(args.paths, inputs)]
    print(f"FID: {frechet_distance(*stats[0], *stats[1]):.4f} between {names[0]} and {names[1]}")


def main(argv=None):
    try:
        run(build_parser().parse_args(argv))
    except FIDError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
