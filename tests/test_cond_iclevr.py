"""cond_iclevr.py on a miniature iCLEVR in the course's formats, graded by a stand-in with the evaluator's interface
(tests/iclevr_fixtures.py). CPU only, tiny models."""
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import cond_iclevr as ci  # noqa: E402
from iclevr_fixtures import (COURSE_OBJECTS, stand_in_calls, write_miniature_iclevr,  # noqa: E402
                             write_stand_in_evaluator)

TINY = ["--device", "cpu", "--ch", "8", "--ch-mult", "1", "1", "1", "1", "--num-res-blocks", "1", "--attn-res", "0",
        "--timesteps", "8", "--schedule", "cosine", "--batch-size", "8", "--warmup", "2"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A miniature dataset with objects.json in a shuffled order, and a stand-in evaluator beside it."""
    root = tmp_path_factory.mktemp("mini_iclevr")
    objects = write_miniature_iclevr(root, num_train=24, num_test=32, seed=1, shuffle_objects=True)
    return root, objects, write_stand_in_evaluator(root / "evaluator")


def copy_dataset(src, dst):
    dst.mkdir()
    for name in ("objects.json", "train.json", "test.json", "new_test.json"):
        (dst / name).write_text((src / name).read_text())
    (dst / "iclevr").symlink_to(src / "iclevr")
    return dst


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def test_loader_reads_the_four_files_and_the_order_of_objects_json(mini):
    root, objects, _ = mini
    assert list(objects) != COURSE_OBJECTS  # the fixture's order is not the course's: the loader must read it
    loaded = ci.load_objects(str(root / "objects.json"))
    assert loaded == objects and len(loaded) == 24
    paths, y = ci.load_train_index(str(root / "train.json"), str(root / "iclevr"), loaded)
    train = json.loads((root / "train.json").read_text())
    assert [os.path.basename(p) for p in paths] == list(train) and y.shape == (24, 24)
    for row, names in zip(y, train.values()):
        assert row.sum() == len(names) and all(row[objects[n]] == 1 for n in names)
    for name in ("test.json", "new_test.json"):
        conditions, y = ci.load_conditions(str(root / name), loaded)
        assert conditions == json.loads((root / name).read_text()) and y.shape == (32, 24)
        expected = torch.zeros(32, 24)
        for i, names in enumerate(conditions):
            for n in names:
                expected[i, objects[n]] = 1
        assert torch.equal(y, expected)


def test_images_are_the_usual_recipe_rgb_squashed_to_64(mini):
    """load_iclevr_image + u / 127.5 - 1 equals Resize((64, 64)) + ToTensor + Normalize(0.5, 0.5) on the RGBA PNG."""
    root, _, _ = mini
    path = next((root / "iclevr").iterdir())
    assert Image.open(path).mode == "RGBA" and Image.open(path).size == (320, 240)
    u = ci.load_iclevr_image(str(path), 64)
    assert u.shape == (3, 64, 64) and u.dtype == torch.uint8
    recipe = T.Compose([T.Resize((64, 64)), T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    expected = recipe(Image.open(path).convert("RGB"))
    assert torch.allclose(u.float() / 127.5 - 1, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------------------------
def test_evaluation_path_normalises_and_reproduces_the_top_k_rule(tmp_path, monkeypatch):
    """Scores are set by painting pixels (the stand-in reads object j's score from pixel (0, j))."""
    folder = write_stand_in_evaluator(tmp_path / "evaluator")
    monkeypatch.chdir(tmp_path)  # the evaluator must find ./checkpoint.pth in its own folder, wherever we run
    evaluator = ci.load_evaluator(str(folder))
    assert os.getcwd() == str(tmp_path)
    images = torch.randint(0, 40, (4, 3, 64, 64), dtype=torch.uint8)
    images[:, 0, 0, :24] = 0
    painted = {0: {0: 250, 5: 240}, 1: {3: 200}, 2: {1: 200, 2: 210, 4: 220}, 3: {8: 255, 7: 100}}
    for i, values in painted.items():
        for j, u in values.items():
            images[i, 0, 0, j] = u
    requested = [[0, 1], [3], [1, 2, 4], [7]]  # top-k: {0, 5} -> 1 hit; {3} -> 1; {1, 2, 4} -> 3; {8} -> 0
    y = torch.zeros(4, 24)
    for i, js in enumerate(requested):
        y[i, js] = 1
    accuracy, hits = ci.evaluate(evaluator, images, y)
    assert hits == [1, 1, 3, 0]
    assert accuracy == pytest.approx(5 / 7)
    first = stand_in_calls(str(folder))[0]  # the whole batch, as the course calls eval(images, labels)
    assert first["images"].dtype == torch.float32 and first["images"].shape == (4, 3, 64, 64)
    assert first["images"].min() >= -1 and first["images"].max() <= 1
    assert torch.allclose(first["images"], (images.float() / 255 - 0.5) / 0.5)
    assert torch.equal(first["labels"], y)


def test_classifier_free_guidance_combines_the_two_passes():
    class Toy(torch.nn.Module):
        calls = []

        def forward(self, x, t, y):  # eps = 1 + (number of objects), so eps_cond - eps_null = k
            self.calls.append(len(x))
            return torch.ones_like(x) * (1 + y.sum(1))[:, None, None, None]

    model, y = Toy(), torch.zeros(2, 24)
    y[0, [1, 2]], y[1, 5] = 1, 1
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 3])
    eps = ci.make_guided_eps_fn(model, None, y, guidance=3.0)(x, t)
    assert torch.allclose(eps[0], torch.full_like(eps[0], 1 + 3 * 2)) and torch.allclose(eps[1], torch.full_like(eps[1], 1 + 3))
    assert Toy.calls == [4]  # conditional and null passes in one batch
    assert torch.allclose(ci.make_guided_eps_fn(model, None, y, guidance=1.0)(x, t)[0], torch.full((3, 8, 8), 3.0))
    assert Toy.calls == [4, 2]  # s = 1 needs no null pass


