"""Benchmark of cond_iclevr.py: accuracy against training time, per guidance scale, judged by two evaluators.

What it measures
----------------
  1. One training run, `cond_iclevr.py --preset P`, graded every --eval-every epochs during training by the first
     evaluator (DDIM 50 steps with the preset's eta and guidance, our classifier's included, into
     OUT/train/accuracy.csv: accuracy against epoch and seconds of training).
  2. The final checkpoint resampled at each classifier-free guidance scale, --num-samples independent sets of the
     32 images per test file (different seeds): accuracy as mean +- std over the sets, by every evaluator given.
  3. Classifier guidance (Dhariwal & Nichol) by our own classifier (trained on the training images before the
     DDPM, --classifier-epochs; what the CPU preset samples with), graded by every evaluator.
  4. Classifier guidance by one evaluator, graded by both: a gain that only the guiding evaluator sees is not a
     gain. Run only with two evaluators (--evaluator-dir A --judge-dir B).
The iCLEVR stand-in: ../shared/iclevr_like/ (make_iclevr_like.py DIR --seed S writes the data in the course's
formats; evaluator/ is a judge trained on seed 0's renders; train_iclevr_evaluator.py trains a second, independent
one on another seed's renders). On the course's real files and evaluator the numbers may differ.

Commands (from the repository root)
-----------------------------------
  python ../shared/iclevr_like/make_iclevr_like.py data/iclevr_s0 --seed 0 --workers 2
  python ../shared/iclevr_like/make_iclevr_like.py data/iclevr_s1 --seed 1 --workers 2
  python ../shared/iclevr_like/train_iclevr_evaluator.py data/iclevr_s1 data/evaluator_s1 --seed 1 --epochs 6 --threads 2
  python benchmarks/cond_iclevr.py --preset cpu --data-dir data/iclevr_s0 --evaluator-dir ../shared/iclevr_like/evaluator \\
      --judge-dir data/evaluator_s1      # every setting (2-core CPU: the training run 64-96 min, then 2-6 min per setting)
  python benchmarks/cond_iclevr.py --preset cpu --data-dir data/iclevr_s0 --evaluator-dir ../shared/iclevr_like/evaluator \\
      --judge-dir data/evaluator_s1 --guidance 3 --own-guidance --classifier-guidance   # the README's from-scratch run
  python benchmarks/cond_iclevr.py --preset gpu --data-dir file --evaluator-dir file       # the course's files, a GPU
  python benchmarks/cond_iclevr.py --preset cpu --data-dir data/iclevr_s0 --evaluator-dir ../shared/iclevr_like/evaluator \\
      --judge-dir data/evaluator_s1 --eta 1 --guidance 1 2 3 --classifier-guidance 3   # resampled with DDIM eta 1
  python benchmarks/cond_iclevr.py --summarise-only --out runs/bench_cond_iclevr_cpu       # the table again
  python cond_iclevr.py --preset cpu --data-dir data/iclevr_s0 --sample-only --ckpt runs/bench_cond_iclevr_cpu/train/ckpt.pt \
      --test-files ../iclevr_s1/new_test.json --evaluator-dir ../shared/iclevr_like/evaluator data/evaluator_s1 \
      --classifier-guidance 2 --out runs/bench_cond_iclevr_cpu/tune_2    # choosing S on conditions not reported
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
# The flags of each preset's training run (cond_iclevr.py's own --preset for the CPU).
TRAIN = {"cpu": ["--preset", "cpu", "--eval-every", "2"],
         "gpu": ["--epochs", "200", "--eval-every", "10", "--classifier-epochs", "12", "--classifier-guidance", "4"]}
# The resampling runs take the preset's sampler too (--sample-only reads only the model's flags from the checkpoint).
SAMPLE = {"cpu": ["--preset", "cpu"], "gpu": []}
GUIDANCE = {"cpu": [1.0, 2.0, 3.0, 4.0], "gpu": [1.0, 1.5, 2.0, 3.0, 4.0]}
CLASSIFIER_GUIDANCE = [0.3, 1.0, 3.0]
OWN_CLASSIFIER_GUIDANCE = [2.0, 4.0, 8.0]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(TRAIN), default="cpu")
    p.add_argument("--data-dir", default="file", help="objects.json, train.json, test files, iclevr/")
    p.add_argument("--evaluator-dir", default=None, help="the grading evaluator (default --data-dir)")
    p.add_argument("--judge-dir", default=None, help="a second, independent evaluator")
    p.add_argument("--out", default=None, help="default runs/bench_cond_iclevr_<preset>")
    p.add_argument("--guidance", type=float, nargs="+", default=None, help="classifier-free guidance scales resampled")
    p.add_argument("--classifier-guidance", type=float, nargs="*", default=CLASSIFIER_GUIDANCE,
                   help="classifier-guidance scales (with --judge-dir)")
    p.add_argument("--own-guidance", type=float, nargs="*", default=OWN_CLASSIFIER_GUIDANCE,
                   help="scales of guidance by our own classifier (the training run's --classifier-epochs)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta of the resampled runs (default the preset's; their folders get an _eta suffix)")
    p.add_argument("--num-samples", type=int, default=4, help="independent sets of 32 images per file and scale")
    p.add_argument("--summarise-only", action="store_true", help="only print the table from an earlier run")
    p.add_argument("extra", nargs="*", help="more cond_iclevr.py flags for the training run, after --")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.out = Path(args.out or f"runs/bench_cond_iclevr_{args.preset}")
    args.evaluator_dir = args.evaluator_dir or args.data_dir
    args.guidance = args.guidance or GUIDANCE[args.preset]
    return args


def run(argv, log):
    """One cond_iclevr.py process; returns (wall seconds, CPU seconds of the child)."""
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    with open(log, "w") as fh:
        code = subprocess.call([sys.executable, str(ROOT / "cond_iclevr.py"), *map(str, argv)], stdout=fh,
                               stderr=subprocess.STDOUT, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code:
        sys.exit(f"cond_iclevr.py failed (exit {code}); see {log}")
    return round(time.time() - t0, 1), round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)


def benchmark(args):
    judges = [args.evaluator_dir] + ([args.judge_dir] if args.judge_dir else [])
    train_dir = args.out / "train"
    timing_path = args.out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    if not (train_dir / "metrics.json").is_file():
        resume = ["--resume"] if (train_dir / "ckpt.pt").is_file() else []
        timing["train"] = run(["--data-dir", args.data_dir, "--evaluator-dir", *judges, "--out", train_dir,
                               *TRAIN[args.preset], *resume, *args.extra], args.out / "train.log")
        timing_path.write_text(json.dumps(timing, indent=2))
    common = [*SAMPLE[args.preset], "--data-dir", args.data_dir, "--sample-only", "--ckpt", train_dir / "ckpt.pt", "--num-samples",
              args.num_samples, "--evaluator-dir", *judges]
    runs = [(f"guidance_{s:g}", ["--guidance", s, "--classifier-guidance", 0]) for s in args.guidance]
    best = 2.0 if 2.0 in args.guidance else args.guidance[0]
    if json.loads((train_dir / "metrics.json").read_text()).get("classifier"):  # else they would guide with A
        runs += [(f"own_classifier_{c:g}", ["--guidance", best, "--classifier-guidance", c]) for c in args.own_guidance]
    if args.judge_dir:
        for guide in (args.evaluator_dir, args.judge_dir):
            tag = "A" if guide == args.evaluator_dir else "B"
            runs += [(f"classifier_{tag}_{c:g}", ["--guidance", best, "--classifier-guidance", c, "--guide-dir", guide])
                     for c in args.classifier_guidance]
    if args.eta is not None:
        runs = [(f"{name}_eta{args.eta:g}", flags + ["--eta", args.eta]) for name, flags in runs]
    for name, flags in runs:
        out = args.out / name
        if not (out / "metrics.json").is_file():
            timing[name] = run(common + ["--out", out, *flags], args.out / f"{name}.log")
            timing_path.write_text(json.dumps(timing, indent=2))


def summarise(args):
    timing = json.loads((args.out / "timing.json").read_text()) if (args.out / "timing.json").is_file() else {}
    rows = []
    for metrics_path in sorted(args.out.glob("*/metrics.json")):
        m = json.loads(metrics_path.read_text())
        name = metrics_path.parent.name
        cells = []
        for stem, r in m["results"].items():
            for judge, s in (r.get("by_evaluator") or {}).items():
                sd = s.get("accuracy_std")
                cells.append(f"{stem} [{Path(judge).name}]: {s['accuracy_mean']:.3f}" + (f" ± {sd:.3f}" if sd else "")
                             + f" ({s['sets']} sets)")
        rows.append({"run": name, "device": m.get("hardware", m["device"]), "epochs": m.get("epochs", m.get("checkpoint_epoch")),
                     "sampler": f"{m['sampler']} {m['sampling_steps']}", "guidance": m["guidance"],
                     "classifier_guidance": m["classifier_guidance"], "guide": Path(m["guide_dir"]).name if m.get("guide_dir") and m["classifier_guidance"] else "-",
                     "accuracy": cells, "seconds": timing.get(name)})
    if not rows:
        sys.exit(f"no */metrics.json under {args.out}")
    for r in rows:
        print(f"{r['run']:<22} {r['device']}, epochs {r['epochs']}, {r['sampler']}, guidance {r['guidance']:g}, "
              f"classifier guidance {r['classifier_guidance']:g} by {r['guide']}; wall/CPU s {r['seconds']}")
        for cell in r["accuracy"]:
            print(f"    {cell}")
    curve = args.out / "train" / "accuracy.csv"
    if curve.is_file():
        print(f"\naccuracy during training ({curve}):")
        for row in csv.reader(open(curve)):
            print("  " + "  ".join(row))
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarise_only:
        benchmark(args)
    summarise(args)


if __name__ == "__main__":
    main()
