"""
Encode ImageNet (or any ImageFolder-style directory) once, offline, into the latent directory train.py reads
(the format is defined in data.py).

    python prepare_imagenet.py --data-path ~/imagenet/train --out data/in256                      # one GPU
    torchrun --nproc_per_node=8 prepare_imagenet.py --data-path ~/imagenet/train --out data/in256 --images

Per image: ADM's centre crop to --image-size, then for both horizontal flips the SD-VAE posterior mean and std
(training draws a fresh sample and a random flip every step), the label (sorted folder order) and, with
--images, the uint8 crop REPA's encoder needs.

The work is cut into shards of --shard-size files in sorted order, dealt round-robin to the processes (any
number of GPUs and nodes sharing --out). A shard is written into a temporary directory and renamed when
complete, so an interrupted run, restarted with the same command, redoes only unfinished shards and never
rewrites a finished one. The manifest is written last, once every shard exists: until then train.py sees no
dataset. Files that cannot be read are skipped and listed in the manifest, never fatal. Each shard records
the size and CRC32 of its files, which the manifest collects and train.py checks whenever it opens the directory
(a truncated, bit-flipped or missing shard file stops it, the shard named).
"""
import argparse
import hashlib
import json
import os
import shutil
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from cli import HelpFormatter, Preemption, check_values, setup_distributed
from data import file_check, write_manifest
from checkpoint import resolve, sha256_of, write_atomically
from vae import VAE_URL, load_vae

EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")
MIN_SIDE, MAX_ASPECT = 8, 16  # smaller or more elongated images are skipped: upscaling them would be noise
SETTINGS = ("image_size", "vae", "images", "shard_size", "dtype", "precision")  # fixed for a directory's life


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-path", required=True, help="ImageFolder-style directory: one folder per class")
    p.add_argument("--out", required=True, help="output directory (created; an existing one is resumed)")
    p.add_argument("--image-size", type=int, default=256, help="crop size; latents are image_size / 8 on a side")
    p.add_argument("--vae", default=VAE_URL, help="SD-VAE weights: URL or path of diffusion_pytorch_model."
                   "{safetensors,bin} (sd-vae-ft-ema by default), or 'random' for a dry run")
    p.add_argument("--images", action="store_true", help="also store the uint8 crops (needed by --repa)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call, per process (x2 flips)")
    p.add_argument("--shard-size", type=int, default=4096, help="files per shard, the unit of resumption")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage of the posterior moments; float16 halves the disk use")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="VAE arithmetic: bf16 autocast is faster on GPUs, at some loss of latent accuracy")
    p.add_argument("--workers", type=int, default=4, help="image-decoding processes per GPU")
    args = p.parse_args(argv)
    check_values(p, args, at_least={"image_size": 8, "batch_size": 1, "shard_size": 1, "workers": 0},
                 readable=("data_path", "vae"), writable=("out",))
    if not os.path.isdir(args.data_path):
        p.error(f"--data-path {args.data_path} is not a directory (expected ImageNet's train/ with one folder per class)")
    if args.image_size % 8:
        p.error(f"--image-size must be a multiple of 8 (the VAE downsamples 8x), got {args.image_size}")
    return args


#################################################################################
#                                   Images                                      #
#################################################################################

