"""benchmarks/gpu.py, the one call that measures every GPU figure, run on this CPU at toy sizes: every step runs
and lands in gpu.json, so the call on a lent GPU cannot fail on a typo. Then what only a GPU would run (bf16
autocast, channels_last), taken on this CPU through a whole tiny run of each training script."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import cfg_afhq as cfg  # noqa: E402
import cond_iclevr as ci  # noqa: E402
import ddpm_mnist as dm  # noqa: E402
import gan_baseline as gb  # noqa: E402
from iclevr_fixtures import write_miniature_iclevr, write_stand_in_evaluator  # noqa: E402


def gzipped_mnist(root, train=600, test=200):
    """MNIST/raw with the first digits of each split as .gz files written here: not the original downloads, whose
    checksums torchvision would accept, but what a copy carried to a GPU machine looks like."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", train), ("t10k", test)):
        for kind, header, item in (("images-idx3", 16, 28 * 28), ("labels-idx1", 8, 1)):
            data = (SHARED / "data" / "MNIST" / "raw" / f"{split}-{kind}-ubyte").read_bytes()
            head = data[:4] + n.to_bytes(4, "big") + data[8:header]
            (raw / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(head + data[header:header + n * item]))
    return root


def test_the_class_folders_read_gzipped_mnist_as_torchvision_reads_the_originals(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cfg_mnist_classes as bench
    import torchvision
    root = gzipped_mnist(tmp_path / "mnist", train=300, test=100)
    for train, n in ((True, 300), (False, 100)):
        images, labels = bench.load_mnist_split(str(root), train)
        original = torchvision.datasets.MNIST(str(SHARED / "data"), train=train)
        assert torch.equal(images, original.data[:n]) and torch.equal(labels, original.targets[:n])
        assert images.dtype == original.data.dtype and labels.dtype == original.targets.dtype


STEPS = {"step_times", "ddpm_mnist_epochs_30", "fid_speed", "gan_mnist", "sampling_precision", "cfg_mnist"}


def run_tiny_benchmark(script, out, *flags, timeout):
    """benchmarks/SCRIPT --tiny on this CPU (2 threads), its outputs in out."""
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--device", "cpu",
                           "--out", str(out), *map(str, flags)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"})


def run_gpu_benchmark(out, *flags):
    return run_tiny_benchmark("gpu.py", out, "--budget", "900", *flags, timeout=1200)


def test_every_step_of_the_gpu_benchmark_runs_at_toy_sizes_from_gzipped_mnist(tmp_path):
    out = tmp_path / "gpu"
    result = run_gpu_benchmark(out, "--data-dir", gzipped_mnist(tmp_path / "mnist"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((out / "gpu.json").read_text())
    steps = summary["steps"]
    assert set(steps) == STEPS
    ddpm = steps["ddpm_mnist_epochs_30"]
    assert ddpm["finished"] and ddpm["num_samples"] == 8 and ddpm["fid"] > 0 and "train16" in ddpm["fid_reference"]
    assert steps["fid_speed"]["finished"] and steps["fid_speed"]["images"] == 4
    assert steps["fid_speed"]["seconds_per_10k_png"] > 0
    assert steps["gan_mnist"]["finished"] and steps["gan_mnist"]["fid"] > 0
    precision = steps["sampling_precision"]
    assert precision["finished"]
    for leg in (precision["default"], precision["fp32_sampling"]):
        assert leg["finished"] and leg["num_samples"] == 8 and leg["fid"] > 0
        assert leg["sampling_precision"] == "float32"  # the CPU samples in float32 either way ...
    assert precision["default"]["fid"] == precision["fp32_sampling"]["fid"]  # ... so the same noises, the same FID
    times = steps["step_times"]
    assert times["finished"] and len(times["train_ms_per_step"]) == 6 and len(times["sample_ms_per_denoising_call"]) == 4
    assert all(isinstance(ms, float) and ms > 0 for table in ("train_ms_per_step", "sample_ms_per_denoising_call")
               for ms in times[table].values()), times  # no variant failed
    assert steps["cfg_mnist"]["finished"] and steps["cfg_mnist"]["fid_w0"] > 0
    assert 0 <= steps["cfg_mnist"]["right_digit_w7.5"] <= 1
    assert summary["tiny"] and summary["total_seconds"] < 900


def test_a_step_that_fails_is_recorded_and_the_others_still_run(tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"not a state dict")  # every step stops at the Inception weights
    out = tmp_path / "gpu"
    result = run_gpu_benchmark(out, "--inception", tmp_path / "broken.pth")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    steps = json.loads((out / "gpu.json").read_text())["steps"]
    assert set(steps) == STEPS
    assert steps["step_times"]["finished"]  # the one step that needs no Inception weights
    assert not any(step["finished"] for name, step in steps.items() if name != "step_times")
    assert "broken.pth" in steps["fid_speed"]["error"]  # fid.py's sentence, raised in this process


# ---------------------------------------------------------------------------------------------------------------
# What the scripts do only on a GPU, done on this CPU: bf16 autocast and channels_last, through whole tiny runs
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """Every torch.autocast("cuda", bf16, enabled=<on a GPU>) becomes the CPU's bf16 autocast, switched on; every
    script's channels_last(device) and sample_in_bf16(args, device) answer as for a GPU. A dtype or layout mistake in
    those branches then fails here, not in the one call on a lent GPU. Returns the dtypes of the autocast regions
    entered (switched on)."""
    real_autocast, entered = torch.autocast, []

    def autocast(device_type, dtype=None, enabled=True, **kwargs):
        enabled = enabled or device_type == "cuda"
        if enabled:
            entered.append(dtype)
        return real_autocast("cpu", dtype=dtype, enabled=enabled, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)
    for module in (dm, gb, cfg, ci):
        monkeypatch.setattr(module, "channels_last", lambda device: torch.channels_last)
    for module in (dm, cfg, ci):
        monkeypatch.setattr(module, "sample_in_bf16", lambda args, device: not args.fp32_sampling)
    return entered


def tiny_class_folders(root, classes=3, per_class=4, size=12):
    rng = np.random.default_rng(0)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"c{k}" / f"{i}.png")
    return root


def test_the_gpu_branches_run_whole_tiny_runs_in_bf16(as_on_a_gpu, tmp_path):
    def in_bf16(main, argv):
        as_on_a_gpu.clear()
        main(argv)
        assert as_on_a_gpu and set(as_on_a_gpu) == {torch.bfloat16}, main.__module__  # the GPU's branch was taken

    mnist = ["--data-dir", str(SHARED / "data"), "--limit", "32", "--device", "cpu", "--no-fid"]
    in_bf16(dm.main, [*mnist, "--out", str(tmp_path / "ddpm"), "--ch", "8", "--timesteps", "10", "--batch-size", "16",
                      "--epochs", "1", "--warmup", "1", "--num-samples", "4", "--sample-batch-size", "4"])
    for style in ("dcgan", "stylegan"):
        in_bf16(gb.main, [*mnist, "--out", str(tmp_path / style), "--arch", style, "--ch", "8", "--z-dim", "16",
                          "--batch-size", "16", "--epochs", "1", "--num-samples", "4", "--stats-samples", "16"])
    folders = tiny_class_folders(tmp_path / "classes")
    in_bf16(cfg.main, ["--data-dir", str(folders), "--out", str(tmp_path / "cfg"), "--image-size", "16", "--ch", "8",
                       "--ch-mult", "1", "2", "--num-res-blocks", "1", "--timesteps", "10", "--batch-size", "4",
                       "--epochs", "1", "--warmup", "1", "--device", "cpu", "--num-samples", "3", "--cfg-scales", "0",
                       "7.5", "--no-fid"])
    mini = tmp_path / "iclevr"
    write_miniature_iclevr(mini, num_train=8, num_test=32, seed=1)
    evaluator = write_stand_in_evaluator(tmp_path / "evaluator")
    in_bf16(ci.main, ["--data-dir", str(mini), "--evaluator-dir", str(evaluator), "--out", str(tmp_path / "iclevr_run"),
                      "--epochs", "1", "--device", "cpu", "--ch", "8", "--ch-mult", "1", "1", "1", "1",
                      "--num-res-blocks", "1", "--attn-res", "0", "--timesteps", "8", "--batch-size", "8", "--warmup",
                      "2"])
    for run in ("ddpm", "cfg", "iclevr_run"):  # sampled in bf16, as on a GPU
        assert json.loads((tmp_path / run / "metrics.json").read_text())["sampling_precision"] == "bf16", run
    for run in ("ddpm", "dcgan", "stylegan"):
        assert json.loads((tmp_path / run / "metrics.json").read_text())["num_samples"] == 4, run
        pngs = sorted((tmp_path / run / "samples").glob("*.png"))
        assert [p.name for p in pngs] == ["00001.png", "00002.png", "00003.png", "00004.png"], run
        assert all(np.asarray(Image.open(p)).std() > 0 for p in pngs), run  # not blank: no NaN turned into one colour
    for w in ("0", "7.5"):
        assert len(list((tmp_path / "cfg").glob(f"samples_w{w}/*/*.png"))) == 3
    accuracy = json.loads((tmp_path / "iclevr_run" / "metrics.json").read_text())["accuracy"]
    assert set(accuracy) == {"test", "new_test"} and all(0 <= a <= 1 for a in accuracy.values())


# ---------------------------------------------------------------------------------------------------------------
# --compile: the training network and the sampling network go through torch.compile (it pays for sampling on a GPU)
# ---------------------------------------------------------------------------------------------------------------
def test_compile_sends_the_training_and_the_sampling_network_through_torch_compile(monkeypatch, tmp_path):
    import ddim
    compiled = []  # the training mode of every module handed to torch.compile; the module is returned as it is

    def record(module, **kwargs):
        compiled.append(module.training)
        return module

    monkeypatch.setattr(torch, "compile", record)
    mnist = ["--data-dir", str(SHARED / "data"), "--limit", "32", "--device", "cpu", "--no-fid", "--compile"]
    dm.main([*mnist, "--out", str(tmp_path / "ddpm"), "--ch", "8", "--timesteps", "10", "--batch-size", "16",
             "--epochs", "1", "--num-samples", "4", "--sample-batch-size", "4"])
    assert sorted(compiled) == [False, True]  # the training network, and the sampling one (the EMA's, in eval mode)
    compiled.clear()
    ddim.main(["--ckpt", str(tmp_path / "ddpm" / "ckpt.pt"), "--steps", "3", "--num-samples", "4", "--no-fid",
               "--device", "cpu", "--out", str(tmp_path / "ddim_images"), "--compile"])
    assert compiled == [False]  # image mode only samples
    compiled.clear()
    cfg.main(["--data-dir", str(tiny_class_folders(tmp_path / "classes")), "--out", str(tmp_path / "cfg"),
              "--image-size", "16", "--ch", "8", "--ch-mult", "1", "2", "--num-res-blocks", "1", "--timesteps", "10",
              "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--num-samples", "3", "--cfg-scales", "0",
              "--no-fid", "--compile"])
    assert sorted(compiled) == [False, True]
    compiled.clear()
    mini = tmp_path / "iclevr"
    write_miniature_iclevr(mini, num_train=8, num_test=32, seed=1)
    ci.main(["--data-dir", str(mini), "--evaluator-dir", str(write_stand_in_evaluator(tmp_path / "evaluator")),
             "--out", str(tmp_path / "iclevr_run"), "--epochs", "1", "--device", "cpu", "--ch", "8", "--ch-mult", "1",
             "1", "1", "1", "--num-res-blocks", "1", "--attn-res", "0", "--timesteps", "8", "--batch-size", "8",
             "--compile"])
    assert sorted(compiled) == [False, True]  # sampling's first: it also grades during training


def test_compiled_sampling_draws_the_images_eager_sampling_draws(tmp_path):
    """torch.compile for real (on this CPU): the same checkpoint and seed give the same digits, compiled or not,
    up to a rounding step of the uint8 images (compiled kernels may add in another order)."""
    mnist = ["--data-dir", str(SHARED / "data"), "--device", "cpu", "--no-fid"]
    dm.main([*mnist, "--limit", "64", "--out", str(tmp_path / "run"), "--ch", "8", "--timesteps", "10",
             "--batch-size", "32", "--epochs", "1", "--num-samples", "0"])
    ckpt = tmp_path / "run" / "ckpt.pt"
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        dm.main([*mnist, "--sample-only", "--ckpt", str(ckpt), "--out", str(tmp_path / name), "--num-samples", "6",
                 "--sample-batch-size", "6", *flags])
    for i in range(1, 7):
        eager, compiled = (np.asarray(Image.open(tmp_path / name / "samples" / f"{i:05d}.png")).astype(int)
                           for name in ("eager", "compiled"))
        assert eager.std() > 0 and np.abs(eager - compiled).max() <= 1, i


def test_the_gpu_profile_runs_at_toy_sizes(tmp_path):
    result = run_tiny_benchmark("gpu_profile.py", tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    profile = json.loads((tmp_path / "profile.json").read_text())
    times = [*profile["sampling_variants"]["ms_per_call"].values(), *profile["training_variants"]["ms_per_step"].values(),
             *(profile["training_step_profiled"][k] for k in ("forward_backward_ms", "clip_adamw_ema_ms", "whole_step_ms"))]
    assert len(times) == 11 and all(isinstance(ms, float) and ms > 0 for ms in times), profile  # none failed
    assert profile["sampling_call_profiled"]["gpu_kernels"] == 0  # a CPU launches none
    assert profile["compiled_sampling"] == profile["compiled_training"] == "skipped: --tiny"
    assert profile["compiled_training_cuda_graphs"] == "skipped: --tiny"
    assert "aten::" in (tmp_path / "profile_sample.txt").read_text()
    assert "by CPU time" in (tmp_path / "profile_train.txt").read_text()


def test_a_training_cut_off_by_the_budget_is_read_back_from_its_log(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu
    log = tmp_path / "ddpm_mnist.log"  # the shape of the H200's log of 2026-12-04, both of format_seconds' forms
    log.write_text("    3.5s  note: ... does not exist yet\n"
                   "    8.5s  UNet 6.80M parameters on cuda\n"
                   "   13.5s  epoch 1/30  step 70/14070  loss 0.8497  1776 img/s  left 1h16m\n"
                   "  522.0s  epoch 18/30  step 8114/14070  loss 0.0222  2023 img/s  left 6m16s\n"
                   "  524.4s  [cut off: the budget ran out]\n")
    assert gpu.progress_of(log) == {"step": 8114, "steps": 14070, "images_per_second": 2023,
                                    "projected_train_seconds": round(522.0 - 8.5 + 376)}
    log.write_text("    8.5s  UNet 6.80M parameters on cuda\n   13.5s  epoch 1/30  step 70/14070  loss 0.8497  "
                   "1776 img/s  left 1h16m\n")
    assert gpu.progress_of(log)["projected_train_seconds"] == round(13.5 - 8.5 + 4560)
    log.write_text("    8.5s  UNet 6.80M parameters on cuda\n")
    assert gpu.progress_of(log) is None  # cut off before its first step
