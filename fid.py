"""
Inception Score, FID, sFID, precision and recall as OpenAI's ADM evaluator (guided-diffusion/evaluations)
computes them, in plain PyTorch: no TensorFlow, no torchvision.

    python fid.py VIRTUAL_imagenet256_labeled.npz samples/xl2.npz     # ADM's reference batch vs sample.py's
    python fid.py --make-ref shapes --image-size 16 --num 10000 ref_shapes16.npz     # a toy reference batch
    python fid.py --make-ref /data/imagenet/train --image-size 256 --num 10000 ref_in256.npz   # from any folder
    python fid.py --make-ref VIRTUAL_imagenet256_labeled.npz ref.npz      # an .npz, its statistics added if missing

A reference batch made here is in ADM's format (arr_0, and the statistics mu, sigma, mu_s, sigma_s of its
images), so it serves this script and train.py --fid-ref (which reads only the statistics) alike.

What makes the numbers ADM's:
  - the FID Inception network (inception.py) with the TF 2015-12-05 weights (pt_inception-2015-12-05-6726825d.pth, a plain
    state dict in torchvision's names, whose BatchNorm counters are dropped on loading), and the TF graph's
    pooling quirks: average pools exclude the padding, Mixed_7c's pool branch is a max pool;
  - inputs resized to 299 by TensorFlow 1's bilinear rule (source pixel i * in / out, no half-pixel offset,
    blended along the width, then the height), then (x - 128) / 128;
  - FID on pool_3 (2048); sFID on the first 7 channels of Mixed_6d.branch1x1 flattened in (h, w, c) order
    (17 x 17 x 7 = 2023); IS from softmax(pool_3 @ W) over 1008 classes without the bias, in consecutive
    splits of 5000; precision and recall with k = 3 nearest-neighbour balls on pool_3, from pairwise squared
    distances computed in float16 as ADM's evaluator does (--exact-distances: float32);
  - statistics in float64 with ddof = 1; the reference's mu, sigma, mu_s, sigma_s when its .npz has them.
Checked against ADM's evaluator itself, run under TensorFlow on fixed inputs (tests/testdata/adm_fixtures.json,
made by tests/testdata/make_adm_fixtures.py; tests/test_fid.py compares): the resize is bit-identical, FID and
sFID agree to 5e-8 relative, IS to 5e-7, and precision and recall to within one image of a few hundred (0.0033
at most: TensorFlow's float16 sums round in an order this emulation does not reproduce; with float32 distances
the gap is up to 0.013). The matrix square root is taken by symmetric eigendecompositions (the same value;
SciPy's sqrtm has broken and changed its signature across versions). Not compared: the Inception network
against the TF graph (a download); it equals pytorch-fid's port of that graph (pool_3 to 4e-7 on identical
random weights).
"""
import argparse
import json
import os
import warnings
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from cli import HelpFormatter, check_values
from inception import INCEPTION_URL, load_inception

#################################################################################
#                                  Images in                                    #
#################################################################################

