"""Benchmark for ddpm_mnist.py: wall time of the whole command (train, 10k samples, FID) and the FID it reaches.

  python benchmarks/ddpm_mnist.py --preset gpu    # the defaults of `python ddpm_mnist.py --epochs 30`, on CUDA
                                                  # target: FID <= 5 vs MNIST train (60k) stats, <= 15 min on one H100
  python benchmarks/ddpm_mnist.py --preset cpu    # the small CPU configuration from the README
                                                  # target: training <= 60 min on 2 cores, FID < 40 on 10k samples
                                                  # (vs the first 10k training digits' statistics in ../shared)

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
PRESETS = {
    "gpu": ["--epochs", "30"],
    "cpu": ["--device", "cpu", "--data-dir", os.path.join(SHARED, "data"), "--ch", "16", "--ch-mult", "1", "2", "2",
            "--num-res-blocks", "1", "--attn-res", "7", "--dropout", "0", "--epochs", "4", "--batch-size", "64", "--lr", "1e-3",
            "--warmup", "200", "--ema-decay", "0.995", "--sampler", "ddim", "--steps", "25", "--eta", "0",
            "--sample-batch-size", "500", "--fid-stats", os.path.join(SHARED, "fid-reference", "mnist_train10k_stats.npz"),
            "--inception", os.path.join(SHARED, "weights", "pt_inception-2015-12-05-nofc.pth")],
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--out", default=None, help="run folder (default runs/bench_<preset>)")
    p.add_argument("extra", nargs="*", help="more ddpm_mnist.py arguments, after --")
    args = p.parse_args()
    out = args.out or os.path.join("runs", f"bench_{args.preset}")
    cmd = [sys.executable, "ddpm_mnist.py", *PRESETS[args.preset], "--out", out, *args.extra]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.time() - t0
    metrics = json.load(open(os.path.join(ROOT, out, "metrics.json")))
    result = {"preset": args.preset, "command": " ".join(cmd[1:]), "wall_seconds": round(wall, 1),
              **{k: metrics.get(k) for k in ("device", "train_seconds", "sample_seconds", "samples_per_second",
                                              "num_samples", "sampler", "sampling_steps", "fid", "fid_num_samples",
                                              "fid_reference")}}
    json.dump(result, open(os.path.join(ROOT, out, "benchmark.json"), "w"), indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