def test_classifier_guidance_is_dhariwal_and_nichols_shift_on_a_linear_classifier(tmp_path):
    """eps^ = eps - S sqrt(1 - abar_t) grad_{x_t} log p(y | x0_hat(x_t)). For logits l = W x0_hat + b, the Bernoulli
    log-likelihood has gradient W^T (y - sigmoid(l)) in x0_hat, and x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    with eps held fixed, so grad_{x_t} = W^T (y - sigmoid(l)) / sqrt(abar_t): the shift in closed form."""
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 24), torch.nn.Sigmoid())
    sched = ci.NoiseSchedule(ci.make_betas("linear", 50))
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    y = torch.zeros(2, 24)
    y[0, [2, 9]], y[1, 20] = 1, 1
    W, b = linear[1].weight.detach(), linear[1].bias.detach()
    for t_value, scale in ((45, 0.05), (10, 0.5), (0, 3.0)):  # high noise, middle, the last step
        t = torch.full((2,), t_value)
        guided = ci.classifier_guided_eps(linear, sched, x_t, t, eps, y, scale, eval_size=8)
        abar = sched.alphas_cumprod[t_value].float()
        x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        logits = x0.flatten(1) @ W.T + b
        grad_xt = ((y - torch.sigmoid(logits)) @ W).reshape(x_t.shape) / abar.sqrt()
        expected = eps - scale * (1 - abar).sqrt() * grad_xt
        torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
        assert (guided - eps).abs().max() > 1e-4  # the push is there: the check above is not vacuous
    # logsigmoid, not a clamped log: an object scored ~0 (logit -40) still gets its full push W^T (1 - 0)
    far = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 24), torch.nn.Sigmoid())
    with torch.no_grad():
        far[1].weight.zero_(), far[1].bias.fill_(-40.0), far[1].weight[2, 0].fill_(1.0)
    t = torch.full((2,), 10)
    shift = ci.classifier_guided_eps(far, sched, x_t, t, eps, y, 1.0, eval_size=8) - eps
    abar = sched.alphas_cumprod[10].float()
    assert shift[0, 0, 0, 0].item() == pytest.approx(-(1 - abar).sqrt().item() / abar.sqrt().item(), rel=1e-4)
    # the evaluator's logits are read through its Sigmoid: with the real interface, the same numbers
    evaluator = ci.load_evaluator(str(write_stand_in_evaluator(tmp_path / "evaluator", gain=4.0)))
    net = ci.evaluator_network(evaluator)
    x = torch.rand(2, 3, 16, 32) * 2 - 1
    torch.testing.assert_close(ci.classifier_logits(net, x), 4 * x.flatten(1)[:, :24], rtol=1e-4, atol=1e-4)
    # inside sample(), which runs in inference mode, the step still gets its gradient
    eps_fn = ci.make_guided_eps_fn(lambda x, t, y: torch.zeros_like(x), sched, y, 1.0, net, 10.0)
    out = ci.sample(eps_fn, sched, torch.randn(2, 3, 64, 64, generator=g), list(range(50)), "ddpm", generator=g)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------------
