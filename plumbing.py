"""plumbing.py: everything a run needs that is not the method.

The homework scripts hold the method (data, noise schedule, model, diffusion maths, training loop, writers of the
deliverables). What no homework asks a student to understand lives here, once, and the scripts call it with the module
name written out (`plumbing.save_run(...)`), so a reader sees at a glance which calls to skip:
flags and presets, checkpoints and resume, Ctrl-C, torchrun, the progress line, reading and writing images, the loss
plot, the metrics file, and the glue to fid.py.
"""

import argparse
import atexit
import csv
import importlib.util
import json
import os
import shutil
import signal
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont, ImageOps

import fid


# ---- flags ------------------------------------------------------------------------------------------------------
class FlagParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is told in one sentence (and exit status 2) instead of the usage block."""

    def error(self, message):
        fail(f"{message} (see --help)")


def parse_with_preset(parser, presets, argv):
    """Parse argv with --preset's values as the defaults: an explicit flag still wins over the preset.

    --epochs and --iters are one choice (when to stop), so an explicit --epochs also sets aside a preset's --iters;
    likewise an explicit --sampler ddpm (all T steps) sets aside a preset's --steps."""
    # A value already in the namespace stays unless its flag is given: None afterwards means "not given".
    given = parser.parse_known_args(argv, argparse.Namespace(epochs=None, iters=None, sampler=None, steps=None))[0]
    if getattr(given, "preset", None):
        parser.set_defaults(**presets[given.preset])
    args = parser.parse_args(argv)
    if given.epochs is not None and given.iters is None:
        args.iters = None
    if given.sampler == "ddpm" and given.steps is None:
        args.steps = None
    return args


