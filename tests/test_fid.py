"""Tests for fid.py: the network against pytorch-fid's own pool3 features, the distance against closed forms, the
.npz format, and the command line (its output and its one-sentence errors). CPU only; few images, since Inception
is slow on a CPU."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "pt_inception-2015-12-05-nofc.pth"
REFERENCE = SHARED / "fid-reference"

sys.path.insert(0, str(ROOT))
import fid  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return fid.load_inception(WEIGHTS, device="cpu")


def relative_error(features, expected):
    return np.abs(features - expected).max() / np.abs(expected).max()


def write_pngs(images_hwc, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(images_hwc):
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


class RecordingNet(torch.nn.Module):
    """Stands in for Inception: records each batch and whether TF32 was on, returns zero features."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches, self.tf32 = [], []

    def forward(self, images):
        self.batches.append(images.clone())
        self.tf32.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return torch.zeros(len(images), fid.FEATURE_DIM)


# --- the network ------------------------------------------------------------------------------------------------

def test_grey_digits_match_pytorch_fid(model):
    digits = np.load(REFERENCE / "mnist_test_first64_uint8.npy")[:8]
    expected = np.load(REFERENCE / "mnist_test_first64_pool3.npy")[:8]
    features = fid.compute_features(torch.from_numpy(digits)[:, None], model, batch_size=5)  # N×1×28×28
    assert features.dtype == np.float32 and features.shape == (8, fid.FEATURE_DIM)
    assert relative_error(features, expected) < 1e-5


def test_colour_png_folder_matches_pytorch_fid(model, tmp_path):
    images = np.load(REFERENCE / "color64_32_uint8.npy")[:8]  # N×64×64×3
    expected = np.load(REFERENCE / "color64_32_pool3.npy")[:8]
    write_pngs(images[:5], tmp_path / "a")
    write_pngs(images[5:], tmp_path / "a" / "zz_sub")  # sorted by path: the subfolder comes after 004.png
    features = fid.compute_features(tmp_path / "a", model)
    assert features.shape == (8, fid.FEATURE_DIM)
    assert relative_error(features, expected) < 1e-5


def test_state_dict_keys_match_weights_file(model):
    file_keys = set(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    model_keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert model_keys == file_keys
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_weights_with_fc_keys_from_env_var(tmp_path, monkeypatch):
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # as in pytorch-fid's file
    torch.save(state, tmp_path / "with_fc.pth")
    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(tmp_path / "with_fc.pth"))
    loaded = fid.load_inception(device="cpu").state_dict()
    assert torch.equal(loaded["Mixed_7c.branch_pool.conv.weight"], state["Mixed_7c.branch_pool.conv.weight"])


def test_bad_weights_are_one_sentence(tmp_path, monkeypatch):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    for path in [tmp_path / "other.pth", tmp_path / "missing.pth"]:
        with pytest.raises(fid.FIDError) as error:
            fid.load_inception(path, device="cpu")
        assert str(path) in str(error.value) and "\n" not in str(error.value)

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(fid.FIDError) as error:
        fid.load_inception(device="cpu")
    message = str(error.value)
    assert fid.FID_WEIGHTS_URL in message and "--inception" in message and "FID_INCEPTION_WEIGHTS" in message


# --- images in, features out ------------------------------------------------------------------------------------

def test_batches_are_uint8_and_tf32_is_off_then_restored():
    net = RecordingNet()
    images = torch.randint(0, 256, (7, 3, 5, 5), dtype=torch.uint8)
    torch.backends.cudnn.allow_tf32, saved = True, torch.backends.cudnn.allow_tf32
    try:
        features = fid.compute_features(images, net, batch_size=3)
        assert torch.backends.cudnn.allow_tf32  # the caller's setting is back
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    assert features.shape == (7, fid.FEATURE_DIM) and features.dtype == np.float32
    assert [len(b) for b in net.batches] == [3, 3, 1] and torch.equal(torch.cat(net.batches), images)
    assert net.tf32 == [(False, False)] * 3


