"""Benchmark for ddim.py on the swiss roll: one run per seed, the median Chamfer distance of every sampler.

The targets, 2048 generated against 2048 reference points, medians over the seeds:
  * the default training: DDPM (all 1000 steps) CD <= 8, DDIM-50 (eta = 0) <= 15, DPM-Solver++(2M)-20 at or below
    DDIM-50, training at most 300 CPU seconds per seed;
  * --preset course (the course's fixed training): DDPM CD <= 10, DDIM-50 with the course's steps <= 30.
(The homework's full marks are DDPM < 20 and DDIM-50 < 60.) Each seed is one `ddim.py` run in its own process, one
thread each; training is timed in wall and in CPU seconds (on a shared machine the wall time grows with the load).

    OMP_NUM_THREADS=1 python benchmarks/ddim_swiss_roll.py --jobs 2                  # the default training, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/ddim_swiss_roll.py --out runs/ddim_bench_course -- --preset course
    python benchmarks/ddim_swiss_roll.py --summarise-only                            # the table again, from --out
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
TARGETS = {"default": {"ddpm": 8.0, "ddim50": 15.0, "train_cpu_seconds": 300}, "course": {"ddpm": 10.0, "ddim50": 30.0}}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="seeds run at the same time, each on one thread")
    p.add_argument("--out", default="runs/ddim_bench", help="a folder per seed, and summary.json / summary.md")
    p.add_argument("--summarise-only", action="store_true", help="only read the runs already in --out")
    p.add_argument("extra", nargs="*", help="flags passed on to ddim.py (after --)")
    return p


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
        for seed, proc, log in [r for r in running if r[1].poll() is not None]:
            log.close()
            running = [r for r in running if r[0] != seed]
            print(f"seed {seed}: exit {proc.returncode} (log in {args.out}/seed{seed}/log.txt)", flush=True)
            if proc.returncode != 0:
                sys.exit(f"seed {seed} failed; see its log")


def summarise(args):
    runs = [json.loads((Path(args.out) / f"seed{s}" / "metrics.json").read_text()) for s in args.seeds]
    rows = []
    for first in runs[0]["rows"]:
        per_seed = [next(r for r in m["rows"] if r["name"] == first["name"]) for m in runs]
        rows.append({**{k: first[k] for k in ("name", "sampler", "steps", "eta", "spacing")},
                     "cd_median": float(np.median([r["cd"] for r in per_seed])),
                     "cd_per_seed": [r["cd"] for r in per_seed],
                     "seconds_median": float(np.median([r["seconds"] for r in per_seed]))})
    by_name = {r["name"]: r for r in rows}
    ddpm = next(r for r in rows if r["sampler"] == "ddpm")
    ddim50 = by_name.get("ddim_50_eta0") or by_name["ddim_50_eta0_course"]  # the course preset steps by T // S
    train_cpu = [m["train_cpu_seconds"] for m in runs]
    preset = "course" if runs[0]["args"].get("preset") == "course" else "default"
    target = TARGETS[preset]
    checks = {f"DDPM median CD <= {target['ddpm']:g}": ddpm["cd_median"] <= target["ddpm"],
              f"DDIM-50 (eta 0) median CD <= {target['ddim50']:g}": ddim50["cd_median"] <= target["ddim50"]}
    if preset == "default":
        limit = target["train_cpu_seconds"]
        checks[f"training <= {limit} CPU s per seed"] = max(train_cpu) <= limit
        checks["DPM-Solver++ 20 median CD <= DDIM-50's"] = by_name["dpmpp_20"]["cd_median"] <= ddim50["cd_median"]
    lines = [f"ddim.py ({preset}) on the swiss roll: seeds {args.seeds}, {runs[0]['num_points']} vs "
             f"{runs[0]['num_points']} points, {runs[0]['device']}; training wall s "
             f"{[m['train_seconds'] for m in runs]}, CPU s {train_cpu}", "",
             "| sampler | steps | eta | spacing | CD (median) | CD per seed | seconds (median) |",
             "| --- | ---: | ---: | --- | ---: | --- | ---: |"]
    for r in rows:
        eta = "-" if r["eta"] is None else f"{r['eta']:g}"
        per_seed = ", ".join(f"{v:.2f}" for v in r["cd_per_seed"])
        lines.append(f"| {r['sampler']} | {r['steps']} | {eta} | {r['spacing']} | {r['cd_median']:.2f} | {per_seed} | "
                     f"{r['seconds_median']:.2f} |")
    lines += [""] + [f"{'PASS' if ok else 'FAIL'}  {what}" for what, ok in checks.items()]
    print("\n".join(lines))
    (Path(args.out) / "summary.md").write_text("\n".join(lines) + "\n")
    summary = {"seeds": args.seeds, "extra_flags": args.extra, "rows": rows, "checks": checks,
               "train_seconds": [m["train_seconds"] for m in runs], "train_cpu_seconds": train_cpu,
               "device": runs[0]["device"], "args": runs[0]["args"]}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.summarise_only:
        start = time.time()
        run_seeds(args)
        print(f"all seeds done in {time.time() - start:.0f} s wall", flush=True)
    summarise(args)


if __name__ == "__main__":
    main()
