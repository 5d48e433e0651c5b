"""The GPU figures the README owes, measured in one call of at most 9 minutes on one H100/H200.

  python benchmarks/gpu.py --data-dir DIR --inception PATH     # on the GPU machine (DIR holds MNIST/raw, .gz is enough)
  python benchmarks/gpu.py --tiny --device cpu                 # the same steps at toy sizes (the test runs this)

The steps, in order; each runs with the time that is left of --budget, and is cut off (and said so) at the end:
  0. where the time goes: milliseconds per training step and per denoising call of ddpm_mnist.py's default UNet,
     with the variants that tuning would choose between (loss read-back, fused AdamW, layout, batch, TF32 instead of
     bf16, cudnn.benchmark, a CUDA graph), about half a minute.
  1. fid.py's speed on 10,000 MNIST digits, from a tensor and from PNG files; target: <= 5 s per 10,000 images.
  2. gan_baseline.py's defaults on MNIST, FID against the 60,000 training digits (10,000 samples), whose
     statistics it computes the first time.
  3. the student's command, `python ddpm_mnist.py --epochs 30`, whole if time allows: training, 10,000 samples and
     their FID against the same statistics; targets: <= 300 s for the command, FID <= 3. The H200 lent on 2026-12-04
     trained at about 2,000 images/s (README): the command needs about 23 minutes there, more than one call, so this
     step is cut off and records where (the rate, and the training time it projects).
  4. what bf16 sampling costs: step 3's checkpoint samples the same 2,000 noises in bf16 autocast (the GPU's
     default) and in float32 (--fp32-sampling), each graded by FID against the same statistics; at most 5 minutes.
  5. cfg_afhq.py on MNIST written as ten class folders (benchmarks/cfg_mnist_classes.py's GPU flags), FID at
     w = 0 and the digit classifier's "right digit" at w = 7.5, if time is left.
Writes OUT/gpu.json (device, torch, each step's command, seconds, numbers, targets met) after every step, so a step
that fails keeps the ones before it (its own entry says why), and prints it at the end.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "benchmarks"))  # cfg_mnist_classes, the benchmark
sys.path.insert(0, str(ROOT))  # first: the script ddpm_mnist.py, not the benchmark of the same name

# What --tiny adds to each step (later flags win in argparse): seconds on a CPU instead of minutes on a GPU.
TINY_DDPM = ["--limit", "256", "--ch", "8", "--timesteps", "10", "--num-samples", "8", "--sample-batch-size", "8",
             "--fid-ref-limit", "16", "--epochs", "1", "--batch-size", "64"]
TINY_GAN = ["--limit", "256", "--ch", "8", "--z-dim", "16", "--epochs", "1", "--num-samples", "8",
            "--stats-samples", "32", "--batch-size", "64", "--fid-ref-limit", "16"]
TINY_CFG = ["--image-size", "28", "--no-flip", "--ch", "8", "--ch-mult", "1", "2", "--num-res-blocks", "1",
            "--timesteps", "10", "--epochs", "1", "--batch-size", "16", "--num-samples", "10", "--sampler", "ddim",
            "--steps", "4", "--sample-batch-size", "10"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(SHARED / "data") if (SHARED / "data").is_dir() else "./data",
                   help="torchvision's MNIST root (MNIST/raw; the .gz files are enough)")
    p.add_argument("--inception", default=str(SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth"),
                   help="FID Inception weights (float16 copies load too)")
    p.add_argument("--out", default="runs/gpu", help="folder for every step's outputs and gpu.json")
    p.add_argument("--budget", type=float, default=540, help="seconds for all steps together")
    p.add_argument("--device", default=None, help="default: cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes, to check the steps run (CPU, seconds)")
    return p


def run_step(name, command, seconds_left, log):
    """Run one command with what is left of the budget; returns (seconds, finished). Every line the command prints
    goes to log with the seconds since the step began, so a log says where the time went, also for a step cut off."""
    start = time.time()
    if seconds_left < 10:
        return 0.0, False
    print(f"\n[{name}] {' '.join(map(str, command))}", flush=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(c) for c in command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def copy_lines():
            for line in proc.stdout:
                fh.write(f"{time.time() - start:7.1f}s  {line}")
                fh.flush()

        reader = threading.Thread(target=copy_lines, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=seconds_left)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join(timeout=5)
            fh.write(f"{time.time() - start:7.1f}s  [cut off: the budget ran out]\n")
            return round(time.time() - start, 1), False
        reader.join(timeout=5)
    if code != 0:
        print(f"[{name}] failed with exit status {code}; see {log}", flush=True)
    return round(time.time() - start, 1), code == 0


def progress_of(log):
    """Where a training run cut off by the budget had got to, from its log (run_step's lines: seconds, then the
    script's line): the last progress line's step, total and images per second, and the training seconds it projects
    for the whole run (the seconds since the model was built, plus the time it said was left)."""
    start, last = None, None
    for line in Path(log).read_text().splitlines():
        seconds = float(line.split("s", 1)[0]) if line.strip() and line.lstrip()[0].isdigit() else None
        if start is None and "parameters on" in line:
            start = seconds
        found = re.search(r"step (\d+)/(\d+) .* (\d+) img/s +left (?:(\d+)h(\d+)m|(\d+)m(\d+)s)", line)
        if found:
            last = seconds, found.groups()
    if last is None:
        return None
    seconds, (step, total, rate, hours, minutes, mins, secs) = last
    left = int(hours) * 3600 + int(minutes) * 60 if hours else int(mins) * 60 + int(secs)
    return {"step": int(step), "steps": int(total), "images_per_second": int(rate),
            "projected_train_seconds": round(seconds - start + left) if start is not None else None}


def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def write_summary(summary, out):
    """OUT/gpu.json, rewritten after every step: a step that fails or runs out of time keeps the ones before it."""
    (out / "gpu.json").write_text(json.dumps(summary, indent=2))


def failure(e):
    """A step run in this process that stopped: its exception, or the sentence its sys.exit gave."""
    return {"finished": False, "error": str(e) or type(e).__name__}


def measure_fid_speed(args, device):
    """fid.py's Inception features of 10,000 MNIST digits, from a tensor and from PNG files, timed after a warm-up."""
    import torch
    import fid
    import ddpm_mnist
    n = 4 if args.tiny else 10_000
    digits = ddpm_mnist.load_mnist(args.data_dir, n).expand(-1, 3, -1, -1)
    model = fid.load_inception(args.inception if os.path.isfile(args.inception) else None, device)
    fid.compute_features(digits[:2 if args.tiny else 50], model, device=device, progress=False)  # warm-up, not timed
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.time()
    fid.compute_features(digits, model, device=device, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    tensor_seconds = time.time() - start
    with tempfile.TemporaryDirectory() as folder:
        ddpm_mnist.save_samples(digits, os.path.join(folder, "png"), os.path.join(folder, "png.zip"))
        start = time.time()
        fid.compute_features(os.path.join(folder, "png"), model, device=device, progress=False)
        png_seconds = time.time() - start
    per_10k = lambda s: round(s * 10_000 / n, 2)
    return {"finished": True, "images": n, "tensor_seconds": round(tensor_seconds, 2),
            "png_seconds": round(png_seconds, 2), "seconds_per_10k_tensor": per_10k(tensor_seconds),
            "seconds_per_10k_png": per_10k(png_seconds), "targets": {"<= 5 s per 10,000": per_10k(png_seconds) <= 5}}


def measure_step_times(args, device):
    """Where step 3's time goes, to tune the GPU path: milliseconds per training step of ddpm_mnist.py's default UNet
    (as train() takes it, loss read back every step; without the read-back; fused AdamW; the plain layout instead of
    channels_last; batch 512; float32 with TF32 instead of bf16 autocast) and per denoising call of a sampling batch
    (bf16 and float32, 1000 and 2500 images, cudnn.benchmark, a CUDA graph of the call). Each variant is timed after
    a warm-up; one that fails says why."""
    import torch
    import ddpm_mnist as dm
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a = dm.parse_args(["--device", device] + (["--ch", "8"] if args.tiny else []))
    sched = dm.NoiseSchedule(dm.make_betas(a.schedule, a.timesteps)).to(dev)
    warm, reps = (1, 2) if args.tiny else (5, 20)

    def ms_per_call(fn):
        for _ in range(warm):
            fn()
        sync()
        start = time.time()
        for _ in range(reps):
            fn()
        sync()
        return round((time.time() - start) / reps * 1000, 3)

    def train_variant(batch, layout, read_loss, fused, bf16=True):
        torch.manual_seed(0)
        model = dm.build_model(a, 1).to(dev, memory_format=layout)
        ema = dm.make_ema(model, a.ema_decay)
        optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, fused=fused or None)

        def step():
            x0 = torch.randn(batch, 1, 28, 28, device=dev).contiguous(memory_format=layout)
            t = torch.randint(0, sched.T, (batch,), device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and bf16):
                loss = dm.diffusion_loss(model, sched, x0, t, torch.randn_like(x0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
            optimizer.step()
            ema.update_parameters(model)
            if read_loss:
                loss.item()
        # Without autocast: float32 with TF32 tensor cores (cuDNN's convolutions use them by default, matrix products
        # when asked). No casts, so fewer kernels (a bf16 step's 2,267 include about 845 copies), each one slower.
        tf32_before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = not bf16 or tf32_before
        try:
            return ms_per_call(step)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32_before

    def sample_variant(model, batch, bf16, graph):
        eps_fn = dm.make_eps_fn(model, bf16)
        x = torch.randn(batch, 1, 28, 28, device=dev).contiguous(memory_format=dm.channels_last(dev))
        t = torch.full((batch,), 500, device=dev, dtype=torch.long)
        if not graph:
            return ms_per_call(lambda: eps_fn(x, t))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
            for _ in range(3):
                eps_fn(x, t)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(g):
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):  # no cast cache across a capture
                model(x, t).float()
        return ms_per_call(g.replay)

    def record(table, name, fn, *fn_args):
        try:
            table[name] = fn(*fn_args)
        except Exception as e:  # one variant failing (a CUDA graph, say) leaves the others
            table[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"

    cl, plain = torch.channels_last if cuda else torch.contiguous_format, torch.contiguous_format
    b, big = (16, 32) if args.tiny else (128, 512)
    train = {}
    record(train, f"batch {b}, as train() runs it (loss read every step)", train_variant, b, cl, True, False)
    record(train, f"batch {b}, loss not read back", train_variant, b, cl, False, False)
    record(train, f"batch {b}, loss not read back, fused AdamW", train_variant, b, cl, False, True)
    record(train, f"batch {b}, plain layout, loss not read back", train_variant, b, plain, False, False)
    record(train, f"batch {big}, loss not read back", train_variant, big, cl, False, False)
    record(train, f"batch {b}, float32 with TF32 (no autocast), loss not read back", train_variant, b, cl, False, False,
           False)
    torch.manual_seed(0)
    model = dm.build_model(a, 1).to(dev, memory_format=cl).eval().requires_grad_(False)
    n1, n2 = (8, 16) if args.tiny else (1000, 2500)
    samp = {}
    with torch.no_grad():
        record(samp, f"batch {n1}, bf16", sample_variant, model, n1, True, False)
        record(samp, f"batch {n1}, float32", sample_variant, model, n1, False, False)
        record(samp, f"batch {n2}, bf16", sample_variant, model, n2, True, False)
        record(samp, f"batch {n2}, float32", sample_variant, model, n2, False, False)
        if cuda:
            torch.backends.cudnn.benchmark = True
            record(samp, f"batch {n1}, bf16, cudnn.benchmark", sample_variant, model, n1, True, False)
            record(samp, f"batch {n1}, float32, cudnn.benchmark", sample_variant, model, n1, False, False)
            torch.backends.cudnn.benchmark = False
            record(samp, f"batch {n1}, bf16, CUDA graph", sample_variant, model, n1, True, True)
    forward_gflop = None if args.tiny else 2.435  # the default UNet's forward pass, per image (FlopCounterMode)
    return {"finished": True, "train_ms_per_step": train, "sample_ms_per_denoising_call": samp,
            "forward_gflop_per_image": forward_gflop, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or "cuda"
    import torch
    summary = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available()
               else f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__, "cuda": torch.version.cuda,
               "tiny": args.tiny, "budget_seconds": args.budget, "steps": {}}
    deadline = time.time() + args.budget
    left = lambda: deadline - time.time()
    common = ["--data-dir", args.data_dir, "--device", device] + (["--inception", args.inception]
                                                                  if os.path.isfile(args.inception) else [])

    # 0. Where the default UNet's time goes, step by step (about half a minute): first, so that it is measured
    # even if a later step runs out of time.
    try:
        summary["steps"]["step_times"] = measure_step_times(args, device)
    except (Exception, SystemExit) as e:
        summary["steps"]["step_times"] = failure(e)
    write_summary(summary, out)

    # 1. fid.py's speed on 10,000 digits. Steps 0, 1 and 5 run partly in this process: a failure there (an
    # exception, or a loader's sys.exit with its sentence) is recorded in gpu.json, and the steps after it still run.
    if left() > 10:
        try:
            summary["steps"]["fid_speed"] = measure_fid_speed(args, device)
        except (Exception, SystemExit) as e:
            summary["steps"]["fid_speed"] = failure(e)
        write_summary(summary, out)

    # 2. The GAN's defaults on MNIST. It computes the 60,000 training digits' statistics into
    # OUT/fid_stats_mnist_train60k.npz (once), where step 3's run finds them.
    gan_out = out / "gan_mnist"
    command = [sys.executable, "gan_baseline.py", "--out", gan_out, *common]
    seconds, done = run_step("gan_baseline (defaults)", command + (TINY_GAN if args.tiny else []), left(), out / "gan.log")
    m = read_json(gan_out / "metrics.json")
    summary["steps"]["gan_mnist"] = {"command": "python gan_baseline.py", "seconds": seconds, "finished": done,
                                     **{k: m.get(k) for k in ("train_seconds", "samples_per_second", "fid", "fid_num_samples")}}
    write_summary(summary, out)

    # 3. The student's command, with what is left. On the H200 lent on 2026-12-04 it needed about 23 minutes, so a
    # call of 9 minutes is cut off in its training: gpu.json then keeps the rate and the training time it projects.
    stats = out / ("fid_stats_mnist_train16.npz" if args.tiny else "fid_stats_mnist_train60k.npz")
    ddpm_out = out / "ddpm_mnist"
    command = [sys.executable, "ddpm_mnist.py", "--epochs", "30", "--out", ddpm_out, *common] + (TINY_DDPM if args.tiny else [])
    seconds, done = run_step("ddpm_mnist --epochs 30", command, left(), out / "ddpm_mnist.log")
    m = read_json(ddpm_out / "metrics.json")
    summary["steps"]["ddpm_mnist_epochs_30"] = {
        "command": "python ddpm_mnist.py --epochs 30", "seconds": seconds, "finished": done,
        **{k: m.get(k) for k in ("train_seconds", "sample_seconds", "samples_per_second", "num_samples", "fid",
                                 "fid_num_samples", "fid_reference", "total_seconds", "hardware")},
        "targets": {"seconds <= 300": done and seconds <= 300, "fid <= 3": m.get("fid") is not None and m["fid"] <= 3},
        **({} if done else {"cut_off_at": progress_of(out / "ddpm_mnist.log")})}
    write_summary(summary, out)

    # 4. What bf16 sampling costs: step 3's model samples the same 2,000 noises twice (--sample-only, so the same
    # seed and batches), in bf16 autocast (the GPU's default) and in float32 (--fp32-sampling), both graded against
    # the same statistics. 2,000 and not 10,000: the float32 pass alone would take minutes.
    if (ddpm_out / "ckpt.pt").is_file():
        precision = {}
        for name, flags in (("default", []), ("fp32_sampling", ["--fp32-sampling"])):
            sample_out = out / f"ddpm_mnist_sampling_{name}"
            command = [sys.executable, "ddpm_mnist.py", "--sample-only", "--ckpt", ddpm_out / "ckpt.pt", *flags,
                       "--num-samples", 8 if args.tiny else 2000, "--out", sample_out, *common]
            command += (["--fid-stats", stats] if stats.is_file() else []) + (["--sample-batch-size", 8] if args.tiny else [])
            seconds, done = run_step(f"ddpm_mnist --sample-only {' '.join(flags)}", command, min(left(), 150),
                                     out / f"ddpm_sampling_{name}.log")
            m = read_json(sample_out / "metrics.json")
            precision[name] = {"command": f"python ddpm_mnist.py --sample-only --num-samples 2000 {' '.join(flags)}".strip(),
                               "seconds": seconds, "finished": done,
                               **{k: m.get(k) for k in ("sampling_precision", "sample_seconds", "num_samples", "fid")}}
        summary["steps"]["sampling_precision"] = {"finished": all(v["finished"] for v in precision.values()), **precision}
    else:
        summary["steps"]["sampling_precision"] = {"finished": False, "error": "step 3 left no checkpoint"}
    write_summary(summary, out)

    # 5. Classifier-free guidance on MNIST as class folders, if time is left.
    if left() > 60:
        import cfg_mnist_classes as bench
        data, classifier = out / "mnist_classes", out / "digit_classifier.pt2"
        try:
            bench.write_mnist_classes(args.data_dir, str(data), per_class=2 if args.tiny else None)
            if not classifier.is_file():
                bench.train_classifier(args.data_dir, str(classifier), 1 if args.tiny else 3, torch.device(device),
                                       limit=512 if args.tiny else None)
        except (Exception, SystemExit) as e:
            summary["steps"]["cfg_mnist"] = failure(e)
        else:
            cfg_out = out / "cfg_mnist"
            flags = TINY_CFG if args.tiny else bench.MODEL_FLAGS["gpu"] + ["--num-samples", "10000"]
            command = [sys.executable, "cfg_afhq.py", "--data-dir", data, "--out", cfg_out, "--device", device,
                       "--classifier", classifier, "--prepare-eval", "--eval-dir", out / "eval_mnist_test_28px",
                       "--cfg-scales", "0", "7.5", *flags]
            command += ["--inception", args.inception] if os.path.isfile(args.inception) else []
            seconds, done = run_step("cfg_afhq on MNIST classes", command, left(), out / "cfg.log")
            m = read_json(cfg_out / "metrics.json")
            scales = m.get("scales", {})
            summary["steps"]["cfg_mnist"] = {"seconds": seconds, "finished": done,
                                             "train_seconds": m.get("train_seconds"),
                                             "fid_w0": scales.get("0", {}).get("fid"),
                                             "right_digit_w7.5": scales.get("7.5", {}).get("class_accuracy")}
    summary["total_seconds"] = round(args.budget - left(), 1)
    write_summary(summary, out)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
