"""DDPM against DCGAN on a folder of images at 64x64 RGB, the same training time each, on a CPU.

The anime-face and cat-face homework train ddpm_mnist.py --dataset folder and gan_baseline.py --dataset folder
on a folder of images and compare them by FID. This runs both for the same number of CPU minutes (--minutes,
turned into a step budget with --iters from a short timing run), draws --num-samples images from each, and grades
them with fid.py against the statistics of the folder's first --num-samples images (the same N on both sides, one
reference for both models). Here the folder is the iCLEVR-like renders (../shared/iclevr_like): a real folder of
RGB scenes; an anime- or cat-face folder works the same way.

  python benchmarks/folder_ddpm_vs_gan.py --data-dir data/iclevr_s0/iclevr --minutes 25
  python benchmarks/folder_ddpm_vs_gan.py --data-dir data/iclevr_s0/iclevr --minutes 10 --num-samples 500 --limit 6000
  python benchmarks/folder_ddpm_vs_gan.py --summarise-only
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
INCEPTION = SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth"
# Small enough for a 2-core CPU at 64x64; --iters is set from --minutes.
DDPM = ["--dataset", "folder", "--image-size", "64", "--ch", "16", "--ch-mult", "1", "2", "2", "2", "--num-res-blocks",
        "1", "--attn-res", "8", "--dropout", "0", "--batch-size", "32", "--lr", "2e-3", "--lr-decay", "cosine",
        "--warmup", "200", "--ema-decay", "0.999", "--sampler", "ddim", "--steps", "20", "--eta", "0",
        "--sample-batch-size", "250"]
GAN = ["--dataset", "folder", "--image-size", "64", "--ch", "16", "--batch-size", "32", "--ema-decay", "0.999",
       "--sample-batch-size", "250"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/iclevr_s0/iclevr", help="the folder of images")
    p.add_argument("--minutes", type=float, default=25, help="training minutes per model")
    p.add_argument("--num-samples", type=int, default=2000, help="samples per model, and reference images")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    p.add_argument("--out", default="runs/bench_folder", help="one folder per model, and summary.json")
    p.add_argument("--summarise-only", action="store_true")
    return p


def steps_per_minute(script, flags, out):
    """How many steps this machine takes per minute: a run of 10 steps and one of 40 (on 256 images, no samples),
    timed whole; the difference is 30 steps without the start-up, the reading and the writing both runs share."""
    seconds = []
    for iters in (10, 40):
        command = [sys.executable, script, *flags, "--limit", "256", "--iters", str(iters), "--num-samples", "0",
                   "--no-fid", "--out", f"{out}_{iters}"]
        t = time.time()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        seconds.append(time.time() - t)
    return 30 / ((seconds[1] - seconds[0]) / 60)


def run(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--data-dir", args.data_dir, "--device", "cpu", "--num-samples", str(args.num_samples),
              "--fid-ref-limit", str(args.num_samples), "--inception", str(INCEPTION)]
    common += ["--limit", str(args.limit)] if args.limit else []
    for name, script, flags in (("ddpm", "ddpm_mnist.py", DDPM), ("gan", "gan_baseline.py", GAN)):
        run_out = out / name
        if (run_out / "metrics.json").is_file():
            continue
        rate = steps_per_minute(script, flags + ["--data-dir", args.data_dir], out / f"{name}_timing")
        iters = int(rate * args.minutes)
        command = [sys.executable, script, *flags, *common, "--iters", str(iters), "--out", str(run_out)]
        print(" ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)


def summarise(args):
    out = Path(args.out)
    rows = {}
    for name in ("ddpm", "gan"):
        path = out / name / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            rows[name] = {k: m.get(k) for k in ("device", "train_seconds", "steps", "fid", "fid_num_samples",
                                                 "fid_reference", "sampler", "sampling_steps")}
            rows[name]["samples_per_second"] = round(m["num_samples"] / max(m["sample_seconds"], 1e-9), 2)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.summarise_only:
        run(args)
    summarise(args)


if __name__ == "__main__":
    main()
