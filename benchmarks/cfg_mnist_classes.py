"""Benchmark of cfg_afhq.py on MNIST written as ten class folders (AFHQ is not on our machines).

MNIST becomes DIR/train/0..9 and DIR/val/0..9 (the 60,000 training and 10,000 test digits as 28x28 grey PNGs, AFHQ's
layout) and cfg_afhq.py trains and samples on it. Per guidance scale w (0, 1, 3 and 7.5, the same noise at each):
  * FID (fid.py) of the samples: the CPU preset against the first 10,000 training digits (--fid-stats), the GPU
    preset against the 10,000 test digits (cfg_afhq.py --prepare-eval);
  * "right digit": the share of samples that a small CNN, trained here on MNIST's training digits (its test accuracy
    is printed), assigns to the digit asked for;
  * the mean pixel value of the samples: how much ink guidance adds.

Commands (from the repository root)
-----------------------------------
  python benchmarks/cfg_mnist_classes.py --write-mnist-classes data/mnist_classes   # only write the folders
  python benchmarks/cfg_mnist_classes.py --preset cpu   # the CPU numbers in benchmarks/RESULTS.md (both cores)
  python benchmarks/cfg_mnist_classes.py --preset gpu   # the homework's model at MNIST's size
Each step is skipped when its output exists (an interrupted training run resumes from its checkpoint).
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cfg_afhq  # noqa: E402
import fid  # noqa: E402
import plumbing  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared")
MODEL_FLAGS = {  # cfg_afhq.py's flags per preset; --data-dir, --out, --num-samples and the FID flags are added below
    "cpu": ["--preset", "cpu"],
    "gpu": ["--image-size", "28", "--no-flip", "--channels", "1", "--ch", "64", "--ch-mult", "1", "2", "2",
            "--max-per-class", "0", "--epochs", "30", "--batch-size", "128", "--lr", "2e-4", "--sampler", "ddim",
            "--steps", "100", "--sample-batch-size", "2500", "--prepare-eval"],
}
PRESETS = {"cpu": dict(num_samples=500, classifier_epochs=1), "gpu": dict(num_samples=10000, classifier_epochs=3)}
SCALES = ["0", "1", "3", "7.5"]


def build_parser():
    p = argparse.ArgumentParser(description="cfg_afhq.py on MNIST as ten class folders (see the module docstring).")
    p.add_argument("--write-mnist-classes", metavar="DIR", default=None, help="only write the class folders, then stop")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="run the whole benchmark")
    p.add_argument("--num-samples", type=int, default=500, help="samples per guidance scale")
    p.add_argument("--classifier-epochs", type=int, default=1, help="training epochs of the digit classifier")
    p.add_argument("--mnist-root", default=os.path.join(SHARED, "data"), help="torchvision's MNIST root")
    p.add_argument("--data", default="data/mnist_classes", help="the class folders (written when missing)")
    p.add_argument("--work", default="runs/cfg_mnist", help="folder for the classifier and the runs")
    p.add_argument("--fid-stats", default=os.path.join(SHARED, "fid-reference", "mnist_train10k_stats.npz"))
    p.add_argument("--inception", default=os.path.join(SHARED, "weights", "pt_inception-2015-12-05-nofc.pth"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def mnist(root, train):
    ds = torchvision.datasets.MNIST(root, train=train, download=True)
    return ds.data, ds.targets


def write_mnist_classes(mnist_root, out_dir):
    """DIR/train/D/00001.png ... and DIR/val/D/..., 28x28 grey PNGs; written into DIR.tmp and renamed when whole."""
    if os.path.isdir(out_dir):
        return
    for split, train in (("train", True), ("val", False)):
        images, labels = mnist(mnist_root, train)
        for digit in range(10):
            os.makedirs(os.path.join(out_dir + ".tmp", split, str(digit)))
            for i, img in enumerate(images[labels == digit].numpy(), start=1):
                Image.fromarray(img, "L").save(os.path.join(out_dir + ".tmp", split, str(digit), f"{i:05d}.png"))
    os.replace(out_dir + ".tmp", out_dir)


class DigitClassifier(nn.Module):
    """Two convolutions and two linear layers: grey N x 1 x 28 x 28 in [0, 1] -> logits of the digits 0..9."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64 * 7 * 7, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1((x - 0.1307) / 0.3081)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def digit_classifier(args):
    """Trained once on the training digits and kept in WORK/digit_classifier.pt; prints its test accuracy."""
    model, path = DigitClassifier(), os.path.join(args.work, "digit_classifier.pt")
    if os.path.isfile(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    (x, y), (x_test, y_test) = mnist(args.mnist_root, True), mnist(args.mnist_root, False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.classifier_epochs):
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(model(x[idx, None].float() / 255), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.inference_mode():
        accuracy = (model.eval()(x_test[:, None].float() / 255).argmax(1) == y_test).float().mean().item()
    print(f"digit classifier: {100 * accuracy:.2f}% right on the {len(x_test)} test digits", flush=True)
    os.makedirs(args.work, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def run_preset(args):
    write_mnist_classes(args.mnist_root, args.data)
    classifier = digit_classifier(args)
    out = os.path.join(args.work, args.preset)
    flags = MODEL_FLAGS[args.preset] + ["--data-dir", args.data, "--out", out, "--device", args.device, "--num-samples",
                                        str(args.num_samples), "--inception", args.inception, "--cfg-scales", *SCALES]
    flags += ["--fid-stats", args.fid_stats] if args.preset == "cpu" else []
    if not os.path.isfile(os.path.join(out, "metrics.json")):
        cfg_afhq.main(flags + (["--resume"] if os.path.isfile(os.path.join(out, "ckpt.pt")) else []))
    with open(os.path.join(out, "metrics.json")) as fh:
        metrics = json.load(fh)
    print(f"\n{metrics['device']}, {metrics.get('steps')} iterations in {metrics.get('train_seconds')} s, "
          f"{metrics['sampler']} {metrics['sampling_steps']} steps, {metrics['num_samples']} samples per scale")
    print(f"{'w':>6}  {'FID':>8}  {'right digit':>11}  {'mean pixel':>10}")
    for w in SCALES:
        files = [(int(d), os.path.join(out, f"samples_w{w}", d, f)) for d in map(str, range(10))
                 for f in sorted(os.listdir(os.path.join(out, f"samples_w{w}", d)))]
        images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("L"))) for _, f in files])
        with torch.inference_mode():
            right = (classifier(images[:, None].float() / 255).argmax(1) == torch.tensor([d for d, _ in files]))
        score = metrics.get("fid_per_scale", {}).get(w, {}).get("fid", float("nan"))
        print(f"{w:>6}  {score:8.2f}  {100 * right.float().mean():10.1f}%  {images.float().mean():10.1f}")
    if args.preset == "cpu":  # what a perfect model scores at this N: as many real test digits, balanced
        x, y = mnist(args.mnist_root, False)
        real = torch.cat([x[y == d][:metrics["num_samples"] // 10] for d in range(10)])[:, None]
        mu, sigma = fid.compute_statistics(real, fid.load_inception(args.inception, args.device))
        score = fid.frechet_distance(mu, sigma, *fid.load_statistics(args.fid_stats))
        print(f"FID of {len(real)} real test digits against the same reference: {score:.2f}")


def main(argv=None):
    args = plumbing.parse_with_preset(build_parser(), PRESETS, argv)
    if args.write_mnist_classes:
        write_mnist_classes(args.mnist_root, args.write_mnist_classes)
    elif args.preset:
        run_preset(args)
    else:
        build_parser().error("give --write-mnist-classes DIR or --preset")


if __name__ == "__main__":
    main()
