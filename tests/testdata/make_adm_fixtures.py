"""
Make testdata/adm_fixtures.json: the numbers that ADM's own evaluator (openai/guided-diffusion,
evaluations/evaluator.py, run unmodified under TensorFlow) gives on fixed synthetic inputs, which test_fid.py
compares fid.py against. Not a project dependency and not run by the tests: run once, by hand, in a separate
virtualenv (the tests import only the input generators below, which need NumPy alone):

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu "numpy<2" scipy requests tqdm
    git clone https://github.com/openai/guided-diffusion /tmp/guided-diffusion
    /tmp/tfenv/bin/python testdata/make_adm_fixtures.py /tmp/guided-diffusion/evaluations/evaluator.py

What is compared (the Inception graph itself is not: it is a download, and fid.py's network was checked
against pytorch-fid's separately):
  - FID and sFID: ADM's FIDStatistics.frechet_distance on the statistics of fixed feature sets;
  - Inception Score: ADM's compute_inception_score, its softmax fed fixed logits;
  - precision and recall: ADM's ManifoldEstimator (its float16 pairwise distances in TensorFlow) on fixed
    dense (Gaussian) and sparse (ReLU'd, like pool_3) feature sets;
  - the resize: tf.compat.v1.image.resize_bilinear to 299 (the op in the Inception graph) of fixed uint8
    images, stored as the SHA-256 of its float32 output plus a few values.
"""
import hashlib
import importlib.util
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def feature_sets():
    """{name: (reference, samples)} float32 feature sets whose precision and recall are neither near 0 nor near 1:
    Gaussian ("dense") and ReLU'd, pool_3-like ("sparse", and "wide" at pool_3's 2048 dimensions)."""
    sets = {}
    for name, n_ref, n_sample, dim, sparse, shift, scale in (("dense", 500, 400, 64, False, 0.2, 0.96),
                                                             ("sparse", 400, 500, 128, True, 0.1, 0.9),
                                                             ("wide", 300, 300, 2048, True, 0.05, 0.93)):
        rng = np.random.default_rng(dim)
        ref = rng.standard_normal((n_ref, dim)).astype(np.float32)
        mix = rng.standard_normal((dim, dim)).astype(np.float32) / np.sqrt(dim)
        samples = (shift + rng.standard_normal((n_sample, dim)) @ (scale * np.eye(dim) + 0.3 * mix)).astype(np.float32)
        if sparse:
            ref, samples = np.maximum(ref - 0.5, 0) * 3, np.maximum(samples - 0.5, 0) * 3
        sets[name] = (ref, samples)
    return sets


def logits_sets():
    """{name: logits (n, 1008)} for the Inception Score: sharp and flat predictions, and one over 2 splits."""
    rng = np.random.default_rng(7)
    return {"sharp": (rng.standard_normal((300, 1008)) * 6).astype(np.float32),
            "flat": (rng.standard_normal((300, 1008)) * 0.5).astype(np.float32),
            "splits": (rng.standard_normal((700, 1008)) * 3).astype(np.float32)}


def resize_images():
    """{name: uint8 (1, H, W, 3)} images of sizes below, at and above 299 and not square."""
    rng = np.random.default_rng(3)
    return {f"{h}x{w}": rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
            for h, w in ((16, 16), (37, 53), (64, 64), (256, 256), (300, 299), (512, 384))}


def digest(array):
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def main(evaluator_path):
    spec = importlib.util.spec_from_file_location("adm_evaluator", evaluator_path)
    adm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adm)
    tf = adm.tf
    np.bool = bool  # the evaluator still says np.bool, which NumPy 1.24 removed
    tf.disable_eager_execution()
    session = tf.Session()
    out = {"evaluator": os.path.basename(evaluator_path), "tensorflow": tf.__version__, "numpy": np.__version__, "fid": {},
           "inception_score": {}, "precision_recall": {}, "resize": {}}

    for name, (ref, samples) in feature_sets().items():
        stats = [adm.FIDStatistics(x.mean(0), np.cov(x, rowvar=False)) for x in (samples, ref)]
        out["fid"][name] = float(stats[0].frechet_distance(stats[1]))
        estimator = adm.ManifoldEstimator(session)
        radii_ref, radii_samples = estimator.manifold_radii(ref), estimator.manifold_radii(samples)
        precision, recall = estimator.evaluate_pr(ref, radii_ref, samples, radii_samples)
        out["precision_recall"][name] = [float(precision[0]), float(recall[0])]

    logits_in = tf.placeholder(tf.float32, [None, 1008])
    softmax = tf.nn.softmax(logits_in)
    for name, logits in logits_sets().items():
        evaluator = object.__new__(adm.Evaluator)  # no Inception graph: its softmax is fed the logits directly
        evaluator.softmax_batch_size, evaluator.softmax_input = 512, logits_in
        evaluator.softmax, evaluator.sess = softmax, session
        out["inception_score"][name] = evaluator.compute_inception_score(logits, split_size=500)

    images_in = tf.placeholder(tf.float32, [None, None, None, 3])
    resized = tf.compat.v1.image.resize_bilinear(images_in, [299, 299], align_corners=False)
    for name, image in resize_images().items():
        result = session.run(resized, {images_in: image.astype(np.float32)})
        out["resize"][name] = {"sha256": digest(result), "values": [float(v) for v in result.reshape(-1)[::40_000]]}

    path = os.path.join(HERE, "adm_fixtures.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1])