def add_run_flags(parser, out):
    """The flags every training script shares: where the run lives, what it runs on, how it is graded."""
    a = parser.add_argument
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    a("--compile", action="store_true",
      help="torch.compile the network for training (with CUDA graphs on one GPU) and sampling")
    a("--out", default=out, help="folder for checkpoint, images and metrics")
    a("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    a("--sample-only", action="store_true", help="skip training: sample from --ckpt")
    a("--ckpt", default=None, help="the checkpoint for --sample-only (default OUT/ckpt.pt)")
    a("--fid", action=argparse.BooleanOptionalAction, default=True, help="FID of the samples against the reference")
    a("--fid-stats", default=None, help="reference statistics .npz (default: the training set's, computed once)")
    a("--fid-ref-limit", type=int, default=None, help="the default reference: only the first N training images")
    a("--inception", default=None, help="FID Inception weights (default: pytorch-fid's file, via torch.hub)")
    a("--save-as", nargs="+", default=None, metavar="OUTPUT=FILE",
      help="copies of outputs under a course's names, e.g. grid.png=result_mnist.jpg loss.png=loss_mnist.jpg")


def run_flag_problems(args):
    """What is wrong with the flags every training script has (add_run_flags' and --epochs --iters --batch-size
    --lr --num-samples), as check() takes it."""
    args.ckpt = args.ckpt or os.path.join(args.out, "ckpt.pt")
    save_as_ok = all("=" in pair and pair.lower().endswith((".png", ".jpg", ".jpeg")) for pair in args.save_as or [])
    return [at_least("--epochs", args.epochs, 0), at_least("--iters", args.iters, 1),
            at_least("--batch-size", args.batch_size, 1), must(args.lr > 0, f"--lr must be positive, got {args.lr}"),
            at_least("--num-samples", args.num_samples, 0), at_least("--fid-ref-limit", args.fid_ref_limit, 2),
            must(args.device == "cpu" or args.device.startswith("cuda"), f"--device {args.device}: use cpu or cuda"),
            must(args.device == "cpu" or torch.cuda.is_available(), f"--device {args.device}: no CUDA here; use cpu"),
            must(save_as_ok, "--save-as takes OUTPUT=FILE naming an image file, e.g. grid.png=result_mnist.jpg"),
            must(not (args.resume and args.sample_only), "--resume and --sample-only exclude each other"),
            must(args.fid_stats is None or os.path.isfile(args.fid_stats), f"--fid-stats {args.fid_stats} not found"),
            must(not (args.resume or args.sample_only) or os.path.isfile(args.ckpt),
                 f"checkpoint {args.ckpt} not found (train first, or pass --ckpt)")]


def fail(message):
    """One clear sentence and exit status 2: how every script reports bad input."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check(*problems):
    """Stop at the first problem; each is a sentence, or None where all is well."""
    for message in problems:
        if message:
            fail(message)


def at_least(flag, value, low):
    return None if value is None or value >= low else f"{flag} must be at least {low}, got {value}"


def between(flag, value, low, high, high_included=True):
    inside = value is None or (low <= value <= high if high_included else low <= value < high)
    return None if inside else f"{flag} must be in [{low}, {high}{']' if high_included else ')'}, got {value}"


def must(condition, message):
    return None if condition else message


def make_out_folder(out):
    """Create --out at the start, so a folder that cannot be written stops the run before any work."""
    if rank() == 0:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            fail(f"--out {out} cannot be created ({e.strerror or e})")


# ---- checkpoints, resume and the random state -----------------------------------------------------------------
def save_checkpoint(path, contents):
    """Write a temporary file, then rename it: a crash mid-write leaves the previous checkpoint whole."""
    torch.save(contents, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, script):
    """The saved run as plain tensors and numbers: weights_only=True, so a checkpoint is data and never runs code."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # empty, truncated, another kind of file, or pickled code: torch raises several types
        fail(f"{path} cannot be loaded: it is damaged, not a checkpoint, or holds code (refused: it could run)")
    if not isinstance(saved, dict) or saved.get("script") != script:
        fail(f"{path} is not a {script}.py checkpoint")
    return saved


def load_run(args, script, run_keys, defaults):
    """The checkpoint for --resume or --sample-only: the flags that define the run (run_keys) come from it, with a
    note for each one given otherwise on the command line (that is, not at its default)."""
    saved = load_checkpoint(args.ckpt, script)
    for key in run_keys:
        if key == "seed" and args.sample_only:
            continue  # --sample-only --seed S: the same model, another draw of the sampling noise
        if getattr(args, key) not in (getattr(defaults, key), saved["args"][key]):
            say(f"note: the checkpoint's --{key.replace('_', '-')} {saved['args'][key]} is kept")
        setattr(args, key, saved["args"][key])
    return saved


def save_run(args, script, state, stop=False, **parts):
    """ckpt.pt: the step, the losses, the random state and each part's state_dict (model, EMA, optimiser ...).
    stop: Ctrl-C was pressed; the run ends here, to be continued with --resume."""
    if rank() == 0:
        save_checkpoint(os.path.join(args.out, "ckpt.pt"), {
            "script": script, "args": vars(args), "step": state["step"], "seconds": state["seconds"],
            "losses": {k: torch.stack(v).cpu() if v else torch.zeros(0) for k, v in state["losses"].items()},
            "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()},
            **{name: part.state_dict() for name, part in parts.items()}})
    if stop:
        say(f"\ninterrupted: saved {args.out}/ckpt.pt at step {state['step']}; continue with --resume")
        sys.exit(130)


def restore_run(saved, args, state, **parts):
    """Load each part, and for --resume the step, the losses and the random state: the same run continues."""
    for name, part in parts.items():
        if saved.get(name):  # not a GradScaler saved off ({}: bf16 or a CPU) or before there was one: it starts afresh
            part.load_state_dict(saved[name])
    if args.resume:
        state.update(step=saved["step"], seconds=saved["seconds"])
        state["losses"] = {k: list(v.unbind()) for k, v in saved["losses"].items()}
        torch.set_rng_state(saved["rng"]["cpu"])
        if saved["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        say(f"resuming {args.ckpt} at step {state['step']}")


class CtrlC:
    """Inside `with CtrlC() as ctrl_c:` Ctrl-C only sets a flag; the training loop finishes its step, saves, stops."""

    def __enter__(self):
        self.pressed = False
        self.previous = signal.signal(signal.SIGINT, self.press)
        return self

    def press(self, signum, frame):
        self.pressed = True

    def stop_requested(self):
        """True on every process if Ctrl-C reached any of them (torchrun: all stop at the same step)."""
        if world_size() == 1:
            return self.pressed
        pressed = torch.tensor([float(self.pressed)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(pressed)
        return pressed.item() > 0

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


# ---- number formats: bf16, fp16 with a gradient scaler, or float32 --------------------------------------------
class Precision:
    """The number format of the network's arithmetic, from what the device computes natively (name: force one):
      bf16     autocast to bfloat16 on GPUs with bf16 arithmetic (Ampere and newer: A100, RTX 30xx/40xx, H100);
               float32's exponent range, so the gradients need no scaling.
      fp16     autocast to float16 with a GradScaler on older GPUs (Colab's T4, V100: no native bf16). float16 flushes
               values below about 6e-8 to zero, so the loss is scaled up before backward() and the gradients scaled
               back before the step; a step whose gradients overflowed is skipped and the scale halved.
      float32  on the CPU: autocast would gain nothing there.
    The scaler passes everything through unless fp16, so one training step serves all three:
      with amp.autocast(): loss = ...
      amp.scaler.scale(loss).backward(); amp.scaler.unscale_(optimizer); clip; amp.scaler.step(optimizer);
      amp.scaler.update()"""

    def __init__(self, device, name=None):
        device = torch.device(device)
        if name is None and device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        self.name, self.device_type = name or "float32", device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32}[self.name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.name == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.name != "float32")


# ---- torchrun: several processes, one GPU each ------------------------------------------------------------------
def start_distributed(args):
    """Under torchrun (it sets RANK), join the process group and take this process's GPU. A plain run: nothing."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    on_gpu = args.device.startswith("cuda")
    dist.init_process_group("nccl" if on_gpu else "gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if on_gpu:
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(args.device)


def leave_distributed():
    """Wait for every process, then leave the group. True on process 0 (and in a plain run): it writes and grades."""
    main_process = rank() == 0
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return main_process


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def my_share(x):
    """This process's share of a batch (the whole batch in a plain run)."""
    return x.tensor_split(world_size())[rank()]


def mean_over_processes(loss):
    """The whole batch's loss, still on the device: the mean of the processes' shares."""
    loss = loss.detach().float()
    if world_size() > 1:
        dist.all_reduce(loss)
        loss = loss / world_size()
    return loss


def sample_in_batches(draw, n, batch_size, seed, device):
    """n images from draw(count, generator), batch_size at a time. Batch b has its own generator (seeded from seed and
    b), so the images are the same however the batches are shared out: under torchrun each process draws every
    world-th batch, and process 0 gathers them back in order (the others get None)."""
    mine = {}
    for b, start in enumerate(range(0, n, batch_size)):
        if b % world_size() == rank():
            mine[b] = draw(min(batch_size, n - start), torch.Generator(device).manual_seed(seed * 1_000_003 + b)).cpu()
            say(f"sampled {start + len(mine[b])}/{n}")
    parts = [mine]
    if world_size() > 1:
        parts = [None] * world_size()
        dist.all_gather_object(parts, mine)
    batches = {k: v for part in parts for k, v in part.items()}
    return torch.cat([batches[b] for b in sorted(batches)]) if rank() == 0 else None


def parallel_model(model, args):
    """The network the training step calls: DistributedDataParallel under torchrun, compiled with --compile (for CUDA
    graphs on one GPU)."""
    if args.batch_size % world_size():
        fail(f"--batch-size {args.batch_size} does not split evenly over {world_size()} processes")
    net = model
    if world_size() > 1:
        device = next(model.parameters()).device
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if not args.compile:
        return net
    # On one GPU, CUDA graphs (mode reduce-overhead) replay a step's ~2,000 kernel launches at once: a small UNet's step
    # is otherwise bound by the CPU launching them. DDP's gradient hooks cannot be captured in a graph.
    one_gpu = world_size() == 1 and next(model.parameters()).device.type == "cuda"
    return torch.compile(net, mode="reduce-overhead" if one_gpu else "default")


def say(message):
    """Print on process 0 only (every process would print the same line)."""
    if rank() == 0:
        print(message, flush=True)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


SAVE_EVERY_S = 60  # at an epoch's end, a checkpoint only if the last one is this old (Progress.checkpoint_due)


class Progress:
    """One line every few seconds: epoch, step, the recent losses, images per second and the time left. It also
    keeps state["seconds"], the training time over every resume, and says when to write a checkpoint."""

    def __init__(self, state, total, steps_per_epoch, batch_size):
        self.total, self.steps_per_epoch, self.batch_size = total, steps_per_epoch, batch_size
        self.first_step, self.seconds_before, self.start, self.last = state["step"], state["seconds"], time.time(), 0
        self.saved = self.start

    def checkpoint_due(self, state, stop):
        """At the end, on Ctrl-C, and at an epoch's end if the last checkpoint is a minute old: on a GPU an MNIST
        epoch takes seconds, and writing every one would cost more than it saves. A crash loses a minute or an epoch."""
        epoch_end = state["step"] % self.steps_per_epoch == 0
        if stop or state["step"] == self.total or (epoch_end and time.time() - self.saved >= SAVE_EVERY_S):
            self.saved = time.time()
            return True
        return False

    def show(self, state):
        step, now = state["step"], time.time()
        state["seconds"] = self.seconds_before + now - self.start
        if now - self.last < 5 and step != self.total:
            return
        self.last = now
        rate = (step - self.first_step) / max(1e-9, now - self.start)
        left = int((self.total - step) / max(rate, 1e-9))
        losses = "  ".join(f"{k} {torch.stack(v[-50:]).mean().item():.4f}" for k, v in state["losses"].items())
        epochs = f"{-(-step // self.steps_per_epoch)}/{-(-self.total // self.steps_per_epoch)}"
        speed = f"{rate * self.batch_size:.0f} img/s  left {left // 60}m{left % 60:02d}s"
        say(f"epoch {epochs}  step {step}/{self.total}  {losses}  {speed}")


# ---- reading images ---------------------------------------------------------------------------------------------
def list_images(root):
    """Image files below root (recursive, .png/.jpg/.jpeg in any case), sorted so runs are reproducible."""
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.join(folder, n) for n in names if n.lower().endswith((".png", ".jpg", ".jpeg"))]
    return sorted(found)


def load_image(path, size, mode="RGB"):
    """One image as uint8 C x H x W (RGB, or grey with mode "L"), resized on its short side and centre-cropped."""
    try:
        with Image.open(path) as img:
            img = ImageOps.fit(img.convert(mode), (size, size), Image.BICUBIC)
    except Exception as e:  # PIL raises several types for broken files; all mean the same to the user
        fail(f"cannot read image {path} ({type(e).__name__})")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).reshape(size, size, -1).copy()).permute(2, 0, 1)


