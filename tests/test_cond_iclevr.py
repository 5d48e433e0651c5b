"""cond_iclevr.py on a miniature iCLEVR in the course's formats, graded by a stand-in with the course evaluator's
interface (tests/iclevr_fixtures.py: object j's score is sigmoid(4 * pixel (0, j)'s red value)). CPU, tiny models."""
import argparse
import csv
import json
import os
import zipfile

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import cond_iclevr as ci
import plumbing
from iclevr_fixtures import COURSE_OBJECTS, stand_in_calls, write_miniature_iclevr, write_stand_in_evaluator

TINY = ["--device", "cpu", "--image-size", "16", "--ch", "8", "--ch-mult", "1", "1", "--num-res-blocks", "1",
        "--attn-res", "0", "--timesteps", "8", "--schedule", "cosine", "--batch-size", "8", "--warmup", "2"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """24 training renders, objects.json in a shuffled order, and a stand-in evaluator in its own folder."""
    root = tmp_path_factory.mktemp("mini_iclevr")
    objects = write_miniature_iclevr(root, num_train=24, num_test=32, seed=1, shuffle_objects=True)
    return root, objects


def scores_of(images):
    """The stand-in's scores for uint8 images: sigmoid(4 * (red value of pixel (0, j)) / 127.5 - 1), j < 24."""
    return torch.sigmoid(4 * (images[:, 0, 0, :24].float() / 127.5 - 1))


# ---- data ----------------------------------------------------------------------------------------------------------
def test_loader_reads_the_four_files_and_the_order_of_objects_json(mini):
    root, objects = mini
    assert list(objects) != COURSE_OBJECTS  # the fixture's order is not the course's: the loader must read it
    args = argparse.Namespace(data_dir=str(root), image_size=64)
    loaded = ci.read_json(args, "objects.json")
    assert loaded == objects and len(loaded) == 24
    data, labels = ci.load_iclevr_training_set(args, loaded, torch.device("cpu"))
    train = json.loads((root / "train.json").read_text())
    assert data.shape == (24, 3, 64, 64) and data.dtype == torch.uint8 and labels.shape == (24, 24)
    for row, names in zip(labels, train.values()):  # in train.json's order, each object at objects.json's index
        assert row.sum() == len(names) and all(row[objects[n]] == 1 for n in names)
    for name in ("test.json", "new_test.json"):
        conditions = json.loads((root / name).read_text())
        expected = torch.zeros(32, 24)
        for i, names in enumerate(conditions):
            expected[i, [objects[n] for n in names]] = 1
        assert torch.equal(ci.multi_hot(ci.read_json(args, name), loaded, name), expected)


def test_images_are_the_usual_recipe_rgb_squashed_to_64(mini):
    """u / 127.5 - 1 of a loaded image equals Resize((64, 64)) + ToTensor + Normalize(0.5, 0.5) on the RGBA render."""
    root, objects = mini
    first = next(iter(json.loads((root / "train.json").read_text())))
    with Image.open(root / "iclevr" / first) as img:
        assert img.mode == "RGBA" and img.size == (320, 240)
        recipe = T.Compose([T.Resize((64, 64)), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
        expected = recipe(img.convert("RGB"))
    data, _ = ci.load_iclevr_training_set(argparse.Namespace(data_dir=str(root), image_size=64), objects, "cpu")
    assert torch.allclose(data[0].float() / 127.5 - 1, expected, atol=1e-6)


# ---- grading and guidance ------------------------------------------------------------------------------------------
def test_the_course_evaluator_loads_in_its_folder_and_our_top_k_rule_is_its_rule(tmp_path, monkeypatch):
    """Scores are set by painting pixels; the course's eval() and our top_k_accuracy agree on them."""
    folder = write_stand_in_evaluator(tmp_path / "evaluator")
    monkeypatch.chdir(tmp_path)  # the evaluator must find ./checkpoint.pth in its own folder, wherever we run
    evaluator = plumbing.load_course_evaluator(str(folder))
    assert os.getcwd() == str(tmp_path)
    images = torch.randint(0, 40, (4, 3, 64, 64), dtype=torch.uint8)
    painted = {0: {0: 250, 5: 240}, 1: {3: 200}, 2: {1: 200, 2: 210, 4: 220}, 3: {8: 255, 7: 100}}
    for i, values in painted.items():
        for j, u in values.items():
            images[i, 0, 0, j] = u
    y = torch.zeros(4, 24)
    for i, js in enumerate([[0, 1], [3], [1, 2, 4], [7]]):  # top-k: {0, 5} 1 hit; {3} 1; {1, 2, 4} 3; {8} 0
        y[i, js] = 1
    assert evaluator.eval(images.float() / 127.5 - 1, y) == pytest.approx(5 / 7)
    assert ci.top_k_accuracy(scores_of(images), y) == pytest.approx(5 / 7)
    y = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0]])  # and a case by hand: 1 + 1 + 2 hits of 6
    assert ci.top_k_accuracy(torch.tensor([[0.9, 0.8, 0.1, 0], [0.1, 0.7, 0.2, 0], [0.6, 0.5, 0.4, 0.9]]), y) == 4 / 6


