"""One GPU call that measures the student's command, `python ddpm_mnist.py --epochs 30`, in at most 9 minutes.

Prepare on a machine with ../shared (MNIST gzipped and the Inception weights in float16: about 55 MiB, under the
64 MiB a GPU call carries), then run on the GPU machine:

    python benchmarks/gpu.py --pack gpu_pack          # writes gpu_pack/MNIST/raw/*.gz and gpu_pack/inception_fp16.pth
    python benchmarks/gpu.py --data-dir gpu_pack --inception gpu_pack/inception_fp16.pth --out runs/gpu
    python benchmarks/gpu.py --tiny --device cpu      # every step at toy sizes, eager only (the test runs this)

The steps, in order, each in processes of its own with its own time limit (seconds, --tiny aside); a step that
fails or runs out of time is written down as such and the next one runs. OUT/gpu.json is rewritten after each step,
OUT/<step>.log keeps every line a step printed, with the seconds since it began.
  a. train_steps (120 s): 30 training steps of each variant, timed after a warm-up (which holds the compilation):
     eager and --compile (CUDA graphs), batch 128 and batch 256 with the learning rate doubled; then 10 more steps
     under the profiler: kernels per step, CPU ms and GPU ms per step.
  b. student (300 s): the whole command with the fastest batch-128 variant of a: training, sampling, the reference
     statistics of the 60,000 training digits, FID of the 10,000 samples. Cut off, it says where it had got to.
  c. samplers (90 s): on b's checkpoint, FID of 10,000 samples against the same statistics for each sampler of
     benchmarks/samplers.py's table, fastest first (ddim.py --ckpt). --tiny: the first and the last, without FID.
  d. floor (15 s): the 10,000 test digits against the same statistics: the FID of real data.
  e. fid (15 s): fid.py's images per second on the test digits with TF32 off (the protocol) and on, and the FID each
     gives against the same statistics.
Targets (ddpm_mnist.py on one H100): the whole command <= 300 s, FID <= 3; fid.py <= 5 s per 10,000 images.
"""
import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))  # the scripts, before benchmarks/ (whose ddpm_mnist.py is a benchmark)
LIMITS = {"train_steps": 120, "student": 300, "samplers": 90, "floor": 15, "fid": 15}
VARIANTS = [(0, 128), (1, 128), (0, 256), (1, 256)]  # (--compile, --batch-size) of the training step
SAMPLERS = [("dpmpp", 20), ("dpmpp", 25), ("ddim", 50), ("ddim", 100), ("ddpm", 1000)]  # benchmarks/samplers.py's
# --tiny: each step at toy sizes (later flags win in argparse), so that a CPU runs them all in seconds.
TINY = ["--limit", "64", "--ch", "8", "--num-res-blocks", "1", "--attn-res", "7", "--timesteps", "10", "--epochs",
        "1", "--batch-size", "16", "--num-samples", "16", "--sample-batch-size", "16", "--fid-ref-limit", "32",
        "--warmup", "1"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(SHARED / "data"), help="holds MNIST/raw (the .gz files are enough)")
    p.add_argument("--inception", default=str(SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth"))
    p.add_argument("--out", default="runs/gpu", help="gpu.json, the logs and every step's run folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes and limits, to check that every step runs")
    p.add_argument("--pack", metavar="FOLDER", help="write MNIST gzipped and the Inception in float16 to FOLDER, stop")
    p.add_argument("--worker", choices=["train_steps", "floor", "fid"], help=argparse.SUPPRESS)
    p.add_argument("--variant", nargs=2, type=int, metavar=("COMPILE", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    return p


# ---- the GPU call's luggage ----------------------------------------------------------------------------------------
def pack(folder, data_dir, inception):
    import torch
    raw = Path(folder) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for path in (Path(data_dir) / "MNIST" / "raw").glob("*-ubyte"):
        with open(path, "rb") as src, gzip.open(raw / (path.name + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    state = torch.load(inception, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}  # loads into float32 as it is
    torch.save(half, Path(folder) / "inception_fp16.pth")
    print(f"wrote {folder}: {sum(p.stat().st_size for p in Path(folder).rglob('*') if p.is_file()) / 2**20:.1f} MiB")


def unpack_mnist(data_dir):
    """torchvision reads MNIST/raw's uncompressed files: write them from the .gz files where they are missing."""
    for gz in (Path(data_dir) / "MNIST" / "raw").glob("*.gz"):
        if not gz.with_suffix("").exists():
            with gzip.open(gz, "rb") as src, open(gz.with_suffix(""), "wb") as dst:
                shutil.copyfileobj(src, dst)


# ---- running a step: a subprocess with a time limit, its lines kept with their times --------------------------------
def run(command, limit, log):
    """Run command for at most limit seconds, every line into log with the seconds since it began.
    Returns (seconds, "ok" | "failed (exit N)" | "cut off after N s")."""
    start = time.time()
    print(f"$ {' '.join(map(str, command))}", flush=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(map(str, command))}\n")
        proc = subprocess.Popen([str(c) for c in command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def copy_lines():
            for line in proc.stdout:
                fh.write(f"{time.time() - start:7.1f}s  {line}")
                fh.flush()
        reader = threading.Thread(target=copy_lines, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=max(1, limit))
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = f"cut off after {limit:.0f} s"
        reader.join(timeout=5)
    return round(time.time() - start, 1), status


def last_json_line(log):
    """A worker's result: the last line of its log that is a JSON object."""
    for line in reversed(Path(log).read_text().splitlines()):
        text = line.split("s  ", 1)[-1]
        if text.startswith("{"):
            return json.loads(text)
    return None


def where_training_got(log):
    """For a run cut off: its last progress line's step, steps, images per second, and the training time it projects."""
    found = None
    for line in Path(log).read_text().splitlines():
        match = re.search(r"^\s*([\d.]+)s .*step (\d+)/(\d+) .* (\d+) img/s +left (\d+)m(\d+)s", line)
        found = match.groups() if match else found
    if found is None:
        return None
    seconds, step, steps, rate, minutes, secs = found
    return {"seconds_into_run": float(seconds), "step": int(step), "steps": int(steps), "images_per_second": int(rate),
            "projected_train_seconds_left": int(minutes) * 60 + int(secs)}


# ---- workers: run in a process of their own, print one JSON line -------------------------------------------------
def train_steps_worker(args):
    """30 timed training steps of ddpm_mnist.py's own loop after a warm-up, then 10 under the profiler."""
    import torch
    import ddpm_mnist
    import plumbing
    compiled, batch = args.variant
    warm, timed, profiled = (2, 3, 2) if args.tiny else (15, 30, 10)
    flags = [*TINY * args.tiny, "--data-dir", args.data_dir, "--device", args.device, "--out",
             Path(args.out) / "train_steps", "--batch-size", batch // 8 if args.tiny else batch, "--lr",
             4e-4 * batch / 128, "--num-samples", 0, "--no-fid", "--iters", warm + timed + profiled]
    flags += ["--compile"] * compiled
    run_args = ddpm_mnist.parse_args([str(f) for f in flags])
    device = torch.device(run_args.device)
    data = ddpm_mnist.load_training_images(run_args, run_args.limit).to(device)
    sched = ddpm_mnist.NoiseSchedule(ddpm_mnist.make_betas(run_args.schedule, run_args.timesteps)).to(device)
    model = ddpm_mnist.build_model(run_args, 1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run_args.lr, fused=device.type == "cuda")
    amp = plumbing.Precision(device)
    plumbing.make_out_folder(run_args.out)
    plumbing.save_run = lambda *a, **k: None  # the steps are timed, not the checkpoint
    marks, profiler = {}, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []))
    show = plumbing.Progress.show

    def timed_show(self, state):  # the clock read at three steps, after the GPU has finished the work before them
        if state["step"] in (warm, warm + timed, warm + timed + profiled):
            torch.cuda.synchronize() if device.type == "cuda" else None
            marks[state["step"]] = time.perf_counter()
            if state["step"] == warm + timed:
                profiler.start()
            if state["step"] == warm + timed + profiled:
                profiler.stop()
        show(self, state)
    plumbing.Progress.show = timed_show
    start = time.perf_counter()
    state = {"step": 0, "seconds": 0.0, "losses": {"loss": []}}
    ddpm_mnist.train(run_args, data, model, ddpm_mnist.EMA(model, run_args.ema_decay), optimizer, sched, state, amp)
    kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    step_ms = 1000 * (marks[warm + timed] - marks[warm]) / timed
    print(json.dumps({
        "images_per_step": run_args.batch_size, "lr": run_args.lr, "precision": amp.name,
        "warmup_seconds": round(marks[warm] - start, 1), "ms_per_step": round(step_ms, 2),
        "images_per_second": round(run_args.batch_size * 1000 / step_ms), "profiled_ms_per_step": round(
            1000 * (marks[warm + timed + profiled] - marks[warm + timed]) / profiled, 2),
        "kernels_per_step": round(len(kernels) / profiled, 1),
        "gpu_ms_per_step": round(sum(e.time_range.elapsed_us() for e in kernels) / 1000 / profiled, 2),
        "cpu_ms_per_step": round(sum(e.self_cpu_time_total for e in profiler.key_averages()) / 1000 / profiled, 2),
        "final_loss": round(state["losses"]["loss"][-1].item(), 4)}), flush=True)


def test_digits(args):
    import torch
    import plumbing
    return plumbing.load_mnist(args.data_dir, 16 if args.tiny else None, train=False), torch.device(args.device)


def floor_worker(args):
    """FID of the 10,000 test digits against the training digits' statistics: what real data scores (--tiny: the
    statistics only; a CPU takes 20 s per FID of a few images)."""
    import fid
    images, device = test_digits(args)
    mu, sigma = fid.compute_statistics(images, fid.load_inception(args.inception, device))
    value = None if args.tiny else fid.frechet_distance(mu, sigma, *fid.load_statistics(args.stats))
    print(json.dumps({"fid": value, "num_images": len(images), "reference": args.stats}), flush=True)


def fid_worker(args):
    """fid.py's features of the test digits with TF32 off (as fid.py computes them) and on; images per second, how
    far TF32 moves the features, and the FID each gives (not with --tiny: a CPU takes 20 s per FID of a few images).
    TF32 on is timed with fid.py's own loop, outside compute_features (which switches it off)."""
    import numpy as np
    import torch
    import fid
    images, device = test_digits(args)
    model = fid.load_inception(args.inception, device)
    fid.compute_features(images[:50], model)  # warm-up: cuDNN picks its algorithms
    result, features_of = {"num_images": len(images)}, {}
    for tf32 in (False, True):
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            with torch.inference_mode():
                features = np.concatenate([model(b.to(device)).cpu().numpy() for b in fid.uint8_batches(images, 50)])
        else:
            features = fid.compute_features(images, model)
        seconds = time.perf_counter() - start
        features_of[tf32] = features = features.astype(np.float64)
        value = None if args.tiny else fid.frechet_distance(features.mean(0), np.cov(features, rowvar=False),
                                                            *fid.load_statistics(args.stats))
        result["tf32_on" if tf32 else "tf32_off"] = {"seconds": round(seconds, 2),
                                                     "images_per_second": round(len(images) / seconds), "fid": value}
    change = np.linalg.norm(features_of[True] - features_of[False]) / np.linalg.norm(features_of[False])
    result["tf32_feature_change"] = float(change)  # relative L2 norm of the difference
    print(json.dumps(result), flush=True)


# ---- the call ------------------------------------------------------------------------------------------------------
def main():
    args = build_parser().parse_args()
    if args.pack:
        return pack(args.pack, args.data_dir, args.inception)
    if args.worker:
        return {"train_steps": train_steps_worker, "floor": floor_worker, "fid": fid_worker}[args.worker](args)
    unpack_mnist(args.data_dir)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    limits = {k: 60 for k in LIMITS} if args.tiny else LIMITS
    tiny = TINY * args.tiny
    me = [sys.executable, "benchmarks/gpu.py", "--data-dir", args.data_dir, "--inception", args.inception,
          "--out", str(out), "--device", args.device] + ["--tiny"] * args.tiny
    import torch
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "limits": limits}

    def record(name, value):
        summary[name] = value
        (out / "gpu.json").write_text(json.dumps(summary, indent=2))

    # a. the training step: each variant its own process (a fresh compile), the limit shared out as it goes
    variants, deadline = [], time.time() + limits["train_steps"]
    for compiled, batch in [v for v in VARIANTS if not (args.tiny and v[0])]:  # a CPU compiles for minutes
        log = out / "train_steps.log"
        command = me + ["--worker", "train_steps", "--variant", compiled, batch]
        seconds, status = run(command, deadline - time.time(), log)
        variants.append({"compile": bool(compiled), "batch_size": batch, "seconds": seconds, "status": status,
                         **((last_json_line(log) or {}) if status == "ok" else {})})
        record("train_steps", variants)
    timed = [v for v in variants if "ms_per_step" in v and v["batch_size"] == 128]
    use_compile = bool(timed) and min(timed, key=lambda v: v["ms_per_step"])["compile"]

    # b. the student's command, whole, with the fastest batch-128 variant
    student = out / "student"
    command = [sys.executable, "ddpm_mnist.py", "--epochs", 30, "--data-dir", args.data_dir, "--inception",
               args.inception, "--device", args.device, "--out", student, *tiny] + ["--compile"] * use_compile
    seconds, status = run(command, limits["student"], out / "student.log")
    metrics = json.loads((student / "metrics.json").read_text()) if (student / "metrics.json").is_file() else {}
    keep = ("precision", "train_seconds", "steps", "sample_seconds", "sampler", "sampling_steps", "num_samples",
            "reference_seconds", "fid_seconds", "fid", "fid_num_samples", "fid_reference")
    record("student", {"command": " ".join(map(str, command[1:])), "wall_seconds": seconds, "status": status,
                       **{k: metrics[k] for k in keep if k in metrics},
                       "where_training_got": None if metrics else where_training_got(out / "student.log"),
                       "target_wall_seconds": 300, "target_fid": 3})
    stats = Path(metrics.get("fid_reference", out / "fid_stats_mnist_firstall.npz"))

    # c. the samplers on the student's checkpoint, fastest first, within one limit
    rows, deadline = [], time.time() + limits["samplers"]
    for sampler, steps in [SAMPLERS[0], SAMPLERS[-1]] if args.tiny else SAMPLERS:  # tiny: two, without FID
        if not (student / "ckpt.pt").is_file() or not stats.is_file() or deadline - time.time() < 5:
            rows.append({"sampler": sampler, "steps": steps, "status": "not run (no checkpoint, statistics or time)"})
            continue
        folder = out / "samplers" / f"{sampler}{steps}"
        command = [sys.executable, "ddim.py", "--ckpt", student / "ckpt.pt", "--sampler", sampler, "--num-samples",
                   16 if args.tiny else 10000, "--fid-stats", stats, "--inception", args.inception, "--device",
                   args.device, "--out", folder] + ["--no-fid"] * args.tiny
        command += [] if sampler == "ddpm" else ["--steps", min(steps, 10) if args.tiny else steps]
        seconds, status = run(command, deadline - time.time(), out / "samplers.log")
        found = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
        rows.append({"sampler": sampler, "steps": steps, "seconds": seconds, "status": status,
                     **{k: found[k] for k in ("fid", "sample_seconds", "sampling_steps") if k in found}})
        record("samplers", rows)
    record("samplers", rows)

    # d, e. the real-data floor, and fid.py's speed with TF32 off and on
    for name in ("floor", "fid"):
        if not stats.is_file():
            record(name, {"status": "not run (no reference statistics from the student step)"})
            continue
        log = out / f"{name}.log"
        seconds, status = run(me + ["--worker", name, "--stats", stats], limits[name], log)
        record(name, {"seconds": seconds, "status": status, **((last_json_line(log) or {}) if status == "ok" else {})})
    record("finished", time.strftime("%Y-%m-%d %H:%M:%S"))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