def npz_batches(path, batch_size, key="arr_0"):
    """Batches of uint8 (b, H, W, 3) images from a .npz, read from the zip one batch at a time (50K 256px
    samples are 9.8 GB), after checking what the array is."""
    with zipfile.ZipFile(path) as zf:
        if f"{key}.npy" not in zf.namelist():
            keys = [n[:-4] for n in zf.namelist()]
            raise ValueError(f"{path} has no '{key}' array (it has {keys}): ADM-format files keep the images in "
                             f"arr_0 (sample.py --num-fid-samples writes one)")
        with zf.open(f"{key}.npy") as f:
            shape, fortran, dtype = npy_header(f)
            if len(shape) != 4 or shape[3] != 3 or fortran:
                raise ValueError(f"{path}: {key} must be N x H x W x 3 (channels last), got shape {shape}")
            if dtype != np.uint8:
                raise ValueError(f"{path}: {key} must be uint8 in [0, 255], got {dtype}. Convert images in "
                                 f"[-1, 1] with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
            row = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                yield np.frombuffer(f.read(n * row), dtype=np.uint8).reshape(n, *shape[1:])


def npy_header(f):
    """(shape, fortran_order, dtype) of the .npy stream f, which is left at the start of the data."""
    major, _ = np.lib.format.read_magic(f)
    return (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)


def count_of(path, key="arr_0"):
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        return npy_header(f)[0][0]


def check_batch(path, role, k=3):
    """Open and check an ADM-format .npz (role: "reference" or "sample") before any network runs, so that a bad
    file fails in seconds with a message naming it, not after an hour of Inception passes. Returns the image
    shape (H, W); warns about what is legal but probably a mistake."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except FileNotFoundError:
        raise ValueError(f"{role} batch {path}: no such file") from None
    except zipfile.BadZipFile:
        raise ValueError(f"{role} batch {path} is not a complete .npz (zip) file: cut short (a copy or a sample.py "
                         "run that did not finish: copy it again, or run the same sample.py command to finish it) or "
                         "not an .npz at all (write one with np.savez(path, arr_0=images))") from None
    batches = npz_batches(path, 64)  # checks arr_0: present, N x H x W x 3, uint8, not Fortran order
    first = next(batches, None)
    if first is None:
        raise ValueError(f"{role} batch {path}: arr_0 holds no images")
    n = count_of(path)
    if n < k + 1:
        raise ValueError(f"{role} batch {path} holds {n} images; precision and recall need at least {k + 1} (each "
                         f"image's {k} nearest neighbours)")
    if role == "reference" and "mu.npy" in names:
        with np.load(path) as ref:
            for key, shape in (("mu", (2048,)), ("sigma", (2048, 2048)), ("mu_s", (2023,)), ("sigma_s", (2023, 2023))):
                if key not in ref.files or ref[key].shape != shape:
                    found = ref[key].shape if key in ref.files else "missing"
                    raise ValueError(f"reference batch {path}: {key} must be {shape} (pool_3 and the sFID features), "
                                     f"found {found}; it was not made with this Inception network")
    if n < 5000:
        warnings.warn(f"{role} batch {path} holds {n} images: the Inception Score is a mean over splits of 5000, so "
                      "with fewer it is one noisy split (published scores use 50,000 samples)")
    if first.max() <= 1:
        warnings.warn(f"{role} batch {path}: its first images have no value above 1, as if [0, 1] data were stored "
                      "as uint8; images must be in [0, 255]")
    return first.shape[1:3]


@torch.no_grad()
def features(net, batches, total=None, device="cpu"):
    """{"pool", "spatial", "logits"} float64 arrays over all images of the batches."""
    out = {"pool": [], "spatial": [], "logits": []}
    for images in tqdm(batches, total=total, unit="batch", desc="inception"):
        for key, value in net(torch.from_numpy(np.array(images)).to(device)).items():
            out[key].append(value.double().cpu().numpy())
    return {key: np.concatenate(value) for key, value in out.items()}


#################################################################################
#                                    Metrics                                    #
#################################################################################

def statistics(acts):
    """(mean, covariance with ddof = 1), float64."""
    acts = np.asarray(acts, dtype=np.float64)
    return acts.mean(0), np.cov(acts, rowvar=False)


def sqrt_psd(a):
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^1/2), with tr((s1 s2)^1/2) taken as the trace of the
    square root of the symmetric s1^1/2 s2 s1^1/2 (the same eigenvalues), in float64."""
    root = sqrt_psd(sigma1)
    eig = np.linalg.eigvalsh(root @ sigma2 @ root)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eig.clip(min=0)).sum())


def inception_score(logits, split_size=5000):
    """Mean over consecutive splits of exp(E_x KL(p(y|x) || p(y))), p from a softmax over the logits."""
    scores = []
    for start in range(0, len(logits), split_size):
        logp = torch.log_softmax(torch.as_tensor(logits[start:start + split_size], dtype=torch.float64), 1)
        log_marginal = torch.logsumexp(logp, 0) - np.log(len(logp))
        scores.append(torch.exp((logp.exp() * (logp - log_marginal)).sum(1).mean()).item())
    return float(np.mean(scores))


