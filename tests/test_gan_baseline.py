"""gan_baseline.py on the CPU with tiny networks (--ch 8) and tiny data: the losses, spectral norm, standing statistics
and StyleGAN's pieces against their formulas; one tiny run per kind of data writing every output; --resume continuing
the same run; one bad input. iCLEVR runs on a miniature in the course's formats, graded by ../shared's ResNet18
stand-in for the course's evaluator (and, for the protocol, by tests/iclevr_fixtures.py's pixel probe)."""
import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import gan_baseline as gb  # noqa: E402
import plumbing  # noqa: E402
from iclevr_fixtures import stand_in_calls, write_miniature_iclevr, write_stand_in_evaluator  # noqa: E402

SHARED = ROOT.parent / "shared"
MNIST_DIR = str(SHARED / "data")
TINY = ["--device", "cpu", "--ch", "8", "--z-dim", "16", "--batch-size", "16", "--sample-batch-size", "64",
        "--stats-samples", "64"]


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
    write_miniature_iclevr(base / "iclevr", num_train=24, num_test=32, seed=0)
    return {"folder": make_folder(base / "folder", 24), "classes": base / "classes", "iclevr": base / "iclevr",
            "probe": write_stand_in_evaluator(base / "probe")}


def run(argv):
    return gb.main([str(a) for a in argv])


def conditions(n, k, multi):
    if not multi:
        return torch.nn.functional.one_hot(torch.arange(n) % k, k).float()
    y = torch.zeros(n, k)
    for i in range(n):
        y[i, torch.randperm(k)[:1 + i % 3]] = 1
    return y


# ---- the networks and the maths -----------------------------------------------------------------------------------
def test_resolution_levels():
    assert gb.resolution_levels(28) == (2, 7)
    assert gb.resolution_levels(64) == (4, 4)
    assert gb.resolution_levels(16) == (2, 4)


@pytest.mark.parametrize("channels,size,num_classes,multi", [(1, 28, 0, False), (3, 16, 0, False), (3, 64, 0, False),
                                                             (3, 16, 3, False), (3, 32, 24, True)],
                         ids=["mnist", "folder16", "folder64", "classes", "iclevr"])
def test_shapes_and_ranges(channels, size, num_classes, multi):
    torch.manual_seed(0)
    G, D = gb.Generator(channels, 8, 16, size, num_classes), gb.Discriminator(channels, 8, size, num_classes)
    z, y = torch.randn(6, 16), conditions(6, num_classes, multi) if num_classes else None
    x = G(z, y)
    assert x.shape == (6, channels, size, size)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.01  # tanh's range, and not a constant picture
    scores = D(x, y)
    assert scores.shape == (6,) and torch.isfinite(scores).all()
    if num_classes:  # both networks use the condition (conditional BN starts neutral: give it weights first)
        for m in G.modules():
            if isinstance(m, gb.ConditionalBatchNorm):
                torch.nn.init.normal_(m.gamma_beta.weight, std=0.5)
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
    opt_g, opt_d = (torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999)) for net in (G, D))
    x, z = torch.rand(8, 3, 16, 16) * 2 - 1, torch.randn(8, 16)
    y = conditions(8, num_classes, True) if num_classes else None

    def losses():  # both losses on a fixed batch and a fixed z
        with torch.no_grad():
            fake = G(z, y)
            return gb.discriminator_loss(D(x, y), D(fake, y), loss).item(), gb.generator_loss(D(fake, y), loss).item()

    before, g_before, d_before = losses(), [p.clone() for p in G.parameters()], [p.clone() for p in D.parameters()]
    d_loss, g_loss = gb.gan_step(G, D, opt_g, opt_d, x, y, torch.randn(2, 8, 16), args, plumbing.Precision("cpu"))
    after = losses()
    assert np.isfinite([d_loss.item(), g_loss.item(), *before, *after]).all()
    assert abs(after[0] - before[0]) > 1e-4 and abs(after[1] - before[1]) > 1e-4
    assert all(not torch.equal(a, p) for a, p in zip(g_before, G.parameters()))
    assert all(not torch.equal(a, p) for a, p in zip(d_before, D.parameters()))
    assert all(p.requires_grad for p in D.parameters())  # the G step gives D its gradients back


def test_spectral_norm_holds_the_top_singular_value_near_one():
    torch.manual_seed(0)
    args = gb.parse_args(["--z-dim", "16"])
    G, D = gb.Generator(3, 8, 16, 16, 24), gb.Discriminator(3, 8, 16, 24)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    for _ in range(30):  # the weights move; one power iteration per D pass keeps up
        gb.gan_step(G, D, opt_g, opt_d, torch.rand(8, 3, 16, 16) * 2 - 1, conditions(8, 24, True),
                    torch.randn(2, 8, 16), args, plumbing.Precision("cpu"))
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
            torch.nn.init.normal_(m.gamma_beta.weight, std=0.5)
    z, y = torch.randn(512, 16), conditions(512, 3, False)
    with torch.no_grad():
        in_training_mode = G.train()(z, y)
        stale = (G.eval()(z, y) - in_training_mode).abs().mean()  # running statistics of nothing: mean 0, var 1
        gb.standing_stats(G, torch.eye(3), 16, torch.Generator().manual_seed(0), batch_size=256, n=2048)
        fresh = (G(z, y) - in_training_mode).abs().mean()
    assert not G.training and fresh < 0.05 and stale > 4 * fresh


