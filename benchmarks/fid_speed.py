"""Benchmark for fid.py: Inception feature extraction speed (images/s) on MNIST training digits.

  python benchmarks/fid_speed.py                          # 10,000 digits on cuda if available
  python benchmarks/fid_speed.py --num-images 300 --device cpu
  python benchmarks/fid_speed.py --from-png               # also decode them from PNG files

The digits go through fid.py's full path (uint8 -> /255 -> 299×299 -> Inception pool3). One batch
is run first and not timed, so one-off kernel selection does not count against the rate.
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
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=None, help="fid.py's default if not given")
    p.add_argument("--num-workers", type=int, default=None, help="for --from-png")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--data-dir", default=str(SHARED / "data") if (SHARED / "data").is_dir()
                   else "./data")
    p.add_argument("--inception", default=str(SHARED / "weights" /
                                              "pt_inception-2015-12-05-nofc.pth")
                   if (SHARED / "weights").is_dir() else None)
    p.add_argument("--from-png", action="store_true",
                   help="also time the folder path: write the digits as PNGs and read them back")
    return p


def main():
    args = build_parser().parse_args()

    try:
        device = fid.pick_device(args.device)
        model = fid.load_inception(args.inception, device)
        digits = torchvision.datasets.MNIST(args.data_dir, train=True, download=True).data
    except fid.FIDError as e:
        sys.exit(f"error: {e}")
    digits = digits[:args.num_images].unsqueeze(1).expand(-1, 3, -1, -1)
    batch_size = args.batch_size or (250 if device.type == "cuda" else 50)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} torch threads"
    print(f"device: {name}; N = {len(digits)} MNIST digits (28×28 RGB); batch size {batch_size}")

    fid.compute_features(digits[:min(batch_size, len(digits))], model, batch_size, device,
                         progress=False)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    features = fid.compute_features(digits, model, batch_size, device)
    seconds = time.perf_counter() - start
    print(f"tensor input: {len(features)} images in {seconds:.1f} s = "
          f"{len(features) / seconds:.1f} images/s")

    if args.from_png:
        with tempfile.TemporaryDirectory() as folder:
            for i, digit in enumerate(digits):
                Image.fromarray(digit.permute(1, 2, 0).numpy()).save(f"{folder}/{i:05d}.png")
            start = time.perf_counter()
            features = fid.compute_features(folder, model, batch_size, device,
                                            args.num_workers)
            seconds = time.perf_counter() - start
        print(f"PNG folder:   {len(features)} images in {seconds:.1f} s = "
              f"{len(features) / seconds:.1f} images/s")


if __name__ == "__main__":
    main()
