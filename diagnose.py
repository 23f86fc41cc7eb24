"""
The paper's diagnostics of cross-layer routing (section 3: Fig. 2 and 3; section 5.3: Fig. 5), for residual and
DAR checkpoints alike, written to one JSON file and PNG figures.

    python diagnose.py --ckpt results/study/residual/checkpoints/0002000.pt --ckpt results/study/dynamic_c4/checkpoints/0002000.pt --out results/diagnose
    python diagnose.py --log results/run/log.jsonl      # the run's training curves, results/run/curves.png

(train.py redraws that curves.png itself at every log line.)

Definitions (docs/design.md section 4). h_l is the input of sublayer l before its LayerNorm (l = 1..L; the
residual stream for residual routing, the DAR aggregate otherwise) and h_{L+1} the input of the final layer;
z_k = h_{2k+1} is the state after block k. For each --t, over one fixed batch of held-out data:
  forward   RMS(z_k), over batch, tokens and channels
  backward  RMS(dL/dz_k), L the velocity MSE of that batch
  cosine    cos(z_k, z_{k+1}) per token, averaged
Source mixing, as sources x t maps at a shallow and a deep sublayer (--sublayers): DAR's routing weights
alpha_{i->l}(t) averaged over batch and tokens; for residual routing, the gradient of the loss with respect to
a scalar gate, equal to 1, on each source v_i of the sum that forms h_l (the forward pass is unchanged, bit
for bit), a counterfactual importance. Timestep probe: ridge regression from h_l, mean-pooled over tokens, to
t, on a grid of t over fixed image-noise pairs; R^2 on pairs held out of the fit, per sublayer, with the input
x_t (patchified and pooled alike) as the baseline.
"""
import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from cli import HelpFormatter, check_values
from data import load_data
from checkpoint import load_model
from model import interpolate, modulate

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", action="append", help="a train.py checkpoint (repeat to compare)")
    p.add_argument("--log", help="instead: draw the training curves of this log.jsonl (curves.png beside it, or "
                   "--out if it ends in .png)")
    p.add_argument("--label", action="append", help="a name per --ckpt for the legends (default: routing)")
    p.add_argument("--data", default="shapes", help="'shapes' or a prepared latent directory")
    p.add_argument("--t", type=float, nargs="+", default=[1.0, 0.5, 0.1], help="t of the per-block measures (1 = data)")
    p.add_argument("--num-samples", type=int, default=64, help="held-out images per measurement")
    p.add_argument("--map-steps", type=int, default=11, help="points of the t grid of the mixing maps")
    p.add_argument("--sublayers", type=int, nargs="+", help="sublayers of the mixing maps (default: L/4 and L)")
    p.add_argument("--probe-pairs", type=int, default=64, help="image-noise pairs of the probe (a quarter held out)")
    p.add_argument("--probe-steps", type=int, default=16, help="points of the probe's t grid")
    p.add_argument("--no-ema", action="store_true", help="the trained weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for diagnostics.json and the figures (default results/diagnose)")
    args = p.parse_args(argv)
    check_values(p, args, at_least={"num_samples": 2, "map_steps": 2, "probe_pairs": 4, "probe_steps": 2},
                 readable=("log",), writable=("out",))
    if args.log:
        if args.ckpt:
            p.error("give --log (a run's curves) or --ckpt (the diagnostics of checkpoints), not both")
        if args.out and not args.out.endswith(".png"):
            p.error(f"with --log, --out is the figure to write: give a name ending in .png, not {args.out}")
        args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.log)), "curves.png")
        return args
    if not args.ckpt:
        p.error("give one or more --ckpt (or --log for a run's training curves)")
    args.out = args.out or "results/diagnose"
    for path in args.ckpt:
        if "://" not in path and not os.path.isfile(path):
            p.error(f"--ckpt {path}: no such checkpoint file")
    if not all(0 <= t <= 1 for t in args.t):
        p.error(f"--t values must lie in [0, 1] (0 noise, 1 data), got {args.t}")
    if args.label and len(args.label) != len(args.ckpt):
        p.error("give one --label per --ckpt, or none")
    if args.label and len(set(args.label)) != len(args.label):
        p.error(f"--label names must differ (each names a checkpoint's results), got {args.label}")
    return args


