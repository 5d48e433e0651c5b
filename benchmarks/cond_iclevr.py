"""Benchmark of cond_iclevr.py: accuracy on iCLEVR for each guidance setting, by two judges.

  1. One training run, `cond_iclevr.py --preset P --eval-every K` (OUT/train/accuracy.csv: the accuracy of the
     hand-in's images during training, by judge A, against epochs and seconds of training).
  2. Its checkpoint resampled (--sample-only) per setting: classifier-free guidance weight w alone, and w = 1 with our
     classifier's guidance at scale S. --num-samples sets of the 32 images per file (other seeds), graded by judge A
     (--evaluator-dir) and, if given, by judge B (--judge-dir, an evaluator trained apart; the same images, sampled
     again): a gain that only one judge sees is not a gain.
The iCLEVR stand-in is ../shared/iclevr_like/: make_iclevr_like.py writes renders in the course's formats, evaluator/
is judge A (trained on seed 0's renders), train_iclevr_evaluator.py trains judge B on another seed's renders.

  python ../shared/iclevr_like/make_iclevr_like.py data/iclevr_s0 --seed 0 --workers 2
  python ../shared/iclevr_like/make_iclevr_like.py data/iclevr_s1 --seed 1 --workers 2
  python ../shared/iclevr_like/train_iclevr_evaluator.py data/iclevr_s1 data/evaluator_s1 --seed 1 --epochs 6 \
      --threads 2
  python benchmarks/cond_iclevr.py --preset cpu --data-dir data/iclevr_s0 \
      --evaluator-dir ../shared/iclevr_like/evaluator --judge-dir data/evaluator_s1
  python benchmarks/cond_iclevr.py --preset gpu --data-dir file --evaluator-dir file      # the course's files, a GPU
  python cond_iclevr.py --preset cpu --data-dir data/iclevr_s0 --sample-only --evaluator-dir data/evaluator_s1 \
      --ckpt runs/bench_cond_iclevr_cpu/train/ckpt.pt --classifier-guidance 2 --out runs/one_setting   # one setting
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"cpu": ["--preset", "cpu", "--eval-every", "2"],
         "gpu": ["--epochs", "200", "--eval-every", "10", "--classifier-epochs", "12", "--classifier-guidance", "4"]}
SAMPLE = {"cpu": ["--preset", "cpu"], "gpu": []}  # the hand-in's sampler (the model's flags come from the checkpoint)
SETTINGS = {f"w{w:g}": ["--cfg-w", str(w), "--classifier-guidance", "0"] for w in (0, 1, 2, 3)}
SETTINGS.update({f"w1_S{s:g}": ["--cfg-w", "1", "--classifier-guidance", str(s)] for s in (2, 4, 8)})


def run(argv, out):
    """One cond_iclevr.py run into out (skipped if out/metrics.json exists); returns its metrics and wall seconds."""
    if not (out / "metrics.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        start = time.time()
        with open(out / "log.txt", "w") as log:
            code = subprocess.call([sys.executable, str(ROOT / "cond_iclevr.py"), *argv, "--out", str(out)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if code:
            sys.exit(f"cond_iclevr.py failed (exit {code}); see {out / 'log.txt'}")
        (out / "seconds.txt").write_text(f"{time.time() - start:.0f}")
    return json.loads((out / "metrics.json").read_text()), (out / "seconds.txt").read_text()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(TRAIN), default="cpu")
    p.add_argument("--data-dir", default="file", help="objects.json, train.json, the test files, iclevr/")
    p.add_argument("--evaluator-dir", default="file", help="judge A, which also grades during training")
    p.add_argument("--judge-dir", default=None, help="judge B, an evaluator trained apart")
    p.add_argument("--out", default=None, help="default runs/bench_cond_iclevr_<preset>")
    p.add_argument("--num-samples", type=int, default=4, help="sets of 32 images per file and setting")
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    args = p.parse_args(argv)
    out = Path(args.out or f"runs/bench_cond_iclevr_{args.preset}").resolve()
    resume = ["--resume"] if (out / "train" / "ckpt.pt").is_file() else []
    _, seconds = run(["--data-dir", args.data_dir, "--evaluator-dir", args.evaluator_dir, *TRAIN[args.preset], *resume],
                     out / "train")
    print(f"training: {seconds} s; accuracy during training in {out / 'train' / 'accuracy.csv'}")
    judges = {"A": args.evaluator_dir, **({"B": args.judge_dir} if args.judge_dir else {})}
    for name in args.settings:
        for judge, folder in judges.items():
            metrics, seconds = run([*SAMPLE[args.preset], "--data-dir", args.data_dir, "--evaluator-dir", folder,
                                    "--sample-only", "--ckpt", str(out / "train" / "ckpt.pt"),
                                    "--num-samples", str(args.num_samples), *SETTINGS[name]], out / f"{name}_{judge}")
            cells = [f"{stem} {statistics.mean(a):.3f} ± {statistics.stdev(a) if len(a) > 1 else 0:.3f}"
                     for stem, a in metrics["accuracy_per_set"].items()]
            print(f"{name:<8} judge {judge}: {', '.join(cells)} ({args.num_samples} sets of 32; {seconds} s; "
                  f"{metrics['device']})")


if __name__ == "__main__":
    main()
