"""Tests for gan_baseline.py, CPU only, with tiny models (--ch 8) and tiny data.

What must hold: G and D give the right shapes and ranges in every mode; one training step moves both losses
and keeps them finite; spectral norm holds each layer's top singular value near 1; a tiny run in each mode
writes every output; --resume continues the same run exactly; bad input stops with one sentence, before any
output. The iCLEVR mode runs on a miniature iCLEVR written here (coloured 2D shapes on a grey background, in
the real dataset's file formats) and is scored by a stand-in for the course's evaluator, with its interface."""
import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import gan_baseline as gb  # noqa: E402

SHARED = ROOT.parent / "shared"
MNIST_DIR = str(SHARED / "data")
TINY = ["--device", "cpu", "--ch", "8", "--z-dim", "16", "--batch-size", "16", "--sample-batch-size", "64",
        "--stats-samples", "64"]

# ---------------------------------------------------------------------------------------------------------------
# A miniature iCLEVR: 8 colours x 3 shapes, 1-3 objects per scene, each object in its own third of the picture
# ---------------------------------------------------------------------------------------------------------------
COLOURS = {"gray": (110, 110, 110), "red": (200, 40, 40), "blue": (40, 60, 210), "green": (40, 170, 60),
           "brown": (130, 80, 30), "purple": (140, 50, 170), "cyan": (40, 200, 210), "yellow": (230, 210, 40)}
SHAPES = ["cube", "sphere", "cylinder"]
BACKGROUND = (200, 200, 200)
# Shape-major, as in the course's objects.json: "gray cube" 0, "red cube" 1, ..., "yellow cylinder" 23.
OBJECTS = {f"{colour} {shape}": 8 * s + c for s, shape in enumerate(SHAPES) for c, colour in enumerate(COLOURS)}


def draw_scene(names, slots, width=80, height=60):
    """An RGBA scene (4:3 like the real 320x240 renders): a square for a cube, a disc for a sphere and a triangle
    for a cylinder, so that the three shapes fill different fractions of their bounding boxes."""
    img = Image.new("RGBA", (width, height), BACKGROUND + (255,))
    draw = ImageDraw.Draw(img)
    r = 9
    for name, slot in zip(names, slots):
        colour, shape = name.split()
        cx, cy = (2 * slot + 1) * width / 6, height / 2
        fill = COLOURS[colour] + (255,)
        if shape == "cube":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "sphere":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx - r, cy + r), (cx + r, cy + r), (cx, cy - r)], fill=fill)
    return img


def make_iclevr(root, n_train=24, n_test=32, seed=0):
    """objects.json, train.json (file -> names), test.json and new_test.json (lists of names), images in iclevr/."""
    rng = np.random.default_rng(seed)
    names = list(OBJECTS)

    def condition():
        return [names[i] for i in rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False)]

    (root / "iclevr").mkdir(parents=True)
    train = {}
    for i in range(n_train):
        objects = condition()
        file = f"CLEVR_train_{i:06d}_0.png"
        draw_scene(objects, rng.choice(3, size=len(objects), replace=False)).save(root / "iclevr" / file)
        train[file] = objects
    files = {"objects.json": OBJECTS, "train.json": train, "test.json": [condition() for _ in range(n_test)],
             "new_test.json": [condition() for _ in range(n_test)]}
    for name, content in files.items():
        (root / name).write_text(json.dumps(content))
    return root