# A tiny run writes every output; --sample-only regrades; classifier guidance reaches the stand-in's optimum
# ---------------------------------------------------------------------------------------------------------------
def test_tiny_run_writes_every_output(mini, tmp_path, capsys):
    root, objects, _ = mini
    folder = write_stand_in_evaluator(tmp_path / "evaluator")
    out = tmp_path / "run"
    metrics = ci.main(["--data-dir", str(root), "--evaluator-dir", str(folder), "--out", str(out), "--epochs", "2",
                       *TINY])
    for name in ("ckpt.pt", "loss.csv", "loss.png", "process.png", "process.gif", "metrics.json",
                 "test_grid.png", "new_test_grid.png", "test.zip", "new_test.zip"):
        assert (out / name).is_file(), name
    assert Image.open(out / "test_grid.png").size == (8 * 66 + 2, 4 * 66 + 2)  # 32 images, 8 per row, 2 px padding
    assert Image.open(out / "process.png").size == (8 * 66 + 2, 66 + 2)  # one row of 8 frames
    assert len(open(out / "loss.csv").read().splitlines()) == 1 + 2 * 3  # 24 images / batch 8, 2 epochs
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["epochs"] == saved["checkpoint_epoch"] == 2  # the weights that sampled: after training, not before
    calls = stand_in_calls(str(folder))
    for k, stem in enumerate(("test", "new_test")):
        conditions = json.loads((root / f"{stem}.json").read_text())
        pngs = sorted((out / stem).iterdir())
        assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(1, 33)]
        pixels = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in pngs])
        # the batch call for this file: 32 images, exactly the saved PNGs as Normalize(0.5, 0.5) loads them
        batch = [c for c in calls if len(c["images"]) == 32][k]  # the first two: test, then new_test
        assert torch.allclose(batch["images"], pixels.float() / 127.5 - 1, atol=1e-6)
        assert all(batch["labels"][i, objects[n]] == 1 for i, names in enumerate(conditions) for n in names)
        assert torch.equal(batch["labels"].sum(1), torch.tensor([float(len(c)) for c in conditions]))
        # the reported accuracy is the top-k rule applied to those images
        scores = torch.sigmoid(4 * (pixels[:, 0, 0, :24].float() / 127.5 - 1))
        hits = [len(set(s.topk(len(c)).indices.tolist()) & {objects[n] for n in c}) for s, c in zip(scores, conditions)]
        assert saved["accuracy"][stem] == pytest.approx(sum(hits) / sum(map(len, conditions)))
        assert [r["hits"] for r in saved["results"][stem]["per_condition"]] == hits
    assert "accuracy on test.json" in capsys.readouterr().out

    # --sample-only with strong classifier guidance: the stand-in's scores are its pixels, so guidance can max them
    guided = ci.main(["--data-dir", str(root), "--evaluator-dir", str(folder), "--out", str(out), "--sample-only",
                      "--classifier-guidance", "20", "--guidance", "1", "--device", "cpu"])
    assert guided["accuracy"]["test"] == 1.0 and guided["accuracy"]["new_test"] == 1.0
    assert min(metrics["accuracy"].values()) < 0.5  # unguided, the tiny model's pixels are nowhere near that


