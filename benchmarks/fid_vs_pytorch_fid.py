"""Benchmark for fid.py: its FID next to pytorch-fid 0.3.0's on the same two folders.

  pip install pytorch-fid==0.3.0 --no-deps      # for this benchmark only; fid.py never imports it
  python benchmarks/fid_vs_pytorch_fid.py                   # 300 MNIST test vs 300 training digits
  python benchmarks/fid_vs_pytorch_fid.py A B --device cuda # any two folders of images
  pip uninstall -y pytorch-fid

pytorch-fid fetches its weights by URL through the torch hub cache. So that this also runs offline,
the benchmark writes a hub-cache copy of fid.py's weights file under a temporary TORCH_HOME, named
as pytorch-fid's release file and with the unused 1008-way `fc` layer filled in with zeros (pool3
features never touch it). Give --use-hub-cache to let pytorch-fid use (or download) the real file.
Without folders, the first N MNIST test digits and the first N training digits are written as
PNGs into the work folder (pytorch-fid reads only the top level of each folder).
"""
import argparse
import os
import re
import subprocess
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

HUB_FILE_NAME = fid.FID_WEIGHTS_URL.rsplit("/", 1)[1]


def write_digits(data_dir, train, n, folder):
    digits = torchvision.datasets.MNIST(data_dir, train=train, download=True).data[:n]
    folder.mkdir(parents=True, exist_ok=True)
    for i, digit in enumerate(digits):
        Image.fromarray(digit.numpy()).save(folder / f"{i:05d}.png")
    return folder


def fake_hub_cache(weights, torch_home):
    """A TORCH_HOME whose hub cache holds `weights` under pytorch-fid's file name, with fc zeros."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state.setdefault("fc.weight", torch.zeros(1008, 2048))
    state.setdefault("fc.bias", torch.zeros(1008))
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(state, checkpoints / HUB_FILE_NAME)
    return torch_home


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", metavar="A B", help="two image folders (default: MNIST)")
    p.add_argument("--num-images", type=int, default=300, help="MNIST digits per side")
    p.add_argument("--data-dir", default=str(SHARED / "data") if (SHARED / "data").is_dir()
                   else "./data")
    p.add_argument("--inception", default=str(SHARED / "weights" /
                                              "pt_inception-2015-12-05-nofc.pth"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="default: a temporary folder, removed after")
    p.add_argument("--use-hub-cache", action="store_true",
                   help="let pytorch-fid use the real torch hub cache (online)")
    return p


def main():
    args = build_parser().parse_args()
    if args.folders and len(args.folders) != 2:
        sys.exit("error: give two folders A B, or none for the MNIST default.")
    try:
        import pytorch_fid  # noqa: F401
    except ImportError:
        sys.exit("error: pytorch-fid is not installed; pip install pytorch-fid==0.3.0 --no-deps.")

    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work_dir or temporary)
        if args.folders:
            a, b = map(Path, args.folders)
        else:
            a = write_digits(args.data_dir, False, args.num_images, work / "mnist_test")
            b = write_digits(args.data_dir, True, args.num_images, work / "mnist_train")
        env = dict(os.environ)
        if not args.use_hub_cache:
            env["TORCH_HOME"] = str(fake_hub_cache(args.inception, work / "torch_home"))

        start = time.perf_counter()
        command = [sys.executable, "-m", "pytorch_fid", str(a), str(b), "--device", args.device,
                   "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        found = re.search(r"FID:\s*(\S+)", result.stdout)
        if result.returncode or not found:
            sys.exit(f"error: pytorch-fid failed: {result.stderr.strip()[-2000:]}")
        theirs, their_seconds = float(found.group(1)), time.perf_counter() - start

        start = time.perf_counter()
        try:
            ours = fid.fid_from_paths(a, b, batch_size=args.batch_size, device=args.device,
                                      num_workers=args.num_workers, weights=args.inception,
                                      report=print)
        except fid.FIDError as e:
            sys.exit(f"error: {e}")
        our_seconds = time.perf_counter() - start

    print(f"device {args.device}; A = {a} vs B = {b}")
    print(f"pytorch-fid 0.3.0: FID {theirs:.6f}  ({their_seconds:.0f} s)")
    print(f"fid.py:            FID {ours:.6f}  ({our_seconds:.0f} s)")
    print(f"difference:        {ours - theirs:+.2e}  (within 5e-4: {abs(ours - theirs) < 5e-4})")


if __name__ == "__main__":
    main()