EVALUATOR = '''"""Stand-in for the course's evaluator.py: the same interface, a hand-made detector instead of a ResNet."""
import torch


class evaluation_model():
    def __init__(self):
        checkpoint = torch.load("./checkpoint.pth")  # relative to the working directory, as in the course's file
        self.palette = checkpoint["palette"]         # 8 x 3 RGB; object index = 8 * shape + colour
        self.background = checkpoint["background"]   # 3
        self.fills = checkpoint["fills"]             # 3: fraction of its bounding box each shape covers
        self.classnum = 24

    def scores(self, images):
        """N x 24 scores: in each third of an image, the colour and shape of what stands out from the background."""
        rgb = (images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
        out = torch.zeros(len(rgb), self.classnum)
        third = rgb.shape[-1] // 3
        for n in range(len(rgb)):
            for slot in range(3):
                part = rgb[n, :, :, slot * third:(slot + 1) * third]
                mask = (part - self.background[:, None, None]).norm(dim=0) > 40
                if mask.sum() < 10:
                    continue
                colour = (self.palette - part[:, mask].mean(1)).norm(dim=1).argmin()
                ys, xs = mask.nonzero(as_tuple=True)
                fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
                shape = (self.fills - fill).abs().argmin()
                out[n, 8 * shape + colour] += mask.float().mean()
        return out

    def compute_acc(self, out, onehot_labels):
        hits = asked = 0
        for scores, labels in zip(out, onehot_labels):
            k = int(labels.sum().item())
            hits += len(set(scores.topk(k).indices.tolist()) & set(labels.topk(k).indices.tolist()))
            asked += k
        return hits / asked

    def eval(self, images, labels):
        with torch.no_grad():
            return self.compute_acc(self.scores(images), labels.cpu())
'''


def make_evaluator(folder):
    folder.mkdir(parents=True)
    (folder / "evaluator.py").write_text(EVALUATOR)
    torch.save({"palette": torch.tensor(list(COLOURS.values()), dtype=torch.float32),
                "background": torch.tensor(BACKGROUND, dtype=torch.float32),
                "fills": torch.tensor([1.0, 0.785, 0.5])}, folder / "checkpoint.pth")
    return folder