def center_crop(image, size):
    """ADM's centre crop (guided-diffusion's center_crop_arr, used by DiT, SiT and REPA): halve with a box
    filter while the short side is at least twice the target, resize bicubically so the short side equals
    it, then cut the central size x size square. Returns uint8 (size, size, 3)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]


def load_image(path, size):
    """(uint8 crop, None), or (None, why it was skipped). Grayscale, CMYK, palette and alpha images are
    converted to RGB; 16-bit ones are scaled to 8 bits (PIL's own conversion would clip them to white)."""
    try:
        with Image.open(path) as image:
            image.load()
            w, h = image.size
            if min(w, h) < MIN_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
                return None, f"{w}x{h} is too small or too elongated"
            if image.mode.startswith("I"):  # 16-bit (I;16*) or 32-bit integer grayscale: 0..65535 -> 0..255
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
            return center_crop(image.convert("RGB"), size), None
    except Exception as e:  # truncated, corrupt, not an image: skip it, never stop a long run
        return None, f"{type(e).__name__}: {e}"


class Files(torch.utils.data.Dataset):
    def __init__(self, root, files, size):
        self.root, self.files, self.size = root, files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return load_image(os.path.join(self.root, self.files[i][0]), self.size)


def scan(root):
    """Class names (sorted folder names) and [(relative path, class index)] in sorted order. A folder that
    cannot be read, a class folder that leads back into --data-path (its images would be counted twice, under
    a wrong label) and a tree without images stop the run before anything is written."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise SystemExit(f"{root} has no class folders: point --data-path at a directory of <class>/<image> files")
    real_root = os.path.realpath(root)
    files = []

    def unreadable(error):
        raise SystemExit(f"cannot read {error.filename} ({error.strerror}): fix its permissions, or move it out of "
                         f"{root}; nothing was written")

    for label, name in enumerate(classes):
        folder = os.path.realpath(os.path.join(root, name))
        if real_root == folder or real_root.startswith(folder + os.sep):
            raise SystemExit(f"class folder {os.path.join(root, name)} links to {folder}, which contains --data-path "
                             "itself: its images would be read twice, once under a wrong label. Remove the link")
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), onerror=unreadable):
            dirnames.sort()
            files += [(os.path.relpath(os.path.join(dirpath, f), root), label)
                      for f in sorted(filenames) if f.lower().endswith(EXTENSIONS)]
    if not files:
        raise SystemExit(f"the {len(classes)} class folders of {root} hold no image files ({', '.join(EXTENSIONS)})")
    return classes, files


#################################################################################
#                                  Encoding                                     #
#################################################################################

@torch.no_grad()
def shard_bytes(args, count):
    """About what a shard of `count` images takes on disk: both flips' mean and std, labels, the crops."""
    latent = 4 * (args.image_size // 8) ** 2
    return count * (4 * latent * np.dtype(args.dtype).itemsize + 8 + args.images * 3 * args.image_size ** 2)


def encode_shard(args, vae, device, files, tmp):
    """Encode one shard's files into a new directory tmp: moments.npy, labels.npy, images.npy, skipped.json."""
    os.makedirs(tmp)
    loader = torch.utils.data.DataLoader(Files(args.data_path, files, args.image_size), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=list)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    moments, labels, images, skipped = [], [], [], []
    for b, batch in enumerate(loader):
        first = b * args.batch_size
        for i, (_, why) in enumerate(batch):
            if why is not None:
                skipped.append([files[first + i][0], why])
        kept = [i for i, (crop, _) in enumerate(batch) if crop is not None]
        if not kept:
            continue
        crops = torch.from_numpy(np.stack([batch[i][0] for i in kept])).to(device)  # (n, H, W, 3) uint8
        x = crops.permute(0, 3, 1, 2).float() / 127.5 - 1
        with autocast:
            mean, std = vae.encode(torch.cat([x, x.flip(3)]))  # both horizontal flips in one call
        n = len(kept)
        m = torch.stack([torch.stack([mean[:n], std[:n]], 1), torch.stack([mean[n:], std[n:]], 1)], 1)
        moments.append(m.float().cpu().numpy().astype(args.dtype))  # (n, flip, [mean, std], 4, h, w)
        labels += [files[first + i][1] for i in kept]
        if args.images:
            images.append(crops.cpu().numpy())
    latent = (4, args.image_size // 8, args.image_size // 8)
    np.save(os.path.join(tmp, "moments.npy"),
            np.concatenate(moments) if moments else np.zeros((0, 2, 2, *latent), args.dtype))
    np.save(os.path.join(tmp, "labels.npy"), np.array(labels, dtype=np.int64))
    if args.images:
        np.save(os.path.join(tmp, "images.npy"),
                np.concatenate(images) if images else np.zeros((0, args.image_size, args.image_size, 3), np.uint8))
    with open(os.path.join(tmp, "skipped.json"), "w") as f:
        json.dump(skipped, f)
    checks = {name: file_check(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp)) if name.endswith(".npy")}
    with open(os.path.join(tmp, "checks.json"), "w") as f:  # the manifest's record of each file, read when opened
        json.dump(checks, f)


def load_plan(args, rank, world):
    """The class list, file list and settings of this output directory, made by rank 0 on the first run
    and read back on every later one, so a resumed run encodes exactly the files the first run planned."""
    path = os.path.join(args.out, "plan.json")
    settings = {k: getattr(args, k) for k in SETTINGS}
    if rank == 0 and not os.path.exists(path):
        os.makedirs(args.out, exist_ok=True)
        classes, files = scan(args.data_path)
        with open(path + ".tmp", "w") as f:
            json.dump({"settings": settings, "data_path": os.path.abspath(args.data_path), "classes": classes,
                       "files": files}, f)
        os.replace(path + ".tmp", path)
    if world > 1:
        dist.barrier()
    with open(path) as f:
        plan = json.load(f)
    if plan["data_path"] != os.path.abspath(args.data_path):
        raise SystemExit(f"{args.out} holds the images of {plan['data_path']}, not of {os.path.abspath(args.data_path)}: "
                         "resuming would mix two datasets. Give the original --data-path, or a new --out")
    if plan["settings"] != settings:
        was = plan["settings"]
        changed = ", ".join(f"{k}: {was[k]} -> {settings[k]}" for k in SETTINGS if was[k] != settings[k])
        raise SystemExit(f"{args.out} was started with other settings ({changed}). Resume it with the original "
                         f"flags, or write to a new --out")
    return plan


class Lock:
    """One run per output directory: rank 0 holds --out/.lock (its host and pid) while the run lasts. A lock
    left by a process that died on this host is taken over; one from another host must be removed by hand."""

    def __init__(self, out, rank):
        self.path, self.held = os.path.join(out, ".lock"), False
        if rank != 0:
            return
        os.makedirs(out, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                with open(self.path, "x") as f:
                    f.write(me)
                self.held = True
                return
            except FileExistsError:
                with open(self.path) as f:
                    host, _, pid = f.read().partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    os.remove(self.path)  # its owner died (killed, or crashed): take over
                    continue
                raise SystemExit(f"{out} is being written by another run (pid {pid} on {host}, per {self.path}); "
                                 f"wait for it, or delete {self.path} if no such run is alive")

    def release(self):
        if self.held:
            os.remove(self.path)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(args):
    rank, world, device = setup_distributed()
    lock = Lock(args.out, rank)
    try:
        run(args, rank, world, device)
    finally:
        lock.release()


def run(args, rank, world, device):
    plan = load_plan(args, rank, world)
    files = [tuple(f) for f in plan["files"]]
    num_shards = -(-len(files) // args.shard_size)
    names = [f"shard_{k:05d}" for k in range(num_shards)]
    todo = [k for k in range(rank, num_shards, world) if not os.path.isdir(os.path.join(args.out, names[k]))]
    if rank == 0:
        done = sum(os.path.isdir(os.path.join(args.out, name)) for name in names)
        print(f"{len(files)} files in {len(plan['classes'])} classes: {done} of {num_shards} shards done; "
              f"{world} process(es) on {device}")
    if todo:
        vae = load_vae(args.vae).to(device)
        bar = tqdm(total=sum(len(files[k * args.shard_size:(k + 1) * args.shard_size]) for k in todo),
                   unit="img", disable=rank != 0, desc=f"rank 0 of {world}")
        with Preemption() as preempt:  # a SIGTERM or SIGUSR1 stops after the shard under way
            for k in todo:
                shard = files[k * args.shard_size:(k + 1) * args.shard_size]
                path = os.path.join(args.out, names[k])
                shutil.rmtree(f"{path}.tmp", ignore_errors=True)  # the remains of an interrupted run
                start = time.time()
                encode = lambda tmp: encode_shard(args, vae, device, shard, tmp)  # noqa: E731
                write_atomically(path, encode, shard_bytes(args, len(shard)), "every finished shard is kept. Free "
                                 "some space and run the same command to continue")
                bar.update(len(shard))
                bar.set_postfix_str(f"{len(shard) / (time.time() - start):.1f} img/s this rank")
                if preempt.requested():
                    preempt.stop(f"stopped after {names[k]}; every finished shard is kept. Run the same command to "
                                 "make the rest")
        bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        write_final_manifest(args, plan, names)
    if world > 1:
        dist.destroy_process_group()


def shard_checks(folder):
    """{file: its bytes and CRC32} of a finished shard: as encode_shard recorded them (checks.json), or made now
    for a shard written before shards recorded them."""
    if os.path.exists(os.path.join(folder, "checks.json")):
        with open(os.path.join(folder, "checks.json")) as f:
            return json.load(f)
    return {name: file_check(os.path.join(folder, name))
            for name in sorted(os.listdir(folder)) if name.endswith(".npy")}


def write_final_manifest(args, plan, names):
    missing = [n for n in names if not os.path.isdir(os.path.join(args.out, n))]
    if missing:
        raise SystemExit(f"{len(missing)} shards are missing (e.g. {missing[0]}): a process failed. Run the same "
                         f"command again to finish them")
    shards, skipped = [], []
    for name in names:
        with open(os.path.join(args.out, name, "skipped.json")) as f:
            skipped += json.load(f)
        count = len(np.load(os.path.join(args.out, name, "labels.npy"), mmap_mode="r"))
        shards.append({"name": name, "count": count, "files": shard_checks(os.path.join(args.out, name))})
    files_digest = hashlib.sha256(json.dumps(plan["files"]).encode()).hexdigest()
    write_manifest(args.out, {
        "count": sum(s["count"] for s in shards), "num_classes": len(plan["classes"]), "classes": plan["classes"],
        "image_size": args.image_size, "latent_shape": [4, args.image_size // 8, args.image_size // 8],
        "latent_dtype": args.dtype, "vae": args.vae,
        "vae_sha256": None if args.vae == "random" else sha256_of(resolve(args.vae)), "precision": args.precision, "images": args.images,
        "crop": "ADM center_crop_arr", "flips": ["none", "horizontal"], "source": plan["data_path"],
        "files": len(plan["files"]), "files_sha256": files_digest, "shards": shards, "skipped": skipped})
    print(f"{args.out}: {sum(s['count'] for s in shards)} images, {len(skipped)} skipped")


if __name__ == "__main__":
    main(parse_args())