def test_grey_png_is_read_as_rgb(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    net = RecordingNet()
    fid.compute_features(tmp_path, net)
    assert torch.equal(net.batches[0][0], torch.from_numpy(grey).expand(3, -1, -1))


def test_compute_statistics_is_float64_mean_and_cov(monkeypatch):
    features = np.random.default_rng(0).standard_normal((40, fid.FEATURE_DIM)).astype(np.float32)
    monkeypatch.setattr(fid, "compute_features", lambda *args: features)
    mu, sigma = fid.compute_statistics(None)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_array_equal(mu, features.astype(np.float64).mean(axis=0))
    np.testing.assert_array_equal(sigma, np.cov(features.astype(np.float64), rowvar=False))
    monkeypatch.setattr(fid, "compute_features", lambda *args: features[:1])
    with pytest.raises(fid.FIDError, match="at least 2 images"):
        fid.compute_statistics(None)


def test_float_images_are_refused_with_the_quantisation():
    with pytest.raises(fid.FIDError, match="uint8"):
        fid.compute_features(torch.rand(2, 3, 8, 8), RecordingNet())
    with pytest.raises(fid.FIDError, match="C = 1 or 3"):
        fid.compute_features(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), RecordingNet())


def test_image_files_are_recursive_sorted_and_case_insensitive(tmp_path):
    for name in ["b.JPG", "a.png", "sub/c.jpeg", "sub/deeper/d.PNG", "notes.txt", "e.gif"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in fid.image_files(tmp_path)]
    assert found == ["a.png", "b.JPG", "sub/c.jpeg", "sub/deeper/d.PNG"]


# --- the Fréchet distance ---------------------------------------------------------------------------------------

def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(32), random_spd(rng, 32)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = fid.frechet_distance(mu1.astype(np.float32), np.diag(a), mu2, np.diag(b))
    assert isinstance(value, float) and value == pytest.approx(expected, rel=1e-6)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_commuting_covariances_closed_form():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((24, 24)))  # a random orthogonal eigenbasis shared by both
    a, b = rng.uniform(0.1, 3, 24), rng.uniform(0.1, 3, 24)
    mu1, mu2 = rng.standard_normal(24), rng.standard_normal(24)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert value == pytest.approx(expected, rel=1e-9)


def test_non_finite_sqrtm_retries_with_eps(monkeypatch, capsys):
    rng = np.random.default_rng(9)
    sigma1, sigma2, mu = random_spd(rng, 6), random_spd(rng, 6), np.zeros(6)
    expected = fid.frechet_distance(mu, sigma1, mu, sigma2)
    sqrtm, calls = scipy.linalg.sqrtm, []

    def first_call_fails(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else sqrtm(matrix)
    monkeypatch.setattr(scipy.linalg, "sqrtm", first_call_fails)
    value = fid.frechet_distance(mu, sigma1, mu, sigma2, eps=1e-6)
    assert len(calls) == 2 and "adding 1e-06" in capsys.readouterr().err
    np.testing.assert_allclose(calls[1], (sigma1 + 1e-6 * np.eye(6)) @ (sigma2 + 1e-6 * np.eye(6)), rtol=1e-12)
    assert value == pytest.approx(expected, abs=1e-4) and value != expected


def test_imaginary_part_is_dropped_when_small_and_refused_when_large(monkeypatch):
    rng = np.random.default_rng(4)
    sigma1, sigma2, mu = random_spd(rng, 5), random_spd(rng, 5), np.zeros(5)
    expected = fid.frechet_distance(mu, sigma1, mu, sigma2)
    sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: sqrtm(m) + 1e-4j * np.eye(len(m)))
    assert fid.frechet_distance(mu, sigma1, mu, sigma2) == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: sqrtm(m) + 1e-2j * np.eye(len(m)))
    with pytest.raises(fid.FIDError, match="imaginary"):
        fid.frechet_distance(mu, sigma1, mu, sigma2)


