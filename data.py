"""
The datasets: the built-in toy data ("shapes", pixel space) and ImageNet latents as prepare_imagenet.py
writes them, plus Gaussian stand-ins of the latents' shape for benchmarks. One file, so that training,
sampling, FID and diagnostics read the same data and the latent directory format is defined exactly once.

All expose the same interface: `train` and `eval` index ranges (the eval split is held out of training),
`num_classes`, `channels`/`size` of the model's input, and `batch(indices, flip, noise, images)` returning
the model input x1 (B, C, H, W) in the model's scale, labels y (B,) and, when asked, the uint8 images REPA
encodes. `Stream` draws training's global batches: every random draw of a step as a function of (seed, step).
"""
import json
import math
import os
import queue
import threading
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw

#################################################################################
#                       Toy data: coloured shapes, 10 classes                   #
#################################################################################

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "crescent", "bar", "two dots", "half disk")


def _polygon(kind, cx, cy, r, angle):
    """Vertices of the polygonal shapes, rotated by angle (radians), around (cx, cy) with radius r."""
    if kind == "square":
        pts = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        pts = [(x * 0.75, y * 0.75) for x, y in pts]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 2, math.pi / 2 + 2.094, math.pi / 2 + 4.189)]
    elif kind == "cross":
        a, b = 1.0, 0.4
        pts = [(b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b), (-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b)]
    elif kind == "star":
        pts = [((1.0 if k % 2 == 0 else 0.5) * math.cos(math.pi / 2 + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.5) * math.sin(math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    else:  # bar
        pts = [(1, 0.32), (-1, 0.32), (-1, -0.32), (1, -0.32)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render_shape(label, rng, size=32):
    """One (size, size, 3) uint8 image of shape class `label`: a light shape of a random colour on a dark
    background of a random colour, with random rotation, size (radius 36-42% of the side) and position (the
    centre within 6% of the side from the middle). Drawn at 4x and box-filtered down, so edges are anti-aliased.

    The figure is always lighter than the ground and always near the middle because that is what lets a small
    model learn the classes in the README's five CPU minutes: with colours of either contrast and shapes
    anywhere in the frame (radius 30-45%), a shape classifier recognised 34% of the quick start's samples; a
    light-on-dark figure alone gave 67%, both together 95%."""
    S = 4 * size
    bg = rng.integers(0, 96, 3)  # dark: every channel below 96
    fg = rng.integers(160, 256, 3)  # light: every channel at least 160
    img = Image.new("RGB", (S, S), tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(img)
    r = S * rng.uniform(0.36, 0.42)
    cx, cy = S / 2 + S * rng.uniform(-0.06, 0.06, 2)
    angle = rng.uniform(0, 2 * math.pi)
    fill = tuple(int(c) for c in fg)
    kind = SHAPES[label]
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r * 0.4)))
    elif kind == "crescent":
        draw.ellipse(box, fill=fill)
        dx, dy = 0.6 * r * math.cos(angle), 0.6 * r * math.sin(angle)
        draw.ellipse((box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy), fill=tuple(int(c) for c in bg))
    elif kind == "two dots":
        for sign in (-1, 1):
            x, y = cx + sign * 0.55 * r * math.cos(angle), cy + sign * 0.55 * r * math.sin(angle)
            draw.ellipse((x - 0.45 * r, y - 0.45 * r, x + 0.45 * r, y + 0.45 * r), fill=fill)
    elif kind == "half disk":
        start = math.degrees(angle)
        draw.pieslice(box, start, start + 180, fill=fill)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)
    return np.asarray(img.reduce(4))


class Shapes:
    """Procedural class-conditional RGB data in pixel space: image i of a split is a pure function of
    (seed, split, i), so nothing is stored and every run sees the same data. Pixels map to [-1, 1]."""

    num_classes = len(SHAPES)
    channels = 3

    def __init__(self, size=32, seed=0, num_train=50_000, num_eval=1_000):
        self.size, self.seed = size, seed
        self.train, self.eval = range(num_train), range(num_train, num_train + num_eval)

    def images(self, indices):
        """(uint8 images (n, size, size, 3), labels (n,)) for dataset indices."""
        labels, images = [], []
        for i in indices:
            rng = np.random.default_rng([self.seed, int(i)])
            labels.append(int(rng.integers(self.num_classes)))
            images.append(render_shape(labels[-1], rng, self.size))
        return np.stack(images), np.array(labels, dtype=np.int64)

    def batch(self, indices, flip=None, noise=None, images=False):
        """x1 (B, 3, size, size) in [-1, 1], y (B,), and the uint8 images when asked. The toy data has no
        augmentation and no posterior: flip and noise are ignored."""
        pixels, labels = self.images(indices)
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x, torch.from_numpy(labels), (torch.from_numpy(pixels) if images else None)


#################################################################################
#                   ImageNet latents (written by prepare_imagenet.py)           #
#################################################################################
# The directory format, version 1:
#   manifest.json            {"format": 1, "count", "num_classes", "classes", "image_size", "latent_shape",
#                             "latent_dtype", "vae", "images": bool, "shards": [{"name", "count"}, ...],
#                             "skipped": [[file, reason], ...], ...}
#   <shard>/moments.npy      (n, 2, 2, 4, 32, 32) float16/32: [unflipped, flipped][posterior mean, std]
#                            (4 x 32 x 32 is "latent_shape", image_size / 8 on a side)
#   <shard>/labels.npy       (n,) int64 class indices (sorted folder order; names in "classes")
#   <shard>/images.npy       (n, 256, 256, 3) uint8 centre crops, unflipped (only with "images": true, for REPA)
# The manifest is written once every shard is complete; readers see nothing before that.

FORMAT = 1
LATENT_SCALE = 0.18215  # SD-VAE latents times this have about unit variance


def write_manifest(path, manifest):
    """Write manifest.json atomically (temporary file, then rename)."""
    tmp = os.path.join(path, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, **manifest}, f, indent=1)
    os.replace(tmp, os.path.join(path, "manifest.json"))


