"""The pieces every script shares, tested once on ddpm_mnist.py's copies (test_shared_pieces.py keeps the other
copies identical): samplers at their edges, the EMA's warm-up, the 8-bit loader, consistent outputs, checkpoints
that refuse to be anything but data."""
import io
import math
import os
import pickle
import signal
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cfg_afhq  # noqa: E402
import cond_iclevr  # noqa: E402 (the script: benchmarks/ has one of the same name)
import ddim  # noqa: E402
import ddpm_mnist as dm  # noqa: E402
import fid  # noqa: E402


# --- samplers at the edges ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [2, 20, 1000])
def test_one_step_goes_from_the_last_step_to_the_clean_image(T):
    assert dm.sampling_timesteps(T, 1) == [T - 1]
    assert ddim.quadratic_timesteps(T, 1) == [T - 1]
    sched = dm.NoiseSchedule(dm.make_betas("linear", T))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 1, 5, 5, generator=g, dtype=torch.float64)  # float64: abar_{T-1} is tiny for short chains
    x_T = dm.q_sample(sched, x0, T - 1, eps)
    # With the exact noise as the prediction, the one DDIM step lands on the clean image itself.
    out = dm.sample(lambda x, t: eps, sched, x_T, dm.sampling_timesteps(T, 1), "ddim", 0.0, g, clip=False)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x_T, x0, atol=1e-2)  # and it started from something else


def test_the_course_ddim_steps_count_down_by_t_over_s():
    steps = ddim.course_timesteps(1000, 50)
    assert steps == list(range(0, 1000, 20)) and steps[-1] == 980 and len(steps) == 50
    assert ddim.course_timesteps(1000, 1000) == list(range(1000))


def test_eta_between_0_and_1_keeps_the_marginal_variance():
    """DDIM's x_t' has variance abar_t' var(x0_hat) + (1 - abar_t' - sigma^2) + sigma^2 = the forward process's for
    any eta in [0, 1]; with eta above 1 the direction term would need a negative variance (refused by every script)."""
    sched = dm.NoiseSchedule(dm.make_betas("linear", 1000))
    for eta in (0.0, 0.5, 1.0):
        for t, t_prev in ((999, 979), (500, 480), (20, 0)):
            a_t, a_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t_prev]
            sigma2 = eta ** 2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            assert 0 <= sigma2 <= 1 - a_prev + 1e-12
    with pytest.raises(SystemExit):
        dm.parse_args(["--sampler", "ddim", "--eta", "1.01"])


# --- the EMA warms up ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [dm, cfg_afhq, cond_iclevr], ids=lambda m: m.__name__)
def test_sampling_is_bf16_only_on_a_gpu_and_not_with_fp32_sampling(module):
    default, fp32 = module.build_parser().parse_args([]), module.build_parser().parse_args(["--fp32-sampling"])
    assert module.sample_in_bf16(default, torch.device("cuda"))
    assert not module.sample_in_bf16(fp32, torch.device("cuda"))
    assert not module.sample_in_bf16(default, torch.device("cpu"))


def test_ddims_image_mode_takes_fp32_sampling_through_ddpm_mnists_switch():
    default, fp32 = ddim.build_parser().parse_args([]), ddim.build_parser().parse_args(["--fp32-sampling"])
    assert dm.sample_in_bf16(default, torch.device("cuda")) and not dm.sample_in_bf16(fp32, torch.device("cuda"))


def test_bf16_sampling_rounds_the_models_noise_and_float32_does_not():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 1, 3, padding=1))
    model = lambda x, t: net(x)  # noqa: E731 (eps_fn's model takes x and t)
    x, t = torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        exact = net(x)
        in_fp32, in_bf16 = dm.make_eps_fn(model, bf16=False)(x, t), dm.make_eps_fn(model, bf16=True)(x, t)
    assert in_fp32.dtype == in_bf16.dtype == torch.float32
    assert torch.equal(in_fp32, exact)
    assert not torch.equal(in_bf16, exact)  # autocast engaged: bf16 keeps 8 bits of mantissa
    torch.testing.assert_close(in_bf16, exact, rtol=0.05, atol=0.05)


def test_ema_decay_warms_up_and_is_saved_with_the_run():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = dm.make_ema(model, 0.999)
    values = []
    for n in range(1, 101):
        with torch.no_grad():
            model.weight.fill_(float(n))
        before = ema.module.weight.item()
        ema.update_parameters(model)
        d = min(0.999, (1 + n) / (10 + n))
        assert ema.decay_now() == pytest.approx(d)
        assert ema.module.weight.item() == pytest.approx(d * before + (1 - d) * n, rel=1e-6)
        values.append(ema.module.weight.item())
    # Without the warm-up (decay 0.999 from the start) the average of the weights 1, 2, ..., 100 would still be
    # below 6; with it, it follows them, about ten updates behind.
    no_warmup = 0.0
    for n in range(1, 101):
        no_warmup = 0.999 * no_warmup + 0.001 * n
    assert no_warmup < 6 and values[-1] > 85 and ema.updates == 100
    assert dm.make_ema(model, 0.0).decay_now() == 0.0  # decay 0: no averaging at all


