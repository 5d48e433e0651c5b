"""Where the GPU's time goes in ddpm_mnist.py's default UNet (6.8M parameters, 28x28): 2 to 4 minutes on one GPU.

  python benchmarks/gpu_profile.py                      # on the GPU machine; writes OUT/profile.json and two tables
  python benchmarks/gpu_profile.py --tiny --device cpu  # toy sizes on a CPU, steps 1-4 (the test runs this)

benchmarks/gpu.py's step 0 times the variants a student's command could use; this script says why they cost what they
cost, so that tuning starts from the profile and not from a guess:
  1. one denoising call of a sampling batch (1000 images, bf16 autocast, channels_last) under torch.profiler: the
     kernels launched and the table of GPU time per operation (OUT/profile_sample.txt);
  2. one training step of batch 128, as train() takes it, under the profiler (OUT/profile_train.txt, by GPU time
     and by CPU time), then the forward + backward and the rest (gradient clipping, AdamW, EMA) timed apart;
  3. the denoising call in other layouts and precisions, and with PyTorch's plain-math attention;
  4. training steps: channels_last, the plain layout, fused AdamW;
  5. torch.compile of the sampling network: seconds to compile, then milliseconds per call;
  6. torch.compile of the training network, if no more than 80 s have passed;
  7. the same with CUDA graphs (mode "reduce-overhead"), if no more than 200 s have passed (added after the first
     run on a GPU, which ran steps 1-6 only).
Every result is written to OUT/profile.json as soon as it is measured; one that fails says why and the rest still run.
Times are milliseconds per call, the mean of 10 calls (20 for training variants) after a warm-up.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the script ddpm_mnist.py, not the benchmark of the same name
import ddpm_mnist as dm  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_profile", help="folder for profile.json and the profiler's tables")
    p.add_argument("--device", default=None, help="default: cuda if there is one")
    p.add_argument("--tiny", action="store_true",
                   help="a width-8 UNet, batches of 8 and no torch.compile (CPU, to check it runs)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sample_batch, train_batch = (8, 8) if args.tiny else (1000, 128)
    model_args = dm.parse_args(["--device", str(dev)] + (["--ch", "8"] if args.tiny else []))
    sched = dm.NoiseSchedule(dm.make_betas(model_args.schedule, model_args.timesteps)).to(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    channels_last, plain = torch.channels_last, torch.contiguous_format
    start = time.time()
    result = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
              "tiny": args.tiny}

    def save():
        result["elapsed_seconds"] = round(time.time() - start, 1)
        (out / "profile.json").write_text(json.dumps(result, indent=1))

    def attempt(name, fn):
        try:
            result[name] = fn()
        except Exception as e:  # one measurement failing (a compiler missing, say) leaves the others
            result[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        save()

    def ms_per_call(fn, warm=3, reps=10):
        for _ in range(warm):
            fn()
        sync()
        begin = time.time()
        for _ in range(reps):
            fn()
        sync()
        return round((time.time() - begin) / reps * 1000, 3)

    def warm_up(fn, calls):
        for _ in range(calls):
            fn()
        sync()

    def compiled(fn, reps):
        """A compiled fn's first call, which compiles: (its seconds, then the milliseconds per call after it)."""
        begin = time.time()
        fn()
        sync()
        return round(time.time() - begin, 1), ms_per_call(fn, reps=reps)

    def gpu_kernels(prof):
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    def table(prof, sort_by, rows=30):
        try:
            return prof.key_averages().table(sort_by=sort_by, row_limit=rows)
        except Exception:  # older PyTorch names the GPU's columns cuda_..., newer ones device_...
            return prof.key_averages().table(sort_by=sort_by.replace("device", "cuda"), row_limit=rows)

    def build(layout):
        torch.manual_seed(0)
        return dm.build_model(model_args, 1).to(dev, memory_format=layout)

    def denoising_call(model, layout, bf16):
        """eps_fn(x, t) on a sampling batch, as sample() calls it."""
        eps_fn = dm.make_eps_fn(model, bf16 and cuda)
        x = torch.randn(sample_batch, 1, 28, 28, device=dev).contiguous(memory_format=layout)
        t = torch.full((sample_batch,), 500, device=dev, dtype=torch.long)
        return lambda: eps_fn(x, t)

    def training_step(layout, fused=False):
        """train()'s step on random images: (forward and backward, the rest, the whole step)."""
        model = build(layout).train()
        ema = dm.make_ema(model, model_args.ema_decay)
        optimizer = torch.optim.AdamW(model.parameters(), lr=model_args.lr, weight_decay=0.0, fused=fused or None)

        def forward_backward():
            x0 = torch.randn(train_batch, 1, 28, 28, device=dev).contiguous(memory_format=layout)
            t = torch.randint(0, sched.T, (train_batch,), device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = dm.diffusion_loss(model, sched, x0, t, torch.randn_like(x0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()

        def rest():
            torch.nn.utils.clip_grad_norm_(model.parameters(), model_args.grad_clip)
            optimizer.step()
            ema.update_parameters(model)

        def step():
            forward_backward()
            rest()
        return forward_backward, rest, step, model

    # 1. One denoising call under the profiler.
    def profile_sampling():
        call = denoising_call(build(channels_last).eval().requires_grad_(False), channels_last, True)
        with torch.no_grad():
            warm_up(call, 3)
            with profile(activities=activities) as prof:
                call()
                sync()
        (out / "profile_sample.txt").write_text(table(prof, "self_device_time_total", 40))
        return {"batch": sample_batch, "gpu_kernels": gpu_kernels(prof)}

    attempt("sampling_call_profiled", profile_sampling)

    # 2. One training step under the profiler, then its two halves timed apart.
    def profile_training():
        forward_backward, rest, step, _ = training_step(channels_last)
        warm_up(step, 5)
        with profile(activities=activities) as prof:
            step()
            sync()
        (out / "profile_train.txt").write_text(table(prof, "self_device_time_total") + "\n\nby CPU time\n"
                                               + table(prof, "self_cpu_time_total"))
        return {"batch": train_batch, "gpu_kernels_per_step": gpu_kernels(prof),
                "forward_backward_ms": ms_per_call(forward_backward, warm=0),
                "clip_adamw_ema_ms": ms_per_call(rest, warm=0), "whole_step_ms": ms_per_call(step)}

    attempt("training_step_profiled", profile_training)

    # 3. The denoising call in other layouts and precisions, and with the plain-math attention.
    def sampling_variants():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        times = {}
        with torch.no_grad():
            for name, layout, bf16 in (("bf16 autocast, channels_last", channels_last, True),
                                       ("bf16 autocast, plain layout", plain, True),
                                       ("float32, plain layout", plain, False),
                                       ("float32, channels_last", channels_last, False)):
                times[name] = ms_per_call(denoising_call(build(layout).eval(), layout, bf16))
            with sdpa_kernel([SDPBackend.MATH]):
                call = denoising_call(build(channels_last).eval(), channels_last, True)
                times["bf16 autocast, channels_last, math attention"] = ms_per_call(call)
        return {"batch": sample_batch, "ms_per_call": times}

    attempt("sampling_variants", sampling_variants)

    # 4. Training steps in the plain layout and with fused AdamW.
    def training_variants():
        times = {name: ms_per_call(training_step(layout, fused)[2], warm=5, reps=20)
                 for name, layout, fused in (("channels_last", channels_last, False), ("plain layout", plain, False),
                                             ("plain layout, fused AdamW", plain, True))}
        return {"batch": train_batch, "ms_per_step": times}

    attempt("training_variants", training_variants)

    # 5. torch.compile of the sampling network (its first call compiles). Not with --tiny: on a CPU the two
    # compilations take minutes, and the scripts' --compile has tests of its own.
    def compiled_sampling():
        if args.tiny:
            return "skipped: --tiny"
        call = denoising_call(torch.compile(build(plain).eval()), plain, True)
        with torch.no_grad():
            compile_seconds, ms = compiled(call, reps=10)
            return {"batch": sample_batch, "compile_seconds": compile_seconds, "ms_per_call": ms}

    attempt("compiled_sampling", compiled_sampling)

    # 6. torch.compile of the training network, if no more than 80 s have passed: its first step compiles forward and
    # backward. 7. The same with CUDA graphs (mode "reduce-overhead"), if no more than 200 s have passed: a training
    # step there is bound by the CPU launching its kernels, which a graph replays in one launch.
    def compiled_training(mode, seconds):
        if args.tiny:
            return "skipped: --tiny"
        if mode == "reduce-overhead" and not cuda:
            return "skipped: CUDA graphs need a GPU"
        if time.time() - start > seconds:
            return f"skipped: more than {seconds} s had passed"
        _, _, step, model = training_step(plain)
        model.forward = torch.compile(model.forward, mode=mode)
        compile_seconds, ms = compiled(step, reps=20)
        return {"batch": train_batch, "compile_seconds": compile_seconds, "ms_per_step": ms}

    attempt("compiled_training", lambda: compiled_training("default", 80))
    attempt("compiled_training_cuda_graphs", lambda: compiled_training("reduce-overhead", 200))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