def file_check(path):
    """{"bytes", "crc32"} of a file, as the manifest records each shard file when it is written (zlib's CRC32
    runs at about 4 GB/s here, so the check is bound by reading the file)."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            crc = zlib.crc32(block, crc)
    return {"bytes": os.path.getsize(path), "crc32": crc}


def check_shard(path, shard, names, crc=True):
    """Stop with the shard named when a file of it is missing, of another size or (crc=True) CRC than the
    manifest records (truncated, bit-flipped, replaced), or holds another number of rows than the manifest says."""
    folder = os.path.join(path, shard["name"])
    redo = (f"delete {folder} and run prepare_imagenet.py again with the command that made {path} (it redoes "
            "only missing shards)")
    for name in names:
        file = os.path.join(folder, name)
        if not os.path.exists(file):
            raise ValueError(f"{file} is missing: {path} is damaged; {redo}")
        recorded = shard.get("files", {}).get(name)  # absent in directories written before checks were recorded
        if recorded and os.path.getsize(file) != recorded["bytes"]:
            raise ValueError(f"{file} has {os.path.getsize(file)} bytes, its manifest says {recorded['bytes']} "
                             f"(truncated or replaced): {path} is damaged; {redo}")
        if crc and recorded and file_check(file)["crc32"] != recorded["crc32"]:
            raise ValueError(f"{file} does not match the CRC its manifest recorded when it was written (its bytes "
                             f"changed on disk): {path} is damaged; {redo}")
        try:
            rows = len(np.load(file, mmap_mode="r"))
        except ValueError as e:  # a header that promises more data than the file holds
            raise ValueError(f"{file} cannot be read ({e}): {path} is damaged; {redo}") from None
        if rows != shard["count"]:
            raise ValueError(f"{file} holds {rows} rows, the manifest says {shard['count']}: the manifest does not "
                             f"match the shards of {path}; {redo}")


class Latents:
    """Memory-mapped ImageNet latents; each batch draws a fresh posterior sample and a random flip. Every
    shard is checked against the manifest when the directory is opened (check_shard): sizes and row counts
    always, the CRCs with crc=True (a read of every byte: 84 GB of float32 moments for ImageNet, and 252 GB more
    of crops with --images, at about 4 GB/s from the page cache, at the disk's speed otherwise)."""

    def __init__(self, path, num_eval=1_000, seed=0, crc=True):
        manifest_path = os.path.join(path, "manifest.json")
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(f"no latent dataset at {path} (no manifest.json). Make one with "
                                    f"`python prepare_imagenet.py --data-path IMAGENET/train --out {path}`, "
                                    f"or train on the built-in toy data with --data=shapes")
        with open(manifest_path) as f:
            self.manifest = m = json.load(f)
        if m.get("format") != FORMAT:
            raise ValueError(f"{path} has latent format {m.get('format')}, this code reads format {FORMAT}")
        self.num_classes, self.has_images = m["num_classes"], m["images"]
        self.channels, self.size = m["latent_shape"][0], m["latent_shape"][1]
        arrays = ["moments.npy", "labels.npy"] + ["images.npy"] * bool(self.has_images)
        for shard in m["shards"]:
            check_shard(path, shard, arrays, crc)
        if sum(s["count"] for s in m["shards"]) != m["count"]:
            raise ValueError(f"{manifest_path} says {m['count']} images but its shards hold "
                             f"{sum(s['count'] for s in m['shards'])}: it does not match its shards. Run "
                             f"prepare_imagenet.py again with the command that made {path}")
        load = lambda shard, name: np.load(os.path.join(path, shard["name"], name), mmap_mode="r")
        self.moments = [load(s, "moments.npy") for s in m["shards"]]
        self.labels = np.concatenate([load(s, "labels.npy") for s in m["shards"]])
        self.pixels = [load(s, "images.npy") for s in m["shards"]] if self.has_images else None
        self.starts = np.cumsum([0] + [s["count"] for s in m["shards"]])
        n = int(self.starts[-1])
        if n <= num_eval:
            raise ValueError(f"{path} holds {n} latents, not more than the {num_eval} held out for evaluation")
        # The eval split: num_eval images held out of training, chosen once by a fixed permutation.
        order = np.random.default_rng(seed).permutation(n)
        held = np.zeros(n, dtype=bool)
        held[order[:num_eval]] = True
        self.train, self.eval = np.flatnonzero(~held), np.flatnonzero(held)

    def _rows(self, arrays, indices):
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        return np.stack([arrays[s][i - self.starts[s]] for s, i in zip(shard, indices)])

    def batch(self, indices, flip=None, noise=None, images=False):
        """x1 = (mean + std * noise) * 0.18215 of each latent, flipped where flip is True, y, and the images
        flipped alike when asked. flip (B,) and noise (B, 4, 32, 32) come from the caller, so that the draws do
        not depend on how a batch is split across GPUs; noise=None gives the posterior mean, flip=None no flip."""
        indices = np.asarray(indices)
        device = noise.device if noise is not None else flip.device if flip is not None else torch.device("cpu")
        moments = torch.from_numpy(self._rows(self.moments, indices).astype(np.float32)).to(device)
        flip = torch.zeros(len(indices), dtype=torch.bool, device=device) if flip is None else flip
        mean, std = torch.where(flip[:, None, None, None, None], moments[:, 1], moments[:, 0]).unbind(1)
        x = (mean if noise is None else mean + std * noise) * LATENT_SCALE
        y = torch.from_numpy(self.labels[indices])
        pixels = None
        if images:
            if not self.has_images:
                raise ValueError("REPA needs the images: prepare the dataset with --images")
            pixels = torch.from_numpy(self._rows(self.pixels, indices)).to(device)
            pixels = torch.where(flip[:, None, None, None], pixels.flip(2), pixels)
        return x, y, pixels


class RandomLatents:
    """Gaussian stand-ins with ImageNet's latent shape and 1000 classes, for timing without a dataset
    (`train.py --bench`); random uint8 images when REPA asks for them. Nothing here is worth learning."""

    num_classes, channels = 1000, 4

    def __init__(self, image_size=256, count=100_000, num_eval=1_000):
        self.size = image_size // 8
        self.train, self.eval = range(count), range(count, count + num_eval)

    def batch(self, indices, flip=None, noise=None, images=False):
        """x1: the given noise (B, 4, size, size), y: the indices mod 1000, and random images when asked."""
        y = torch.as_tensor(np.asarray(indices) % self.num_classes)
        pixels = None
        if images:
            pixels = torch.randint(0, 256, (len(y), 8 * self.size, 8 * self.size, 3), dtype=torch.uint8,
                                   device=noise.device)
        return noise, y, pixels


def load_data(name_or_path, image_size=None, seed=0, num_eval=1_000, crc=True):
    """'shapes' (toy, pixel space, image_size 32 by default), 'random' (RandomLatents, image_size 256 by
    default) or the path of a prepared latent directory (its shards' CRCs checked if crc), with num_eval images
    held out of training."""
    if name_or_path == "shapes":
        return Shapes(size=image_size or 32, seed=seed, num_eval=num_eval)
    if name_or_path == "random":
        return RandomLatents(image_size or 256, num_eval=num_eval)
    data = Latents(name_or_path, num_eval=num_eval, seed=seed, crc=crc)
    expected = data.manifest["image_size"]
    if image_size not in (None, expected):
        raise ValueError(f"{name_or_path} holds latents of {expected}px images, not {image_size}px")
    return data


class OneClass:
    """A dataset with its labels ignored, for unconditional training (train.py --unconditional): one class, and
    every label 0."""

    num_classes = 1

    def __init__(self, data):
        self.data = data

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batch(self, *args, **kwargs):
        x, y, images = self.data.batch(*args, **kwargs)
        return x, torch.zeros_like(y), images


#################################################################################
#                          The training stream                                  #
#################################################################################

class Stream:
    """The global batch of step s and every random draw that goes with it, as a function of (seed, s).
    The data order is a fresh permutation of the training indices every epoch (the last partial batch of an
    epoch is dropped). t is uniform on [0, 1], or with lognormal=(m, s) sigmoid(m + s n), n ~ N(0, 1)."""

    def __init__(self, data, global_batch, seed, device, lognormal=None):
        self.data, self.G, self.seed, self.device, self.lognormal = data, global_batch, seed, device, lognormal
        self.train = torch.as_tensor(np.asarray(data.train))
        self.steps_per_epoch = len(self.train) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the global batch {global_batch} is larger than the {len(self.train)} training images")
        self.epoch, self.order = None, None

    def draw(self, step, drop_prob):
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self.epoch, self.order = epoch, self.train[torch.randperm(len(self.train), generator=g)]
        g = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + step)
        shape, dev = (self.G, self.data.channels, self.data.size, self.data.size), self.device
        return dict(
            indices=self.order[pos * self.G:(pos + 1) * self.G],
            t=torch.rand(self.G, generator=g, device=dev) if self.lognormal is None else
            torch.sigmoid(self.lognormal[0] + self.lognormal[1] * torch.randn(self.G, generator=g, device=dev)),
            drop=torch.rand(self.G, generator=g, device=dev) < drop_prob,  # labels -> null class
            flip=torch.rand(self.G, generator=g, device=dev) < 0.5,  # latents only
            eps=torch.randn(shape, generator=g, device=dev),  # the interpolant's noise
            posterior=torch.randn(shape, generator=g, device=dev))  # latents only: the posterior sample's noise