# --- one loader for every image mode --------------------------------------------------------------------------
def test_a_16_bit_gradient_loads_as_8_bit_levels(tmp_path):
    ramp = (np.arange(256 * 16, dtype=np.uint32).reshape(16, 256) * 16).astype(np.uint16)  # 0 ... 65520
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # PIL opens it as 16/32-bit grey
        naive = np.asarray(img.convert("RGB"))
        mine = np.asarray(dm.to_rgb8(img))
    assert (naive == 255).mean() > 0.9  # what PIL's convert does: almost everything white
    expected = np.round(ramp / 65535 * 255).astype(np.uint8)
    assert np.array_equal(mine[..., 0], expected) and np.array_equal(mine[..., 1], mine[..., 2])
    assert mine.min() == 0 and mine.max() >= 254 and len(np.unique(mine)) > 200
    tensor = dm.load_image(str(path), 16)
    assert tensor.dtype == torch.uint8 and tensor.float().mean() == pytest.approx(127.5, abs=3)
    # fid.py reads the same pixels
    features_input = fid.ImageFiles([path])[0][0]
    assert np.array_equal(features_input.permute(1, 2, 0).numpy(), mine)


@pytest.mark.parametrize("mode", ["P", "RGBA", "CMYK", "LA", "1", "L"])
def test_other_modes_become_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    img = rgb.convert(mode)
    out = dm.to_rgb8(img)
    assert out.mode == "RGB" and out.size == (12, 12)
    assert np.array_equal(np.asarray(out), np.asarray(img.convert("RGB")))


# --- outputs are one run's complete set ---------------------------------------------------------------------------
def test_a_smaller_set_replaces_a_larger_one_whole(tmp_path):
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    folder, zip_path = tmp_path / "samples", tmp_path / "samples.zip"
    dm.save_samples(images, str(folder), str(zip_path))
    dm.save_samples(images[:4], str(folder), str(zip_path))
    assert sorted(os.listdir(folder)) == [f"{i:05d}.png" for i in range(1, 5)]
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == [f"{i:05d}.png" for i in range(1, 5)]
    assert sorted(os.listdir(tmp_path)) == ["samples", "samples.zip"]  # no temporary files left


def test_an_interrupted_write_leaves_the_old_set_and_no_temporary_files(tmp_path, monkeypatch):
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    folder, zip_path = tmp_path / "samples", tmp_path / "samples.zip"
    dm.save_samples(images, str(folder), str(zip_path))
    old_zip = zip_path.read_bytes()
    calls = {"n": 0}
    original = zipfile.ZipFile.write

    def interrupt(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C while the zip is being written
        return original(self, *a, **k)
    monkeypatch.setattr(zipfile.ZipFile, "write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        dm.save_samples(images[:3] // 2, str(folder), str(zip_path))
    assert zip_path.read_bytes() == old_zip and len(os.listdir(folder)) == 6
    assert sorted(os.listdir(tmp_path)) == ["samples", "samples.zip"]


def test_a_failed_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise KeyboardInterrupt  # the second Ctrl-C, in the middle of the write
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        dm.save_checkpoint(str(path), {"x": 1})
    assert os.listdir(tmp_path) == []


# --- a checkpoint is data -----------------------------------------------------------------------------------------
class Payload:
    def __reduce__(self):
        return (os.system, ("echo this would run",))


@pytest.mark.parametrize("content, says", [
    (b"", "is not a checkpoint"),
    (b"not a checkpoint at all\n", "is not a checkpoint"),
    ("truncated", "is not a checkpoint"),
    ("pickle", "refused, because loading it could run code"),
    ("other script", "not a ddpm_mnist.py checkpoint (it was written by cfg_afhq.py)"),
    ("no script", "older version"),
])
def test_bad_checkpoints_get_one_sentence(tmp_path, capsys, content, says):
    path = tmp_path / "ckpt.pt"
    if content == "truncated":
        buffer = io.BytesIO()
        torch.save({"script": "ddpm_mnist", "model": {"w": torch.zeros(1000)}}, buffer)
        path.write_bytes(buffer.getvalue()[:300])
    elif content == "pickle":
        path.write_bytes(pickle.dumps({"model": Payload()}))
    elif content == "other script":
        torch.save({"script": "cfg_afhq"}, path)
    elif content == "no script":
        torch.save({"model": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        dm.load_checkpoint(str(path), "ddpm_mnist")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert "Traceback" not in err[0] and "weights_only=False" not in err[0]


# --- the writers' own grid and MNIST reader (no torchvision import at start-up) --------------------------------------
@pytest.mark.parametrize("n, nrow", [(2, 8), (25, 5), (7, 3), (64, 8)])
def test_make_grid_lays_out_what_torchvision_does(n, nrow):
    import torchvision
    images = torch.randint(0, 256, (n, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    ours = np.asarray(dm.make_grid(images, nrow=nrow, pad=2, scale=1))
    theirs = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    assert ours.shape == theirs.shape and (ours == theirs).all()


def test_mnist_reader_gives_torchvisions_digits_from_the_raw_and_the_gzipped_file(tmp_path):
    import gzip
    import torchvision
    shared = ROOT.parent / "shared" / "data"
    theirs = torchvision.datasets.MNIST(str(shared), train=True, download=False).data
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as fh:
        fh.write((shared / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes())
    for root in (shared, tmp_path):
        ours = dm.mnist_digits(str(root))
        assert ours.dtype == torch.uint8 and torch.equal(ours, theirs)