#################################################################################
#                          The instrumented forward pass                        #
#################################################################################

def trace(model, x, t, y, gates=False):
    """Run `model` keeping every aggregated state. Returns the velocity and a dict with
      "h"      [h_1, ..., h_{L+1}], each (B, T, d), in the autograd graph
      "alpha"  DAR: [alpha_1, ..., alpha_{L+1}], each (B, T, |S_l|)
      "gates"  residual with gates=True: [g_1, ..., g_{L+1}], g_l of shape (l,), all ones, with gradients
               (or the given list of such tensors, e.g. perturbed ones);
               each h_l is then formed anew as sum_i g_l[i] v_i, in the residual stream's own order, so every
               value stays bit-identical to model(x, t, y) (but h_l then feeds only sublayer l).
    Residual routing without gates keeps the running stream, so dL/dh_l is the stream's gradient."""
    cfg = model.config
    v0 = model.x_embedder(x) + model.pos_embed
    e = model.t_embedder(t)
    c = e + model.y_embedder(y)
    sublayers = []  # (pre-norm, (shift, scale, gate), function) of sublayers 1..L
    for block in model.blocks:
        attn, mlp = block.modulations(c)
        sublayers += [(block.norm1, attn, block.attn), (block.norm2, mlp, block.mlp)]
    shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    sublayers.append((model.final_layer.norm_final, (shift, scale, None), model.final_layer.linear))
    out = {"h": [], "alpha": [], "gates": []}
    vs = [v0]
    for l, (norm, (shift, scale, gate), f) in enumerate(sublayers, start=1):
        if cfg.routing != "residual":
            xin, h, alpha = model.routers.aggregate(l, dict(enumerate(vs)), e, shift, scale, need_h=True, need_alpha=True)
            out["alpha"].append(alpha)
        else:
            if gates is not False:
                g = torch.ones(l, device=x.device, dtype=v0.dtype, requires_grad=True) if gates is True else gates[l - 1]
                h = vs[0] * g[0]
                for i in range(1, l):
                    h = h + vs[i] * g[i]  # ((v_0 + v_1) + v_2) + ...: the stream's order, times exact ones
                out["gates"].append(g)
            else:
                h = v0 if l == 1 else h + vs[-1]
            xin = modulate(norm(h), shift, scale)
        out["h"].append(h)
        vs.append(f(xin) if gate is None else gate.unsqueeze(1) * f(xin))
    v = model.unpatchify(vs[-1])  # the final layer's output
    return v[:, : cfg.in_channels], out


#################################################################################
#                                   Measures                                    #
#################################################################################

def batch_at(data, indices, t, seed, device):
    """x_t, target velocity and labels for held-out images, with noise fixed by (seed, image)."""
    x1, y, _ = data.batch(indices)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x1.shape, generator=g)
    xt, u = interpolate(x1, eps, torch.full((len(x1),), float(t)))
    return xt.to(device), u.to(device), y.to(device)


def per_block(model, data, indices, t, seed, device):
    """RMS(z_k), RMS(dL/dz_k) and cos(z_k, z_{k+1}) for k = 1..depth."""
    xt, u, y = batch_at(data, indices, t, seed, device)
    tt = torch.full((len(xt),), float(t), device=device)
    v, out = trace(model, xt, tt, y)
    z = out["h"][2::2]  # z_k = h_{2k+1}, k = 1..depth
    for zk in z:
        zk.retain_grad()
    F.mse_loss(v, u).backward()
    rms = lambda a: a.float().square().mean().sqrt().item()
    result = {"forward_rms": [rms(zk) for zk in z], "backward_rms": [rms(zk.grad) for zk in z],
              "cosine": [F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item() for a, b in zip(z, z[1:])]}
    return result


