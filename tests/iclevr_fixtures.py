"""A miniature iCLEVR in exactly the course's formats, and a stand-in for the course's evaluator.

The real data and the course's evaluator cannot be shipped or downloaded here, so the tests (and a CPU demo)
use these instead:
  * write_miniature_iclevr(root): objects.json, train.json, test.json, new_test.json and iclevr/*.png, laid out
    and formatted as the course's files are; each PNG is a 320x240 RGBA "scene" of 1-3 flat coloured shapes
    (a square for a cube, a disc for a sphere, an upright capped bar for a cylinder) in the 8 CLEVR colours.
  * write_stand_in_evaluator(folder): evaluator.py + checkpoint.pth with the course's interface: a class
    evaluation_model whose __init__ loads './checkpoint.pth' from the working directory and keeps its network
    in .resnet18, and eval(images, labels) -> hits / requested objects with the top-k rule. Its "network" is
    not a classifier: object j's score is sigmoid(gain * the j-th value of the image, red channel row by row, so
    pixel (0, j) when the image is at least 24 wide), so a test can set the scores it wants by painting pixels.
    Every call to eval is saved to calls/NNNN.pt beside evaluator.py.

    python tests/iclevr_fixtures.py runs/mini_iclevr --num-train 256   # data + runs/mini_iclevr/stand_in_evaluator
"""
import argparse
import json
import os
import random

import torch
from PIL import Image, ImageDraw

# The eight CLEVR colours (RGB) and three shapes; the course's objects.json lists colour fastest, shape slowest.
COLOURS = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
           "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
