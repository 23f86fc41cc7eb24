"""
Checkpoints and weight files on disk: the one place that writes train.py's checkpoints and reads every weight
file the project loads (its own checkpoints, released SiT ones, the SD-VAE's .safetensors or .bin, DINOv2, the
FID Inception), from a path or a URL.

Its own file because every script needs it and none of it is the network: model.py builds SiT, this reads and
writes bytes. Writes are atomic (temporary file, then rename); reads never run code (weights_only=True, or the
documented .safetensors layout); a failure names the file and says what to do.
"""
import hashlib
import json
import os
import re
import shutil

import torch


def save_checkpoint(checkpoint, path):
    """torch.save to a temporary file, then an atomic rename: a crash never leaves a half-written checkpoint.
    A failed write (a full disk) removes the partial file and says so; earlier checkpoints are untouched."""
    tmp = f"{path}.tmp"
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise SystemExit(f"could not write {path} ({why}; {free / 2**20:.1f} MiB free there); the partial file was "
                         "removed and every earlier checkpoint is kept. Free some space (or fix the directory) and "
                         "--resume") from None


def resolve(source):
    """The local path of a checkpoint source: a path, or a URL downloaded once into torch.hub's cache."""
    if "://" not in source:
        return source
    # The cached name keeps the URL's path: the ema and mse VAEs share a file name.
    path = os.path.join(torch.hub.get_dir(), "checkpoints", source.split("://", 1)[1].replace("/", "_"))
    if not os.path.exists(path):
        folder = os.path.dirname(path)
        made = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        try:
            torch.hub.download_url_to_file(source, path)
        except Exception as e:  # noqa: BLE001 (no network, a dead link, a proxy: all end the same way)
            if made and not os.listdir(folder):
                os.rmdir(folder)  # leave no empty cache folder behind
            raise SystemExit(f"could not download {source} ({type(e).__name__}: {e}). Download it on a machine with "
                             f"network access and give its local path instead, or put it at {path}") from None
    return path


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(source):
    """A checkpoint or state dict from a local path or a URL (downloaded once into torch.hub's cache), onto
    the CPU: torch.save files with weights_only=True, .safetensors files by their documented layout. A file
    whose name carries a hash prefix (torch.hub's convention, name-<sha256 prefix>.ext) must match it."""
    path = resolve(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes): a copy or download that did not finish; fetch it again")
    named = re.search(r"-([0-9a-f]{8,})\.[A-Za-z]+$", os.path.basename(path))
    if named and not sha256_of(path).startswith(named.group(1)):
        raise ValueError(f"{path} is not the file its name says: its sha256 does not start with {named.group(1)}. "
                         "It is corrupt or another file; download it again")
    try:
        if path.endswith(".safetensors"):
            return read_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load's errors for a non-checkpoint are many and cryptic)
        raise ValueError(f"{path} is not a checkpoint that can be read safely: not a torch.save file of tensors "
                         f"(it is loaded with weights_only=True, so no code in it ever runs) nor a .safetensors file "
                         f"({type(e).__name__})") from None


def read_safetensors(path):
    """A .safetensors file: an 8-byte little-endian header length, a JSON header mapping each name to its
    dtype, shape and byte range, then the raw little-endian data. No pickle, hence no safetensors package."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = bytearray(f.read())
    header.pop("__metadata__", None)
    state = {}
    for name, info in header.items():
        dtype, (begin, end) = dtypes[info["dtype"]], info["data_offsets"]
        flat = torch.frombuffer(data, dtype=dtype, offset=begin, count=(end - begin) // dtype.itemsize)
        state[name] = flat.reshape(info["shape"])
    return state


def weights_of(checkpoint, ema=True):
    """The state dict in a checkpoint: ours and SiT/DiT's training checkpoints hold "ema" and "model"
    (EMA preferred unless ema=False); a released SiT checkpoint is a bare state dict."""
    for key in ("ema", "model") if ema else ("model", "ema"):
        if key in checkpoint:
            return checkpoint[key]
    return checkpoint
