"""
Make testdata/reference.safetensors: a small file written by the safetensors package itself (its save_file),
which tests/test_export.py reads with checkpoint.read_safetensors and rewrites, byte for byte, with
checkpoint.write_safetensors. Not a project dependency and not run by the tests: run once, by hand, in a
separate virtualenv (the tests import TENSORS and METADATA below, which need NumPy alone):

    python3 -m venv /tmp/stv && /tmp/stv/bin/pip install safetensors numpy
    /tmp/stv/bin/python tests/testdata/make_safetensors_fixture.py

The tensors cover what an export holds (float32 matrices and a 0-d scalar) and the package's ordering rule
(larger element sizes first: int64, then float32, then float16; then by name).
"""
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
METADATA = {"config": '{"depth": 2, "routing": "static"}', "step": "7", "weights": "ema"}


def tensors():
    rng = np.random.default_rng(0)
    return {"blocks.1.attn.qkv.weight": rng.standard_normal((6, 3)).astype(np.float32),
            "blocks.0.mlp.fc1.bias": rng.standard_normal(5).astype(np.float32),
            "routers.3.gamma": np.array(1.25, dtype=np.float32),
            "y_embedder.embedding_table.weight": rng.standard_normal((3, 2)).astype(np.float16),
            "steps": np.array([3, -1, 2**40], dtype=np.int64)}


if __name__ == "__main__":
    from safetensors.numpy import load_file, save_file

    path = os.path.join(HERE, "reference.safetensors")
    save_file(tensors(), path, metadata=METADATA)
    assert all(np.array_equal(v, tensors()[k]) for k, v in load_file(path).items())
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")