def mixing(model, data, indices, sublayers, steps, seed, device):
    """{sublayer: (sources x t) matrix}: DAR's mean routing weights, or residual routing's gate gradients."""
    maps = {l: [] for l in sublayers}
    ts = np.linspace(0, 1, steps)
    for t in ts:
        xt, u, y = batch_at(data, indices, t, seed, device)
        tt = torch.full((len(xt),), float(t), device=device)
        if model.config.routing == "residual":
            v, out = trace(model, xt, tt, y, gates=True)
            F.mse_loss(v, u).backward()
            for l in sublayers:
                maps[l].append(out["gates"][l - 1].grad.tolist())
        else:
            with torch.no_grad():
                _, out = trace(model, xt, tt, y)
            for l in sublayers:
                maps[l].append(out["alpha"][l - 1].float().mean((0, 1)).tolist())
        model.zero_grad(set_to_none=True)
    sources = {l: (list(range(l)) if model.config.routing == "residual" else model.routers.source_sets[l - 1])
               for l in sublayers}
    return {str(l): {"t": ts.tolist(), "sources": sources[l], "values": np.array(maps[l]).T.tolist()} for l in sublayers}


def routing_maps(model, data, indices, ts=(0.1, 0.5, 0.9), seed=0, device="cpu"):
    """DAR's mean routing weights as heat-map panels, one per t: sources v_0..v_L (rows) x aggregators 1..L+1
    (columns; L + 1 is the final one), 0 where a source is not in S_l. For watching routing form in training."""
    L = 2 * model.config.depth
    panels = []
    for t in ts:
        xt, _, y = batch_at(data, indices, t, seed, device)
        with torch.no_grad():
            _, extras = model(xt, torch.full((len(xt),), float(t), device=device), y, return_weights=True)
        values = np.zeros((L + 1, L + 1))
        for l, (S_l, alpha) in enumerate(zip(model.routers.source_sets, extras["alpha"])):
            values[S_l, l] = alpha.float().mean((0, 1)).cpu().numpy()
        panels.append((f"t = {t}", list(range(L + 1)), list(range(1, L + 2)), values))
    return panels