def test_label_dropout_nulls_whole_multi_hot_rows():
    torch.manual_seed(0)
    y = (torch.rand(2000, 24) < 0.1).float()
    y[:, 0] = 1  # every row requests an object, so a dropped row is one of zeros
    dropped = ci.drop_conditions(y, 0.3)
    kept = dropped.sum(1) > 0
    assert torch.equal(dropped[kept], y[kept]) and (dropped[~kept] == 0).all()
    assert abs((~kept).float().mean().item() - 0.3) < 0.04
    assert torch.equal(ci.drop_conditions(y, 0.0), y) and (ci.drop_conditions(y, 1.0) == 0).all()


def test_classifier_free_guidance_combines_the_two_passes_in_one_batch(monkeypatch):
    calls = []

    def toy(x, t, y):  # eps = 1 + (number of objects): eps_cond - eps_null = k
        calls.append(len(x))
        return torch.ones_like(x) * (1 + y.sum(1))[:, None, None, None]
    monkeypatch.setattr(ci, "sample", lambda eps_fn, sched, x, *rest, **kw: eps_fn(x, torch.full((len(x),), 3)))
    y = torch.zeros(2, 24)
    y[0, [1, 2]], y[1, 5] = 1, 1
    args = argparse.Namespace(image_size=8, cfg_w=2.0, eta=0.0, classifier_guidance=0.0)
    eps = ci.sample_conditions(toy, None, y, [0], "ddim", args, seed=0)
    assert calls == [4]  # the conditional and the null pass in one batch
    assert torch.allclose(eps[0], torch.full((3, 8, 8), 3.0 * 3 - 2))  # (1 + w)(1 + k) - w with k = 2
    assert torch.allclose(eps[1], torch.full((3, 8, 8), 3.0 * 2 - 2))  # and k = 1
    assert torch.equal(ci.guided_eps(torch.tensor(3.0), torch.tensor(1.0), 2.0), torch.tensor(7.0))  # (1 + w) c - w u
    eps = ci.sample_conditions(toy, None, y, [0], "ddim", argparse.Namespace(**{**vars(args), "cfg_w": 0.0}), seed=0)
    assert calls == [4, 2] and torch.allclose(eps[0], torch.full((3, 8, 8), 3.0))  # w = 0: the conditional model alone


def test_classifier_guidance_is_dhariwal_and_nichols_shift_on_a_linear_classifier():
    """eps^ = eps - S sqrt(1 - abar_t) grad_{x_t} log p(y | x0_hat(x_t)). For logits l = W x0_hat + b the Bernoulli
    log-likelihood has gradient W^T (y - sigmoid(l)) in x0_hat, and x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    with eps held fixed, so grad_{x_t} = W^T (y - sigmoid(l)) / sqrt(abar_t): the shift in closed form."""
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 24))
    sched = ci.NoiseSchedule(ci.make_betas("linear", 50))
    x_t, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    y = torch.zeros(2, 24)
    y[0, [2, 9]], y[1, 20] = 1, 1
    W, b = linear[1].weight.detach(), linear[1].bias.detach()
    for t_value, scale in ((45, 0.05), (10, 0.5), (0, 3.0)):  # high noise, middle, the last step
        t = torch.full((2,), t_value)
        guided = ci.classifier_guided_eps(linear, sched, x_t, t, eps, y, scale)
        abar = sched.alphas_cumprod[t_value].float()
        x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        grad_xt = ((y - torch.sigmoid(x0.flatten(1) @ W.T + b)) @ W).reshape(x_t.shape) / abar.sqrt()
        torch.testing.assert_close(guided, eps - scale * (1 - abar).sqrt() * grad_xt, rtol=1e-4, atol=1e-5)
        assert (guided - eps).abs().max() > 1e-4  # the push is there: the check above is not vacuous
    with torch.no_grad():  # logsigmoid, not a clamped log: an object scored ~0 (logit -40) still gets its full push
        linear[1].weight.zero_(), linear[1].bias.fill_(-40.0), linear[1].weight[2, 0].fill_(1.0)
    shift = ci.classifier_guided_eps(linear, sched, x_t, torch.full((2,), 10), eps, y, 1.0) - eps
    abar = sched.alphas_cumprod[10].float()
    assert shift[0, 0, 0, 0].item() == pytest.approx(-((1 - abar).sqrt() / abar.sqrt()).item(), rel=1e-4)
    args = argparse.Namespace(image_size=8, cfg_w=0.0, eta=0.0, classifier_guidance=10.0)  # inside sample()'s
    out = ci.sample_conditions(lambda x, t, y: torch.zeros_like(x), sched, y, list(range(50)), "ddpm", args, 0, linear)
    assert torch.isfinite(out).all()  # inference mode, the guidance step still gets its gradient


