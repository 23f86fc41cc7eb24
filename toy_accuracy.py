"""
Class accuracy on the toy data: the share of a checkpoint's samples that a small CNN, trained on the real
shapes, puts in the class they were drawn for, overall and per class. It is the toy data's offline measure
of quality: fid.py needs the Inception weights, which a machine without network cannot fetch, and this
answers directly whether the classes are recognisable.

    python toy_accuracy.py --ckpt=results/quickstart/checkpoints/0003000.pt

The classifier (four 3x3 convolutions, 0.19M parameters) is trained once per image size, on 30,000 shapes
of another seed than training uses, and kept in --classifier; at 16px that takes about 2 minutes on 2 CPU
cores and reaches 100% on 2,000 held-out shapes. The samples are the EMA model's (20 Heun steps, guidance
4.0 by default, fixed noise), so two checkpoints are scored on the same draws.
A file of its own because nothing else needs a classifier.
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import HelpFormatter, check_values
from data import SHAPES, Shapes
from checkpoint import load_checkpoint, load_model, save_checkpoint
from sample import sample_ode


def classifier():
    """Four 3x3 convolutions with GELU and two 2x2 max pools, a global average pool, a linear map to the classes."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 96, 3, padding=1), nn.GELU(), nn.MaxPool2d(2), nn.Conv2d(96, 128, 3, padding=1), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, len(SHAPES)))


@torch.no_grad()
def predict(net, x, batch_size=500):
    """Class predictions for images x (B, 3, H, W) in [-1, 1]."""
    return torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def features(net, x, batch_size=500):
    """The classifier's 128 pooled features (its input to the last linear) of images x."""
    return torch.cat([net[:-1](x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


def toy_fid(net, x, size, seed=7):
    """FID on the classifier's features: the Frechet distance between the feature statistics of images x and of
    as many real shapes (dataset seed `seed`, neither the training data's nor the classifier's). Inception's
    features mean nothing for 16px shapes; these are features trained to tell the shapes apart."""
    from fid import frechet_distance, statistics

    real = Shapes(size=size, seed=seed, num_train=1, num_eval=len(x))
    return frechet_distance(*statistics(features(net, x)), *statistics(features(net, real.batch(real.eval)[0])))


def class_accuracy(net, x, y):
    """(overall accuracy, [accuracy of each class]) of net on images x with labels y."""
    hit = (predict(net, x) == y).float()
    return hit.mean().item(), [hit[y == c].mean().item() for c in range(len(SHAPES))]


def train_classifier(size, path, num_train=30_000, num_eval=2_000, epochs=4, batch_size=128, seed=123):
    """Train the classifier on shapes of `size` px (dataset seed `seed`), save it to `path` atomically with
    its held-out accuracy, and return it."""
    data = Shapes(size=size, seed=seed, num_train=num_train, num_eval=num_eval)
    x, y, _ = data.batch(range(num_train + num_eval))
    torch.manual_seed(0)
    net = classifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(num_train).split(batch_size):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        held_out = class_accuracy(net, x[num_train:], y[num_train:])[0]
        print(f"classifier epoch {epoch + 1}/{epochs}: held-out accuracy {held_out:.4f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint({"size": size, "held_out_accuracy": held_out, "state": net.state_dict()}, path)
    return net


def load_classifier(size, path):
    """The classifier for `size` px shapes from `path`, trained and saved there first if it is not."""
    if not os.path.exists(path):
        print(f"no classifier at {path}: training one on {size}px shapes")
        return train_classifier(size, path)
    saved = load_checkpoint(path)
    if not (isinstance(saved, dict) and {"size", "state"} <= saved.keys()):
        raise SystemExit(f"{path} is not a shape classifier saved by toy_accuracy.py (no size and state): give another "
                         "--classifier path (a missing one is trained there)")
    if saved["size"] != size:
        raise SystemExit(f"{path} classifies {saved['size']}px shapes, the samples are {size}px: give another "
                         f"--classifier path (a missing one is trained)")
    net = classifier()
    net.load_state_dict(saved["state"])
    return net.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint trained with --data=shapes")
    p.add_argument("--classifier", help="the classifier's file, trained there when missing "
                                        "(default results/shapes_classifier_<size>px.pt)")
    p.add_argument("--per-class", type=int, default=40, help="samples per class")
    p.add_argument("--num-steps", type=int, default=20, help="Heun steps")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale; 1 = none")
    p.add_argument("--seed", type=int, default=1, help="seed of the sampling noise")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast of the model, as "
                   "sample.py --precision=bf16 (what it costs in accuracy and toy FID)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model, as sample.py --compile")
    args = p.parse_args(argv)
    check_values(p, args, at_least={"per_class": 1, "num_steps": 1, "cfg_scale": 0.0}, readable=("ckpt",),
                 writable=("classifier",))

    model = load_model(args.ckpt).eval()
    if args.compile:
        model.compile()
    cfg = model.config
    if cfg.in_channels != 3 or cfg.num_classes != len(SHAPES):
        raise SystemExit(f"{args.ckpt} is not a toy-data model ({cfg.in_channels} channels, {cfg.num_classes} "
                         f"classes): toy_accuracy.py scores checkpoints trained with --data=shapes")
    size = cfg.input_size
    net = load_classifier(size, args.classifier or f"results/shapes_classifier_{size}px.pt")

    y = torch.arange(len(SHAPES)).repeat_interleave(args.per_class)
    z = torch.randn(len(y), 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    with torch.autocast("cpu", torch.bfloat16, enabled=args.precision == "bf16"):
        x = torch.cat([sample_ode(model, zb, yb, num_steps=args.num_steps, cfg_scale=args.cfg_scale)
                       for zb, yb in zip(z.split(100), y.split(100))]).float().clamp(-1, 1)
    overall, per_class = class_accuracy(net, x, y)
    print(f"class accuracy of {len(y)} samples (guidance {args.cfg_scale}, {args.num_steps} Heun steps): {overall:.3f}")
    print(f"toy FID (the classifier's 128 features, against {len(y)} real shapes): {toy_fid(net, x, size):.4f}")
    print("| " + " | ".join(SHAPES) + " |")
    print("|---" * len(SHAPES) + "|")
    print("| " + " | ".join(f"{a:.2f}" for a in per_class) + " |")
    return overall, per_class


if __name__ == "__main__":
    main()