def load_image_folder(root, size, limit=None):
    """Every image below root as one uint8 tensor N x 3 x size x size."""
    paths = list_images(root)[:limit]
    if not paths:
        fail(f"no .png/.jpg/.jpeg images found in {root}")
    say(f"reading {len(paths)} images from {root} at {size}x{size} ...")
    return torch.stack([load_image(p, size) for p in paths])


def load_pairs(paths, size, channels):
    """Two images A B, or a folder's images taken in pairs, as uint8 tensors A (N x C x S x S) and B."""
    files = paths if len(paths) == 2 else list_images(paths[0])
    if len(files) < 2:
        fail(f"--fuse needs at least two images, found {len(files)} in {paths[0]}")
    images = torch.stack([load_image(f, size, "L" if channels == 1 else "RGB") for f in files[:len(files) // 2 * 2]])
    return images[0::2], images[1::2]


def load_mnist(data_dir, limit=None, train=True):
    """MNIST's digits as uint8 N x 1 x 28 x 28, from data_dir/MNIST/raw (torchvision downloads them if missing)."""
    import torchvision  # here: importing it takes seconds, and only MNIST needs it
    try:
        digits = torchvision.datasets.MNIST(data_dir, train=train, download=True).data
    except Exception as e:
        fail(f"MNIST is not in {data_dir}/MNIST/raw and could not be downloaded ({type(e).__name__}); "
             f"pass --data-dir pointing at a folder that holds MNIST/raw")
    return digits[:limit].unsqueeze(1)


# ---- writing images ---------------------------------------------------------------------------------------------
def to_uint8(x):
    """[-1, 1] floats -> uint8 RGB N x 3 x H x W on the CPU, rounded as a PNG writer would; grey becomes RGB."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def make_grid(images, nrow, pad=2):
    """uint8 N x 3 x H x W -> one PIL image, nrow images a row on white lines, small images enlarged to be seen."""
    n, _, h, w = images.shape
    cols, rows = min(nrow, n), -(-n // min(nrow, n))
    grid = torch.full((3, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[:, top:top + h, left:left + w] = image
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    scale = max(1, 64 // h)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_samples(images, folder, zip_path):
    """00001.png, 00002.png, ... and a zip of exactly those files at its root (what graders unpack). The previous
    run's set is removed first, so the two sets never mix."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with zipfile.ZipFile(zip_path, "w") as zf:
        for i, image in enumerate(images):
            path = os.path.join(folder, f"{i + 1:05d}.png")
            Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").save(path)
            zf.write(path, arcname=os.path.basename(path))


def write_samples(out, images, frames):
    """The homework's images: samples/ and samples.zip, grid.png (the first 25) and process.png / process.gif.
    The old metrics.json goes first: it described the samples being replaced."""
    remove_old_metrics(out)
    save_samples(images, os.path.join(out, "samples"), os.path.join(out, "samples.zip"))
    make_grid(images[:25], nrow=5).save(os.path.join(out, "grid.png"))
    save_process(frames, out)


def save_process(frames, out, columns=8):
    """frames: states from pure noise to the image (N x C x H x W each). process.png: a row per sample, `columns`
    evenly spaced frames (the first pure noise, the last the result); process.gif: every frame."""
    chosen = [round(k * (len(frames) - 1) / (columns - 1)) for k in range(columns)]
    rows = torch.stack([to_uint8(frames[k]) for k in chosen], dim=1)  # N x columns x 3 x H x W
    make_grid(rows.flatten(0, 1), nrow=columns).save(os.path.join(out, "process.png"))
    gif = [make_grid(to_uint8(f), nrow=len(f)) for f in frames + [frames[-1]] * 10]
    gif[0].save(os.path.join(out, "process.gif"), save_all=True, append_images=gif[1:], duration=60, loop=0)


def save_progress(images, out, epoch):
    """progress/epoch_NNN.png: the fixed-noise samples after an epoch, so a student sees the model learn."""
    if rank() == 0:
        os.makedirs(os.path.join(out, "progress"), exist_ok=True)
        make_grid(to_uint8(images), nrow=8).save(os.path.join(out, "progress", f"epoch_{epoch:03d}.png"))


def plot_loss(curves, path, title):
    """{name: values per iteration} as a line plot: each curve faint, its moving average bold; the y axis on a log
    scale when every value is positive (a diffusion loss falls by orders of magnitude)."""
    W, H, m = 900, 540, 80  # size and margin
    img, font = Image.new("RGB", (W, H), "white"), ImageFont.load_default(size=15)
    draw, every = ImageDraw.Draw(img), np.concatenate(list(curves.values())).astype(np.float64)
    f = np.log10 if (every > 0).all() else np.asarray
    lo, hi = np.percentile(f(every), [0.5, 100]) + [-1e-6, 1e-6]  # the first, largest values would squash the rest
    n = max(len(v) for v in curves.values())

    def xy(i, v):
        return m + (W - 2 * m) * i / max(1, n - 1), H - m - (H - 2 * m) * (np.clip(v, lo, hi) - lo) / (hi - lo)

    draw.rectangle([m, m, W - m, H - m], outline="black")
    for v in np.linspace(lo, hi, 6):
        draw.text((m - 6, xy(0, v)[1]), f"{10 ** v if f is np.log10 else v:.4g}", fill="black", font=font, anchor="rm")
    for k, (name, v) in enumerate(curves.items()):
        colour, v, window = [(31, 119, 180), (214, 39, 40), (44, 160, 44)][k % 3], f(v), max(1, len(v) // 100)
        average = np.convolve(v, np.ones(window) / window, "valid")
        draw.line([xy(i, v[i]) for i in range(len(v))], fill=tuple(c + (255 - c) * 2 // 3 for c in colour))
        draw.line([xy(i + window - 1, a) for i, a in enumerate(average)], fill=colour, width=2)
        label = f"{name} (moving average of {window})"
        draw.text((W - m - 8, m + 8 + 22 * k), label, fill=colour, font=font, anchor="ra")
    draw.text((W / 2, m / 2), title, fill="black", font=font, anchor="mm")
    scale = "; the loss on a log scale" if f is np.log10 else ""
    draw.text((W / 2, H - m / 2), f"iteration 1 ... {n}{scale}", fill="black", font=font, anchor="mm")
    img.save(path)


def write_loss(out, losses, title):
    """loss.csv (a row per iteration, a column per curve) and loss.png, from {name: [loss tensors]}."""
    if rank() != 0:
        return
    curves = {name: torch.stack(v).float().cpu().numpy() for name, v in losses.items() if v}
    if not curves:
        return
    with open(os.path.join(out, "loss.csv"), "w", newline="") as fh:
        rows = [(i + 1, *row) for i, row in enumerate(zip(*curves.values()))]
        csv.writer(fh).writerows([("iteration", *curves)] + rows)
    plot_loss(curves, os.path.join(out, "loss.png"), title)


def remove_old_metrics(out):
    """The previous run's metrics.json goes before new outputs are written: it described the files being replaced."""
    if rank() == 0 and os.path.exists(os.path.join(out, "metrics.json")):
        os.remove(os.path.join(out, "metrics.json"))


def write_metrics(path, metrics):
    """metrics.json, written last: every number the run measured and what reproduces it."""
    with open(path + ".tmp", "w") as fh:
        json.dump(metrics, fh, indent=2)
    os.replace(path + ".tmp", path)


def save_as(args):
    """--save-as OUTPUT=FILE ...: copies of outputs under a course's names, converted by the extension."""
    for pair in args.save_as or []:
        output, target = pair.split("=", 1)
        source = os.path.join(args.out, output)
        if not os.path.isfile(source):
            say(f"note: --save-as {pair}: this run wrote no {output}")
            continue
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        with Image.open(source) as img:
            img.convert("RGB").save(target, quality=95)
        say(f"wrote {target} (from {source})")


def load_course_evaluator(folder):
    """folder/evaluator.py's evaluation_model(), unchanged, built in folder as the course's code expects (it reads
    ./checkpoint.pth)."""
    spec = importlib.util.spec_from_file_location("course_evaluator", os.path.join(folder, "evaluator.py"))
    module, cwd = importlib.util.module_from_spec(spec), os.getcwd()
    os.chdir(folder)
    try:
        spec.loader.exec_module(module)
        return module.evaluation_model()
    finally:
        os.chdir(cwd)


# ---- FID (fid.py, the pytorch-fid protocol) ---------------------------------------------------------------------
def prepare_fid(args, stats):
    """Before any work: the Inception network, or None (FID skipped, said now) when its weights are not to be had
    and --inception was not given; a given --fid-stats must hold statistics."""
    try:
        if args.fid_stats:
            fid.load_statistics(args.fid_stats)
        inception = fid.load_inception(args.inception, "cpu")
    except fid.FIDError as e:
        if args.inception or args.fid_stats:
            fail(str(e))
        say(f"note: FID will be skipped: {e}")
        return None
    if not os.path.isfile(stats):
        say(f"note: {stats} does not exist yet: the reference statistics are computed into it once, after sampling")
    return inception


def training_set_stats(args):
    """Where the training images' statistics are cached (beside --out): one file per data set and --fid-ref-limit."""
    limit = args.fid_ref_limit or "all"
    folder = os.path.basename(os.path.abspath(args.data_dir))
    name = "mnist" if args.dataset == "mnist" else f"{folder}_{args.image_size}px"
    return os.path.join(os.path.dirname(os.path.abspath(args.out)), f"fid_stats_{name}_first{limit}.npz")


def compute_fid(images, inception, stats, reference_images, device):
    """FID of uint8 samples against the statistics in stats (made once from reference_images() if missing)."""
    inception, start = inception.to(device), time.time()
    if not os.path.isfile(stats):
        say(f"computing the reference statistics into {stats} (once)")
        fid.save_statistics(stats, *fid.compute_statistics(reference_images(), inception, device=device))
    reference_seconds, start = time.time() - start, time.time()
    mu, sigma = fid.compute_statistics(images, inception, device=device)
    value = fid.frechet_distance(mu, sigma, *fid.load_statistics(stats))
    say(f"FID {value:.3f}  ({len(images)} samples against {stats})")
    return {"fid": value, "fid_num_samples": len(images), "fid_reference": stats,
            "reference_seconds": round(reference_seconds, 1), "fid_seconds": round(time.time() - start, 1)}


def write_fusion(args, a, b, fused, ts):
    """fusion.png (rows A | B | fused), the fused images as fusion/00001.png ... and fusion.json, with their FID
    against the source images (A and B) when --fid is on."""
    make_grid(torch.stack([a, b, fused], dim=1).flatten(0, 1), nrow=3).save(os.path.join(args.out, "fusion.png"))
    save_samples(fused, os.path.join(args.out, "fusion"), os.path.join(args.out, "fusion.zip"))
    result = {"pairs": len(a), "lam": args.lam, "t_per_pair": ts, "fid": None}
    if args.fid and len(a) >= 2:  # the fused images against their sources
        inception = fid.load_inception(args.inception, args.device)
        mu, sigma = fid.compute_statistics(fused, inception, device=args.device)
        mu_ab, sigma_ab = fid.compute_statistics(torch.cat([a, b]), inception, device=args.device)
        result["fid"] = fid.frechet_distance(mu, sigma, mu_ab, sigma_ab)
    write_metrics(os.path.join(args.out, "fusion.json"), result)
    say(f"wrote {args.out}/fusion.png, fusion/ and fusion.zip: {len(a)} pair(s), rows of A | B | fused")
    return result