# ---- a tiny run writes every output; --resume continues exactly; bad input stops ------------------------------------
def test_tiny_run_writes_every_output_and_grades_them_as_the_course_does(mini, tmp_path):
    root, objects = mini
    folder = write_stand_in_evaluator(tmp_path / "evaluator")
    out = tmp_path / "run"
    metrics = ci.main(["--data-dir", str(root), "--evaluator-dir", str(folder), "--out", str(out), "--epochs", "1",
                       "--sampler", "ddim", "--classifier-epochs", "1", "--classifier-guidance", "2",
                       "--eval-every", "1", "--num-samples", "2", *TINY])
    for name in ("ckpt.pt", "loss.csv", "loss.png", "process.png", "process.gif", "progress/epoch_001.png",
                 "accuracy.csv", "test_grid.png", "new_test_grid.png", "test.zip", "new_test.zip"):
        assert (out / name).is_file(), name
    assert Image.open(out / "test_grid.png").size == (8 * 66 + 2, 4 * 66 + 2)  # 32 images, 8 a row, 2 px lines
    assert Image.open(out / "process.png").size == (8 * 66 + 2, 66 + 2)  # one row of 8 frames
    assert len((out / "loss.csv").read_text().splitlines()) == 1 + 3  # 24 images in batches of 8
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["args"]["image_size"] == 16 and saved["classifier_guidance"] == 2 and saved["steps"] == 3
    assert {k: v for k, v in saved.items() if k != "args"} == json.loads(json.dumps(metrics))
    assert set(saved) >= {"accuracy", "accuracy_per_set", "sampler", "sampling_steps", "eta", "cfg_w", "args"}
    calls = [c for c in stand_in_calls(str(folder)) if len(c["images"]) == 32]
    assert len(calls) == 2 + 2 * 2  # during training: one set per file; at the end: two sets per file
    for k, stem in enumerate(("test", "new_test")):
        conditions = json.loads((root / f"{stem}.json").read_text())
        assert zipfile.ZipFile(out / f"{stem}.zip").namelist() == [f"{i:05d}.png" for i in range(1, 33)]
        pngs = torch.stack([torch.from_numpy(np.array(Image.open(out / stem / f"{i:05d}.png"))).permute(2, 0, 1)
                            for i in range(1, 33)])
        assert pngs.shape == (32, 3, 64, 64)
        during, final = calls[k], calls[2 + 2 * k]  # the same weights after 1 epoch: the same images
        assert torch.equal(during["images"], final["images"])
        assert torch.allclose(final["images"], pngs.float() / 127.5 - 1, atol=1e-6)  # the PNGs, Normalize(0.5, 0.5)
        assert all(final["labels"][i, objects[n]] == 1 for i, names in enumerate(conditions) for n in names)
        assert torch.equal(final["labels"].sum(1), torch.tensor([float(len(c)) for c in conditions]))
        assert saved["accuracy"][stem] == pytest.approx(ci.top_k_accuracy(scores_of(pngs), final["labels"]))
        assert saved["accuracy_per_set"][stem][0] == saved["accuracy"][stem]
        assert len(saved["accuracy_per_set"][stem]) == 2
    rows = list(csv.reader(open(out / "accuracy.csv")))
    assert rows[0] == ["epoch", "step", "train_seconds", "test", "new_test"] and rows[1][:2] == ["1", "3"]
    assert [float(a) for a in rows[1][3:]] == pytest.approx(list(saved["accuracy"].values()))
    # --sample-only from ckpt.pt (the model and our classifier as saved): the same seeds give the same hand-in
    again = ci.main(["--data-dir", str(root), "--evaluator-dir", str(folder), "--out", str(tmp_path / "again"),
                     "--ckpt", str(out / "ckpt.pt"), "--sample-only", "--sampler", "ddim", "--classifier-guidance", "2"])
    assert again["accuracy"] == saved["accuracy"]
    assert (tmp_path / "again" / "test" / "00032.png").read_bytes() == (out / "test" / "00032.png").read_bytes()


def test_resume_continues_exactly(mini, tmp_path):
    """--iters 5 straight, and --iters 2 then --resume --iters 5 (over an epoch's end): the same weights."""
    root, _ = mini
    common = ["--data-dir", str(root), "--classifier-epochs", "1", *TINY]
    ci.main([*common, "--out", str(tmp_path / "a"), "--iters", "5"])
    ci.main([*common, "--out", str(tmp_path / "b"), "--iters", "2"])
    ci.main([*common, "--out", str(tmp_path / "b"), "--iters", "5", "--resume"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 5 and torch.equal(a["losses"]["loss"], b["losses"]["loss"])
    for part in ("model", "classifier"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(a["ema"]["weights"][k], b["ema"]["weights"][k]) for k in a["ema"]["weights"])


def test_an_unknown_object_stops_before_anything_is_written(mini, tmp_path, capsys):
    root, _ = mini
    data = tmp_path / "data"
    data.mkdir()
    for name in ("objects.json", "test.json", "new_test.json"):
        (data / name).write_text((root / name).read_text())
    train = json.loads((root / "train.json").read_text())
    (data / "train.json").write_text(json.dumps({**train, next(iter(train)): ["pink cube"]}))
    with pytest.raises(SystemExit) as e:
        ci.main(["--data-dir", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY])
    assert e.value.code == 2 and "pink cube" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
