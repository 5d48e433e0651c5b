"""Benchmark (not a test): gan_baseline.py on MNIST, FID and speed on the protocol of ddpm_mnist.py.

Target (issue 7): with the defaults on one H100, FID <= 10 on 10,000 samples against the statistics of the
60,000 MNIST training digits that ddpm_mnist.py uses (runs/fid_stats_mnist_train60k.npz), in <= 10 minutes
(training + sampling + FID; the reference statistics are computed once beforehand, untimed, and shared with
ddpm_mnist.py). The summary puts the GAN beside runs/ddpm_mnist/metrics.json when that run exists.

  python benchmarks/gan_mnist.py            # GPU: the defaults; exit status 1 if the target is missed
  python benchmarks/gan_mnist.py --cpu      # gan_baseline.py --preset cpu on this 2-core CPU: FID of 2,000 samples
                                            # against the first 10,000 training digits (biased upward vs N=10k)

Each run leaves its outputs in runs/bench_gan_mnist[_cpu]/ and the summary in benchmark.json there.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
WEIGHTS = os.path.join(SHARED, "weights", "pt_inception-2015-12-05-nofc.pth")
CPU_STATS = os.path.join(SHARED, "fid-reference", "mnist_train10k_stats.npz")
GPU_STATS = os.path.join(ROOT, "runs", "fid_stats_mnist_train60k.npz")  # ddpm_mnist.py's default reference
# gan_baseline.py's --preset cpu; ../shared holds its reference (the first 10,000 training digits' statistics).
CPU_PRESET = ["--preset", "cpu", "--fid-stats", CPU_STATS]


def reference_statistics(data_dir, path):
    """The 60k-train statistics exactly as gan_baseline.py / ddpm_mnist.py's compute_fid makes them, once."""
    if os.path.isfile(path):
        return None
    sys.path.insert(0, ROOT)
    import fid
    import gan_baseline
    t = time.time()
    inception = fid.load_inception(WEIGHTS if os.path.isfile(WEIGHTS) else None)
    mu, sigma = fid.compute_statistics(gan_baseline.load_mnist(data_dir), model=inception)
    fid.save_statistics(path, mu, sigma)
    return round(time.time() - t, 1)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the CPU preset instead of the GPU defaults")
    p.add_argument("--data-dir", default=os.path.join(SHARED, "data") if os.path.isdir(SHARED) else "./data")
    p.add_argument("--out", default=None, help="default runs/bench_gan_mnist (or _cpu)")
    return p


def main():
    args = build_parser().parse_args()
    out = args.out or os.path.join(ROOT, "runs", "bench_gan_mnist" + ("_cpu" if args.cpu else ""))
    stats_seconds = None if args.cpu else reference_statistics(args.data_dir, GPU_STATS)
    command = [sys.executable, os.path.join(ROOT, "gan_baseline.py"), "--data-dir", args.data_dir, "--out", out]
    command += CPU_PRESET if args.cpu else ["--fid-stats", GPU_STATS]
    command += ["--inception", WEIGHTS] if os.path.isfile(WEIGHTS) else []
    print(" ".join(command), flush=True)
    t = time.time()
    subprocess.run(command, check=True)
    wall = time.time() - t
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = json.load(open(os.path.join(out, "metrics.json")))
    result = {"device": m.get("hardware", m["device"]), "command": " ".join(command), "fid": m.get("fid"),
              "fid_num_samples": m.get("fid_num_samples"), "fid_reference": m.get("fid_reference"),
              "train_seconds": m["train_seconds"], "samples_per_second": m["samples_per_second"],
              "g_steps": m["g_steps"], "wall_seconds": round(wall, 1),
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "reference_stats_seconds": stats_seconds}
    if not args.cpu:
        result["target_met"] = result["fid"] is not None and result["fid"] <= 10 and wall <= 600
    json.dump(result, open(os.path.join(out, "benchmark.json"), "w"), indent=2)

    print(f"\n| model | device | FID (N, reference) | samples/s | train s | wall s |\n|---|---|---|---|---|---|")
    fid_text = "n/a" if result["fid"] is None else f"{result['fid']:.2f}"
    print(f"| GAN (gan_baseline.py) | {m['device']} | {fid_text} (N={result['fid_num_samples']}, "
          f"{os.path.basename(str(result['fid_reference']))}) | {result['samples_per_second']:.0f} | "
          f"{result['train_seconds']:.0f} | {wall:.0f} |")
    ddpm = os.path.join(ROOT, "runs", "ddpm_mnist", "metrics.json")
    if os.path.isfile(ddpm):
        d = json.load(open(ddpm))
        if d.get("fid") is not None:
            print(f"| DDPM (ddpm_mnist.py) | {d['device']} | {d['fid']:.2f} (N={d.get('fid_num_samples')}, "
                  f"{os.path.basename(str(d.get('fid_reference')))}) | {d.get('samples_per_second')} | "
                  f"{d.get('train_seconds')} | {d.get('total_seconds')} |")
    print(f"\nCPU time {result['cpu_seconds']:.0f} s; details in {out}/benchmark.json")
    if not args.cpu:
        print("target (FID <= 10 in <= 600 s):", "met" if result["target_met"] else "MISSED")
        sys.exit(0 if result["target_met"] else 1)


if __name__ == "__main__":
    main()
