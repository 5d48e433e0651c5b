"""Benchmark of cfg_afhq.py on MNIST written as ten class folders (AFHQ is not on our machines).

What it measures
----------------
cfg_afhq.py trains on any folder with one sub-folder of images per class, so MNIST becomes DIR/train/0..9 and
DIR/val/0..9 (the 60,000 training and 10,000 test digits as 28x28 PNGs, AFHQ's layout) and the script runs on it
at --image-size 28 (the digits' own size: no resizing; cfg_afhq.py reads them as RGB, grey in all three channels).
Three numbers per guidance scale w (0, 1, 3 and 7.5, the same starting noise at each):
  * FID (fid.py, pytorch-fid protocol) of the samples against MNIST statistics of the same preprocessing;
  * "right digit": the share of samples that a small CNN, trained here on MNIST's training set (its test-set
    accuracy is stated), assigns to the digit that was asked for;
  * the mean pixel value of the samples beside that of the training digits: how much ink guidance adds.
Targets (the issue): on a GPU, FID <= 5 at w = 0 and the right digit in >= 99% of samples at w = 7.5; on a CPU, a
small configuration that shows the same effect of w within an hour.

Commands (from the repository root)
-----------------------------------
  python benchmarks/cfg_mnist_classes.py --write-mnist-classes data/mnist_classes   # only write the folders
  python benchmarks/cfg_mnist_classes.py --train-classifier runs/cfg_mnist/digit_classifier.pt2
  python benchmarks/cfg_mnist_classes.py --preset cpu                     # the README's CPU numbers (both cores)
  python benchmarks/cfg_mnist_classes.py --preset gpu                     # the issue's GPU targets
Every step is skipped when its output exists (and an interrupted training run resumes from its checkpoint), so a
preset can be re-run after an interruption.
"""

import argparse
import gzip
import json
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cfg_afhq  # noqa: E402  (the script under test, from the repository root)

# cfg_afhq.py flags per preset; --data-dir, --out, --classifier and the FID reference are added by run_preset.
MODEL_FLAGS = {
    # cfg_afhq.py's --preset cpu: sized for a 2-core CPU (its values and their reasons are in cfg_afhq.py).
    "cpu": ["--preset", "cpu"],
    # The homework's model at MNIST's size: all 60,000 digits, DDIM with 100 steps for 10,000 samples per scale.
    "gpu": ["--image-size", "28", "--no-flip", "--ch", "64", "--ch-mult", "1", "2", "2", "--num-res-blocks", "2",
            "--max-per-class", "0", "--epochs", "30", "--batch-size", "128", "--lr", "2e-4", "--ema-decay", "0.9995",
            "--sampler", "ddim", "--steps", "100", "--sample-batch-size", "2500"],
}
# The scales sampled, each with its FID and the class check: the homework's two and two between them, to show
# how FID moves with w.
SCALES = ["0", "1", "3", "7.5"]
NUM_SAMPLES = {"cpu": 500, "gpu": 10000}
CLASSIFIER_EPOCHS = {"cpu": 1, "gpu": 3}
TARGETS = {"gpu": {"fid_at_0": 5.0, "right_digit_at_7.5": 0.99}}


def build_parser():
    p = argparse.ArgumentParser(description="cfg_afhq.py on MNIST as ten class folders (see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--write-mnist-classes", metavar="DIR", default=None,
                   help="only write MNIST as DIR/train/0..9 and DIR/val/0..9 PNGs, then stop")
    p.add_argument("--train-classifier", metavar="PATH", default=None,
                   help="only train the digit classifier and export it to PATH (.pt2), then stop")
    p.add_argument("--preset", choices=sorted(MODEL_FLAGS), default=None, help="run the whole benchmark")
    p.add_argument("--mnist-root", default=os.path.join(ROOT, "..", "shared", "data"),
                   help="torchvision's MNIST root (holds MNIST/raw: the IDX files, plain or .gz)")
    p.add_argument("--data", default="data/mnist_classes", help="the class folders (written when missing)")
    p.add_argument("--work", default="runs/cfg_mnist", help="folder for the classifier and the runs")
    p.add_argument("--fid-stats", default=os.path.join(ROOT, "..", "shared", "fid-reference", "mnist_train10k_stats.npz"),
                   help="CPU preset: FID reference statistics (the GPU preset uses the 10,000 test digits instead)")
    p.add_argument("--inception", default=os.path.join(ROOT, "..", "shared", "weights", "pt_inception-2015-12-05-nofc.pth"),
                   help="FID Inception weights (pytorch-fid's download if this file is missing)")
    p.add_argument("--classifier-epochs", type=int, default=None, help="default: 1 on the CPU preset, 3 on the GPU")
    p.add_argument("--real-baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also the FID of as many real test digits as samples: the floor for that N")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.write_mnist_classes, args.train_classifier, args.preset)) != 1:
        p.exit(2, "error: give exactly one of --write-mnist-classes, --train-classifier and --preset\n")
    if args.classifier_epochs is not None and args.classifier_epochs < 1:
        p.exit(2, f"error: --classifier-epochs must be at least 1, got {args.classifier_epochs}\n")
    return args


