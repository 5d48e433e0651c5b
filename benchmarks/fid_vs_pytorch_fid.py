"""Benchmark for fid.py: its FID next to pytorch-fid 0.3.0's on the same two folders.

  pip install pytorch-fid==0.3.0 --no-deps      # for this benchmark only; fid.py never imports it
  python benchmarks/fid_vs_pytorch_fid.py                   # 300 MNIST test vs 300 training digits
  python benchmarks/fid_vs_pytorch_fid.py A B --device cuda # any two folders of images (top level only)
  pip uninstall -y pytorch-fid

pytorch-fid fetches its weights by URL into the torch hub cache. So that this runs offline too, it is given a
temporary TORCH_HOME whose hub cache holds fid.py's weights file under the release file's name, with the unused
1008-way `fc` layer filled in with zeros. Without folders, the first N MNIST test and training digits are
written as PNGs (pytorch-fid reads only the top level of a folder).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
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
    p.add_argument("folders", nargs="*", metavar="A B", help="two image folders (default: MNIST digits)")
    p.add_argument("--num-images", type=int, default=300, help="MNIST digits per side")
    p.add_argument("--data-dir", default=str(SHARED / "data"))
    p.add_argument("--inception", default=str(SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=50)
    return p


def write_digits(data_dir, train, n, folder):
    folder.mkdir(parents=True)
    for i, digit in enumerate(torchvision.datasets.MNIST(data_dir, train=train, download=True).data[:n]):
        Image.fromarray(digit.numpy()).save(folder / f"{i:05d}.png")
    return folder


def main():
    args = build_parser().parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        if args.folders:
            a, b = args.folders
        else:
            a = write_digits(args.data_dir, False, args.num_images, work / "mnist_test")
            b = write_digits(args.data_dir, True, args.num_images, work / "mnist_train")
        state = torch.load(args.inception, map_location="cpu", weights_only=True)
        state.setdefault("fc.weight", torch.zeros(1008, 2048))
        state.setdefault("fc.bias", torch.zeros(1008))
        (work / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(state, work / "hub" / "checkpoints" / fid.FID_WEIGHTS_URL.rsplit("/", 1)[1])
        command = [sys.executable, "-m", "pytorch_fid", str(a), str(b), "--device", args.device,
                   "--batch-size", str(args.batch_size)]
        result = subprocess.run(command, env={**os.environ, "TORCH_HOME": str(work)}, capture_output=True, text=True)
        found = re.search(r"FID:\s*(\S+)", result.stdout)
        if not found:
            sys.exit(f"error: pytorch-fid failed: {result.stderr.strip()[-2000:]}")
        model = fid.load_inception(args.inception, args.device)
        ours = fid.frechet_distance(*fid.compute_statistics(a, model, args.batch_size),
                                    *fid.compute_statistics(b, model, args.batch_size))
    theirs = float(found.group(1))
    print(f"device {args.device}; A = {a} vs B = {b}")
    print(f"pytorch-fid 0.3.0: FID {theirs:.6f}")
    print(f"fid.py:            FID {ours:.6f}")
    print(f"difference:        {ours - theirs:+.2e}")


if __name__ == "__main__":
    main()