class Prefetcher:
    """What make(step) returns for the steps first..last - 1 in order, made `depth` steps ahead by a background
    thread (depth 0: made on demand, in the caller's thread). make is a function of the step alone (train.py's
    load_step: the draw and the batches, functions of (seed, step)), so prefetching changes when the numbers are
    computed, never which. An error in the thread is raised by get() of its step. A context: leaving it stops
    the thread.

        with Prefetcher(lambda s: load_step(data, stream, s, ...), step, max_steps) as batches:
            while step < max_steps:
                draw, parts = batches.get(step)
    """

    def __init__(self, make, first, last, depth=2):
        self.make, self.depth = make, depth
        if depth:
            self.queue, self.stopped = queue.Queue(depth), threading.Event()
            self.thread = threading.Thread(target=self._run, args=(first, last), daemon=True, name="prefetch")
            self.thread.start()

    def _run(self, first, last):
        for step in range(first, last):
            try:
                item = (step, self.make(step), None)
            except BaseException as e:  # handed to the loop, which raises it at this step
                item = (step, None, e)
            while not self.stopped.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if item[2] is not None or self.stopped.is_set():
                return

    def get(self, step):
        if not self.depth:
            return self.make(step)
        made, value, error = self.queue.get()
        if error is not None:
            raise error
        if made != step:
            raise RuntimeError(f"the prefetcher made step {made} where step {step} was asked for: get() must ask "
                               "for the steps in order, from the first")
        return value

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.depth:
            self.stopped.set()
            self.thread.join(timeout=10)