def test_modulation_and_demodulation_follow_their_formulas():
    torch.manual_seed(0)
    conv = gb.ModulatedConv2d(6, 5, 3, w_dim=4)
    with torch.no_grad():
        conv.affine.weight.normal_()
    w = torch.randn(2, 4)
    weight, s = conv.modulated_weight(w), conv.affine(w)  # s: one scale per input channel and sample
    expected = conv.scale * conv.weight[None] * s[:, None, :, None, None]
    expected = expected / expected.pow(2).sum(dim=(2, 3, 4), keepdim=True).add(1e-8).sqrt()
    torch.testing.assert_close(weight, expected)
    # demodulated: every output channel's weights have unit norm, so unit-variance inputs give unit-variance outputs
    torch.testing.assert_close(weight.pow(2).sum(dim=(2, 3, 4)), torch.ones(2, 5), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 6, 96, 96)
    out = conv(x, w)
    assert abs(out[:, :, 2:-2, 2:-2].var().item() - 1) < 0.05
    for n in range(2):  # the grouped convolution is each sample's own convolution
        torch.testing.assert_close(out[n:n + 1], torch.nn.functional.conv2d(x[n:n + 1], weight[n], padding=1),
                                   rtol=1e-4, atol=1e-4)
    plain = gb.ModulatedConv2d(6, 5, 1, w_dim=4, demodulate=False)
    assert not torch.allclose(plain.modulated_weight(w).pow(2).sum(dim=(2, 3, 4)), torch.ones(2, 5))


def test_style_mixing_switches_codes_at_the_crossover():
    torch.manual_seed(0)
    G = gb.StyleGenerator(3, 8, 16, 12, 2, 16)
    assert G.num_layers == 5  # the 4x4 constant's block, then two levels of (upsampling block, block)
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
        expected = gamma / 2 * weight.pow(2).sum().item()
        assert gb.r1_penalty(linear_d, x, None, gamma).item() == pytest.approx(expected, rel=1e-5)


# ---- tiny runs, one per kind of data ------------------------------------------------------------------------------
def read_images(folder):
    return np.stack([np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))]).astype(np.float64)


def check_outputs(out, n_samples, side):
    """Every output of a run with samples; returns metrics.json."""
    out = Path(out)
    rows = list(csv.reader(open(out / "loss.csv")))
    assert rows[0] == ["iteration", "D", "G"] and len(rows) >= 2
    assert all(np.isfinite([float(v) for v in row[1:]]).all() for row in rows[1:])
    assert Image.open(out / "loss.png").size == (900, 540)
    assert Image.open(out / "progress" / "epoch_001.png").format == "PNG"
    ckpt = plumbing.load_checkpoint(str(out / "ckpt.pt"), "gan_baseline")
    assert {"G", "D", "ema", "opt_g", "opt_d", "rng", "step", "losses"} <= set(ckpt)
    names = [f"{i:05d}.png" for i in range(1, n_samples + 1)]
    assert sorted(os.listdir(out / "samples")) == names
    with zipfile.ZipFile(out / "samples.zip") as zf:
        assert zf.namelist() == names  # flat: no folder inside
    images = read_images(out / "samples")
    assert images.shape == (n_samples, side, side, 3)
    # Something is drawn: each sample varies across its pixels, and the samples differ from one another.
    assert images.std(axis=(1, 2, 3)).min() > 5 and images.std(axis=0).mean() > 5
    grid = plumbing.make_grid(torch.from_numpy(images[:25].astype(np.uint8)).permute(0, 3, 1, 2), nrow=5)
    assert np.array_equal(np.asarray(Image.open(out / "grid.png")), np.asarray(grid))  # the first 25 samples
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == n_samples and metrics["steps"] == len(rows) - 1
    assert {"device", "train_seconds", "sample_seconds", "args"} <= set(metrics)
    return metrics


def test_tiny_mnist_run_writes_every_output(tmp_path):
    out = tmp_path / "mnist"
    run(["--data-dir", MNIST_DIR, "--limit", 48, "--epochs", 1, "--num-samples", 30, "--no-fid", "--out", out] + TINY)
    metrics = check_outputs(out, n_samples=30, side=28)
    assert metrics["steps"] == 3 and metrics["args"]["dataset"] == "mnist"
    images = read_images(out / "samples")
    assert np.array_equal(images[..., 0], images[..., 2])  # grey digits written as RGB


def test_tiny_stylegan_run_writes_every_output(tmp_path, data):
    out = tmp_path / "style"
    run(["--dataset", "folder", "--data-dir", data["folder"], "--image-size", 16, "--arch", "stylegan", "--epochs", 1,
         "--num-samples", 10, "--no-fid", "--w-dim", 16, "--mapping-layers", 2, "--out", out] + TINY)
    metrics = check_outputs(out, n_samples=10, side=16)
    assert metrics["args"]["loss"] == "nonsat" and metrics["args"]["r1_gamma"] == 1.0


