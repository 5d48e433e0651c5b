"""Which sampler should ddpm_mnist.py use by default? FID of each sampler on one checkpoint, from the same noise.

Each row samples --num-samples images from the checkpoint's EMA network with `ddim.py --ckpt` (the samplers of
ddim.py, the same code as ddpm_mnist.py's), once per sampling seed; the seed fixes x_T, so every sampler starts from
the same noise. The default is the fastest sampler of at most 100 steps whose mean FID is within 0.5 of the best
mean (if none is, within 0.5 of the best of them, and it says so).

    python ddpm_mnist.py --preset cpu --num-samples 0           # the checkpoint: runs/cpu_mnist/ckpt.pt
    python benchmarks/samplers.py --ckpt runs/cpu_mnist/ckpt.pt  # 1,000 samples, seeds 0 and 1, every row
    python benchmarks/samplers.py --summarise-only               # the table again, from OUT/samplers.json

With ../shared beside the repo the reference is its statistics of the first 10,000 training digits (what --preset cpu
is graded against); otherwise ddim.py computes the checkpoint's own reference once.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# (sampler, steps): ddpm takes all T = 1000 steps; ddim evenly spaced (eta 0); dpmpp DPM-Solver++(2M), quadratic spacing
ROWS = [("dpmpp", 20), ("dpmpp", 25), ("ddim", 50), ("ddim", 100), ("ddpm", 1000)]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="runs/cpu_mnist/ckpt.pt", help="a ddpm_mnist.py checkpoint")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds (the noise x_T)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--rows", nargs="+", default=None, help="only these rows, e.g. ddim:50 ddpm:1000")
    p.add_argument("--out", default="runs/samplers", help="one folder per row and seed, and samplers.json")
    p.add_argument("--summarise-only", action="store_true", help="print the table from OUT/samplers.json")
    return p


def run_row(args, sampler, steps, seed):
    out = os.path.join(args.out, f"{sampler}{steps}_seed{seed}")
    cmd = [sys.executable, "ddim.py", "--ckpt", args.ckpt, "--sampler", sampler, "--num-samples", str(args.num_samples),
           "--seed", str(seed), "--out", out]
    cmd += [] if sampler == "ddpm" else ["--steps", str(steps)]
    if SHARED.is_dir():
        cmd += ["--fid-stats", str(SHARED / "fid-reference" / "mnist_train10k_stats.npz"),
                "--inception", str(SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth")]
    print(" ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    metrics = json.loads((ROOT / out / "metrics.json").read_text())
    return {"sampler": sampler, "steps": steps, "seed": seed, "fid": metrics["fid"], "device": metrics["device"],
            "num_samples": metrics["num_samples"], "sample_seconds": metrics["sample_seconds"],
            "wall_seconds": round(time.time() - start, 1), "reference": metrics["fid_reference"]}


def summarise(results):
    """One line per row: mean +- std of the FID over the seeds, the seeds' values, the sampling time; the default."""
    by_row = {}
    for r in results:
        by_row.setdefault((r["sampler"], r["steps"]), []).append(r)
    means = {row: float(np.mean([r["fid"] for r in rs])) for row, rs in by_row.items()}
    short = [row for row in means if row[1] <= 100]  # the default samples in at most 100 steps
    best = min(means.values())
    if all(means[row] > best + 0.5 for row in short):
        best = min(means[row] for row in short)
        print(f"no sampler of at most 100 steps is within 0.5 of the best mean ({min(means.values()):.2f}); the "
              f"default is the fastest within 0.5 of the best of them ({best:.2f})")
    fastest = min((row for row in short if means[row] <= best + 0.5), key=lambda row: row[1])
    print(f"{'sampler':>8} {'steps':>5}  FID mean +- std (seeds)                 sample s")
    for row, rs in by_row.items():
        fids = [r["fid"] for r in rs]
        seeds = ", ".join(f"{r['seed']}: {r['fid']:.2f}" for r in rs)
        mark = "  <- default" if row == fastest else ""
        print(f"{row[0]:>8} {row[1]:>5}  {means[row]:6.2f} +- {np.std(fids):4.2f} ({seeds})"
              f"  {np.mean([r['sample_seconds'] for r in rs]):7.1f}{mark}")
    return fastest


def main():
    args = build_parser().parse_args()
    path = ROOT / args.out / "samplers.json"
    results = json.loads(path.read_text()) if path.is_file() else []
    if not args.summarise_only:
        rows = [(s, int(n)) for s, n in (r.split(":") for r in args.rows)] if args.rows else ROWS
        for seed in args.seeds:
            for sampler, steps in rows:
                results = [r for r in results if (r["sampler"], r["steps"], r["seed"]) != (sampler, steps, seed)]
                results.append(run_row(args, sampler, steps, seed))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(results, indent=2))  # after every row: an interrupted run keeps the rest
    summarise(results)


if __name__ == "__main__":
    main()
