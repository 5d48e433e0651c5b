"""Benchmark (not a test): gan_baseline.py on MNIST, FID and speed on the protocol of ddpm_mnist.py.

Target (issue 7): with the defaults on one H100, FID <= 10 on 10,000 samples against the statistics of the 60,000
MNIST training digits (runs/fid_stats_mnist_train60k.npz, ddpm_mnist.py's reference), in <= 10 minutes (training +
sampling + FID; the reference statistics are computed once beforehand, untimed).

  python benchmarks/gan_mnist.py            # GPU: the defaults; exit status 1 if the target is missed
  python benchmarks/gan_mnist.py --cpu      # gan_baseline.py --preset cpu: FID against the first 10,000 digits

The outputs land in runs/bench_gan_mnist[_cpu]/, the summary in benchmark.json there.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
WEIGHTS = os.path.join(SHARED, "weights", "pt_inception-2015-12-05-nofc.pth")
CPU_STATS = os.path.join(SHARED, "fid-reference", "mnist_train10k_stats.npz")  # the first 10,000 training digits
GPU_STATS = os.path.join(ROOT, "runs", "fid_stats_mnist_train60k.npz")


def reference_statistics(data_dir, path):
    """The 60,000 training digits' statistics, as plumbing.compute_fid makes them, once (untimed)."""
    if not os.path.isfile(path):
        sys.path.insert(0, ROOT)
        import fid
        import plumbing
        inception = fid.load_inception(WEIGHTS if os.path.isfile(WEIGHTS) else None, "cuda")
        fid.save_statistics(path, *fid.compute_statistics(plumbing.load_mnist(data_dir), inception, device="cuda"))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the CPU preset instead of the GPU defaults")
    p.add_argument("--data-dir", default=os.path.join(SHARED, "data") if os.path.isdir(SHARED) else "./data")
    p.add_argument("--out", default=None, help="default runs/bench_gan_mnist (or _cpu)")
    return p


def main():
    args = build_parser().parse_args()
    out = args.out or os.path.join(ROOT, "runs", "bench_gan_mnist" + ("_cpu" if args.cpu else ""))
    if not args.cpu:
        reference_statistics(args.data_dir, GPU_STATS)
    command = [sys.executable, os.path.join(ROOT, "gan_baseline.py"), "--data-dir", args.data_dir, "--out", out]
    command += ["--preset", "cpu", "--fid-stats", CPU_STATS] if args.cpu else ["--fid-stats", GPU_STATS]
    command += ["--inception", WEIGHTS] if os.path.isfile(WEIGHTS) else []
    print(" ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True)
    wall = time.time() - start
    m = json.load(open(os.path.join(out, "metrics.json")))
    result = {"command": " ".join(command), "wall_seconds": round(wall, 1),
              "samples_per_second": round(m["num_samples"] / max(m["sample_seconds"], 1e-9), 1),
              **{k: m.get(k) for k in ("device", "fid", "fid_num_samples", "fid_reference", "train_seconds", "steps")}}
    if not args.cpu:
        result["target_met"] = result["fid"] is not None and result["fid"] <= 10 and wall <= 600
    json.dump(result, open(os.path.join(out, "benchmark.json"), "w"), indent=2)
    print(json.dumps(result, indent=2))
    if not args.cpu:
        sys.exit(0 if result["target_met"] else 1)


if __name__ == "__main__":
    main()
