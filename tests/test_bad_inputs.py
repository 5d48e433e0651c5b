"""Bad input, across every script: one sentence on stderr naming the culprit, a non-zero exit (2 for the training
scripts, 1 for fid.py's command line), no traceback, nothing new in --out, and before any training starts.

Each case is (script, arguments, words the message must contain). Arguments may name the files made by the
`files` fixture: {mnist}, {folder}, {classes}, {iclevr}, {evaluator}, {inception}, {stats10k}, {bad_*} ...
"""
import argparse
import importlib.util
import io
import json
import os
import pickle
import shutil
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import cfg_afhq  # noqa: E402
import cond_iclevr  # noqa: E402
import ddim  # noqa: E402
import ddpm_mnist  # noqa: E402
import fid  # noqa: E402
import gan_baseline  # noqa: E402
from iclevr_fixtures import write_miniature_iclevr, write_stand_in_evaluator  # noqa: E402

SCRIPTS = {"ddpm": ddpm_mnist, "cfg": cfg_afhq, "iclevr": cond_iclevr, "ddim": ddim, "gan": gan_baseline, "fid": fid}
TINY = {
    "ddpm": ["--device", "cpu", "--ch", "8", "--timesteps", "10", "--epochs", "1", "--limit", "32", "--batch-size", "16",
             "--data-dir", "{mnist}"],
    "cfg": ["--device", "cpu", "--ch", "8", "--image-size", "8", "--ch-mult", "1", "2", "--num-res-blocks", "1",
            "--timesteps", "10", "--epochs", "1", "--batch-size", "8", "--data-dir", "{classes}"],
    "iclevr": ["--device", "cpu", "--ch", "8", "--ch-mult", "1", "1", "--num-res-blocks", "1", "--attn-res", "0",
               "--image-size", "16", "--timesteps", "8", "--schedule", "cosine", "--epochs", "1", "--batch-size", "8",
               "--data-dir", "{iclevr}"],
    "ddim": ["--device", "cpu", "--hidden", "16", "--emb-dim", "8", "--iters", "5", "--train-points", "500",
             "--num-points", "16", "--timesteps", "20", "--no-table"],
    "gan": ["--device", "cpu", "--ch", "8", "--z-dim", "8", "--batch-size", "16", "--epochs", "1", "--limit", "32",
            "--data-dir", "{mnist}"],
    "fid": [],
}