def test_our_classifier_trains_before_the_ddpm_is_kept_and_guides_without_an_evaluator(mini, tmp_path):
    """--classifier-epochs: trained before the DDPM into ckpt.pt (loadable as data), the same on --resume of a DDPM
    trained without it, and --classifier-guidance then guides with it, no evaluator needed. Grading during
    training makes its images as the final ones are made, guidance included."""
    root, _, _ = mini
    common = ["--data-dir", str(root), "--image-size", "16", "--test-files", "test.json", "--guidance", "1",
              "--sampler", "ddim", "--steps", "8", "--eta", "1", *TINY]
    folder = write_stand_in_evaluator(tmp_path / "evaluator")
    straight = ci.main([*common, "--out", str(tmp_path / "a"), "--epochs", "1", "--classifier-epochs", "2",
                        "--classifier-guidance", "5", "--evaluator-dir", str(folder), "--eval-every", "1"])
    assert straight["guide_dir"] == "own classifier" and straight["classifier"]["epochs"] == 2
    during, final = [c for c in stand_in_calls(str(folder)) if len(c["images"]) == 32]  # epoch 1's, the hand-in's
    assert torch.equal(during["images"], final["images"])
    rows = list(csv.reader(open(tmp_path / "a" / "accuracy.csv")))
    assert float(rows[1][3]) == pytest.approx(straight["accuracy"]["test"])
    ci.main([*common, "--out", str(tmp_path / "b"), "--epochs", "1"])
    ci.main([*common, "--out", str(tmp_path / "b"), "--epochs", "1", "--resume", "--classifier-epochs", "2"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])  # the DDPM is the same with it or without
    a, b = a["classifier"]["weights"], b["classifier"]["weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # seeded on its own
    pngs = {}
    for scale in ("0", "5"):
        out = tmp_path / f"s{scale}"
        m = ci.main([*common, "--sample-only", "--ckpt", str(tmp_path / "a" / "ckpt.pt"), "--out", str(out),
                     "--classifier-guidance", scale])
        assert m["guide_dir"] == ("own classifier" if scale == "5" else None)
        pngs[scale] = np.stack([np.array(Image.open(f)) for f in sorted((out / "test").iterdir())])
    assert np.array_equal(pngs["5"], np.array([np.array(Image.open(f)) for f in sorted((tmp_path / "a" / "test").iterdir())]))
    assert np.abs(pngs["5"].astype(int) - pngs["0"]).mean() > 0.25  # the same seeds, and the guidance moved them


def test_top_k_accuracy_of_our_classifier_is_the_courses_rule():
    y = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0]])
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.7, 0.2, 0.0], [0.6, 0.5, 0.4, 0.9]])
    net = lambda x: scores[: len(x)]  # noqa: E731  (only its outputs matter)
    net.eval = lambda: None
    images = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    assert ci.top_k_accuracy(net, images, y, torch.device("cpu")) == pytest.approx((1 + 1 + 2) / 6)


def test_resume_continues_exactly_grading_during_training_and_no_evaluator_is_a_note(mini, tmp_path, capsys):
    """Straight: 2 epochs, graded after each (--eval-every 1). Resumed: 1 epoch, then --resume to 2, no evaluator.
    Same weights: resuming is exact, and grading during training does not disturb training."""
    root, _, _ = mini
    common = ["--data-dir", str(root), "--image-size", "16", "--test-files", "test.json", *TINY]
    folder = write_stand_in_evaluator(tmp_path / "evaluator")
    ci.main([*common, "--out", str(tmp_path / "a"), "--epochs", "2", "--evaluator-dir", str(folder), "--eval-every", "1"])
    ci.main([*common, "--out", str(tmp_path / "b"), "--epochs", "1"])
    first_epoch_seconds = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["train_seconds"]
    resumed = ci.main([*common, "--out", str(tmp_path / "b"), "--epochs", "2", "--resume"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 6
    # the training clock (accuracy.csv's seconds) carries on over --resume instead of starting again at 0
    assert 0 < first_epoch_seconds < b["train_seconds"]
    assert resumed["train_seconds"] == pytest.approx(b["train_seconds"], abs=0.05)  # metrics.json rounds to 0.1 s
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    rows = list(csv.reader(open(tmp_path / "a" / "accuracy.csv")))
    assert rows[0] == ["epoch", "step", "train_seconds", "test"] and [r[:2] for r in rows[1:]] == [["1", "3"], ["2", "6"]]
    assert all(0 <= float(r[3]) <= 1 and float(r[2]) >= 0 for r in rows[1:])
    assert resumed["accuracy"] is None and "skipped" in resumed["accuracy_note"]
    assert "accuracy skipped" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one sentence naming the culprit, a non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------------------------
def edit_json(path, change):
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value)))


def first_key(d):
    return next(iter(d))