def squared_distances(a, b, half=True):
    """Pairwise squared distances |a|^2 - 2 a.b + |b|^2, clamped at 0. half=True computes them as ADM's evaluator
    does, in float16 (its features cast to float16, each step rounded to float16), falling back to float32 for a
    block where float16 overflows; half=False in float32."""
    if half:
        a16, b16 = a.half(), b.half()
        norm_a = a16.float().square().half().float().sum(1, keepdim=True).half()
        norm_b = b16.float().square().half().float().sum(1).half()
        d = ((norm_a - (2 * (a16.float() @ b16.float().T)).half()) + norm_b).clamp(min=0)
        if torch.isfinite(d).all():
            return d.float()
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp(min=0)


def manifold_radii(feats, k=3, block=10_000, half=True):
    """Squared distance of each point to its k-th nearest neighbour (itself excluded: the (k+1)-th smallest
    with itself included, as ADM)."""
    return torch.cat([squared_distances(feats[i:i + block], feats, half).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), block)])


def coverage(points, centres, radii, block=10_000, half=True):
    """Fraction of points inside at least one ball (centre, squared radius), boundary included."""
    inside = [(squared_distances(points[i:i + block], centres, half) <= radii).any(1)
              for i in range(0, len(points), block)]
    return torch.cat(inside).double().mean().item()


def precision_recall(ref, samples, k=3, device="cpu", half=True):
    """Improved precision (samples inside the reference manifold) and recall (reference inside the samples'),
    with ADM's float16 distances unless half=False."""
    ref, samples = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (ref, samples))
    return (coverage(samples, ref, manifold_radii(ref, k, half=half), half=half),
            coverage(ref, samples, manifold_radii(samples, k, half=half), half=half))


def evaluate(ref_path, sample_path, net, device="cpu", batch_size=64, half=True):
    """Every metric of sample_path against ref_path, as a dict; half: ADM's float16 distances for precision and
    recall."""
    acts = {}
    for name, path in (("ref", ref_path), ("samples", sample_path)):
        total = -(-count_of(path) // batch_size)
        acts[name] = features(net, npz_batches(path, batch_size), total, device)
    with np.load(ref_path) as ref:
        if "mu" in ref.files:  # ADM's reference batches: statistics of the whole dataset
            ref_pool, ref_spatial = (ref["mu"], ref["sigma"]), (ref["mu_s"], ref["sigma_s"])
        else:
            ref_pool, ref_spatial = statistics(acts["ref"]["pool"]), statistics(acts["ref"]["spatial"])
    s = acts["samples"]
    precision, recall = precision_recall(acts["ref"]["pool"], s["pool"], device=device, half=half)
    return {"inception_score": inception_score(s["logits"]),
            "fid": frechet_distance(*statistics(s["pool"]), *ref_pool),
            "sfid": frechet_distance(*statistics(s["spatial"]), *ref_spatial),
            "precision": precision, "recall": recall}


#################################################################################
#                                  The script                                   #
#################################################################################

def folder_images(root, image_size, num, seed=0):
    """uint8 (n, image_size, image_size, 3): ADM's centre crop (prepare_imagenet.py's, as the training data) of
    `num` image files drawn at random (seeded) from every image under root (all of them if there are fewer);
    files that cannot be read are skipped and counted. They are held in memory: num x image_size^2 x 3 bytes."""
    from prepare_imagenet import EXTENSIONS, load_image

    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                   if f.lower().endswith(EXTENSIONS))
    if not files:
        raise SystemExit(f"{root} holds no image files ({', '.join(EXTENSIONS)}): give a folder of images, 'shapes' "
                         "or an .npz")
    if num is not None and num < len(files):
        files = [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), num, replace=False))]
    crops, skipped = [], 0
    for path in tqdm(files, unit="image", desc="centre crops"):
        crop, why = load_image(path, image_size)
        if crop is None:
            skipped += 1
        else:
            crops.append(crop)
    if skipped:
        print(f"{skipped} of {len(files)} files skipped: not readable as images, or too small or elongated")
    return np.stack(crops)