def ridge_fit(x, y, lam):
    """Ridge regression on features standardised over x: a predictor function."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    a = (x - mu) / sd
    w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ (y - y.mean()))
    return lambda z: (z - mu) / sd @ w + y.mean()


def r2(y, pred):
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def ridge_r2(x, y, groups, test, lams=10.0 ** np.arange(-6, 3)):
    """Held-out R^2 of ridge regression from features x to targets y. Rows with test=True are held out; the
    penalty is chosen by 4-fold cross-validation over the training rows' groups (image-noise pairs), so no
    pair is ever on both sides of a split."""
    train_groups = np.unique(groups[~test])
    folds = np.array_split(train_groups, min(4, len(train_groups)))

    def cv(lam):
        scores = []
        for fold in folds:
            held = np.isin(groups, fold)
            fit_rows = ~test & ~held
            scores.append(r2(y[held], ridge_fit(x[fit_rows], y[fit_rows], lam)(x[held])))
        return np.mean(scores)

    lam = max(lams, key=cv)
    return r2(y[test], ridge_fit(x[~test], y[~test], lam)(x[test]))


@torch.no_grad()
def probe(model, data, indices, steps, seed, device):
    """Timestep probe R^2 per sublayer input h_l (l = 1..L+1) and for the pooled, patchified x_t."""
    ts = np.linspace(0, 1, steps)
    feats, raw, targets, pair = [], [], [], []
    p = model.config.patch_size
    for t in ts:
        xt, _, y = batch_at(data, indices, t, seed, device)
        _, out = trace(model, xt, torch.full((len(xt),), float(t), device=device), y)
        feats.append(torch.stack([h.float().mean(1) for h in out["h"]], 1).cpu().numpy())  # (B, L+1, d)
        raw.append(F.unfold(xt.float(), p, stride=p).mean(2).cpu().numpy())  # (B, C p p): pooled patches
        targets.append(np.full(len(xt), t))
        pair.append(np.arange(len(xt)))
    feats, raw, targets, pair = map(np.concatenate, (feats, raw, targets, pair))
    held = pair >= len(indices) - len(indices) // 4  # the last quarter of the pairs, at every t, for the test
    return {"r2": [ridge_r2(feats[:, l], targets, pair, held) for l in range(feats.shape[1])],
            "r2_xt": ridge_r2(raw, targets, pair, held)}


#################################################################################
#                          Figures, drawn with Pillow                           #
#################################################################################

FONT = ImageFont.load_default()


def ticks(lo, hi, log=False, n=5):
    """Tick values spanning [lo, hi]: powers of ten on a log axis, round steps otherwise."""
    if log:
        return [10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    step = 10 ** math.floor(math.log10((hi - lo) / n or 1))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def fmt(v):
    return f"{v:.0e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:g}"


def line_plot(series, title, xlabel, ylabel, path, log=False, hline=None, x_ticks=None):
    """series: [(label, xs, ys)] or [(label, xs, ys, spreads)], one coloured line each (spreads: an error bar of
    +-spread at each point), with axes, ticks, labels and a legend. hline: (label, y) drawn dashed across (a
    baseline). x_ticks: the x axis is logarithmic with ticks at these values (e.g. chunk sizes 1, 2, 4, 8, 14).
    Saved to path unless it is None; returns the image."""
    W, H, left, right, top, bottom = 640, 420, 70, 160, 36, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    spread = lambda s, i: s[3][i] if len(s) > 3 else 0.0
    ys_all = [v for s in series for i, y in enumerate(s[2]) for v in (y - spread(s, i), y + spread(s, i))
              if not log or v > 0] + ([hline[1]] if hline else [])
    xs_all = [x for s in series for x in s[1]]
    y_ticks = ticks(min(ys_all), max(ys_all), log) if ys_all else [0, 1]
    logx, x_ticks = x_ticks is not None, x_ticks or ticks(min(xs_all), max(xs_all))
    lo_y, hi_y, lo_x, hi_x = y_ticks[0], y_ticks[-1], x_ticks[0], x_ticks[-1]
    f = (lambda y: math.log10(y)) if log else (lambda y: y)
    g = math.log if logx else (lambda x: x)
    pad = 0.05 * (g(hi_x) - g(lo_x)) if logx else 0.0  # so that points at the ends stand clear of the frame
    px = lambda x: left + (g(x) - g(lo_x) + pad) / ((g(hi_x) - g(lo_x) + 2 * pad) or 1) * (W - left - right)
    py = lambda y: H - bottom - (f(y) - f(lo_y)) / ((f(hi_y) - f(lo_y)) or 1) * (H - top - bottom)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for y in y_ticks:
        d.line([left - 4, py(y), left, py(y)], fill="black")
        d.line([left + 1, py(y), W - right - 1, py(y)], fill=(230, 230, 230))
        d.text((left - 8, py(y)), fmt(y), fill="black", font=FONT, anchor="rm")
    for x in x_ticks:
        d.line([px(x), H - bottom, px(x), H - bottom + 4], fill="black")
        d.text((px(x), H - bottom + 8), fmt(x), fill="black", font=FONT, anchor="mt")
    d.text(((left + W - right) / 2, 10), title, fill="black", font=FONT, anchor="mt")
    d.text(((left + W - right) / 2, H - 16), xlabel + (" (log scale)" if logx else ""), fill="black", font=FONT,
           anchor="mt")
    d.text((8, top - 22), ylabel, fill="black", font=FONT)
    legend = [(s[0], COLOURS[i % len(COLOURS)]) for i, s in enumerate(series)]
    for i, s in enumerate(series):
        kept = [(x, y, spread(s, k)) for k, (x, y) in enumerate(zip(s[1], s[2])) if not log or y > 0]
        d.line([(px(x), py(y)) for x, y, _ in kept], fill=legend[i][1], width=2)
        for x, y, e in kept:
            d.ellipse([px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2], fill=legend[i][1])
            if e and (not log or y > e):
                d.line([px(x), py(y - e), px(x), py(y + e)], fill=legend[i][1], width=1)
                for y_end in (y - e, y + e):
                    d.line([px(x) - 4, py(y_end), px(x) + 4, py(y_end)], fill=legend[i][1], width=1)
    if hline:
        for x in range(left, W - right, 12):
            d.line([x, py(hline[1]), min(x + 6, W - right), py(hline[1])], fill="gray", width=2)
        legend.append((hline[0], "gray"))
    for i, (label, colour) in enumerate(legend):
        y = top + 10 + 18 * i
        d.line([W - right + 10, y, W - right + 30, y], fill=colour, width=3)
        d.text((W - right + 36, y), label, fill="black", font=FONT, anchor="lm")
    if path:
        img.save(path)
    return img


def training_curves(log_path, path):
    """The figure of a run's log.jsonl, one panel under another: the training loss and the held-out loss of the
    raw and EMA weights (log scale), REPA's alignment loss if the run has one, FID and IS if logged. Written
    through a rename (a viewer never reads half of it); returns path, or None while the log has no loss yet. A
    step logged twice (a resumed run repeats none, but a line cut short by a kill is skipped) keeps its last."""
    records = []
    with open(log_path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed run
                pass

    def series(key, label):
        points = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}
        return label, sorted(points), [points[s] for s in sorted(points)]

    panels = [([series("loss", "training"), series("eval_loss", "held-out"), series("eval_loss_ema", "held-out, EMA")],
               "loss", "velocity MSE", True),
              ([series("repa_loss", "REPA")], "REPA alignment", "negative cosine", False),
              ([series("fid", "FID")], "FID of EMA samples", "FID", False),
              ([series("inception_score", "IS")], "Inception Score of EMA samples", "IS", False)]
    images = [line_plot([s for s in lines if s[1]], title, "step", ylabel, None, log=log)
              for lines, title, ylabel, log in panels if any(s[1] for s in lines)]
    if not images or not series("loss", "")[1] and not series("eval_loss", "")[1]:
        return None
    figure = Image.new("RGB", (images[0].width, sum(i.height for i in images)), "white")
    for k, image in enumerate(images):
        figure.paste(image, (0, k * images[0].height))
    figure.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    return path


def heat_maps(panels, title, path, xlabel="t (0 noise, 1 data)", xtick="{:.1f}"):
    """panels: [(subtitle, sources, ts, values (sources x t))], side by side. Non-negative values (routing
    weights) run white to blue; signed ones (gate gradients) blue to white to red, symmetric about 0. The
    columns need not be t: xlabel and xtick (a format) name them."""
    cell_w, cell_h, left, top, bottom, bar = 22, 14, 60, 44, 56, 90
    width = sum(left + cell_w * len(ts) + bar for _, _, ts, _ in panels)
    height = top + bottom + cell_h * max(len(src) for _, src, _, _ in panels)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((width / 2, 6), title, fill="black", font=FONT, anchor="mt")
    x0 = 0
    for subtitle, sources, ts, values in panels:
        values = np.asarray(values, dtype=np.float64)
        signed = values.min() < 0
        scale = np.abs(values).max() or 1.0

        def colour(v):  # white at 0, towards red (positive, signed maps) or blue at the largest |value|
            base = (214, 39, 40) if signed and v >= 0 else (31, 119, 180)
            return tuple(int(255 + (c - 255) * abs(v) / scale) for c in base)

        ox = x0 + left
        d.text((ox + cell_w * len(ts) / 2, 24), subtitle, fill="black", font=FONT, anchor="mt")
        for r, src in enumerate(sources):
            y = top + cell_h * r
            d.text((ox - 4, y + cell_h / 2), f"v{src}", fill="black", font=FONT, anchor="rm")
            for c_, v in enumerate(values[r]):
                d.rectangle([ox + cell_w * c_, y, ox + cell_w * (c_ + 1) - 1, y + cell_h - 1], fill=colour(v))
        y = top + cell_h * len(sources)
        for c_, t in enumerate(ts):
            if c_ % max(1, len(ts) // 5) == 0 or c_ == len(ts) - 1:
                d.text((ox + cell_w * (c_ + 0.5), y + 4), xtick.format(t), fill="black", font=FONT, anchor="mt")
        d.text((ox + cell_w * len(ts) / 2, y + 22), xlabel, fill="black", font=FONT, anchor="mt")
        d.text((ox - left + 4, top - 14), "source", fill="black", font=FONT)
        bx = ox + cell_w * len(ts) + 12  # colour bar
        for k in range(60):
            v = scale * (1 - 2 * k / 59) if signed else scale * (1 - k / 59)
            d.rectangle([bx, top + 2 * k, bx + 10, top + 2 * k + 1], fill=colour(v))
        d.text((bx + 14, top), f"{scale:.3g}", fill="black", font=FONT, anchor="lm")
        d.text((bx + 14, top + 119), f"{-scale if signed else 0:.3g}", fill="black", font=FONT, anchor="lm")
        x0 += left + cell_w * len(ts) + bar
    img.save(path)


#################################################################################
#                                  The script                                   #
#################################################################################

def diagnose(model, data, args, device):
    """Every measure of one model: a JSON-ready dict."""
    cfg = model.config
    L = 2 * cfg.depth
    sublayers = args.sublayers or [max(1, L // 4), L]
    if any(not 1 <= l <= L + 1 for l in sublayers):
        raise SystemExit(f"--sublayers must lie in 1..{L + 1} for this model (L + 1 is the final aggregation)")
    indices = np.asarray(data.eval)[: args.num_samples]
    blocks = {}
    for t in args.t:
        blocks[str(t)] = per_block(model, data, indices, t, args.seed, device)
        model.zero_grad(set_to_none=True)
    return {"routing": cfg.routing, "chunk": cfg.chunk, "depth": cfg.depth, "per_block": blocks,
            "mixing": mixing(model, data, indices, sublayers, args.map_steps, args.seed, device),
            "probe": probe(model, data, np.asarray(data.eval)[: args.probe_pairs], args.probe_steps, args.seed, device)}


def figures(results, out):
    """The PNGs: one per per-block measure and t, the mixing maps of each checkpoint, and the probe."""
    labels = list(results)
    first = results[labels[0]]
    for t in first["per_block"]:
        for key, title, ylabel, log, start in (("forward_rms", "forward magnitude", "RMS(z_k)", True, 1),
                                               ("backward_rms", "backward magnitude", "RMS(dL/dz_k)", True, 1),
                                               ("cosine", "block similarity", "cos(z_k, z_k+1)", False, 1)):
            series = [(label, list(range(start, start + len(r["per_block"][t][key]))), r["per_block"][t][key])
                      for label, r in results.items()]
            line_plot(series, f"{title} at t = {t}", "block k", ylabel, os.path.join(out, f"{key}_t{t}.png"), log)
    for label, r in results.items():
        kind = "gate gradient dL/dg (residual, counterfactual)" if r["routing"] == "residual" else "routing weight alpha"
        panels = [(f"sublayer {l}", m["sources"], m["t"], m["values"]) for l, m in r["mixing"].items()]
        heat_maps(panels, f"{label}: {kind}", os.path.join(out, f"mixing_{safe(label)}.png"))
    series = [(label, list(range(1, len(r["probe"]["r2"]) + 1)), r["probe"]["r2"]) for label, r in results.items()]
    line_plot(series, "timestep probe: held-out R^2 of t from pooled h_l", "sublayer l (L+1 = final)", "R^2",
              os.path.join(out, "probe.png"), hline=(f"x_t ({labels[0]})", first["probe"]["r2_xt"]))


def safe(label):
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)


def main(args):
    if args.log:
        path = training_curves(args.log, args.out)
        print(f"training curves in {path}" if path else f"{args.log} has no loss logged yet: no figure")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    results, data = {}, None
    for i, path in enumerate(tqdm(args.ckpt, desc="checkpoints")):
        model = load_model(path, ema=not args.no_ema).to(device).eval()
        cfg = model.config
        if cfg.routing != "residual":
            model.routers.kernel = "torch"  # h and alpha come from the reference path
        if data is None:
            data = load_data(args.data, cfg.input_size if args.data == "shapes" else None, seed=0,
                             num_eval=max(args.num_samples, args.probe_pairs))
        if (data.channels, data.size) != (cfg.in_channels, cfg.input_size):
            raise SystemExit(f"{path} models {cfg.in_channels}x{cfg.input_size}px inputs, but --data gives "
                             f"{data.channels}x{data.size}: pass the data it was trained on")
        chunk = "" if cfg.routing == "residual" else " dense" if cfg.chunk == 1 else f" c{cfg.chunk}"
        label = args.label[i] if args.label else cfg.routing + chunk
        if label in results:  # two checkpoints of one routing: tell them apart by file, never drop one
            label = f"{label} ({os.path.relpath(path)})"
        results[label] = diagnose(model, data, args, device)
    with open(os.path.join(args.out, "diagnostics.json"), "w") as f:
        json.dump(results, f, indent=1)
    figures(results, args.out)
    print(f"diagnostics.json and figures in {args.out}")


if __name__ == "__main__":
    main(parse_args())