# ---------------------------------------------------------------------------------------------------------------
# MNIST as class folders
# ---------------------------------------------------------------------------------------------------------------
def load_mnist_split(mnist_root, train):
    """MNIST's training (train=True) or test digits, N x 28 x 28 uint8, and their labels, from the IDX files in
    MNIST_ROOT/MNIST/raw, plain or .gz; else torchvision's copy, downloaded there if missing. Reading the files here
    lets .gz files that are not MNIST's original downloads serve too (torchvision would check their checksums)."""
    prefix = os.path.join(mnist_root, "MNIST", "raw", "train" if train else "t10k")
    images, labels = read_idx(prefix + "-images-idx3-ubyte"), read_idx(prefix + "-labels-idx1-ubyte")
    if images is not None and labels is not None and len(images) == len(labels):
        return images, labels.long()
    try:
        ds = torchvision.datasets.MNIST(mnist_root, train=train, download=True)
    except Exception as e:
        sys.exit(f"error: could not load or download MNIST into {mnist_root} ({e}); pass --mnist-root")
    return ds.data, ds.targets


def read_idx(path):
    """An IDX file (PATH or PATH.gz) as a uint8 tensor, or None if neither is there whole. The format: 0, 0, 8 (the
    bytes are uint8), the number of dimensions D, D big-endian 32-bit sizes, then the bytes."""
    for name, opener in ((path, open), (path + ".gz", gzip.open)):
        if not os.path.isfile(name):
            continue
        try:
            with opener(name, "rb") as fh:
                data = fh.read()
            dims = data[3]
            shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
        except (OSError, EOFError, IndexError, struct.error):  # unreadable, or cut off inside its header
            continue
        if data[:3] == bytes([0, 0, 8]) and len(data) == 4 + 4 * dims + int(np.prod(shape)):
            return torch.frombuffer(bytearray(data[4 + 4 * dims:]), dtype=torch.uint8).view(*shape)
    return None