def make_reference(source, image_size, num, path, net, device="cpu", batch_size=64, seed=0):
    """An ADM-format reference batch: arr_0 and the statistics of its images (mu, sigma: pool_3; mu_s, sigma_s:
    the sFID features), from the toy data ('shapes': held-out images), an image folder, or an .npz whose arr_0
    is taken as it is (and its statistics too, if it has them: ADM's cover the whole training set)."""
    if source == "shapes":
        from data import Shapes  # only this mode needs the toy data

        data = Shapes(size=image_size, seed=seed, num_eval=num or 10_000)
        images, kept = data.images(data.eval)[0], {}
    elif os.path.isdir(source):
        images, kept = folder_images(source, image_size, num or 10_000, seed), {}
    else:
        check_batch(source, "reference")
        with np.load(source) as ref:
            images = ref["arr_0"] if num is None else ref["arr_0"][:num]
            kept = {k: ref[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in ref.files and num is None}
    if len(kept) < 4:
        acts = features(net, (images[i:i + batch_size] for i in range(0, len(images), batch_size)),
                        -(-len(images) // batch_size), device)
        (mu, sigma), (mu_s, sigma_s) = statistics(acts["pool"]), statistics(acts["spatial"])
        kept = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    tmp = path[:-4] + ".tmp.npz"
    np.savez(tmp, arr_0=images, **kept)
    os.replace(tmp, path)
    print(f"{len(images)} images of {source} ({images.shape[1]}px) and their statistics in {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("files", nargs="+", help="REF.npz SAMPLES.npz, or with --make-ref the .npz to write")
    p.add_argument("--inception", default=INCEPTION_URL, help="pt_inception-2015-12-05-6726825d.pth: URL or path")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", help="also write the metrics to this file")
    p.add_argument("--exact-distances", action="store_true", help="precision and recall from float32 distances "
                   "instead of ADM's float16 ones (published numbers use ADM's)")
    p.add_argument("--make-ref", help="instead: write a reference batch (images and statistics) of 'shapes' (the "
                   "toy data), an image folder, or an .npz")
    p.add_argument("--image-size", type=int, default=32, help="--make-ref: crop size for a folder, or the toy size")
    p.add_argument("--num", type=int, help="--make-ref: number of images (default 10,000, as ADM's reference "
                   "batches, drawn at random from a folder; all of an .npz)")
    args = p.parse_args(argv)
    check_values(p, args, at_least={"batch_size": 1, "image_size": 1, "num": 1}, readable=("inception",),
                 writable=("json",))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # TF32 moves FID
    if args.make_ref:
        if len(args.files) != 1 or not args.files[0].endswith(".npz"):
            p.error("with --make-ref give one file to write, ending in .npz")
        if args.make_ref != "shapes" and not os.path.exists(args.make_ref):
            p.error(f"--make-ref {args.make_ref}: no such folder or file (or give 'shapes')")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return make_reference(args.make_ref, args.image_size, args.num, args.files[0],
                              load_inception(args.inception).to(device), device, args.batch_size)
    if len(args.files) != 2:
        p.error("give two files: REF.npz SAMPLES.npz")
    ref_size, sample_size = check_batch(args.files[0], "reference"), check_batch(args.files[1], "sample")
    if ref_size != sample_size:
        raise ValueError(f"reference images are {ref_size} and samples {sample_size}: both would be resized to 299, "
                         "but FID between two resolutions mostly measures the resolution. Use the reference batch of "
                         "the samples' resolution (ADM publishes one for 64, 128, 256 and 512)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = evaluate(*args.files, load_inception(args.inception).to(device), device, args.batch_size,
                       half=not args.exact_distances)
    for name, label in (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
                        ("precision", "Precision"), ("recall", "Recall")):
        print(f"{label}: {metrics[name]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)


if __name__ == "__main__":
    main()