def test_mismatched_dimensions_raise():
    with pytest.raises(fid.FIDError, match="different dimensions"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- statistics files -------------------------------------------------------------------------------------------

def test_statistics_round_trip_in_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.standard_normal(2048), rng.standard_normal((2048, 2048))
    fid.save_statistics(tmp_path / "sub" / "ours.npz", mu, sigma)
    with np.load(tmp_path / "sub" / "ours.npz") as data:  # what pytorch-fid reads
        assert sorted(data.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(data["mu"], mu)
        np.testing.assert_array_equal(data["sigma"], sigma)
    loaded_mu, loaded_sigma = fid.load_statistics(tmp_path / "sub" / "ours.npz")
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    np.savez(tmp_path / "theirs.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))  # pytorch-fid's
    assert fid.load_statistics(tmp_path / "theirs.npz")[0].dtype == np.float64


@pytest.mark.parametrize("arrays, says", [
    (None, "FileNotFoundError"),
    ({"sigma": np.eye(2048)}, "no mu"),
    ({"mu": np.zeros(8), "sigma": np.eye(8)}, "shape (8,)"),
    ({"mu": np.zeros(2048), "sigma": np.zeros(2048)}, "sigma of shape (2048,)"),
])
def test_bad_statistics_files_are_refused(tmp_path, arrays, says):
    path = tmp_path / "stats.npz"
    if arrays is not None:
        np.savez(path, **arrays)
    with pytest.raises(fid.FIDError) as error:
        fid.load_statistics(path)
    assert says in str(error.value) and str(path) in str(error.value)


# --- command line -----------------------------------------------------------------------------------------------

def test_cli_two_folders_and_a_statistics_file(tmp_path, monkeypatch, capsys):
    # Each folder holds two copies of one reference image, so both covariances are exactly zero and
    # FID = ‖f(x) − f(y)‖², with f(x), f(y) pytorch-fid's stored features. The square root of the zero matrix is
    # zero; stubbing sqrtm with that saves the seconds SciPy takes on a 2048 × 2048 matrix.
    images = np.load(REFERENCE / "color64_32_uint8.npy")
    expected = np.load(REFERENCE / "color64_32_pool3.npy").astype(np.float64)
    write_pngs(images[[0, 0]], tmp_path / "a")
    write_pngs(images[[1, 1]], tmp_path / "b" / "sub")

    def sqrtm_of_zero(matrix):
        assert not matrix.any()
        return np.zeros_like(matrix)
    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_of_zero)
    monkeypatch.chdir(tmp_path)
    fid.main(["a", "b", "--inception", str(WEIGHTS), "--device", "cpu"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("FID: ") and line.endswith("between a (N = 2 images) and b (N = 2 images)")
    assert float(line.split()[1]) == pytest.approx(np.sum((expected[0] - expected[1]) ** 2), rel=1e-4)

    fid.save_statistics("ref.npz", expected[1], np.zeros((2048, 2048)))
    write_pngs(images[[2, 2, 5]], tmp_path / "c")  # --limit 2 takes the two copies
    fid.main(["ref.npz", "c", "--limit", "2", "--inception", str(WEIGHTS), "--device", "cpu", "--batch-size", "1"])
    line = capsys.readouterr().out.strip()
    assert line.endswith("between ref.npz (statistics file) and c (N = 2 images)")
    assert float(line.split()[1]) == pytest.approx(np.sum((expected[1] - expected[2]) ** 2), rel=1e-4)


def test_cli_save_stats(tmp_path, capsys):
    images = np.load(REFERENCE / "color64_32_uint8.npy")[:3]
    write_pngs(images, tmp_path / "colour")
    fid.main(["--save-stats", str(tmp_path / "colour"), str(tmp_path / "colour.npz"), "--limit", "2",
              "--inception", str(WEIGHTS), "--device", "cpu"])
    assert "statistics of 2 images written to" in capsys.readouterr().out
    mu, sigma = fid.load_statistics(tmp_path / "colour.npz")
    expected = np.load(REFERENCE / "color64_32_pool3.npy")[:2].astype(np.float64)
    np.testing.assert_allclose(mu, expected.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(expected, rowvar=False), rtol=1e-3, atol=1e-5)


def test_cli_mnist_stats_takes_the_first_training_digits(tmp_path, monkeypatch, capsys):
    seen = []

    def recording_statistics(source, model, batch_size):
        seen.append(source)
        return np.full(2048, 0.5), np.eye(2048)
    monkeypatch.setattr(fid, "compute_statistics", recording_statistics)
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: None)
    fid.main(["--mnist-stats", str(tmp_path / "mnist.npz"), "--data-dir", str(SHARED / "data"), "--limit", "3"])
    assert "statistics of 3 images written to" in capsys.readouterr().out
    digits = np.frombuffer((SHARED / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()[16:],
                           dtype=np.uint8).reshape(-1, 1, 28, 28)
    assert seen[0].dtype == torch.uint8 and torch.equal(seen[0], torch.from_numpy(digits[:3].copy()))
    assert fid.load_statistics(tmp_path / "mnist.npz")[0][0] == 0.5


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    rng = np.random.default_rng(8)
    write_pngs(rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8), tmp_path / "corrupt")
    (tmp_path / "corrupt" / "zz_bad.jpg").write_bytes(b"\xff\xd8 truncated")
    write_pngs(rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8), tmp_path / "mixed")
    write_pngs(rng.integers(0, 256, (1, 20, 20, 3), dtype=np.uint8), tmp_path / "mixed" / "sub")
    np.savez(tmp_path / "no_mu.npz", sigma=np.eye(3))
    np.savez(tmp_path / "d3.npz", mu=np.zeros(3), sigma=np.eye(3))
    fid.save_statistics(tmp_path / "ok.npz", np.zeros(2048), np.eye(2048))
    return tmp_path


@pytest.mark.parametrize("args, says", [
    (["empty", "ok.npz"], "empty is not a folder"),
    (["missing_folder", "ok.npz"], "missing_folder is not a folder"),
    (["corrupt", "ok.npz"], "zz_bad.jpg"),
    (["mixed", "ok.npz"], "differ in size"),
    (["no_mu.npz", "ok.npz"], "no_mu.npz has no mu"),
    (["ok.npz", "d3.npz"], "d3.npz holds mu of shape (3,)"),
    (["ok.npz"], "two inputs"),
    (["ok.npz", "ok.npz", "--limit", "0"], "--limit"),
    (["ok.npz", "ok.npz", "--device", "tpu"], "--device"),
    (["ok.npz", "ok.npz", "--bogus"], "--bogus"),
    (["ok.npz", "corrupt", "--inception", "nope.pth"], "nope.pth"),
    (["--save-stats", "empty", "out.npz"], "empty is not a folder"),
    (["--save-stats", "corrupt", "out.npz", "--mnist-stats", "m.npz"], "one of"),
])
def test_cli_bad_input_is_one_sentence_and_exit_2(bad_inputs, monkeypatch, capsys, args, says):
    monkeypatch.chdir(bad_inputs)
    with pytest.raises(SystemExit) as exit_:
        fid.main(["--inception", str(WEIGHTS), "--device", "cpu", *args])  # a flag in args comes last and wins
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and says in err
    assert not (bad_inputs / "out.npz").exists()


def test_cli_error_in_a_real_process(tmp_path):
    np.savez(tmp_path / "only_sigma.npz", sigma=np.eye(3))
    result = subprocess.run([sys.executable, str(ROOT / "fid.py"), "only_sigma.npz", "only_sigma.npz"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "only_sigma.npz has no mu" in result.stderr
