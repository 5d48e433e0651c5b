"""Tests for fid.py: the network against pytorch-fid's own features, the distance against closed
forms, the .npz format, and the command line (output and one-sentence errors). CPU only."""

import math
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth"
REFERENCE = SHARED / "fid-reference"

sys.path.insert(0, str(ROOT))
import fid  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return fid.load_inception(WEIGHTS, device="cpu")


def random_images(rng, n, size, folder, ext=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}{ext}")


# --- the network ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, to_nchw", [
    ("mnist_test_first64", lambda a: a[:, None].repeat(3, axis=1)),   # N×28×28 gray → RGB
    ("color64_32", lambda a: a.transpose(0, 3, 1, 2)),                 # N×H×W×C → N×C×H×W
])
def test_features_match_pytorch_fid(model, name, to_nchw):
    images = torch.from_numpy(to_nchw(np.load(REFERENCE / f"{name}_uint8.npy")))
    expected = np.load(REFERENCE / f"{name}_pool3.npy")
    features = fid.compute_features(images, model, batch_size=64, progress=False)
    # Relative error = max |ours − reference| / max |reference|.
    assert features.shape == expected.shape
    assert np.abs(features - expected).max() / np.abs(expected).max() < 1e-5


def test_state_dict_keys_match_weights_file(model):
    file_keys = set(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    model_keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert model_keys == file_keys


def test_weights_with_fc_and_from_env_var(tmp_path, monkeypatch):
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / "with_fc.pth")
    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(tmp_path / "with_fc.pth"))
    loaded = fid.load_inception(device="cpu").state_dict()
    assert torch.equal(loaded["Mixed_7c.branch_pool.conv.weight"],
                       state["Mixed_7c.branch_pool.conv.weight"])


def test_offline_without_weights_names_flag_env_and_url(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(fid.FIDError) as error:
        fid.load_inception(device="cpu")
    message = str(error.value)
    assert "--inception" in message and "FID_INCEPTION_WEIGHTS" in message
    assert fid.FID_WEIGHTS_URL in message and "\n" not in message


def test_every_source_gives_the_same_features(model, tmp_path):
    rng = np.random.default_rng(0)
    random_images(rng, 2, 20, tmp_path / "imgs")
    uint8 = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
                         for p in sorted((tmp_path / "imgs").iterdir())])
    minus_one_to_one = uint8.float() / 127.5 - 1
    from_folder = fid.compute_features(tmp_path / "imgs", model, progress=False)
    from_uint8 = fid.compute_features(uint8, model, progress=False)
    from_float = fid.compute_features(minus_one_to_one, model, progress=False,
                                      value_range=(-1, 1))
    from_batches = fid.compute_features(iter([uint8[:1], uint8[1:]]), model, progress=False)
    np.testing.assert_array_equal(from_folder, from_uint8)
    np.testing.assert_array_equal(from_float, from_uint8)
    np.testing.assert_allclose(from_batches, from_uint8, rtol=1e-5, atol=1e-6)


# --- preprocessing ----------------------------------------------------------------------------

def test_quantisation_matches_png_writer():
    x = torch.tensor([0.0, 0.5 / 255, 0.49 / 255, 1.0, 1.2, -0.1, 0.5])
    expected = (x.clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8)
    assert torch.equal(fid.to_uint8(x), expected)
    assert torch.equal(fid.to_uint8(x * 2 - 1, value_range=(-1, 1)), expected)
    u = torch.arange(256, dtype=torch.uint8)
    assert fid.to_uint8(u) is u
    assert torch.equal(fid.to_uint8(u.float() / 255), u)  # ToTensor's output round-trips
    with pytest.raises(fid.FIDError, match="value_range"):
        fid.to_uint8(torch.linspace(-1, 1, 10))  # [-1, 1] images passed as (0, 1)


def test_list_images_is_recursive_and_case_insensitive(tmp_path):
    for name in ["a.png", "b.JPG", "sub/c.jpeg", "sub/deeper/d.PNG", "notes.txt", "e.gif"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in fid.list_images(tmp_path)]
    assert found == ["a.png", "b.JPG", "sub/c.jpeg", "sub/deeper/d.PNG"]