def make_folder(root, n, size=16, seed=0):
    """n small RGB pictures: a coloured disc on a random background."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (size + 4, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
        x, y = rng.integers(0, size // 2, 2)
        ImageDraw.Draw(img).ellipse([x, y, x + size // 2, y + size // 2], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        img.save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    make_folder(base / "classes" / "cat", 10, seed=1)
    make_folder(base / "classes" / "dog", 14, seed=2)
    return {"folder": make_folder(base / "folder", 24), "classes": base / "classes",
            "iclevr": make_iclevr(base / "iclevr"), "evaluator": make_evaluator(base / "course")}


def run(argv):
    gb.main([str(a) for a in argv])


def read_metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# The networks
# ---------------------------------------------------------------------------------------------------------------
def test_resolution_levels():
    assert gb.resolution_levels(28) == (2, 7)
    assert gb.resolution_levels(64) == (4, 4)
    assert gb.resolution_levels(16) == (2, 4)


def random_conditions(n, k, multi):
    if not multi:
        return torch.nn.functional.one_hot(torch.arange(n) % k, k).float()
    y = torch.zeros(n, k)
    for i in range(n):
        y[i, torch.randperm(k)[:1 + i % 3]] = 1
    return y


@pytest.mark.parametrize("channels,size,num_classes,multi", [(1, 28, 0, False), (3, 16, 0, False), (3, 64, 0, False),
                                                             (3, 16, 3, False), (3, 64, 24, True)],
                         ids=["mnist", "folder16", "folder64", "classes", "iclevr"])
def test_shapes_and_ranges(channels, size, num_classes, multi):
    torch.manual_seed(0)
    G = gb.Generator(channels, 8, 16, size, num_classes)
    D = gb.Discriminator(channels, 8, size, num_classes)
    z = torch.randn(6, 16)
    y = random_conditions(6, num_classes, multi) if num_classes else None
    x = G(z, y)
    assert x.shape == (6, channels, size, size)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.01  # tanh range, and not a constant picture
    scores = D(x, y)
    assert scores.shape == (6,) and torch.isfinite(scores).all()
    if num_classes:  # both networks must use the condition (CBN starts neutral: give it weights first)
        for m in G.modules():
            if isinstance(m, gb.ConditionalBatchNorm):
                torch.nn.init.normal_(m.gain.weight, std=0.5)
                torch.nn.init.normal_(m.bias.weight, std=0.5)
        other = y.roll(1, dims=0)
        assert not torch.allclose(G(z, y), G(z, other), atol=1e-4)
        assert not torch.allclose(D(x, y), D(x, other), atol=1e-4)


def test_losses_follow_their_formulas():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    hinge = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
    assert torch.isclose(gb.discriminator_loss(real, fake, "hinge"), hinge)
    assert torch.isclose(gb.generator_loss(fake, "hinge"), -fake.mean())
    bce = -(torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean())
    assert torch.isclose(gb.discriminator_loss(real, fake, "nonsat"), bce, atol=1e-6)
    assert torch.isclose(gb.generator_loss(fake, "nonsat"), -torch.log(torch.sigmoid(fake)).mean(), atol=1e-6)


@pytest.mark.parametrize("loss,num_classes", [("hinge", 0), ("nonsat", 0), ("hinge", 24)])
def test_one_training_step_moves_both_losses(loss, num_classes):
    torch.manual_seed(0)
    args = gb.parse_args(["--loss", loss, "--z-dim", "16"])
    G, D = gb.Generator(3, 8, 16, 16, num_classes), gb.Discriminator(3, 8, 16, num_classes)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    y = random_conditions(8, num_classes, True) if num_classes else None
    z = torch.randn(8, 16)

    def losses():  # both losses on a fixed batch and fixed z
        with torch.no_grad():
            fake = G(z, y)
            return (gb.discriminator_loss(D(x, y), D(fake, y), loss).item(), gb.generator_loss(D(fake, y), loss).item())

    before = losses()
    g_before = [p.detach().clone() for p in G.parameters()]
    d_before = [p.detach().clone() for p in D.parameters()]
    d_loss = gb.discriminator_step(G, D, opt_d, x, y, args, torch.device("cpu"))
    g_loss = gb.generator_step(G, D, opt_g, y, 8, args, torch.device("cpu"))
    after = losses()
    assert np.isfinite([d_loss, g_loss, *before, *after]).all()
    assert abs(after[0] - before[0]) > 1e-4 and abs(after[1] - before[1]) > 1e-4
    assert all(not torch.equal(a, p) for a, p in zip(g_before, G.parameters()) if p.grad is not None)
    assert all(not torch.equal(a, p) for a, p in zip(d_before, D.parameters()))
    assert all(p.requires_grad for p in D.parameters())  # the G step gives D its gradients back


def test_spectral_norm_holds_top_singular_value_near_one():
    torch.manual_seed(0)
    args = gb.parse_args(["--z-dim", "16"])
    G, D = gb.Generator(3, 8, 16, 16, 24), gb.Discriminator(3, 8, 16, 24)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    for _ in range(30):  # training steps: the weights move, one power iteration per D pass keeps up
        x, y = torch.rand(8, 3, 16, 16) * 2 - 1, random_conditions(8, 24, True)
        gb.discriminator_step(G, D, opt_d, x, y, args, torch.device("cpu"))
        gb.generator_step(G, D, opt_g, y, 8, args, torch.device("cpu"))
    layers = [m for m in D.modules() if hasattr(m, "parametrizations")]
    assert len(layers) == 2 * 3 + 2 + 2  # 2 down-blocks (conv, conv, 1x1 skip), the last block, score, projection
    for m in layers:
        with torch.no_grad():
            sigma = torch.linalg.matrix_norm(m.weight.flatten(1), ord=2).item()
            raw = torch.linalg.matrix_norm(m.parametrizations.weight.original.flatten(1), ord=2).item()
        assert 0.97 < sigma < 1.1, (m, sigma)
        assert abs(raw - 1) > 0.05  # the raw weights are not normalised by themselves: the check is not vacuous


def test_standing_stats_make_eval_mode_match_training_mode():
    torch.manual_seed(0)
    G = gb.Generator(3, 8, 16, 16, 3)
    for m in G.modules():  # weights far from their initial state, as an EMA copy's are
        if isinstance(m, gb.ConditionalBatchNorm):
            torch.nn.init.normal_(m.gain.weight, std=0.5)
    z, y = torch.randn(512, 16), random_conditions(512, 3, False)
    with torch.no_grad():
        in_training_mode = G.train()(z, y)
        stale = (G.eval()(z, y) - in_training_mode).abs().mean()  # running stats of nothing: mean 0, var 1
        pool = random_conditions(64, 3, False)
        gb.standing_stats(G, pool, 16, torch.Generator().manual_seed(0), batch_size=256, n=2048)
        fresh = (G(z, y) - in_training_mode).abs().mean()
    assert not G.training and fresh < 0.05 and stale > 4 * fresh


# ---------------------------------------------------------------------------------------------------------------
# Tiny runs, one per mode
# ---------------------------------------------------------------------------------------------------------------
def check_common_outputs(out, n_samples=None, side=None):
    out = Path(out)
    for name in ("ckpt.pt", "grid.png", "loss.png", "loss.csv", "metrics.json"):
        assert (out / name).is_file(), name
    rows = list(csv.reader(open(out / "loss.csv")))
    assert rows[0] == ["iteration", "d_loss", "g_loss"] and len(rows) > 2
    assert all(np.isfinite([float(v) for v in row[1:]]).all() for row in rows[1:])
    assert Image.open(out / "loss.png").size == (900, 540)
    ckpt = gb.load_checkpoint(str(out / "ckpt.pt"))
    assert {"G", "D", "ema", "opt_g", "opt_d", "rng", "step", "epoch"} <= set(ckpt)
    if n_samples:
        names = [f"{i:05d}.png" for i in range(1, n_samples + 1)]
        assert sorted(os.listdir(out / "samples")) == names
        img = Image.open(out / "samples" / "00001.png")
        assert img.mode == "RGB" and img.size == (side, side)
        with zipfile.ZipFile(out / "samples.zip") as zf:
            assert zf.namelist() == names  # flat: no folder inside
    return read_metrics(out)


def test_tiny_mnist_run_writes_every_output(tmp_path):
    out = tmp_path / "mnist"
    run(["--data-dir", MNIST_DIR, "--limit", 48, "--epochs", 1, "--num-samples", 30, "--no-fid", "--out", out] + TINY)
    metrics = check_common_outputs(out, n_samples=30, side=28)
    assert Image.open(out / "grid.png").size == ((5 * 30 + 2) * 2,) * 2  # 28 px images doubled to be seen
    assert metrics["d_steps"] == 3 and metrics["g_steps"] == 3 and metrics["num_samples"] == 30
    assert metrics["samples_per_second"] > 0 and metrics["args"]["dataset"] == "mnist"
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid[..., 0].std() > 10  # something is drawn


def test_tiny_folder_run_and_sample_only_reproduces_it(tmp_path, data):
    out = tmp_path / "folder"
    run(["--dataset", "folder", "--data-dir", data["folder"], "--image-size", 16, "--epochs", 2, "--num-samples", 20,
         "--no-fid", "--out", out] + TINY)
    check_common_outputs(out, n_samples=20, side=16)
    first = [np.asarray(Image.open(out / "samples" / f"{i:05d}.png")) for i in (1, 20)]
    os.remove(out / "metrics.json")
    run(["--sample-only", "--out", out, "--num-samples", 20, "--no-fid", "--sample-batch-size", 64,
         "--stats-samples", 64])
    again = [np.asarray(Image.open(out / "samples" / f"{i:05d}.png")) for i in (1, 20)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # sampling is seeded and needs no training data
    assert "train_seconds" not in read_metrics(out)


def test_tiny_classes_run_writes_every_output_and_samples_without_data(tmp_path, data):
    out = tmp_path / "classes"
    run(["--dataset", "classes", "--data-dir", data["classes"], "--image-size", 16, "--epochs", 1, "--num-samples", 12,
         "--no-fid", "--out", out] + TINY)
    metrics = check_common_outputs(out, n_samples=12, side=16)
    assert metrics["args"]["label_names"] == ["cat", "dog"] and metrics["args"]["label_counts"] == [10, 14]
    moved = tmp_path / "elsewhere"
    os.rename(data["classes"], moved)  # --sample-only rebuilds the class frequencies from the checkpoint
    try:
        run(["--sample-only", "--out", out, "--num-samples", 12, "--no-fid", "--stats-samples", 64])
    finally:
        os.rename(moved, data["classes"])
    assert read_metrics(out)["num_samples"] == 12


def test_tiny_iclevr_run_with_evaluator(tmp_path, data, monkeypatch, capsys):
    out = tmp_path / "iclevr"
    monkeypatch.chdir(tmp_path)  # not the evaluator's folder: its ./checkpoint.pth must be found all the same
    run(["--dataset", "iclevr", "--data-dir", data["iclevr"], "--epochs", 1, "--evaluator-dir", data["evaluator"],
         "--out", out] + TINY)
    assert os.getcwd() == str(tmp_path)
    metrics = check_common_outputs(out)
    for name in ("test.png", "new_test.png"):
        assert Image.open(out / name).size == (8 * 66 + 2, 4 * 66 + 2)  # 32 conditions, 8 per row, 64 px
    assert set(metrics["accuracy"]) == {"test.json", "new_test.json"}
    assert all(0 <= a <= 1 for a in metrics["accuracy"].values())
    assert metrics["num_samples"] == 2 * 32 and metrics["samples_per_second"] > 0  # one set per file, timed
    assert not (out / "samples").exists()
    assert "accuracy on test.json" in capsys.readouterr().out


def test_iclevr_without_evaluator_says_accuracy_is_skipped(tmp_path, data, capsys):
    out = tmp_path / "iclevr"
    run(["--dataset", "iclevr", "--data-dir", data["iclevr"], "--epochs", 1, "--out", out] + TINY)
    assert "accuracy skipped" in capsys.readouterr().out
    assert read_metrics(out)["accuracy"] is None and (out / "test.png").is_file()
    images, moved = Path(data["iclevr"]) / "iclevr", tmp_path / "elsewhere"
    os.rename(images, moved)  # --sample-only needs train.json's labels, not the images
    try:
        (out / "test.png").unlink()
        run(["--sample-only", "--out", out, "--no-fid"])
    finally:
        os.rename(moved, images)
    assert (out / "test.png").is_file() and (out / "new_test.png").is_file()


def test_accuracy_follows_the_course_protocol(data, tmp_path, monkeypatch):
    """Real scenes with their own labels score 1 with the stand-in; mismatched labels score less. This checks that
    images and labels reach eval() aligned, in [-1, 1], with the objects.json indices."""
    monkeypatch.chdir(tmp_path)
    images, labels, tests, names = gb.load_iclevr_dataset(str(data["iclevr"]), 64, ["test.json"])
    assert images.shape == (24, 3, 64, 64) and images.dtype == torch.uint8 and labels.shape == (24, 24)
    assert names == list(OBJECTS) and tests["test.json"].shape == (32, 24)
    assert set(labels.sum(1).tolist()) <= {1.0, 2.0, 3.0}
    evaluator = gb.load_evaluator(str(data["evaluator"]))
    assert os.getcwd() == str(tmp_path)
    assert gb.evaluate(evaluator, images, labels)[0] == 1.0
    assert gb.evaluate(evaluator, images, labels.roll(1, dims=0))[0] < 0.5


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------
def test_resume_continues_the_same_run(tmp_path):
    common = ["--data-dir", MNIST_DIR, "--limit", 40, "--num-samples", 0] + TINY
    run(common + ["--epochs", 2, "--out", tmp_path / "straight"])
    run(common + ["--epochs", 1, "--out", tmp_path / "split"])
    run(common + ["--epochs", 2, "--out", tmp_path / "split", "--resume"])
    a, b = (gb.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("straight", "split"))
    assert a["step"] == b["step"] == 6 and a["epoch"] == b["epoch"] == 2
    for key in ("G", "D", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert torch.equal(a["d_losses"], b["d_losses"]) and torch.equal(a["g_losses"], b["g_losses"])


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one sentence on stderr, a non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------------------------
def corrupt_iclevr(root, data, change):
    import shutil
    shutil.copytree(data["iclevr"], root)
    change(root)
    return root


def edit_json(path, edit):
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def first_train_file(root):
    return sorted(json.loads((root / "train.json").read_text()))[0]


BAD_ICLEVR = {
    "unknown object": (lambda r: edit_json(r / "train.json", lambda t: t.__setitem__(first_train_file(r), ["pink cube"])),
                       "'pink cube'"),
    "missing image": (lambda r: os.remove(r / "iclevr" / first_train_file(r)), "does not exist"),
    "four objects": (lambda r: edit_json(r / "test.json", lambda t: t.__setitem__(
        3, ["gray cube", "red cube", "blue cube", "green cube"])), "test.json[3]"),
    "repeated object": (lambda r: edit_json(r / "new_test.json", lambda t: t.__setitem__(5, ["red cube", "red cube"])),
                        "repeats"),
    "missing test file": (lambda r: os.remove(r / "new_test.json"), "new_test.json not found"),
}


@pytest.mark.parametrize("case", list(BAD_ICLEVR))
def test_bad_iclevr_data_stops_naming_the_culprit(case, tmp_path, data, capsys):
    change, culprit = BAD_ICLEVR[case]
    root = corrupt_iclevr(tmp_path / "bad", data, change)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run(["--dataset", "iclevr", "--data-dir", root, "--epochs", 1, "--out", out] + TINY)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and err[0].startswith("error:") and culprit in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "-1"], "--epochs"),
    (["--dataset", "folder", "--data-dir", "no/such/folder"], "no/such/folder"),
    (["--dataset", "classes", "--data-dir", "{folder}"], "at least two sub-folders"),
    (["--dataset", "folder", "--data-dir", "{folder}", "--image-size", "30"], "--image-size"),
    (["--dataset", "iclevr", "--data-dir", "{iclevr}", "--evaluator-dir", "{folder}"], "no evaluator.py"),
    (["--data-dir", MNIST_DIR, "--evaluator-dir", "{evaluator}"], "--dataset mnist"),
    (["--resume"], "not found"),
    (["--beta1", "1"], "--beta1"),
], ids=["epochs", "missing-folder", "one-class", "image-size", "no-evaluator", "evaluator-for-mnist", "resume",
        "beta1"])
def test_bad_arguments_stop_with_one_sentence(argv, message, tmp_path, data, capsys):
    out = tmp_path / "out"
    argv = [a.format(**{k: str(v) for k, v in data.items()}) for a in argv]
    with pytest.raises(SystemExit) as e:
        run(argv + ["--out", out, "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()


def test_command_line_exit_status(tmp_path, data):
    root = corrupt_iclevr(tmp_path / "bad", data, BAD_ICLEVR["unknown object"][0])
    result = subprocess.run([sys.executable, str(ROOT / "gan_baseline.py"), "--dataset", "iclevr", "--data-dir", str(root),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "pink cube" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# FID (last: it loads the Inception network)
# ---------------------------------------------------------------------------------------------------------------
def test_fid_uses_the_reference_statistics(tmp_path, quick_frechet):
    out = tmp_path / "fid"
    stats = SHARED / "fid-reference" / "mnist_train10k_stats.npz"
    run(["--data-dir", MNIST_DIR, "--limit", 32, "--epochs", 1, "--num-samples", 24, "--fid", "--fid-stats", stats,
         "--inception", SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth", "--out", out] + TINY)
    metrics = read_metrics(out)
    assert metrics["fid_num_samples"] == 24 and metrics["fid_reference"] == str(stats)
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 50  # an untrained G is far from MNIST
    assert len(quick_frechet) == 1


# ---------------------------------------------------------------------------------------------------------------
# The StyleGAN-style generator (--arch stylegan): its formulas, style mixing, the R1 penalty, a tiny run
# ---------------------------------------------------------------------------------------------------------------
def test_modulation_and_demodulation_follow_their_formulas():
    torch.manual_seed(0)
    conv = gb.ModulatedConv2d(6, 5, 3, w_dim=4)
    with torch.no_grad():
        conv.affine.weight.normal_()
    w = torch.randn(2, 4)
    weight = conv.modulated_weight(w)
    s = conv.affine(w)  # one scale per input channel and sample
    expected = conv.scale * conv.weight[None] * s[:, None, :, None, None]
    expected = expected / expected.pow(2).sum(dim=(2, 3, 4), keepdim=True).add(1e-8).sqrt()
    torch.testing.assert_close(weight, expected)
    # demodulated: every output channel's weights have unit norm, so unit-variance inputs give unit-variance outputs
    torch.testing.assert_close(weight.pow(2).sum(dim=(2, 3, 4)), torch.ones(2, 5), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 6, 96, 96)
    out = conv(x, w)
    assert abs(out[:, :, 2:-2, 2:-2].var().item() - 1) < 0.05
    # the grouped convolution is each sample's own convolution
    for n in range(2):
        torch.testing.assert_close(out[n:n + 1], torch.nn.functional.conv2d(x[n:n + 1], weight[n], padding=1),
                                   rtol=1e-4, atol=1e-4)
    plain = gb.ModulatedConv2d(6, 5, 1, w_dim=4, demodulate=False)
    assert not torch.allclose(plain.modulated_weight(w).pow(2).sum(dim=(2, 3, 4)), torch.ones(2, 5))


def test_style_mixing_switches_codes_at_the_crossover():
    torch.manual_seed(0)
    G = gb.StyleGenerator(3, 8, 16, 12, 2, 16)
    assert G.num_layers == 5  # 4x4 constant, then two levels of (upsampling block, block)
    w1, w2 = torch.randn(3, 12), torch.randn(3, 12)
    ws = gb.mix_styles(w1, w2, 2, G.num_layers)
    assert all(torch.equal(ws[k], w1) for k in range(2)) and all(torch.equal(ws[k], w2) for k in range(2, 5))
    seen = []
    for block in G.blocks:
        block.conv.affine.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    z1, z2 = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        G(z1, z2=z2, crossover=3)
        m1, m2 = G.mapping(z1), G.mapping(z2)
    assert len(seen) == 5
    assert all(torch.allclose(seen[k], m1) for k in range(3)) and all(torch.allclose(seen[k], m2) for k in range(3, 5))
    with torch.no_grad():
        image = G(z1)
    assert image.shape == (3, 3, 16, 16) and image.abs().max() <= 1 and image.std() > 0.01


def test_r1_penalty_is_its_closed_form_on_a_linear_discriminator():
    weight = torch.randn(3 * 4 * 4)

    def linear_d(x, y=None):  # f(x) = w . x + 2, so grad_x f = w for every image
        return x.flatten(1) @ weight + 2.0
    x = torch.randn(5, 3, 4, 4)
    for gamma in (1.0, 10.0):
        assert gb.r1_penalty(linear_d, x, None, gamma).item() == pytest.approx(gamma / 2 * weight.pow(2).sum().item(),
                                                                              rel=1e-5)


def test_tiny_stylegan_run_writes_every_output(tmp_path, data):
    out = tmp_path / "style"
    run(["--dataset", "folder", "--data-dir", data["folder"], "--image-size", 16, "--arch", "stylegan", "--epochs", 1,
         "--num-samples", 10, "--no-fid", "--w-dim", 16, "--mapping-layers", 2, "--out", out] + TINY)
    metrics = check_common_outputs(out, n_samples=10, side=16)
    assert metrics["arch"] == "stylegan" and metrics["args"]["loss"] == "nonsat" and metrics["args"]["r1_gamma"] == 1.0
