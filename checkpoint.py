"""
Checkpoints and weight files on disk: the one place that writes train.py's checkpoints and reads every weight
file the project loads (its own checkpoints, released SiT ones, the SD-VAE's .safetensors or .bin, DINOv2, the
FID Inception), from a path or a URL; and the one that exports a checkpoint's EMA weights to .safetensors:

    python checkpoint.py results/run/checkpoints/0400000.pt sit-xl-2-dar.safetensors

Also the rules of resuming a run (which checkpoint, what must match, what
may change) and of starting one from weights (--init-from), and models rebuilt from such files.

Its own file because every script needs it and none of it is the network: model.py builds SiT, this reads and
writes bytes. Writes are atomic (temporary file, then rename); reads never run code (weights_only=True, or the
documented .safetensors layout); a failure names the file and says what to do.
"""
import glob
import hashlib
import json
import math
import os
import re
import shutil

import torch

from model import SIZES, SiT


def save_checkpoint(checkpoint, path):
    """torch.save to a temporary file, then an atomic rename: a crash never leaves a half-written checkpoint.
    A failed write (a full disk) removes the partial file and says so; earlier checkpoints are untouched."""
    write_atomically(path, lambda tmp: torch.save(checkpoint, tmp), nbytes(checkpoint),
                     "every earlier checkpoint is kept. Free some space (or fix the directory) and --resume")