# --- the Fréchet distance ---------------------------------------------------------------------

def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(32), random_spd(rng, 32)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected,
                                                                                    rel=1e-9)


def test_commuting_covariances_closed_form():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((24, 24)))  # random orthogonal eigenbasis
    a, b = rng.uniform(0.1, 3, 24), rng.uniform(0.1, 3, 24)
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.standard_normal(24), rng.standard_normal(24)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    assert fid.trace_sqrt_product(sigma1, sigma2) == pytest.approx(np.sqrt(a * b).sum(), rel=1e-9)


def test_failed_sqrtm_warns_and_falls_back(monkeypatch):
    # Singular covariances from 5 samples in 12 dimensions; sqrtm is made to fail the way it does
    # on real small-sample 2048-d statistics (a clearly complex diagonal), where pytorch-fid raises.
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((5, 12)), rng.standard_normal((5, 12)) + 1
    (mu1, sigma1), (mu2, sigma2) = fid.statistics_from_features(x), fid.statistics_from_features(y)
    expected = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    monkeypatch.setattr(fid, "_sqrtm", lambda m: m + 1j * np.eye(len(m)))
    with pytest.warns(fid.FIDWarning, match="singular"):
        value = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert math.isfinite(value) and value == pytest.approx(expected, rel=1e-6)


def test_non_finite_sqrtm_retries_with_eps(monkeypatch):
    rng = np.random.default_rng(9)
    sigma1, sigma2, mu = random_spd(rng, 6), random_spd(rng, 6), np.zeros(6)
    expected = fid.frechet_distance(mu, sigma1, mu, sigma2)
    calls = []

    def first_call_fails(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else fid.scipy.linalg.sqrtm(matrix)
    monkeypatch.setattr(fid, "_sqrtm", first_call_fails)
    with pytest.warns(fid.FIDWarning, match="not finite"):
        value = fid.frechet_distance(mu, sigma1, mu, sigma2, eps=1e-6)
    np.testing.assert_allclose(calls[1], (sigma1 + 1e-6 * np.eye(6)) @ (sigma2 + 1e-6 * np.eye(6)))
    assert value == pytest.approx(expected, abs=1e-4)


def test_mismatched_dimensions_raise():
    with pytest.raises(fid.FIDError, match="different dimensions"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- statistics files -------------------------------------------------------------------------

def test_npz_round_trip_and_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.standard_normal(8), random_spd(rng, 8)
    fid.save_statistics(tmp_path / "ours.npz", mu, sigma)
    loaded_mu, loaded_sigma = fid.load_statistics(tmp_path / "ours.npz")
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    with np.load(tmp_path / "ours.npz") as data:  # what pytorch-fid reads
        assert sorted(data.files) == ["mu", "sigma"]
    np.savez(tmp_path / "theirs.npz", mu=mu.astype(np.float32), sigma=sigma)  # pytorch-fid writes
    np.testing.assert_allclose(fid.load_statistics(tmp_path / "theirs.npz")[0], mu, rtol=1e-6)
    np.savez(tmp_path / "no_mu.npz", sigma=sigma)
    with pytest.raises(fid.FIDError, match="no mu"):
        fid.load_statistics(tmp_path / "no_mu.npz")


# --- command line -----------------------------------------------------------------------------

def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "fid.py"), *map(str, args),
                           "--inception", str(WEIGHTS), "--device", "cpu"],
                          cwd=cwd, capture_output=True, text=True, timeout=900)


