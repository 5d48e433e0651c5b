"""Benchmark for ddpm_mnist.py: wall time of the whole command (train, 10k samples, FID) and the FID it reaches.

  python benchmarks/ddpm_mnist.py --preset gpu    # the student's `python ddpm_mnist.py --epochs 30`, on CUDA
  python benchmarks/ddpm_mnist.py --preset cpu    # `python ddpm_mnist.py --preset cpu` on this 2-core CPU
                                                  # FID of 10k samples against the first 10k training digits

Extra arguments after `--` go to ddpm_mnist.py (e.g. `-- --inception PATH --data-dir DIR`). The result is printed and
written to OUT/benchmark.json beside ddpm_mnist.py's metrics.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
OFFLINE = ["--data-dir", os.path.join(SHARED, "data"), "--inception",
           os.path.join(SHARED, "weights", "pt_inception-2015-12-05-nofc.pth")]
PRESETS = {
    "gpu": ["--epochs", "30"],
    # ../shared holds the statistics of the first 10,000 training digits, exactly what --preset cpu's reference is
    "cpu": ["--preset", "cpu", "--fid-stats", os.path.join(SHARED, "fid-reference", "mnist_train10k_stats.npz")],
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--out", default=None, help="run folder (default runs/bench_<preset>)")
    p.add_argument("extra", nargs="*", help="more ddpm_mnist.py arguments, after --")
    return p


def main():
    args = build_parser().parse_args()
    out = args.out or os.path.join("runs", f"bench_{args.preset}")
    offline = OFFLINE if os.path.isdir(SHARED) else []
    cmd = [sys.executable, "ddpm_mnist.py", *PRESETS[args.preset], *offline, "--out", out, *args.extra]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.time() - t0
    metrics = json.load(open(os.path.join(ROOT, out, "metrics.json")))
    result = {"preset": args.preset, "command": " ".join(cmd[1:]), "wall_seconds": round(wall, 1),
              **{k: metrics.get(k) for k in ("device", "train_seconds", "sample_seconds", "num_samples", "sampler",
                                              "sampling_steps", "fid", "fid_num_samples", "fid_reference")}}
    result["train_and_sample_seconds"] = round((metrics.get("train_seconds") or 0) + (metrics.get("sample_seconds") or 0), 1)
    json.dump(result, open(os.path.join(ROOT, out, "benchmark.json"), "w"), indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