SHAPES = ("cube", "sphere", "cylinder")
COURSE_OBJECTS = [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


def shade(rgb, factor):
    return tuple(max(0, min(255, round(c * factor))) for c in rgb)


def draw_scene(names, rng, width=320, height=240):
    """One RGBA scene: a floor shaded top to bottom, and each object at its own spot, nearer ones lower and larger."""
    img = Image.new("RGBA", (width, height))
    draw = ImageDraw.Draw(img)
    for yy in range(height):
        v = 150 + round(40 * yy / height)
        draw.line([(0, yy), (width, yy)], fill=(v, v, v - 4, 255))
    slots = rng.sample(range(3), len(names))  # left, middle, right: objects never overlap
    for name, slot in sorted(zip(names, slots), key=lambda p: p[1]):
        colour, shape = name.split()
        rgb = COLOURS[colour]
        cy = rng.randint(95, 165)
        r = round(18 + 22 * (cy - 95) / 70)  # perspective: lower means nearer means larger
        cx = round(width * (slot + 0.5) / 3 + rng.randint(-20, 20))
        if shape == "cube":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb + (255,), outline=shade(rgb, 0.6) + (255,), width=2)
        elif shape == "sphere":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb + (255,))
            draw.ellipse([cx - r // 2, cy - r // 2, cx - r // 6, cy - r // 6], fill=shade(rgb, 1.35) + (255,))
        else:
            w, cap = round(0.75 * r), max(3, r // 3)
            draw.rectangle([cx - w, cy - r + cap, cx + w, cy + r], fill=shade(rgb, 0.85) + (255,))
            draw.ellipse([cx - w, cy + r - cap, cx + w, cy + r + cap], fill=shade(rgb, 0.85) + (255,))
            draw.ellipse([cx - w, cy - r, cx + w, cy - r + 2 * cap], fill=shade(rgb, 1.2) + (255,))
    return img


def random_condition(rng, names):
    return rng.sample(names, rng.randint(1, 3))


def write_miniature_iclevr(root, num_train=48, num_test=32, seed=0, shuffle_objects=False):
    """The course's four JSON files and root/iclevr/*.png. shuffle_objects writes objects.json in another order
    than the course's, to show that a loader reads the order from the file. Returns the objects mapping."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "iclevr"), exist_ok=True)
    order = list(COURSE_OBJECTS)
    if shuffle_objects:
        rng.shuffle(order)
    objects = {name: i for i, name in enumerate(order)}
    train = {}
    for scene in range(-(-num_train // 3)):  # like CLEVR_train_001032_0/1/2: one scene gains an object at a time
        full = rng.sample(COURSE_OBJECTS, 3)
        for k in range(3):
            if len(train) < num_train:
                train[f"CLEVR_train_{scene:06d}_{k}.png"] = full[:k + 1]
    for name, names in train.items():
        draw_scene(names, rng).save(os.path.join(root, "iclevr", name))
    tests = {f: [random_condition(rng, COURSE_OBJECTS) for _ in range(num_test)] for f in ("test.json", "new_test.json")}
    for name, value in [("objects.json", objects), ("train.json", train), *tests.items()]:
        with open(os.path.join(root, name), "w") as fh:
            json.dump(value, fh)
    return objects


STAND_IN_SOURCE = '''"""Stand-in for the course's evaluator.py (tests only): the same interface, a trivial network.

Object j's score is sigmoid(gain * the j-th value of the normalised image: red channel, row by row, i.e. pixel
(0, j) for images at least 24 wide); accuracy follows the
course's rule: for each image, the k highest scores (k = objects requested) that were requested, over all
requested objects. Every eval call is saved to calls/NNNN.pt beside this file."""
import os

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))


class PixelProbe(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.sigmoid(self.gain * x.flatten(1)[:, :self.num_classes])  # red channel, row by row


class evaluation_model():
    def __init__(self):
        checkpoint = torch.load('./checkpoint.pth')  # relative to the working directory, as the course's is
        self.resnet18 = PixelProbe(checkpoint['num_classes'])
        self.resnet18.load_state_dict(checkpoint['model'])
        self.resnet18 = self.resnet18{to_device}
        self.resnet18.eval()
        self.classnum = checkpoint['num_classes']
        self.calls = 0

    def compute_acc(self, out, onehot_labels):
        hits = total = 0
        for scores, wanted in zip(out, onehot_labels):
            k = int(wanted.sum().item())
            top = set(scores.topk(k).indices.tolist())
            hits += len(top & set(torch.nonzero(wanted).flatten().tolist()))
            total += k
        return hits / total

    def eval(self, images, labels):
        with torch.no_grad():
            out = self.resnet18(images)
            os.makedirs(os.path.join(HERE, 'calls'), exist_ok=True)
            torch.save({{'images': images.cpu(), 'labels': labels.cpu()}},
                       os.path.join(HERE, 'calls', f'{{self.calls:04d}}.pt'))
            self.calls += 1
            return self.compute_acc(out.cpu(), labels.cpu())
'''


def write_stand_in_evaluator(folder, num_classes=24, gain=4.0, needs_cuda=False):
    """evaluator.py + checkpoint.pth ({'model': state dict}, as the course's). needs_cuda: call .cuda() in
    __init__ as the course's evaluator does (so it cannot be built without a GPU)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "evaluator.py"), "w") as fh:
        fh.write(STAND_IN_SOURCE.format(to_device=".cuda()" if needs_cuda else ""))
    torch.save({"model": {"gain": torch.tensor(gain)}, "num_classes": num_classes}, os.path.join(folder, "checkpoint.pth"))
    return folder


def stand_in_calls(folder):
    """Every eval call the stand-in in folder received, in order: [{'images': ..., 'labels': ...}, ...]."""
    calls = os.path.join(folder, "calls")
    return [torch.load(os.path.join(calls, f), weights_only=True) for f in sorted(os.listdir(calls))]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Write a miniature iCLEVR (the course's formats) and a stand-in evaluator.")
    p.add_argument("root")
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-test", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write_miniature_iclevr(a.root, a.num_train, a.num_test, a.seed)
    write_stand_in_evaluator(os.path.join(a.root, "stand_in_evaluator"))
    print(f"wrote {a.root}: objects.json, train.json ({a.num_train} images in iclevr/), test.json, new_test.json "
          f"({a.num_test} conditions each), stand_in_evaluator/")