def test_cli_two_folders(model, tmp_path, monkeypatch, capsys):
    # Each folder holds two identical copies of one image, so both covariances are exactly zero
    # and FID = ‖f(x) − f(y)‖². That lets this test replace SciPy's sqrtm, which takes from 20 s to
    # minutes on a 2048×2048 matrix on 2 shared cores, by its exact value on the zero matrix;
    # sqrtm itself is tested against closed forms above.
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    y = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    Image.fromarray(x).save(tmp_path / "a" / "x.png")
    shutil.copy(tmp_path / "a" / "x.png", tmp_path / "a" / "sub" / "x_copy.PNG")
    Image.fromarray(y).save(tmp_path / "b" / "y.jpg")
    shutil.copy(tmp_path / "b" / "y.jpg", tmp_path / "b" / "y_copy.jpeg")

    def sqrtm_of_zero(matrix):
        assert not matrix.any()
        return np.zeros_like(matrix)
    monkeypatch.setattr(fid, "_sqrtm", sqrtm_of_zero)
    monkeypatch.chdir(tmp_path)
    fid.main(["a", "b", "--inception", str(WEIGHTS), "--device", "cpu"])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert "A: 2 images in a" in lines and "B: 2 images in b" in lines
    assert lines[-1].startswith("FID: ")
    f_x = fid.compute_features(tmp_path / "a" / "sub", model, progress=False)[0]
    f_y = fid.compute_features(tmp_path / "b", model, progress=False)[0]
    expected = np.sum((f_x.astype(np.float64) - f_y) ** 2)
    assert float(lines[-1].split()[1]) == pytest.approx(expected, abs=1e-4)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "biased" in warnings[0] and "singular" in warnings[0]


def test_cli_error_is_one_line_without_traceback(tmp_path):
    np.savez(tmp_path / "only_sigma.npz", sigma=np.eye(3))
    result = run_cli("only_sigma.npz", "only_sigma.npz", cwd=tmp_path)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "only_sigma.npz has no mu" in result.stderr


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    random_images(np.random.default_rng(8), 2, 16, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "zz_bad.jpg").write_bytes(b"\xff\xd8 truncated")
    np.savez(tmp_path / "no_mu.npz", sigma=np.eye(3))
    np.savez(tmp_path / "d3.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / "d4.npz", mu=np.zeros(4), sigma=np.eye(4))
    return tmp_path


@pytest.mark.parametrize("args, says", [
    (["empty", "d3.npz"], "no .png"),
    (["missing_folder", "d3.npz"], "does not exist"),
    (["corrupt", "corrupt"], "zz_bad.jpg"),
    (["corrupt", "corrupt", "--num-workers", "1"], "zz_bad.jpg"),  # raised inside a worker
    (["no_mu.npz", "d3.npz"], "no mu"),
    (["d3.npz", "d4.npz"], "different dimensions"),
    (["corrupt", "d3.npz"], "3-dimensional"),
    (["--save-stats", "empty", "out.npz"], "no .png"),
])
def test_cli_bad_input_one_sentence(bad_inputs, monkeypatch, args, says):
    monkeypatch.chdir(bad_inputs)
    with pytest.raises(SystemExit) as exit_:
        fid.main([*args, "--inception", str(WEIGHTS), "--device", "cpu"])
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: ")  # non-zero exit
    assert says in message and "\n" not in message


def test_cli_mnist_stats(tmp_path):
    fid.main(["--mnist-stats", str(tmp_path / "mnist.npz"), "--data-dir", str(SHARED / "data"),
              "--limit", "2", "--inception", str(WEIGHTS), "--device", "cpu"])
    mu, sigma = fid.load_statistics(tmp_path / "mnist.npz")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert np.isfinite(sigma).all() and np.allclose(sigma, sigma.T)


def test_statistics_that_are_not_a_covariance_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6))
    good = np.cov(a, rowvar=False)
    for name, mu, sigma, says in [("asym", np.zeros(6), good + np.triu(np.ones((6, 6)), 1), "not symmetric"),
                                  ("neg", np.zeros(6), -good, "negative eigenvalue"),
                                  ("inf", np.full(6, np.inf), good, "not finite")]:
        path = tmp_path / f"{name}.npz"
        with open(path, "wb") as fh:
            np.savez(fh, mu=mu, sigma=sigma)
        with pytest.raises(fid.FIDError, match=says):
            fid.load_statistics(path)


def test_the_distance_is_never_negative_or_nan():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(3000, 64))
    mu, sigma = fid.statistics_from_features(features)
    value = fid.frechet_distance(mu, sigma, mu, sigma)  # exactly 0 in exact arithmetic: rounding may go below
    assert value == 0.0 or 0 < value < 1e-6
    with pytest.raises(fid.FIDError):
        fid.frechet_distance(mu, sigma * np.nan, mu, sigma)