def nbytes(obj):
    """The bytes of the tensors and arrays in a (nested) object: about what writing it takes on disk."""
    if isinstance(obj, dict):
        return sum(map(nbytes, obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(map(nbytes, obj))
    return obj.nbytes if hasattr(obj, "nbytes") else 0


def write_atomically(path, write, needed, kept):
    """write(tmp) into a temporary name (a file, or a directory it makes), then rename it to `path`, so that
    `path` exists only complete. A write that fails (a full disk, a file-size limit, a directory that cannot be
    written) removes what it left and stops with a message naming the path, the bytes it needed and the space
    free there; `kept` says what was not touched and what to do."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise SystemExit(f"could not write {path} ({why}; it needs about {needed / 2**20:.1f} MiB and "
                         f"{free / 2**20:.1f} MiB are free there); the partial file was removed and {kept}") from None


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
        if path.endswith(".safetensors"):  # ours carry their config, and load as a checkpoint; others are weights
            state, metadata = read_safetensors(path)
            return {"config": json.loads(metadata["config"]), "ema": state} if "config" in metadata else state
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load's errors for a non-checkpoint are many and cryptic)
        raise ValueError(f"{path} is not a checkpoint that can be read safely: not a torch.save file of tensors "
                         f"(it is loaded with weights_only=True, so no code in it ever runs) nor a .safetensors file "
                         f"({type(e).__name__})") from None


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """(state dict, metadata) of a .safetensors file: an 8-byte little-endian header length, a JSON header mapping
    each name to its dtype, shape and byte range (and "__metadata__" to a dict of strings), then the raw
    little-endian data. No pickle, hence no safetensors package."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = bytearray(f.read())
    metadata = header.pop("__metadata__", None) or {}
    state = {}
    for name, info in header.items():
        dtype, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
        flat = torch.frombuffer(data, dtype=dtype, offset=begin, count=(end - begin) // dtype.itemsize)
        state[name] = flat.reshape(info["shape"])
    return state, metadata


def write_safetensors(state, path, metadata=None):
    """read_safetensors' inverse in the layout of the safetensors package's save_file (tensors ordered by element
    size, largest first, then by name; compact JSON; the header padded with spaces to a multiple of 8 bytes),
    written atomically. metadata: a dict of strings (its keys in any order: the package's own order is a hash
    map's)."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, chunks, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for key in sorted(state, key=lambda k: (-state[k].element_size(), k)):
        t = state[key].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for raw in chunks:
                f.write(raw)

    write_atomically(path, write, 8 + len(text) + offset, "nothing else was touched")


def export(source, path):
    """A checkpoint's EMA weights (its model weights when it has no EMA) as a .safetensors file with the model's
    config in its metadata: every script that takes --ckpt (and --init-from) loads it as the checkpoint."""
    checkpoint = load_checkpoint(source)
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        raise SystemExit(f"{source} is not one of train.py's checkpoints (no config): export needs the config "
                         "that rebuilds the model")
    which = "ema" if "ema" in checkpoint else "model"
    metadata = {"config": json.dumps(checkpoint["config"]), "weights": which, "source": os.path.basename(source),
                "step": str(checkpoint.get("step", "")), "format": "nanoDAR SiT"}
    write_safetensors(weights_of(checkpoint), path, metadata)
    return path


def weights_of(checkpoint, ema=True):
    """The state dict in a checkpoint: ours and SiT/DiT's training checkpoints hold "ema" and "model"
    (EMA preferred unless ema=False); a released SiT checkpoint is a bare state dict."""
    for key in ("ema", "model") if ema else ("model", "ema"):
        if key in checkpoint:
            return checkpoint[key]
    return checkpoint


#################################################################################
#                                   Resuming                                    #
#################################################################################

def resume(args, ckpt_dir, model, ema, opt, projector, retunable, per_invocation, verbose=True, added=None):
    """Load the checkpoint that --resume names (resume_source) into the model, EMA, optimiser and projector and
    the CPU generator; returns its step. Of the run's settings (args, as the checkpoint stored them), those named
    in `retunable` may change (printed when verbose), those in `per_invocation` are this command's alone, and
    every other one defines the run: a checkpoint trained with another value is refused. `added` maps flags
    newer than some checkpoints to the value those checkpoints ran with. Drops the log records after the step."""
    source, ckpt = resume_source(args.resume, ckpt_dir)
    then, now = {**(added or {}), **ckpt["args"]}, vars(args)
    differ = lambda keys: {k: (then.get(k), now.get(k)) for k in sorted(keys) if then.get(k) != now.get(k)}
    changed = differ((then.keys() | now.keys()) - set(retunable) - set(per_invocation))
    if changed:
        raise SystemExit(f"{source} was trained with other settings; resuming would not continue that run. "
                         f"Differences (checkpoint, now): {changed}")
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])
    for group in opt.param_groups:
        group["lr"] = args.lr  # the optimiser's state holds the old rate; --lr may change on resume
    if projector is not None:
        projector.load_state_dict(ckpt["projector"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if verbose:
        retuned = differ(retunable)
        print(f"resumed from {source} at step {ckpt['step']}"
              + (f"; changed (checkpoint, now): {retuned}" if retuned else ""))
        drop_log_after(os.path.join(args.results_dir, "log.jsonl"), ckpt["step"])
    return ckpt["step"]


def refuse_used(results_dir):
    """A fresh start never writes into the directory of another run: one with checkpoints, or with the records
    of a run that wrote none."""
    if glob.glob(os.path.join(results_dir, "checkpoints", "*.pt")):
        raise SystemExit(f"{results_dir} already holds checkpoints: continue with --resume latest, or give "
                         "another --results-dir")
    records = [n for n in ("args.json", "log.jsonl") if os.path.exists(os.path.join(results_dir, n))]
    if records:
        raise SystemExit(f"{results_dir} holds the records ({', '.join(records)}) of a run that wrote no "
                         "checkpoint: give another --results-dir, or delete that directory if it is not needed")


def checkpoints_by_step(ckpt_dir):
    """[(step, path)] of the checkpoints train.py wrote into ckpt_dir (named by step), highest step first."""
    found = []
    for path in glob.glob(os.path.join(ckpt_dir, "*.pt")):
        stem = os.path.basename(path)[:-3]
        if stem.isdigit():
            found.append((int(stem), path))
    return sorted(found, reverse=True)


def resume_source(resume, ckpt_dir):
    """(path, checkpoint) to resume from: --resume=latest takes the highest step in ckpt_dir that can be read
    (an unreadable one is skipped with a message naming it); a path must belong to this run's directory or to
    none (a directory holding another run's checkpoints is never written into). Non-finite state is refused."""
    if resume == "latest":
        candidates = [path for _, path in checkpoints_by_step(ckpt_dir)]
        if not candidates:
            raise SystemExit(f"--resume latest: no checkpoint in {ckpt_dir}")
    else:
        theirs, ours = os.path.realpath(os.path.dirname(resume)), os.path.realpath(ckpt_dir)
        if theirs != ours and checkpoints_by_step(ckpt_dir):
            raise SystemExit(f"--resume={resume} is not a checkpoint of the run in {os.path.dirname(ckpt_dir)}, which "
                             f"holds checkpoints of its own: give the --results-dir that {resume} belongs to, or a new "
                             "one")
        candidates = [resume]
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
            if not (isinstance(ckpt, dict) and {"args", "model", "ema", "opt", "step"} <= ckpt.keys()):
                raise ValueError("it is not a checkpoint of train.py (no args, model, ema, opt and step)")
        except Exception as error:  # noqa: BLE001 (any reason a file cannot be resumed from)
            if resume != "latest":
                raise SystemExit(f"cannot resume from {path}: {error}")
            print(f"skipping {path}, which cannot be read: {error}")
            continue
        bad = nonfinite_tensors(model=ckpt["model"], ema=ckpt["ema"], opt=ckpt["opt"])
        if bad:
            raise SystemExit(f"{path} holds non-finite values ({bad}); resume from an earlier checkpoint")
        return path, ckpt
    raise SystemExit(f"--resume latest: no checkpoint in {ckpt_dir} can be read")


def drop_log_after(path, step):
    """Keep only the log records up to `step`: a resumed run rewrites the later ones exactly (the same draws and
    weights), so a step killed after its checkpoint is never logged twice. Rewritten atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def nonfinite_tensors(**states):
    """Names of the first few tensors with a NaN or inf in nested state dicts (model, EMA, optimiser)."""
    bad = []

    def visit(name, value):
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{name}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{name}.{i}", item)
        elif torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            bad.append(name)

    for name, state in states.items():
        visit(name, state)
    return bad[:5]


def init_from(model, source):
    """Load a checkpoint's weights as a starting point. Residual routing loads strictly. DAR loads the SiT
    weights strictly and the routers only from a checkpoint with the same routing, chunk and final aggregator;
    otherwise the routers start as at step 0 (the paper applies DAR when fine-tuning existing models). With
    routing="explicit" the loaded timestep embedder is kept, so e(t) is not zero at the start. A checkpoint with
    another number of classes (or without the null class) cannot lend its label table: the table starts fresh,
    as at step 0, and every other weight is loaded; it says so."""
    checkpoint = load_checkpoint(source)
    state = weights_of(checkpoint) if isinstance(checkpoint, dict) else {}
    if not (isinstance(state, dict) and any(k.endswith("x_embedder.proj.weight") for k in state)):
        raise SystemExit(f"--init-from={source} holds no SiT weights (no x_embedder): give one of train.py's "
                         "checkpoints or a released SiT checkpoint")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    cfg = model.config
    ours = model.state_dict()
    table = "y_embedder.embedding_table.weight"
    fresh = set()  # what keeps its initial values
    if table in state and state[table].shape[1:] == ours[table].shape[1:] and state[table].shape != ours[table].shape:
        theirs_rows, our_rows = state[table].shape[0], ours[table].shape[0]
        print(f"--init-from={source}: its label table has {theirs_rows} rows and this model's {our_rows} (classes, "
              "then the null class if there is one): the label table starts fresh, every other weight is loaded")
        state, fresh = {k: v for k, v in state.items() if k != table}, {table}
    wrong = [(k, tuple(v.shape), tuple(ours[k].shape)) for k, v in state.items()
             if k in ours and v.shape != ours[k].shape]
    if wrong:
        k, theirs_shape, our_shape = wrong[0]
        raise SystemExit(f"--init-from={source} is another architecture: {k} is {theirs_shape} there and "
                         f"{our_shape} in this model ({len(wrong)} tensors differ). Give the --model, --depth, "
                         f"--hidden-size, --num-heads and --image-size it was trained with")
    theirs = checkpoint.get("config", {}) if isinstance(checkpoint.get("config"), dict) else {}
    same_routing = all(theirs.get(k) == getattr(cfg, k) for k in ("routing", "chunk", "final_agg"))
    if not (cfg.routing == "residual" or same_routing):
        state = {k: v for k, v in state.items() if not k.startswith("routers.")}
        fresh |= {k for k in ours if k.startswith("routers.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - fresh:
        raise ValueError(f"{source} does not fit {cfg}: missing {missing}, unexpected {unexpected}")


#################################################################################
#                               Models from files                               #
#################################################################################

def load_model(source, ema=True):
    """Rebuild a model from one of train.py's checkpoints (its config) or a released SiT checkpoint (the
    architecture read off its tensor shapes), with the EMA weights unless ema=False."""
    checkpoint = load_checkpoint(source)
    state = weights_of(checkpoint, ema)
    model = SiT(**(checkpoint["config"] if "config" in checkpoint else config_of_weights(state, source)))
    model.load_state_dict(state, strict=True)
    return model


def config_of_weights(state, source="the checkpoint"):
    """The config of a residual SiT state dict that comes without one: sizes from the shapes, the number of
    heads from the preset of that depth and width (shapes do not show it)."""
    if any(k.startswith("routers.") for k in state) or "x_embedder.proj.weight" not in state:
        raise ValueError(f"{source} is neither a train.py checkpoint (no config) nor a released SiT state dict")
    d, C, p, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    heads = {(n, width): h for n, width, h in SIZES.values()}.get((depth, d))
    if heads is None:
        raise ValueError(f"{source}: depth {depth} and width {d} match no SiT preset, so the number of heads is unknown")
    rows = state["y_embedder.embedding_table.weight"].shape[0]  # num_classes + the null class
    return dict(input_size=math.isqrt(state["pos_embed"].shape[1]) * p, patch_size=p, in_channels=C, hidden_size=d,
                depth=depth, num_heads=heads, num_classes=rows - 1, class_dropout_prob=0.1,
                learn_sigma=state["final_layer.linear.weight"].shape[0] == 2 * p * p * C)


def main(argv=None):
    """python checkpoint.py CKPT OUT.safetensors: the export."""
    import argparse

    from cli import HelpFormatter, check_values

    p = argparse.ArgumentParser(description="Export a train.py checkpoint's EMA weights and config to .safetensors "
                                "(sample.py, diagnose.py, toy_accuracy.py and --init-from load it)",
                                formatter_class=HelpFormatter)
    p.add_argument("ckpt", help="one of train.py's checkpoints")
    p.add_argument("out", help="the .safetensors file to write")
    args = p.parse_args(argv)
    check_values(p, args, readable=("ckpt",), writable=("out",))
    if not args.out.endswith(".safetensors"):
        p.error(f"{args.out}: give a name ending in .safetensors (that is how the loaders know the format)")
    print(f"EMA weights of {args.ckpt} in {export(args.ckpt, args.out)}")


if __name__ == "__main__":
    main()