def write_mnist_classes(mnist_root, out_dir, per_class=None):
    """DIR/train/D/00001.png ... (60,000 digits) and DIR/val/D/... (10,000 test digits), 28x28 grey PNGs (with
    per_class, only that many of each digit in each split). Written into DIR.tmp and renamed, so a folder that
    exists is complete."""
    if os.path.isdir(out_dir):
        print(f"{out_dir} exists: using it", flush=True)
        return
    tmp, t0 = out_dir.rstrip("/") + ".tmp", time.time()
    for split, train in (("train", True), ("val", False)):
        images, labels = load_mnist_split(mnist_root, train)
        written = 0
        for digit in range(10):
            folder = os.path.join(tmp, split, str(digit))
            os.makedirs(folder, exist_ok=True)
            kept = images[labels == digit][:per_class].numpy()
            for i, img in enumerate(kept, start=1):
                Image.fromarray(img, "L").save(os.path.join(folder, f"{i:05d}.png"))
            written += len(kept)
        print(f"wrote {written} {split} digits to {os.path.join(out_dir, split)}/0..9", flush=True)
    os.replace(tmp, out_dir)
    print(f"MNIST class folders done in {time.time() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The class check: a small CNN trained on MNIST's training set
# ---------------------------------------------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    """Two conv layers and two linear ones; takes what cfg_afhq.py's --classifier gets: float N x 3 x 28 x 28 in
    [0, 1] (grey in three channels), and gives logits for the digits 0..9 (the class folders' sorted order)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x):
        x = (x.mean(1, keepdim=True) - 0.1307) / 0.3081  # MNIST's mean and std
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(self.dropout(F.relu(self.fc1(x.flatten(1)))))


def train_classifier(mnist_root, path, epochs, device, seed=0, limit=None):
    """Train on the 60,000 training digits, test on the 10,000 test digits, export to path (torch.export, CPU)
    and write path.json with the test accuracy. Returns that record."""
    torch.manual_seed(seed)
    x_train, y_train = load_mnist_split(mnist_root, True)
    x_test, y_test = load_mnist_split(mnist_root, False)
    x_train, y_train, x_test, y_test = x_train[:limit], y_train[:limit], x_test[:limit], y_test[:limit]
    as_input = lambda x: (x.float() / 255).unsqueeze(1).expand(-1, 3, -1, -1)
    model = DigitClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * ((len(x_train) + 127) // 128))
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train)).split(128):
            loss = F.cross_entropy(model(as_input(x_train[idx]).to(device)), y_train[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    model = model.cpu().eval()
    with torch.inference_mode():
        predicted = torch.cat([model(as_input(x)).argmax(1) for x in x_test.split(1000)])
    accuracy = (predicted == y_test).float().mean().item()
    program = torch.export.export(model, (as_input(x_test[:2]),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.export.save(program, path)
    record = {"test_accuracy": accuracy, "test_images": len(x_test), "train_images": len(x_train), "epochs": epochs,
              "seconds": round(time.time() - t0, 1), "device": str(device)}
    with open(path + ".json", "w") as fh:
        json.dump(record, fh, indent=2)
    print(f"digit classifier: {100 * accuracy:.2f}% right on the {len(x_test)} MNIST test digits "
          f"({epochs} epoch(s), {record['seconds']:.0f} s); exported to {path}", flush=True)
    return record


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------
def real_baseline(args, n, stats_path, device):
    """FID of n real test digits (n/10 of each, as the samples are balanced) against the same reference: what a
    perfect model would score with this N. (The GPU preset's reference is the test set itself, so it is skipped.)"""
    import fid
    images, labels = load_mnist_split(args.mnist_root, False)
    chosen = torch.cat([images[labels == d][:n // 10 + (d < n % 10)] for d in range(10)])
    mu, sigma = fid.compute_statistics(chosen.unsqueeze(1), model=fid.load_inception(args.inception, device), device=device)
    return fid.frechet_distance(mu, sigma, *fid.load_statistics(stats_path))


def mean_pixel(folder):
    """The mean pixel value (0-255) of the PNGs under folder: how much ink the digits carry. Guidance thickens
    strokes, and this shows by how much."""
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names if f.endswith(".png")]
    return float(np.mean([np.asarray(Image.open(f).convert("L"), dtype=np.float64).mean() for f in files]))


def run_preset(args):
    preset, t0, cpu0 = args.preset, time.time(), time.process_time()
    write_mnist_classes(args.mnist_root, args.data)
    classifier, epochs = os.path.join(args.work, "digit_classifier.pt2"), args.classifier_epochs or CLASSIFIER_EPOCHS[preset]
    classifier_record = None
    if os.path.isfile(classifier + ".json"):
        with open(classifier + ".json") as fh:
            classifier_record = json.load(fh)
    if classifier_record is None or classifier_record["epochs"] != epochs:  # the one trained for the other preset
        classifier_record = train_classifier(args.mnist_root, classifier, epochs, args.device)
    out = os.path.join(args.work, preset)
    common = ["--data-dir", args.data, "--out", out, "--classifier", classifier, "--device", args.device,
              "--num-samples", str(NUM_SAMPLES[preset])]
    if os.path.isfile(args.inception):
        common += ["--inception", args.inception]
    if preset == "cpu":  # 10,000 test digits through Inception would take hours on one core: a fixed reference
        reference = ["--fid-stats", args.fid_stats]
    else:  # the homework's protocol: the validation split (here MNIST's test set) written out as the reference
        reference = ["--prepare-eval", "--eval-dir", os.path.join(args.work, "eval_mnist_test_28px")]
    metrics_path = os.path.join(out, "metrics.json")
    if not os.path.isfile(metrics_path):
        resume = ["--resume"] if os.path.isfile(os.path.join(out, "ckpt.pt")) else []  # an interrupted run goes on
        cfg_afhq.main(MODEL_FLAGS[preset] + common + reference + resume + ["--cfg-scales"] + SCALES)
    with open(metrics_path) as fh:
        metrics = json.load(fh)
    scales = metrics["scales"]
    summary = {"preset": preset, "device": metrics["device"], "num_samples_per_scale": NUM_SAMPLES[preset],
               "fid_reference": metrics["fid_reference"], "classifier_test_accuracy": classifier_record["test_accuracy"],
               "train_seconds": metrics.get("train_seconds"), "steps": metrics.get("steps"),
               "sampler": f"{metrics['sampler']} {metrics['sampling_steps']} steps",
               "scales": {w: {"fid": s.get("fid"), "right_digit": s.get("class_accuracy"),
                              "mean_pixel": mean_pixel(os.path.join(out, f"samples_w{w}")),
                              "sample_seconds": s["sample_seconds"]} for w, s in sorted(scales.items(), key=lambda kv: float(kv[0]))},
               "real_train_digits_mean_pixel": float(load_mnist_split(args.mnist_root, True)[0][:10000].double().mean())}
    if preset == "cpu" and args.real_baseline:
        summary["real_test_digits_fid"] = real_baseline(args, NUM_SAMPLES[preset], args.fid_stats, args.device)
    # Wall and CPU time of this invocation (steps already done are skipped; the CPU time is the measure on a
    # shared machine, where the wall time depends on what else runs).
    summary["benchmark_seconds"] = round(time.time() - t0, 1)
    summary["benchmark_cpu_seconds"] = round(time.process_time() - cpu0, 1)
    if preset in TARGETS:
        s = summary["scales"]
        summary["targets_met"] = {"fid_at_0 <= 5": s["0"]["fid"] is not None and s["0"]["fid"] <= TARGETS[preset]["fid_at_0"],
                                  "right_digit_at_7.5 >= 0.99": s["7.5"]["right_digit"] >= TARGETS[preset]["right_digit_at_7.5"]}
    with open(os.path.join(args.work, f"summary_{preset}.json"), "w") as fh:
        json.dump(summary, fh, indent=2)

    print(f"\ncfg_afhq.py on MNIST class folders, preset {preset} ({summary['device']}, {summary['steps']} training "
          f"iterations in {summary['train_seconds']} s, {summary['sampler']}):")
    print(f"{'w':>6}  {'FID':>8}  {'right digit':>11}  {'mean pixel':>10}")
    for w, s in summary["scales"].items():
        print(f"{w:>6}  {'-' if s['fid'] is None else format(s['fid'], '.2f'):>8}  {100 * s['right_digit']:>10.1f}%"
              f"  {s['mean_pixel']:>10.1f}")
    print(f"mean pixel (0-255) of the first 10,000 training digits, the FID reference's: "
          f"{summary['real_train_digits_mean_pixel']:.1f}")
    print(f"N = {NUM_SAMPLES[preset]} samples per scale (balanced over the digits); FID vs {summary['fid_reference']}")
    if "real_test_digits_fid" in summary:
        print(f"FID of {NUM_SAMPLES[preset]} real test digits vs the same reference: {summary['real_test_digits_fid']:.2f} "
              f"(the floor at this N)")
    print(f"digit classifier: {100 * summary['classifier_test_accuracy']:.2f}% on the 10,000 MNIST test digits")
    for target, ok in summary.get("targets_met", {}).items():
        print(f"target {target}: {'met' if ok else 'NOT met'}")
    print(f"wrote {os.path.join(args.work, f'summary_{preset}.json')}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.write_mnist_classes:
        write_mnist_classes(args.mnist_root, args.write_mnist_classes)
    elif args.train_classifier:
        train_classifier(args.mnist_root, args.train_classifier, args.classifier_epochs or 1, args.device)
    else:
        run_preset(args)


if __name__ == "__main__":
    main()
