"""Benchmark for fid.py: Inception feature extraction speed (images/s) on MNIST training digits.

  python benchmarks/fid_speed.py                          # 10,000 digits, on cuda if available
  python benchmarks/fid_speed.py --num-images 300 --device cpu
  python benchmarks/fid_speed.py --from-png --batch-size 250  # also read them back from PNG files

The digits go through fid.py's whole path (uint8 -> /255 -> 299×299 -> Inception pool3). One batch runs first,
untimed, so one-off kernel selection does not count against the rate.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
import fid  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default=str(SHARED / "data"))
    p.add_argument("--inception", default=str(SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth"))
    p.add_argument("--from-png", action="store_true", help="also time the folder path")
    return p


def timed(source, model, batch_size, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    features = fid.compute_features(source, model, batch_size)
    return len(features), time.perf_counter() - start


def main():
    args = build_parser().parse_args()
    model = fid.load_inception(args.inception, args.device)
    digits = torchvision.datasets.MNIST(args.data_dir, train=True, download=True).data[:args.num_images, None]
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; N = {len(digits)} MNIST digits (28×28 grey); batch size {args.batch_size}")
    fid.compute_features(digits[:args.batch_size], model, args.batch_size)  # warm-up
    n, seconds = timed(digits, model, args.batch_size, args.device)
    print(f"tensor input: {n} images in {seconds:.1f} s = {n / seconds:.1f} images/s")
    if args.from_png:
        with tempfile.TemporaryDirectory() as folder:
            for i, digit in enumerate(digits):
                Image.fromarray(digit[0].numpy()).save(f"{folder}/{i:05d}.png")
            n, seconds = timed(folder, model, args.batch_size, args.device)
        print(f"PNG folder:   {n} images in {seconds:.1f} s = {n / seconds:.1f} images/s")


if __name__ == "__main__":
    main()
