"""Benchmark for ddim.py on the swiss roll: the default training with several seeds, the median Chamfer distance.

The targets (issue 4), with 2048 generated against 2048 reference points:
  * the default training finishes in 5 minutes or less on 2 CPU cores;
  * median over 3 seeds: CD <= 8 for DDPM with all 1000 steps, CD <= 15 for DDIM with 50 steps (eta = 0);
  * DPM-Solver++(2M) with 20 steps at or below DDIM with 50.
(The homework's full marks are DDPM < 20 and DDIM-50 < 60.) With `-- --preset course`, the course's fixed
training: DDPM CD <= 10 and DDIM-50 (the course's steps) <= 30.

Each seed is one `ddim.py` run (its own data, model and sampling noise) in its own process, single-threaded.
The table gives, per sampler, the median CD over the seeds, each seed's CD and the median sampling seconds.
Training is timed in wall seconds and in CPU seconds of that process: on a shared machine the wall time
grows with the load, while the CPU time is about what the run takes on a core of its own.

    OMP_NUM_THREADS=1 python benchmarks/ddim_swiss_roll.py                 # 3 seeds, one after another
    OMP_NUM_THREADS=1 python benchmarks/ddim_swiss_roll.py --jobs 2        # two seeds at a time (2 cores)
    python benchmarks/ddim_swiss_roll.py --summarise-only                  # redo the table from the runs
    python benchmarks/ddim_swiss_roll.py -- --preset course                # any ddim.py flags after --
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
TARGET_TRAIN_SECONDS, TARGET_DDPM, TARGET_DDIM50 = 300, 8.0, 15.0
TARGET_COURSE_DDPM, TARGET_COURSE_DDIM50 = 10.0, 30.0  # --preset course (issue 12): median of 3 seeds


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="seeds run at the same time, each single-threaded")
    p.add_argument("--out", default="runs/ddim_bench", help="one folder per seed, and summary.json / summary.md")
    p.add_argument("--summarise-only", action="store_true", help="only read the runs already in --out")
    p.add_argument("extra", nargs="*", help="flags passed on to ddim.py (after --)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.exit(2, f"error: --jobs must be at least 1, got {args.jobs}\n")
    return args


def run_seeds(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running = list(args.seeds), []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            folder = Path(args.out) / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(ROOT / "ddim.py"), "--seed", str(seed), "--out", str(folder), *args.extra]
            print("running:", " ".join(cmd), flush=True)
            log = open(folder / "log.txt", "w")
            running.append((seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log))
        time.sleep(2)
        for item in list(running):
            seed, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"seed {seed}: exit {proc.returncode} (log in {args.out}/seed{seed}/log.txt)", flush=True)
                if proc.returncode != 0:
                    sys.exit(f"seed {seed} failed; see its log")


def summarise(args):
    runs = {s: json.loads((Path(args.out) / f"seed{s}" / "metrics.json").read_text()) for s in args.seeds}
    names = [r["name"] for r in runs[args.seeds[0]]["rows"]]
    rows = []
    for name in names:
        per_seed = [next(r for r in m["rows"] if r["name"] == name) for m in runs.values()]
        rows.append({"name": name, "sampler": per_seed[0]["sampler"], "steps": per_seed[0]["steps"],
                     "eta": per_seed[0]["eta"], "spacing": per_seed[0]["spacing"], "cd_median": float(np.median([r["cd"] for r in per_seed])),
                     "cd_per_seed": [round(r["cd"], 3) for r in per_seed],
                     "seconds_median": float(np.median([r["seconds"] for r in per_seed]))})
    by_name = {r["name"]: r for r in rows}
    by_name["ddpm"] = next(r for r in rows if r["sampler"] == "ddpm")  # ddpm_<T>
    train_wall = [m["train_seconds"] for m in runs.values()]
    train_cpu = [m["train_cpu_seconds"] for m in runs.values()]
    first = runs[args.seeds[0]]
    # DDIM-50 with the run's own spacing (the course preset steps by T // S: its row is ddim_50_eta0_course).
    ddim50 = by_name.get("ddim_50_eta0") or by_name["ddim_50_eta0_course"]
    course = first["args"].get("preset") == "course"
    target_ddpm, target_ddim50 = (TARGET_COURSE_DDPM, TARGET_COURSE_DDIM50) if course else (TARGET_DDPM, TARGET_DDIM50)
    checks = {
        f"DDPM (all steps) median CD <= {target_ddpm:g}": by_name["ddpm"]["cd_median"] <= target_ddpm,
        f"DDIM-50 (eta 0) median CD <= {target_ddim50:g}": ddim50["cd_median"] <= target_ddim50,
    }
    if not course:  # the default training's own targets (issue 4)
        checks[f"training <= {TARGET_TRAIN_SECONDS} s (CPU seconds, max over seeds)"] = max(train_cpu) <= TARGET_TRAIN_SECONDS
        checks["DPM-Solver++ 20 median CD <= DDIM-50's"] = by_name["dpmpp_20"]["cd_median"] <= ddim50["cd_median"]
    lines = [f"ddim.py on the swiss roll: {len(runs)} seeds {args.seeds}, {first['num_points']} generated vs "
             f"{first['num_points']} reference points, device {first['device']}, {first['threads']} thread(s); "
             f"training wall s {train_wall}, CPU s {train_cpu}", "",
             "| sampler | steps | eta | spacing | CD (median) | CD per seed | seconds (median) |",
             "| --- | ---: | ---: | --- | ---: | --- | ---: |"]
    for r in rows:
        eta = f"{r['eta']:g}" if r["eta"] is not None else "-"
        lines.append(f"| {r['sampler']} | {r['steps']} | {eta} | {r['spacing']} | {r['cd_median']:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in r['cd_per_seed'])} | {r['seconds_median']:.1f} |")
    lines += [""] + [f"{'PASS' if ok else 'FAIL'}  {what}" for what, ok in checks.items()]
    text = "\n".join(lines)
    print(text)
    (Path(args.out) / "summary.md").write_text(text + "\n")
    summary = {"seeds": args.seeds, "extra_flags": args.extra, "train_seconds": train_wall,
               "train_cpu_seconds": train_cpu, "rows": rows, "checks": checks, "device": first["device"],
               "num_points": first["num_points"], "args": first["args"]}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if not args.summarise_only:
        t0 = time.time()
        run_seeds(args)
        print(f"all seeds done in {time.time() - t0:.0f} s wall", flush=True)
    summarise(args)


if __name__ == "__main__":
    main()
