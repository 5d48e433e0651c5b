"""Every GPU figure the README owes, measured in one call of at most 9 minutes on one H100/H200.

  python benchmarks/gpu.py --data-dir DIR --inception PATH     # on the GPU machine (DIR holds MNIST/raw, .gz is enough)
  python benchmarks/gpu.py --tiny --device cpu                 # the same steps at toy sizes (the test runs this)

The steps, in order; each runs with the time that is left of --budget, and is cut off (and said so) at the end:
  1. the student's command, `python ddpm_mnist.py --epochs 30`, whole: training, 10,000 samples and their FID
     against the 60,000 training digits, whose statistics it computes itself the first time;
     targets: <= 300 s for the command, FID <= 3.
  2. fid.py's speed on 10,000 MNIST digits, from a tensor and from PNG files; target: <= 5 s per 10,000 images.
  3. gan_baseline.py's defaults on MNIST, FID against the same statistics (10,000 samples).
  4. step 1's checkpoint sampled again with --fp32-sampling (the same 10,000 noises, float32 instead of bf16
     autocast), at most 3 minutes: what bf16 sampling costs in FID and saves in time on this model.
  5. cfg_afhq.py on MNIST written as ten class folders (benchmarks/cfg_mnist_classes.py's GPU flags), FID at
     w = 0 and the digit classifier's "right digit" at w = 7.5, if time is left.
Writes OUT/gpu.json (device, torch, each step's command, seconds, numbers, targets met) after every step, so a step
that fails keeps the ones before it (its own entry says why), and prints it at the end.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
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
            "--stats-samples", "32", "--batch-size", "64"]
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
    """Run one command with what is left of the budget; returns (seconds, finished)."""
    start = time.time()
    if seconds_left < 10:
        return 0.0, False
    print(f"\n[{name}] {' '.join(map(str, command))}", flush=True)
    with open(log, "w") as fh:
        try:
            code = subprocess.run([str(c) for c in command], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=seconds_left).returncode
        except subprocess.TimeoutExpired:
            return round(time.time() - start, 1), False
    if code != 0:
        print(f"[{name}] failed with exit status {code}; see {log}", flush=True)
    return round(time.time() - start, 1), code == 0


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


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or "cuda"
    import torch
    summary = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available()
               else f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__, "tiny": args.tiny,
               "budget_seconds": args.budget, "steps": {}}
    deadline = time.time() + args.budget
    left = lambda: deadline - time.time()
    common = ["--data-dir", args.data_dir, "--device", device] + (["--inception", args.inception]
                                                                  if os.path.isfile(args.inception) else [])

    # 1. The student's command. Its 60k reference statistics land in OUT/fid_stats_mnist_train60k.npz (computed
    # by the run itself), which the GAN step reuses.
    ddpm_out = out / "ddpm_mnist"
    command = [sys.executable, "ddpm_mnist.py", "--epochs", "30", "--out", ddpm_out, *common] + (TINY_DDPM if args.tiny else [])
    seconds, done = run_step("ddpm_mnist --epochs 30", command, left(), out / "ddpm_mnist.log")
    m = read_json(ddpm_out / "metrics.json")
    summary["steps"]["ddpm_mnist_epochs_30"] = {
        "command": "python ddpm_mnist.py --epochs 30", "seconds": seconds, "finished": done,
        **{k: m.get(k) for k in ("train_seconds", "sample_seconds", "samples_per_second", "num_samples", "fid",
                                 "fid_num_samples", "fid_reference", "total_seconds", "hardware")},
        "targets": {"seconds <= 300": done and seconds <= 300, "fid <= 3": m.get("fid") is not None and m["fid"] <= 3}}
    write_summary(summary, out)

    # 2. fid.py's speed on 10,000 digits. Steps 2 and 4 run partly in this process: a failure there (an exception,
    # or a loader's sys.exit with its sentence) is recorded in gpu.json, and the steps after it still run.
    if left() > 10:
        try:
            summary["steps"]["fid_speed"] = measure_fid_speed(args, device)
        except (Exception, SystemExit) as e:
            summary["steps"]["fid_speed"] = failure(e)
        write_summary(summary, out)

    # 3. The GAN's defaults on MNIST, against the statistics step 1 computed.
    stats = out / ("fid_stats_mnist_train16.npz" if args.tiny else "fid_stats_mnist_train60k.npz")
    gan_out = out / "gan_mnist"
    command = [sys.executable, "gan_baseline.py", "--out", gan_out, *common] + (["--fid-stats", stats] if stats.is_file() else [])
    seconds, done = run_step("gan_baseline (defaults)", command + (TINY_GAN if args.tiny else []), left(), out / "gan.log")
    m = read_json(gan_out / "metrics.json")
    summary["steps"]["gan_mnist"] = {"command": "python gan_baseline.py", "seconds": seconds, "finished": done,
                                     **{k: m.get(k) for k in ("train_seconds", "samples_per_second", "fid", "fid_num_samples")}}
    write_summary(summary, out)

    # 4. Step 1's model sampled again in float32: the same seed, so the same noise as step 1's bf16 samples.
    fp32_out = out / "ddpm_mnist_fp32_sampling"
    if (ddpm_out / "ckpt.pt").is_file():
        command = [sys.executable, "ddpm_mnist.py", "--sample-only", "--ckpt", ddpm_out / "ckpt.pt", "--fp32-sampling",
                   "--out", fp32_out, *common] + (["--fid-stats", stats] if stats.is_file() else [])
        command += ["--num-samples", "8", "--sample-batch-size", "8"] if args.tiny else []
        seconds, done = run_step("ddpm_mnist --sample-only --fp32-sampling", command, min(left(), 180),
                                 out / "ddpm_fp32_sampling.log")
        m = read_json(fp32_out / "metrics.json")
        summary["steps"]["ddpm_mnist_fp32_sampling"] = {
            "command": "python ddpm_mnist.py --sample-only --fp32-sampling", "seconds": seconds, "finished": done,
            **{k: m.get(k) for k in ("sampling_precision", "sample_seconds", "num_samples", "fid")},
            "bf16_sampling": {k: summary["steps"]["ddpm_mnist_epochs_30"].get(k) for k in ("sample_seconds", "fid")}}
    else:
        summary["steps"]["ddpm_mnist_fp32_sampling"] = {"finished": False, "error": "step 1 left no checkpoint"}
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