def write_stats(path, mu, sigma):
    with open(path, "wb") as fh:
        np.savez(fh, mu=mu, sigma=sigma)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    f = {"mnist": SHARED / "data", "inception": SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth",
         "stats10k": SHARED / "fid-reference" / "mnist_train10k_stats.npz"}
    folder = base / "folder"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    f["folder"] = folder
    classes = base / "classes"
    for k, name in enumerate(("cat", "dog")):
        (classes / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(classes / name / f"{i}.png")
    f["classes"] = classes
    (base / "empty_class" / "cat").mkdir(parents=True)
    (base / "empty_class" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(base / "empty_class" / "cat" / "a.png")
    f["empty_class"] = base / "empty_class"
    f["empty"] = base / "empty"
    f["empty"].mkdir()
    iclevr = base / "iclevr"
    write_miniature_iclevr(iclevr, num_train=12, num_test=32, seed=0)
    f["iclevr"] = iclevr
    f["evaluator"] = write_stand_in_evaluator(base / "evaluator")
    f["no_evaluator"] = base / "no_evaluator"
    f["no_evaluator"].mkdir()
    # broken files
    f["file"] = base / "a_file"
    f["file"].write_text("not a folder")
    f["text"] = base / "text.txt"
    f["text"].write_text("hello\n")
    f["empty_file"] = base / "empty.pt"
    f["empty_file"].write_bytes(b"")
    buffer = io.BytesIO()
    torch.save({"script": "ddpm_mnist", "model": {"w": torch.zeros(2000)}}, buffer)
    f["truncated"] = base / "truncated.pt"
    f["truncated"].write_bytes(buffer.getvalue()[:400])

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo this would have run",))
    f["payload"] = base / "payload.pt"
    f["payload"].write_bytes(pickle.dumps({"args": Payload()}))
    for script in ("cfg_afhq", "gan_baseline", "ddim", "cond_iclevr", "ddpm_mnist"):
        torch.save({"script": script, "args": {}}, base / f"{script}.pt")
        f[f"ckpt_{script}"] = base / f"{script}.pt"
    torch.save({"model": {}}, base / "old.pt")
    f["ckpt_old"] = base / "old.pt"
    # statistics files
    eye = np.eye(2048)
    f["stats_nomu"] = base / "nomu.npz"
    with open(f["stats_nomu"], "wb") as fh:
        np.savez(fh, sigma=eye)
    f["stats_object"] = base / "object.npz"
    with open(f["stats_object"], "wb") as fh:
        np.savez(fh, mu=np.array([None, 1], dtype=object), sigma=eye)
    asym = eye.copy()
    asym[0, 1] = 5.0
    f["stats_asym"] = write_stats(base / "asym.npz", np.zeros(2048), asym)
    f["stats_nan"] = write_stats(base / "nan.npz", np.full(2048, np.nan), eye)
    f["stats_neg"] = write_stats(base / "neg.npz", np.zeros(2048), -eye)
    f["stats_dim"] = write_stats(base / "dim.npz", np.zeros(8), np.eye(8))
    f["stats_shape"] = write_stats(base / "shape.npz", np.zeros(2048), np.eye(8))
    f["npy"] = base / "array.npz"
    np.save(open(f["npy"], "wb"), np.zeros(3))
    # image folders for fid.py: one broken image late in an otherwise fine folder
    late = base / "late_broken"
    late.mkdir()
    for i in range(30):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(late / f"{i:03d}.png")
    (late / "029.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    f["late_broken"] = late
    f["cuda"] = "cuda" if not torch.cuda.is_available() else "cuda:99"
    return {k: str(v) for k, v in f.items()}


# The cases. "{out}" is replaced by a fresh output folder (absent), "{out_file}" by a file, "{out_full}" by a
# folder with something in it.
CASES = [
    # ---- ddpm_mnist.py -----------------------------------------------------------------------------------------
    ("ddpm", ["--epochs", "-1"], "--epochs"),
    ("ddpm", ["--iters", "0"], "--iters"),
    ("ddpm", ["--batch-size", "0"], "--batch-size"),
    ("ddpm", ["--lr", "0"], "--lr"),
    ("ddpm", ["--warmup", "-5"], "--warmup"),
    ("ddpm", ["--ema-decay", "1"], "--ema-decay"),
    ("ddpm", ["--dropout", "1.5"], "--dropout"),
    ("ddpm", ["--timesteps", "1"], "--timesteps"),
    ("ddpm", ["--ch", "0"], "--ch"),
    ("ddpm", ["--ch-mult", "1", "0"], "--ch-mult"),
    ("ddpm", ["--num-res-blocks", "0"], "--num-res-blocks"),
    ("ddpm", ["--image-size", "4"], "--image-size"),
    ("ddpm", ["--limit", "0"], "--limit"),
    ("ddpm", ["--num-samples", "-3"], "--num-samples"),
    ("ddpm", ["--sample-batch-size", "0"], "--sample-batch-size"),
    ("ddpm", ["--grad-clip", "-1"], "--grad-clip"),
    ("ddpm", ["--sampler", "ddim", "--steps", "0"], "--steps"),
    ("ddpm", ["--sampler", "ddim", "--steps", "11"], "--steps"),
    ("ddpm", ["--steps", "5"], "DDPM takes all T steps"),
    ("ddpm", ["--sampler", "ddim", "--eta", "1.5"], "--eta"),
    ("ddpm", ["--sampler", "ddim", "--eta", "-0.1"], "--eta"),
    ("ddpm", ["--lam", "2"], "--lam"),
    ("ddpm", ["--fuse-t", "50"], "--fuse-t"),
    ("ddpm", ["--fuse-t", "8", "3"], "--fuse-t"),
    ("ddpm", ["--device", "tpu"], "--device"),
    ("ddpm", ["--device", "{cuda}"], "--device"),
    ("ddpm", ["--dataset", "folder", "--data-dir", "{out}_missing"], "is not a folder"),
    ("ddpm", ["--dataset", "folder", "--data-dir", "{empty}"], "no .png/.jpg/.jpeg"),
    ("ddpm", ["--resume"], "not found"),
    ("ddpm", ["--sample-only"], "not found"),
    ("ddpm", ["--resume", "--sample-only"], "exclude each other"),
    ("ddpm", ["--fid-stats", "{out}_typo.npz", "--inception", "{inception}"], "does not exist"),
    ("ddpm", ["--fid-stats", "{stats_nomu}", "--inception", "{inception}"], "no mu"),
    ("ddpm", ["--fid-stats", "{stats_object}", "--inception", "{inception}"], "cannot read"),
    ("ddpm", ["--fid-stats", "{stats_asym}", "--inception", "{inception}"], "not symmetric"),
    ("ddpm", ["--fid-stats", "{stats_nan}", "--inception", "{inception}"], "not finite"),
    ("ddpm", ["--fid-stats", "{stats_neg}", "--inception", "{inception}"], "negative eigenvalue"),
    ("ddpm", ["--fid-stats", "{stats_dim}", "--inception", "{inception}"], "8-dimensional"),
    ("ddpm", ["--fid-stats", "{stats_shape}", "--inception", "{inception}"], "shape"),
    ("ddpm", ["--fid-stats", "{npy}", "--inception", "{inception}"], "not an .npz archive"),
    ("ddpm", ["--inception", "{out}_weights.pth"], "does not exist"),
    ("ddpm", ["--inception", "{text}"], "--inception"),
    ("ddpm", ["--out", "{out_file}"], "is a file"),
    ("ddpm", ["--resume", "--ckpt", "{empty_file}"], "is not a checkpoint"),
    ("ddpm", ["--resume", "--ckpt", "{truncated}"], "is not a checkpoint"),
    ("ddpm", ["--resume", "--ckpt", "{text}"], "is not a checkpoint"),
    ("ddpm", ["--resume", "--ckpt", "{payload}"], "could run code"),
    ("ddpm", ["--resume", "--ckpt", "{ckpt_cfg_afhq}"], "cfg_afhq.py"),
    ("ddpm", ["--sample-only", "--ckpt", "{ckpt_gan_baseline}"], "gan_baseline.py"),
    ("ddpm", ["--sample-only", "--ckpt", "{ckpt_old}"], "older version"),
    ("ddpm", ["--fuse", "{text}"], "--fuse"),
    ("ddpm", ["--fuse", "{text}", "{out}_nothing.png", "--ckpt", "{ckpt_ddpm_mnist}"], "does not exist"),
    ("ddpm", ["--sample-only", "--ckpt", "{ckpt_ddpm_mnist}"], "older version"),
    ("ddpm", ["--dataset", "folder", "--data-dir", "{folder}", "--fid-ref-limit", "1"], "--fid-ref-limit"),
    # ---- cfg_afhq.py -------------------------------------------------------------------------------------------
    ("cfg", ["--data-dir", "{empty_class}", "--no-fid"], "dog"),
    ("cfg", ["--classes", "cat", "horse", "--no-fid"], "horse"),
    ("cfg", ["--classes", "cat", "cat", "--no-fid"], "twice"),
    ("cfg", ["--cfg-scales", "--no-fid"], "--cfg-scales"),
    ("cfg", ["--cfg-scales", "nan", "--no-fid"], "finite"),
    ("cfg", ["--cfg-scales", "-2", "--no-fid"], "below -1"),
    ("cfg", ["--cfg-scales", "loud", "--no-fid"], "invalid guidance_scale value"),
    ("cfg", ["--cfg-dropout", "1", "--no-fid"], "--cfg-dropout"),
    ("cfg", ["--cfg-dropout", "0", "--cfg-scales", "0", "7.5", "--no-fid"], "without label dropout"),
    ("cfg", ["--num-samples", "1", "--no-fid"], "leaves some of the 2 classes"),
    ("cfg", ["--classifier", "{out}_missing.pt2", "--no-fid"], "--classifier"),
    ("cfg", ["--classifier", "{text}", "--no-fid"], "not a torch.export program"),
    ("cfg", ["--fid-stats", "{out}_typo.npz", "--inception", "{inception}"], "does not exist"),
    ("cfg", ["--fid-stats", "{stats_asym}", "--inception", "{inception}"], "not symmetric"),
    ("cfg", ["--prepare-eval", "--inception", "{inception}"], "val"),
    ("cfg", ["--inception", "{inception}"], "--prepare-eval"),
    ("cfg", ["--steps", "4", "--no-fid"], "DDPM takes all T steps"),
    ("cfg", ["--sampler", "ddim", "--eta", "2", "--no-fid"], "--eta"),
    ("cfg", ["--device", "tpu", "--no-fid"], "--device"),
    ("cfg", ["--attn-levels", "5", "--no-fid"], "--attn-levels"),
    ("cfg", ["--max-per-class", "-1", "--no-fid"], "--max-per-class"),
    ("cfg", ["--handin-images", "-1", "--no-fid"], "--handin-images"),
    ("cfg", ["--out", "{out_file}", "--no-fid"], "is a file"),
    ("cfg", ["--resume", "--ckpt", "{ckpt_ddpm_mnist}", "--no-fid"], "ddpm_mnist.py"),
    ("cfg", ["--sample-only", "--ckpt", "{payload}", "--no-fid"], "could run code"),
    ("cfg", ["--data-dir", "{out}_missing", "--no-fid"], "is not a folder"),
    # ---- cond_iclevr.py ----------------------------------------------------------------------------------------
    ("iclevr", ["--classifier-guidance", "2"], "--evaluator-dir"),
    ("iclevr", ["--evaluator-dir", "{no_evaluator}"], "evaluator.py"),
    ("iclevr", ["--evaluator-dir", "{out}_missing"], "is not a folder"),
    ("iclevr", ["--eval-every", "1"], "--evaluator-dir"),
    ("iclevr", ["--guidance", "3", "--label-dropout", "0"], "--label-dropout"),
    ("iclevr", ["--guidance", "-1"], "--guidance"),
    ("iclevr", ["--label-dropout", "1"], "--label-dropout"),
    ("iclevr", ["--fid"], "accuracy, not by FID"),
    ("iclevr", ["--output-size", "4"], "--output-size"),
    ("iclevr", ["--process-labels", "pink cube"], "pink cube"),
    ("iclevr", ["--process-labels", "red cube", "red cube"], "repeats"),
    ("iclevr", ["--test-files", "missing.json"], "missing.json not found"),
    ("iclevr", ["--test-files", "test.json", "{iclevr}/test.json"], "two test files are named test.json"),
    ("iclevr", ["--objects", "{text}"], "not valid JSON"),
    ("iclevr", ["--objects", "{out}_objects.json"], "not found"),
    ("iclevr", ["--objects", "{iclevr}/test.json"], "distinct index"),
    ("iclevr", ["--eval-steps", "100"], "--eval-steps"),
    ("iclevr", ["--sampler", "ddim", "--eta", "1.2"], "--eta"),
    ("iclevr", ["--device", "tpu"], "--device"),
    ("iclevr", ["--limit", "0"], "--limit"),
    ("iclevr", ["--num-samples", "0"], "--num-samples"),
    ("iclevr", ["--resume", "--ckpt", "{ckpt_gan_baseline}"], "gan_baseline.py"),
    ("iclevr", ["--sample-only", "--ckpt", "{text}"], "is not a checkpoint"),
    ("iclevr", ["--out", "{out_file}"], "is a file"),
    ("iclevr", ["--data-dir", "{out}_missing"], "is not a folder"),
    # ---- ddim.py -----------------------------------------------------------------------------------------------
    ("ddim", ["--iters", "-1"], "--iters"),
    ("ddim", ["--steps", "0"], "--steps"),
    ("ddim", ["--sampler", "ddpm", "--steps", "10"], "DDPM takes all T steps"),
    ("ddim", ["--steps", "200"], "--timesteps"),
    ("ddim", ["--timesteps", "1"], "--timesteps"),
    ("ddim", ["--eta", "1.5"], "--eta"),
    ("ddim", ["--fourier", "20"], "--fourier"),
    ("ddim", ["--hidden", "0"], "--hidden"),
    ("ddim", ["--ckpt-every", "0"], "--ckpt-every"),
    ("ddim", ["--sample-only", "--out", "{out}"], "not found"),
    ("ddim", ["--data", "spiral"], "invalid choice"),
    ("ddim", ["--device", "tpu"], "--device"),
    ("ddim", ["--data-dir", "{out}_missing"], "is not a folder"),
    ("ddim", ["--ckpt", "{text}"], "is not a checkpoint"),
    ("ddim", ["--ckpt", "{ckpt_cfg_afhq}"], "neither a ddim.py nor a ddpm_mnist.py checkpoint"),
    ("ddim", ["--resume", "--out", "{out_ddpm_ckpt}"], "not a ddim.py checkpoint"),
    ("ddim", ["--out", "{out_file}"], "is a file"),
    # ---- gan_baseline.py ---------------------------------------------------------------------------------------
    ("gan", ["--epochs", "-1"], "--epochs"),
    ("gan", ["--dataset", "folder", "--data-dir", "{out}_missing"], "is not a folder"),
    ("gan", ["--dataset", "classes", "--data-dir", "{folder}"], "at least two sub-folders"),
    ("gan", ["--dataset", "folder", "--data-dir", "{folder}", "--image-size", "30"], "--image-size"),
    ("gan", ["--dataset", "iclevr", "--data-dir", "{iclevr}", "--evaluator-dir", "{no_evaluator}"], "no evaluator.py"),
    ("gan", ["--evaluator-dir", "{evaluator}"], "--dataset mnist"),
    ("gan", ["--resume"], "not found"),
    ("gan", ["--beta1", "1"], "--beta1"),
    ("gan", ["--mixing-prob", "2"], "--mixing-prob"),
    ("gan", ["--r1-gamma", "-1"], "--r1-gamma"),
    ("gan", ["--arch", "stylegan", "--w-dim", "0"], "--w-dim"),
    ("gan", ["--test-sets", "0"], "--test-sets"),
    ("gan", ["--n-dis", "0"], "--n-dis"),
    ("gan", ["--fid-stats", "{out}_typo.npz", "--inception", "{inception}"], "does not exist"),
    ("gan", ["--fid-stats", "{stats_neg}", "--inception", "{inception}"], "negative eigenvalue"),
    ("gan", ["--device", "tpu"], "--device"),
    ("gan", ["--resume", "--ckpt", "{ckpt_ddpm_mnist}"], "ddpm_mnist.py"),
    ("gan", ["--sample-only", "--ckpt", "{truncated}"], "is not a checkpoint"),
    ("gan", ["--out", "{out_file}"], "is a file"),
    ("gan", ["--arch", "vae"], "invalid choice"),
    # ---- fid.py ------------------------------------------------------------------------------------------------
    ("fid", ["{out}_missing", "{stats10k}"], "does not exist"),
    ("fid", ["{empty}", "{stats10k}"], "holds no .png"),
    ("fid", ["{late_broken}", "{stats10k}", "--inception", "{inception}", "--device", "cpu"], "029.png"),
    ("fid", ["{folder}", "{stats_asym}"], "not symmetric"),
    ("fid", ["{folder}", "{stats_neg}"], "negative eigenvalue"),
    ("fid", ["{folder}", "{stats_nan}"], "not finite"),
    ("fid", ["{folder}", "{stats_object}"], "cannot read"),
    ("fid", ["{folder}", "{stats_dim}"], "8-dimensional"),
    ("fid", ["{folder}"], "expected two inputs"),
    ("fid", ["{folder}", "{text}"], "neither a folder of images nor an .npz"),
    ("fid", ["--save-stats", "{folder}", "{out_file}/stats.npz", "--inception", "{inception}"], "cannot write"),
    ("fid", ["--save-stats", "{folder}", "{out}_stats.txt"], "must end in .npz"),
    ("fid", ["{folder}", "{folder}", "--limit", "0"], "--limit"),
    ("fid", ["{folder}", "{folder}", "--device", "tpu"], "unknown device"),
    ("fid", ["{folder}", "{folder}", "--inception", "{text}"], "cannot read Inception weights"),
]


def test_there_are_enough_cases():
    assert len(CASES) >= 100


@pytest.mark.parametrize("script, argv, says", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_stops_with_one_sentence_before_any_work(files, tmp_path, monkeypatch, script, argv, says):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    (tmp_path / "out_file").write_text("a file where a folder should be")
    names = {**files, "out": str(out), "out_file": str(tmp_path / "out_file")}
    if "{out_ddpm_ckpt}" in argv:  # ddim.py --resume in a folder that holds a ddpm_mnist.py checkpoint
        (tmp_path / "ddpm_run").mkdir()
        shutil.copy(files["ckpt_ddpm_mnist"], tmp_path / "ddpm_run" / "ckpt.pt")
        names["out_ddpm_ckpt"] = str(tmp_path / "ddpm_run")
    before = sorted(p.name for p in tmp_path.iterdir())
    tiny = [a.format(**names) for a in TINY[script]]
    args = [a.format(**names) for a in argv]
    if script != "fid" and "--out" not in args:
        args += ["--out", str(out)]
    module = SCRIPTS[script]
    calls = {"forward": 0}
    original_forward = fid.FIDInceptionV3.forward

    def counting_forward(self, x):  # no image may go through Inception before every input was checked
        calls["forward"] += 1
        return original_forward(self, x)
    monkeypatch.setattr(fid.FIDInceptionV3, "forward", counting_forward)
    err, stdout = io.StringIO(), io.StringIO()
    start = time.time()
    with pytest.raises(SystemExit) as e, redirect_stderr(err), redirect_stdout(stdout):
        module.main(tiny + args)
    seconds = time.time() - start
    code = e.value.code
    if isinstance(code, str):  # fid.py exits with its message, as sys.exit(message) does: status 1
        err.write(code + "\n")
        code = 1
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == (1 if script == "fid" else 2), (code, lines)
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert says in lines[0], lines[0]
    assert "Traceback" not in err.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "bad input wrote files"
    assert not out.exists()
    assert calls["forward"] == 0 and seconds < 60, (calls, seconds)
    assert "step 1/" not in stdout.getvalue()  # no training step was taken


@pytest.mark.parametrize("script", ["ddpm", "cfg", "iclevr", "ddim", "gan"])
def test_compile_without_a_cpp_compiler_stops_with_one_sentence(files, tmp_path, monkeypatch, script):
    """--compile on a CPU needs a C++ compiler (torch.compile builds C++ there): said before any work, not as the
    compiler's traceback at the first step."""
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    names = {**files, "out": str(tmp_path / "out")}
    err = io.StringIO()
    with pytest.raises(SystemExit) as e, redirect_stderr(err), redirect_stdout(io.StringIO()):
        SCRIPTS[script].main([a.format(**names) for a in TINY[script]] + ["--compile", "--out", str(tmp_path / "out")])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1, lines
    assert "--compile on a CPU needs a C++ compiler (no-such-c++-compiler)" in lines[0]
    assert not (tmp_path / "out").exists()


def test_compile_on_a_gpu_without_triton_is_named(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    for module in (ddpm_mnist, cfg_afhq, cond_iclevr, ddim, gan_baseline):
        args = argparse.Namespace(compile=True, device="cuda")
        assert "needs Triton" in module.compile_problem(args), module.__name__
        assert module.compile_problem(argparse.Namespace(compile=False, device="cuda")) is None
