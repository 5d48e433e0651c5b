"""Benchmark of cond_iclevr.py: accuracy from the course's evaluator against training time, and per guidance scale.

What it measures
----------------
  --preset gpu   the homework itself, on the real iCLEVR and the course's evaluator.py + checkpoint.pth (a GPU is
                 required: the evaluator moves itself to CUDA). One training run with the defaults, graded every
                 --eval-every epochs (DDIM 50 steps, into OUT/train/accuracy.csv: accuracy against epoch and
                 wall time); then the final checkpoint resampled with the default DDPM sampler (all 1000 steps)
                 at each classifier-free guidance scale, --num-samples sets per test file (mean and spread, since
                 32 images make a noisy number). The table: accuracy on test.json and new_test.json per scale,
                 training seconds, sampling seconds, the GPU. The course's bar: 0.8 on both files.
  --preset cpu   the CPU demo of the README on the miniature dataset (tests/iclevr_fixtures.py: flat coloured
                 shapes, graded by the stand-in evaluator, whose number means nothing about iCLEVR); it shows
                 that every output is written and what a CPU run costs.
Times are wall seconds and the CPU seconds of the child processes (on a shared machine the wall time grows
with the load; the CPU time is about what the run takes on a core of its own).

Commands (from the repository root)
-----------------------------------
  python benchmarks/cond_iclevr.py --preset gpu --data-dir file --evaluator-dir file     # the README's GPU numbers
  OMP_NUM_THREADS=1 python benchmarks/cond_iclevr.py --preset cpu                          # the README's CPU demo
  python benchmarks/cond_iclevr.py --summarise-only --out runs/bench_cond_iclevr_gpu       # the table again
  python benchmarks/cond_iclevr.py --preset gpu ... -- --ch 64                             # flags for the training run
"""
import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_DEMO = ["--device", "cpu", "--image-size", "16", "--ch", "16", "--ch-mult", "1", "2", "--num-res-blocks", "1",
            "--attn-res", "8", "--timesteps", "100", "--epochs", "45", "--batch-size", "32", "--lr", "1e-3",
            "--warmup", "50", "--ema-decay", "0.995", "--sampler", "ddim", "--steps", "25"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--data-dir", default="file", help="(gpu) the course's objects.json, train.json, test files, iclevr/")
    p.add_argument("--evaluator-dir", default=None, help="(gpu) the course's evaluator.py and checkpoint.pth (default --data-dir)")
    p.add_argument("--out", default=None, help="default runs/bench_cond_iclevr_<preset>")
    p.add_argument("--epochs", type=int, default=200, help="(gpu) training epochs")
    p.add_argument("--eval-every", type=int, default=10, help="(gpu) grade every K epochs during training")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0], help="(gpu) scales resampled")
    p.add_argument("--num-samples", type=int, default=5, help="(gpu) sets of 32 images per test file and scale")
    p.add_argument("--summarise-only", action="store_true", help="only print the table from an earlier run")
    p.add_argument("extra", nargs="*", help="(gpu) more cond_iclevr.py flags for the training run, after --")
    args = p.parse_args(argv)
    args.out = Path(args.out or f"runs/bench_cond_iclevr_{args.preset}")
    args.evaluator_dir = args.evaluator_dir or args.data_dir
    return args


def run(argv, log):
    """One cond_iclevr.py process; returns (wall seconds, CPU seconds of the child)."""
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    with open(log, "w") as fh:
        code = subprocess.call([sys.executable, str(ROOT / "cond_iclevr.py"), *argv], stdout=fh, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code:
        sys.exit(f"cond_iclevr.py failed (exit {code}); see {log}")
    return round(time.time() - t0, 1), round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)


def gpu(args):
    train_dir = args.out / "train"
    timing = {}
    if not (train_dir / "metrics.json").is_file():
        timing["train"] = run(["--data-dir", args.data_dir, "--evaluator-dir", args.evaluator_dir, "--out", str(train_dir),
                               "--epochs", str(args.epochs), "--eval-every", str(args.eval_every), *args.extra],
                              args.out / "train.log")
    for s in args.guidance:
        out = args.out / f"guidance_{s:g}"
        if not (out / "metrics.json").is_file():
            timing[f"guidance_{s:g}"] = run(
                ["--data-dir", args.data_dir, "--evaluator-dir", args.evaluator_dir, "--sample-only", "--ckpt",
                 str(train_dir / "ckpt.pt"), "--out", str(out), "--guidance", str(s), "--num-samples",
                 str(args.num_samples)], args.out / f"guidance_{s:g}.log")
    path = args.out / "timing.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**earlier, **timing}, indent=2))


def cpu(args):
    data = ROOT / "runs" / "mini_iclevr"
    if not (data / "train.json").is_file():
        subprocess.check_call([sys.executable, str(ROOT / "tests" / "iclevr_fixtures.py"), str(data), "--num-train", "512"])
    timing = {"demo": run(["--data-dir", str(data), "--evaluator-dir", str(data / "stand_in_evaluator"),
                           "--out", str(args.out / "demo"), *CPU_DEMO], args.out / "demo.log")}
    (args.out / "timing.json").write_text(json.dumps(timing, indent=2))


def summarise(args):
    timing = json.loads((args.out / "timing.json").read_text()) if (args.out / "timing.json").is_file() else {}
    rows, acc = [], {}
    for metrics_path in sorted(args.out.glob("*/metrics.json")):
        m = json.loads(metrics_path.read_text())
        name = metrics_path.parent.name
        acc = {stem: (r.get("accuracy_mean", (r["accuracy_per_set"] or [None])[0]), r.get("accuracy_std"))
               for stem, r in m["results"].items()}
        rows.append(f"| {name} | {m['device']} | {m.get('epochs', m.get('checkpoint_epoch', '-'))} | {m['sampler']} {m['sampling_steps']} | "
                    f"{m['guidance']:g} | " + " | ".join(
                        "-" if a is None else f"{a:.3f}" + (f" ± {sd:.3f}" if sd is not None else "") for a, sd in acc.values())
                    + f" | {timing.get(name, ('-', '-'))[0]} / {timing.get(name, ('-', '-'))[1]} |")
    if not rows:
        sys.exit(f"no */metrics.json under {args.out}")
    print("| run | device | epochs | sampler, steps | guidance | " + " | ".join(f"{s}.json" for s in acc)
          + " | wall s / CPU s |")
    print("|---" * (7 + len(acc) - 1) + "|")
    print("\n".join(rows))
    curve = args.out / "train" / "accuracy.csv"
    if curve.is_file():
        print(f"\naccuracy during training ({curve}):")
        for row in csv.reader(open(curve)):
            print("  " + "  ".join(row))


def main():
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarise_only:
        gpu(args) if args.preset == "gpu" else cpu(args)
    summarise(args)


if __name__ == "__main__":
    main()
