"""cfg_afhq.py: label dropout, the guidance formula and its doubled batch, then whole tiny runs (CPU)."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
import cfg_afhq as cfg  # noqa: E402
import cond_iclevr  # noqa: E402 (the script: benchmarks/ has one of the same name)
import ddpm_mnist  # noqa: E402

CLASSES = ["cat", "dog", "wild"]
MODEL = ["--image-size", "16", "--ch", "8", "--ch-mult", "1", "2", "--num-res-blocks", "1", "--timesteps", "20",
         "--batch-size", "8", "--warmup", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def afhq_like(tmp_path_factory):
    """AFHQ's layout in miniature: train/{cat,dog,wild} with 6 images each, val/ with 3; class k is bright in
    colour channel k, so a colour classifier tells the classes apart."""
    root = tmp_path_factory.mktemp("data") / "afhq"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for k, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (24, 24, 3)).astype(np.uint8)
                pixels[..., k] += 180
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
    return root


def tiny_model(num_classes=3, seed=0):
    """A tiny class-conditional UNet with every weight random (the zero-initialised output layer would make every
    prediction 0 and every comparison below trivially true)."""
    torch.manual_seed(seed)
    unet = cfg.UNet(3, 8, [1, 2], 1, [], 0.0)
    model = cfg.ClassConditionalUNet(unet, num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_label_dropout_replaces_about_a_tenth_with_the_null_label():
    torch.manual_seed(0)
    n, p = 200_000, 0.1
    labels = torch.randint(1, 4, (n,))
    dropped = cfg.drop_labels(labels, p)
    is_null = dropped == cfg.NULL_LABEL
    # Binomial(n, p): the rate lies within 5 standard deviations of p (fails by chance about once in 3.5 million).
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(is_null.float().mean().item() - p) < 5 * sd
    for k in (1, 2, 3):  # independently of the class
        in_class = labels == k
        assert abs(is_null[in_class].float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / in_class.sum().item())
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the rest keep their label
    assert not (cfg.drop_labels(labels, 0.0) == cfg.NULL_LABEL).any()


def test_scale_0_is_the_conditional_model_and_scale_minus_1_the_unconditional_one():
    model = tiny_model()
    x, t, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 3, 7, 11, 15, 19]), torch.tensor([1, 2, 3, 1, 2, 3])
    with torch.no_grad():
        eps_cond, eps_uncond = model(x, t, y), model(x, t, torch.zeros_like(y))
    assert (eps_cond - eps_uncond).abs().max() > 1e-2  # the label matters, so the checks below can fail
    torch.testing.assert_close(cfg.make_cfg_eps_fn(model, y, 0.0, bf16=False)(x, t), eps_cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cfg.make_cfg_eps_fn(model, y, -1.0, bf16=False)(x, t), eps_uncond, rtol=1e-5, atol=1e-5)
    assert torch.equal(cfg.guided_eps(eps_cond, eps_uncond, 0.0), eps_cond)
    torch.testing.assert_close(cfg.guided_eps(eps_cond, eps_uncond, -1.0), eps_uncond)
    torch.testing.assert_close(cfg.guided_eps(eps_cond, eps_uncond, 2.0), 3 * eps_cond - 2 * eps_uncond)


@pytest.mark.parametrize("w", [1.0, 7.5])
def test_the_doubled_batch_equals_two_separate_passes(w):
    model = tiny_model()
    x, t, y = torch.randn(5, 3, 8, 8), torch.tensor([19, 10, 5, 1, 0]), torch.tensor([3, 1, 2, 2, 1])
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    guided = cfg.make_cfg_eps_fn(model, y, w, bf16=False)(x, t)
    assert calls == [10]  # one pass over the doubled batch
    with torch.no_grad():
        separate = cfg.guided_eps(model(x, t, y), model(x, t, torch.zeros_like(y)), w)
    torch.testing.assert_close(guided, separate, rtol=1e-4, atol=1e-4)


def test_balanced_labels():
    labels = cfg.balanced_labels(500, 3)
    assert torch.bincount(labels).tolist() == [0, 167, 167, 166]
    assert torch.equal(labels, labels.sort().values)  # grouped by class


@pytest.mark.parametrize("argv, iters, epochs", [
    ([], 100000, 400),                               # the course preset stops after its 100,000 steps
    (["--epochs", "3"], None, 3),                    # an explicit --epochs is the stopping rule now
    (["--epoch=3"], None, 3),                        # abbreviated and with "=", as argparse allows
    (["--epochs", "3", "--iters", "7"], 7, 3),       # both given: --iters still overrides, as its help says
    (["--iters", "7"], 7, 400),
])
def test_an_explicit_epochs_sets_aside_a_presets_iters(argv, iters, epochs):
    args = cfg.parse_with_preset(cfg.build_parser(), ["--preset", "course"] + argv)
    assert (args.iters, args.epochs) == (iters, epochs)


@pytest.mark.parametrize("module", [ddpm_mnist, cfg, cond_iclevr], ids=lambda m: m.__name__)  # ddim.py: no DDIM preset
def test_an_explicit_ddpm_sampler_sets_aside_a_presets_ddim_steps(module):
    """--preset cpu samples with DDIM and a step count; --sampler ddpm takes all T steps, so the preset's count must
    not reach the check that --steps goes with DDIM (it did: "--steps applies to --sampler ddim")."""
    parse = lambda argv: module.parse_with_preset(module.build_parser(), ["--preset", "cpu"] + argv)  # noqa: E731
    assert parse([]).steps is not None and module.PRESETS["cpu"]["sampler"] == "ddim"
    args = parse(["--sampler", "ddpm"])
    assert (args.sampler, args.steps) == ("ddpm", None)
    assert parse(["--sampler", "ddim", "--steps", "7"]).steps == 7
    assert parse(["--sampler", "ddpm", "--steps", "7"]).steps == 7  # given together: the check says they clash


def export_colour_classifier(path):
    """The class check for the tiny data: the mean of each colour channel as the logits (red = cat, ...)."""
    class Colour(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))
    program = torch.export.export(Colour(), (torch.zeros(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))


def test_a_tiny_run_writes_every_output(afhq_like, tmp_path, quick_frechet):
    out, eval_dir, classifier = tmp_path / "run", tmp_path / "eval_afhq_16px", tmp_path / "colour.pt2"
    export_colour_classifier(classifier)
    calls = quick_frechet  # the distance without its matrix square root (conftest.py)
    cfg.main(["--data-dir", str(afhq_like), "--out", str(out), "--prepare-eval", "--eval-dir", str(eval_dir),
              "--epochs", "2", "--num-samples", "12", "--cfg-scales", "0", "7.5", "--grid-cols", "3",
              "--inception", str(SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth"),
              "--classifier", str(classifier), *MODEL])

    # The eval folder: every validation image at 16 x 16, and its statistics, computed once.
    evals = sorted(eval_dir.rglob("*.png"))
    assert len(evals) == 9 and {p.parent.name for p in evals} == set(CLASSES)
    assert all(Image.open(p).size == (16, 16) and Image.open(p).mode == "RGB" for p in evals)
    assert Path(str(eval_dir) + "_fid_stats.npz").is_file()

    for name in ["ckpt.pt", "loss.csv", "loss.png", "metrics.json", "grid_w0.png", "grid_w7.5.png", "grid_scales.png"]:
        assert (out / name).is_file(), name
    for w in ("0", "7.5"):
        for name in CLASSES:
            files = sorted((out / f"samples_w{w}" / name).glob("*.png"))
            assert [f.name for f in files] == ["00001.png", "00002.png", "00003.png", "00004.png"]
            assert Image.open(files[0]).size == (16, 16) and Image.open(files[0]).mode == "RGB"
    # The grids: one row per class (3 rows of 16 px images enlarged 4x), the side-by-side one wider than one scale.
    one, both = Image.open(out / "grid_w0.png"), Image.open(out / "grid_scales.png")
    assert one.height == both.height > 3 * 16 * 4 and both.width > 1.8 * (one.width - 40)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == CLASSES and metrics["num_samples_per_scale"] == 12 and metrics["steps"] == 6
    assert str(eval_dir) in metrics["fid_reference"] and "9 images" in metrics["fid_reference"]
    assert len(calls) == 2 and all(shape == (2048,) for c in calls for shape in c[::2])
    for w in ("0", "7.5"):
        scale = metrics["scales"][w]
        assert scale["num_samples"] == 12 and math.isfinite(scale["fid"]) and scale["fid"] > 0
        assert 0 <= scale["class_accuracy"] <= 1 and set(scale["class_accuracy_per_class"]) == set(CLASSES)

    # Resampling from the checkpoint at w = -1 (unconditional), without FID.
    cfg.main(["--out", str(out), "--sample-only", "--no-fid", "--cfg-scales", "-1", "--num-samples", "3",
              "--sampler", "ddim", "--steps", "5", "--device", "cpu"])
    assert len(list((out / "samples_w-1").rglob("*.png"))) == 3
    assert json.loads((out / "metrics.json").read_text())["scales"]["-1"]["num_samples"] == 3


def test_the_same_noise_at_every_scale_and_resume_continues_exactly(afhq_like, tmp_path):
    common = ["--data-dir", str(afhq_like), "--no-fid", "--num-samples", "0", *MODEL]
    cfg.main([*common, "--out", str(tmp_path / "straight"), "--epochs", "2"])
    cfg.main([*common, "--out", str(tmp_path / "resumed"), "--epochs", "1"])
    cfg.main([*common, "--out", str(tmp_path / "resumed"), "--epochs", "2", "--resume"])
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert straight["step"] == resumed["step"] == 6
    for key, value in straight["ema"].items():
        torch.testing.assert_close(resumed["ema"][key], value, rtol=0, atol=0, msg=key)

    # Sample i starts from the same noise at every scale: with guidance that changes nothing (a model whose class
    # embedding is the same for every label), every scale gives the same images.
    model = tiny_model()
    with torch.no_grad():
        model.class_emb.weight.copy_(model.class_emb.weight[:1].expand_as(model.class_emb.weight))
    args = cfg.parse_args(["--data-dir", str(afhq_like), "--sampler", "ddpm", "--seed", "3", *MODEL[:2]])
    args.image_size, args.sample_batch_size = 8, 2
    sched = cfg.NoiseSchedule(cfg.make_betas("linear", 20))
    labels = cfg.balanced_labels(5, 3)
    images = [cfg.sample_at_scale(model, sched, labels, w, args, list(range(20)), torch.device("cpu")) for w in (0, 4)]
    # (up to one grey level: the two scales round differently in float32, and other noise would differ wildly)
    assert (images[0].int() - images[1].int()).abs().max() <= 1 and images[0].float().std() > 20


@pytest.mark.parametrize("case", ["empty class folder", "unknown class", "no scales"])
def test_bad_input_stops_with_one_sentence(afhq_like, tmp_path, capsys, case):
    data, extra = afhq_like, []
    if case == "empty class folder":
        data = tmp_path / "data"
        for name in CLASSES:
            (data / name).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(data / "cat" / "a.png")
        Image.new("RGB", (16, 16)).save(data / "dog" / "a.png")  # wild stays empty
    elif case == "unknown class":
        extra = ["--classes", "cat", "horse"]
    else:
        extra = ["--cfg-scales"]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cfg.main(["--data-dir", str(data), "--out", str(out), "--no-fid", *MODEL, *extra])
    assert exit_info.value.code not in (0, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert {"empty class folder": "wild", "unknown class": "horse", "no scales": "--cfg-scales"}[case] in lines[0]
    assert not out.exists()  # nothing written


def test_mnist_class_folders_hold_what_the_message_says(tmp_path, capsys):
    """benchmarks/cfg_mnist_classes.py writes MNIST as class folders; with per_class it writes that many per digit
    and split, and says how many it wrote (it used to print the split's full size)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cfg_mnist_classes as bench
    bench.write_mnist_classes(str(SHARED / "data"), str(tmp_path / "digits"), per_class=2)
    for split in ("train", "val"):
        assert sorted(p.name for p in (tmp_path / "digits" / split).iterdir()) == [str(d) for d in range(10)]
        assert len(list((tmp_path / "digits" / split).glob("*/*.png"))) == 20
        with Image.open(tmp_path / "digits" / split / "7" / "00002.png") as img:
            assert img.size == (28, 28) and img.mode == "L"
    printed = capsys.readouterr().out
    assert "wrote 20 train digits" in printed and "wrote 20 val digits" in printed
