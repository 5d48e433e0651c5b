"""The README's "What to hand in" blocks, each run at tiny settings on stand-in data, as a student's submission runs
them: each script copied with plumbing.py and fid.py into an empty folder and run there; every file a block names under
`# files:` must be written, JPEGs as JPEG, zips flat. The commands are the README's own, with the data folders
swapped for small ones here and tiny sizes appended (argparse takes the last value of a flag)."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "tests"))
from iclevr_fixtures import write_miniature_iclevr, write_stand_in_evaluator  # noqa: E402

TINY = {
    "ddpm_mnist.py": ["--iters", "2", "--limit", "32", "--batch-size", "16", "--ch", "8", "--timesteps", "8",
                      "--num-samples", "6", "--sample-batch-size", "6", "--no-fid", "--device", "cpu", "--image-size", "16"],
    "gan_baseline.py": ["--iters", "2", "--limit", "32", "--batch-size", "16", "--ch", "8", "--z-dim", "8",
                        "--w-dim", "8", "--mapping-layers", "1", "--num-samples", "6", "--stats-samples", "16",
                        "--no-fid", "--device", "cpu", "--image-size", "16", "--output-size", "64"],
    "ddim.py": ["--iters", "20", "--hidden", "16", "16", "16", "--emb-dim", "16", "--train-points", "1000",
                "--num-points", "64", "--device", "cpu"],
    "cfg_afhq.py": ["--iters", "2", "--ch", "8", "--ch-mult", "1", "2", "--num-res-blocks", "1", "--image-size", "16",
                    "--timesteps", "8", "--num-samples", "6", "--sample-batch-size", "6", "--batch-size", "8",
                    "--no-fid", "--device", "cpu", "--handin-images", "6"],
    "cond_iclevr.py": ["--iters", "2", "--ch", "8", "--ch-mult", "1", "1", "--num-res-blocks", "1", "--attn-res", "0",
                       "--image-size", "16", "--output-size", "64", "--timesteps", "8", "--schedule", "cosine",
                       "--batch-size", "8", "--device", "cpu"],
    "fid.py": [],
}


def handin_blocks():
    """[(title, [command lines], [files])] of the README's ```bash blocks that start with '# hand-in:'."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = body.strip().splitlines()
        if not lines[0].startswith("# hand-in:"):
            continue
        commands = [line for line in lines if line.startswith("python ")]
        files = next(line for line in lines if line.startswith("# files:")).split()[2:]
        blocks.append((lines[0][len("# hand-in:"):].strip(), commands, files))
    return blocks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("handin_data")
    rng = np.random.default_rng(0)
    faces = base / "faces"
    faces.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(faces / f"{i:02d}.png")
    pairs = base / "pairs"
    pairs.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(pairs / f"{i:02d}.jpg")
    afhq = base / "afhq"
    for split, n in (("train", 4), ("val", 2)):
        for k, name in enumerate(("cat", "dog", "wild")):
            (afhq / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (24, 24, 3)).astype(np.uint8)
                pixels[..., k] += 180
                Image.fromarray(pixels).save(afhq / split / name / f"{i}.jpg")
    iclevr = base / "file"  # the course's folder: data and evaluator side by side
    write_miniature_iclevr(iclevr, num_train=12, num_test=32, seed=0)
    write_stand_in_evaluator(iclevr)
    return {"anime_faces": faces, "cat_faces": faces, "cat_pairs": pairs, "afhq": afhq, "file": iclevr,
            "mnist.npz": SHARED / "fid-reference" / "mnist_train10k_stats.npz"}


BLOCKS = handin_blocks()


def test_the_readme_has_a_block_for_every_course():
    titles = " ".join(title for title, _, _ in BLOCKS)
    for course in ("NYCU MNIST", "NYCU IMVFX", "KAIST CS492(D) assignments 1-2", "classifier-free guidance", "SJTU",
                   "iCLEVR"):
        assert course in titles, course


@pytest.mark.parametrize("title, commands, files", BLOCKS, ids=[t.split(" (")[0] for t, _, _ in BLOCKS])
def test_a_handin_block_writes_its_files(tmp_path, data, title, commands, files):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "FID_INCEPTION_WEIGHTS": str(SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth")}
    for line in commands:
        words = shlex.split(line)
        script = words[1]
        args = [str(data.get(w, w)) for w in words[2:]]
        if script == "ddpm_mnist.py" and "--fuse-t" in args:  # the course's range [0, 100) within the tiny run's 8 steps
            i = args.index("--fuse-t")
            args[i + 1:i + 3] = ["0", "4"]
        extra = list(TINY[script])
        if script in ("ddpm_mnist.py", "gan_baseline.py") and "--data-dir" not in args:
            extra += ["--data-dir", str(SHARED / "data")]  # MNIST, offline
        # A student's submission: the script with plumbing.py and fid.py (ddim.py: and ddpm_mnist.py) in a folder
        # of their own, run there.
        for name in (script, "plumbing.py", "fid.py") + (("ddpm_mnist.py",) if script == "ddim.py" else ()):
            shutil.copy(ROOT / name, tmp_path / name)
        result = subprocess.run([sys.executable, script, *args, *extra], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (line, result.stderr[-3000:])
    for name in files:
        path = tmp_path / name
        assert path.is_file(), f"{title}: {name} was not written"
        if name.endswith((".jpg", ".jpeg")):
            with Image.open(path) as img:
                assert img.format == "JPEG" and img.mode == "RGB", name
        elif name.endswith(".png"):
            with Image.open(path) as img:
                assert img.format == "PNG", name
        elif name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
            assert names and all("/" not in n and n.endswith(".png") for n in names), name  # flat, PNGs
        elif name.endswith(".json"):
            json.loads(path.read_text())