BAD_INPUTS = {
    "unknown label in train.json": (
        "train.json", lambda d: {**d, first_key(d): ["pink cube"]}, "pink cube"),
    "unknown label in test.json": (
        "test.json", lambda c: c[:3] + [["red cube", "magenta sphere"]] + c[4:], "magenta sphere"),
    "missing image": (
        "train.json", lambda d: {**d, "CLEVR_train_999999_0.png": ["red cube"]}, "CLEVR_train_999999_0.png"),
    "more than 3 objects": (
        "new_test.json", lambda c: c[:5] + [["red cube", "blue cube", "gray sphere", "cyan cylinder"]] + c[6:],
        "new_test.json[5]"),
    "repeated object": (
        "test.json", lambda c: c[:7] + [["yellow cube", "yellow cube"]] + c[8:], "yellow cube"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_naming_the_culprit(mini, tmp_path, capsys, case):
    root, _, _ = mini
    data = copy_dataset(root, tmp_path / "data")
    file_name, change, culprit = BAD_INPUTS[case]
    edit_json(data / file_name, change)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        ci.main(["--data-dir", str(data), "--out", str(out), "--epochs", "1", *TINY])
    err = capsys.readouterr().err
    assert e.value.code != 0 and culprit in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    if case == "repeated object":
        assert "test.json[7]" in err
    assert not out.exists()


def test_flags_that_need_the_evaluator_and_a_bad_evaluator_dir(mini, tmp_path, capsys):
    root, _, _ = mini
    for argv, culprit in [(["--classifier-guidance", "2"], "--evaluator-dir"),
                          (["--evaluator-dir", str(tmp_path)], "evaluator.py")]:
        with pytest.raises(SystemExit) as e:
            ci.main(["--data-dir", str(root), "--out", str(tmp_path / "run"), *TINY, *argv])
        assert e.value.code != 0 and culprit in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_course_evaluator_without_cuda_says_it_needs_a_gpu(mini, tmp_path, capsys, monkeypatch):
    """The course's evaluation_model() calls .cuda(); on a machine without CUDA that fails, and we say why."""
    root, _, _ = mini
    folder = write_stand_in_evaluator(tmp_path / "evaluator", needs_cuda=True)

    def no_cuda(self, *args, **kwargs):
        raise AssertionError("Torch not compiled with CUDA enabled")
    monkeypatch.setattr(torch.nn.Module, "cuda", no_cuda)  # what .cuda() does without CUDA, on any machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        ci.main(["--data-dir", str(root), "--evaluator-dir", str(folder), "--out", str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err
    assert e.value.code != 0 and "needs a GPU" in err and "CUDA" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# The real formats end to end: a few images made by ../shared/iclevr_like/make_iclevr_like.py, graded by its
# ResNet18 evaluator (the course's interface), for cond_iclevr.py and the conditional GAN
# ---------------------------------------------------------------------------------------------------------------
ICLEVR_LIKE = ROOT.parent / "shared" / "iclevr_like"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    import subprocess
    root = tmp_path_factory.mktemp("iclevr_like")
    subprocess.run([sys.executable, str(ICLEVR_LIKE / "make_iclevr_like.py"), str(root), "--num-train", "9", "--seed", "3"],
                   check=True, capture_output=True)
    return root


def test_rendered_iclevr_like_data_trains_samples_and_is_graded(rendered, tmp_path):
    train = json.loads((rendered / "train.json").read_text())
    assert len(train) == 9 and all(1 <= len(v) <= 3 for v in train.values())
    with Image.open(rendered / "iclevr" / next(iter(train))) as img:
        assert img.size == (320, 240)
    out = tmp_path / "run"
    metrics = ci.main(["--data-dir", str(rendered), "--evaluator-dir", str(ICLEVR_LIKE / "evaluator"), "--out", str(out),
                       "--image-size", "16", "--epochs", "1", "--sampler", "ddim", "--steps", "2", *TINY])
    for stem in ("test", "new_test"):
        assert 0 <= metrics["accuracy"][stem] <= 1 and len(os.listdir(out / stem)) == 32
        with Image.open(out / stem / "00001.png") as img:
            assert img.size == (64, 64)  # upsampled from 16 to the evaluator's 64
    import gan_baseline as gb
    gb.main(["--dataset", "iclevr", "--data-dir", str(rendered), "--evaluator-dir", str(ICLEVR_LIKE / "evaluator"),
             "--out", str(tmp_path / "gan"), "--image-size", "16", "--epochs", "1", "--ch", "8", "--z-dim", "8",
             "--batch-size", "8", "--stats-samples", "16", "--device", "cpu", "--test-sets", "2"])
    gan = json.loads((tmp_path / "gan" / "metrics.json").read_text())
    assert set(gan["accuracy"]) == {"test.json", "new_test.json"}
    assert gan["results"]["test.json"]["sets"] == 2 and gan["results"]["test.json"]["accuracy_std"] is not None
    with Image.open(tmp_path / "gan" / "test.png") as img:
        assert img.size == (8 * 66 + 2, 4 * 66 + 2)  # 64 px images


def test_objects_file_in_the_specs_spelling(mini, tmp_path):
    root, _, _ = mini
    data = copy_dataset(root, tmp_path / "data")
    os.rename(data / "objects.json", data / "object.json")
    assert ci.objects_file(str(data)) == str(data / "object.json")
    assert ci.objects_file(str(data), "x.json") == "x.json"
    (data / "objects.json").write_text((data / "object.json").read_text())
    assert ci.objects_file(str(data)) == str(data / "objects.json")