def test_tiny_classes_run_writes_every_output_and_samples_without_the_data(tmp_path, data):
    out = tmp_path / "classes"
    run(["--dataset", "classes", "--data-dir", data["classes"], "--image-size", 16, "--epochs", 1, "--num-samples", 12,
         "--no-fid", "--out", out] + TINY)
    first = check_outputs(out, n_samples=12, side=16)
    assert first["args"]["label_names"] == ["cat", "dog"]
    samples = read_images(out / "samples")
    moved = tmp_path / "elsewhere"
    os.rename(data["classes"], moved)  # --sample-only takes the classes from the checkpoint
    try:
        run(["--sample-only", "--out", out, "--num-samples", 12, "--no-fid", "--stats-samples", 64])
    finally:
        os.rename(moved, data["classes"])
    again = json.loads((out / "metrics.json").read_text())
    assert again["num_samples"] == 12 and "train_seconds" not in again
    assert np.array_equal(read_images(out / "samples"), samples)  # sampling is seeded: the same images again


def test_tiny_iclevr_run_with_the_evaluator(tmp_path, data, monkeypatch):
    out = tmp_path / "iclevr"
    monkeypatch.chdir(tmp_path)  # not the evaluator's folder: its ./checkpoint.pth must be found all the same
    run(["--dataset", "iclevr", "--data-dir", data["iclevr"], "--image-size", 16, "--epochs", 1, "--evaluator-dir",
         SHARED / "iclevr_like" / "evaluator", "--out", out] + TINY)
    assert os.getcwd() == str(tmp_path)
    for name in ("test.png", "new_test.png"):  # 32 conditions, 8 a row, upsampled to 64 px
        assert Image.open(out / name).size == (8 * 66 + 2, 4 * 66 + 2)
    assert (out / "progress" / "epoch_001.png").is_file() and (out / "loss.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"test.json", "new_test.json"} and metrics["num_samples"] == 64
    assert all(0 <= a <= 1 for a in metrics["accuracy"].values())


def test_iclevr_grading_follows_the_course_protocol(tmp_path, data, monkeypatch):
    """A stand-in G paints each condition into pixel row 0 of the red channel, which the pixel probe reads as its
    scores: its own conditions score 1, shifted ones less. So the conditions reach G and eval() aligned, and the
    images reach eval() as the course loads PNGs (u / 127.5 - 1)."""
    monkeypatch.chdir(tmp_path)
    evaluator = plumbing.load_course_evaluator(str(data["probe"]))
    assert os.getcwd() == str(tmp_path)
    tests = {"test.json": conditions(32, 24, True)}

    def painter(shift):
        def G(z, y):
            x = -torch.ones(len(y), 3, 64, 64)
            x[:, 0, 0, :24] = 2 * y.roll(shift, dims=0) - 1
            return x
        return G
    args = SimpleNamespace(seed=0, z_dim=4, output_size=64, out=tmp_path)
    assert gb.grade_iclevr(painter(0), tests, evaluator, args, torch.device("cpu"))["accuracy"]["test.json"] == 1.0
    assert gb.grade_iclevr(painter(1), tests, evaluator, args, torch.device("cpu"))["accuracy"]["test.json"] < 0.5
    call = stand_in_calls(str(data["probe"]))[0]
    assert torch.equal(call["labels"], tests["test.json"]) and set(call["images"].unique().tolist()) == {-1.0, 1.0}


# ---- resume, bad input ----------------------------------------------------------------------------------------------
def test_resume_continues_the_same_run(tmp_path):
    common = ["--data-dir", MNIST_DIR, "--limit", 48, "--num-samples", 0] + TINY
    run(common + ["--iters", 5, "--out", tmp_path / "straight"])
    run(common + ["--iters", 2, "--out", tmp_path / "split"])
    run(common + ["--iters", 5, "--out", tmp_path / "split", "--resume"])
    a, b = (plumbing.load_checkpoint(str(tmp_path / d / "ckpt.pt"), "gan_baseline") for d in ("straight", "split"))
    assert a["step"] == b["step"] == 5
    for key in ("G", "D"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    for name, tensor in a["ema"]["weights"].items():
        assert torch.equal(tensor, b["ema"]["weights"][name]), name
    assert all(torch.equal(a["losses"][k], b["losses"][k]) for k in ("D", "G"))
    assert (tmp_path / "split" / "progress" / "epoch_001.png").is_file()


def test_a_missing_iclevr_file_stops_naming_it(tmp_path, data):
    root = tmp_path / "bad"
    shutil.copytree(data["iclevr"], root)
    os.remove(root / "new_test.json")
    result = subprocess.run([sys.executable, str(ROOT / "gan_baseline.py"), "--dataset", "iclevr", "--data-dir", root,
                             "--out", tmp_path / "out"], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "new_test.json" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
