"""
What one training step costs in memory traffic, counted on any machine:

    python tools/traffic.py --model=SiT-XL/2 --global-batch-size=32    (train.py's flags; or train.py --bench --traffic)

(What it costs in time on a device is `python train.py --bench`.) Its own file because it is a measuring
instrument, not part of the recipe: train.py stays a recipe and this file can be read on its own. No GPU is needed. The step (train.train_step and the EMA update, exactly as
training runs them) runs on fake tensors (torch's FakeTensorMode: shapes, dtypes and strides, no data and no
memory) on the CPU device, under bf16 autocast when asked, with DAR on the fused kernel's custom ops. A
TorchDispatchMode sees every aten op and charges it:
  - bytes: every distinct tensor it reads plus every tensor it writes, each by its distinct elements (a
    broadcast (B, 1, d) operand costs B * d elements; an in-place op reads and writes its tensor);
  - kernels: one per op, none for views, allocations and metadata;
  - the fused DAR ops by what their loops read and write (kernel.traffic), which is not what their inputs
    and outputs alone would say (a backward accumulating into a buffer reads it too).
Ops are grouped: matmuls and attention, DAR aggregation forward and backward (with the partial-sum reductions
the backward launches), autograd's additions of gradients that reach a tensor from several readers (in the
backward of this model every `add` is one: its backward formulas add nothing themselves), the optimiser and
EMA, and everything else. The CPU's autocast lists differ from CUDA's in one op this model uses: CUDA runs
LayerNorm in fp32, which --traffic reproduces by running it in fp32.

The floor of DAR's aggregations (Eq. 7 and 11 fix each aggregator l's sources S_l, N_l = |S_l|; io is one
(B, T, d) tensor in the activation dtype):
  forward   each aggregator reads each of its sources once and writes its output: sum_l (N_l + 1) io;
  backward  each aggregator reads each source once more and its output's gradient: sum_l (N_l + 1) io; each
            source's gradient is written by its first reader in the backward and read and written by every
            other, sum_i (2 k_i - 1) io with k_i the readers of v_i;
  dynamic   its per-token queries add a read forward and a dq write backward: 2 io per aggregator.
Nothing else is counted in the floor: the statistics a one-pass backward needs are taken as free.
What DAR replaces in residual routing is each sublayer's residual add, LayerNorm and modulate: --traffic
counts residual routing too, so its table shows DAR's bytes over residual next to that floor.

The roofline columns are a model, not a measurement: per op, max(FLOPs / peak, bytes / bandwidth) on an H100
SXM (989 TFLOP/s dense bf16, 3.35 TB/s) and an H200 (989 TFLOP/s, 4.8 TB/s), summed over the step, with
FLOPs from torch's flop counter (matmuls and attention; elementwise work is charged by bytes alone).
"""
import math
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as tools/traffic.py: the repository's modules

import kernel  # noqa: E402
import train  # noqa: E402

DEVICES = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}  # dense bf16 FLOP/s, bytes/s
SMS = 132  # streaming multiprocessors of both, which set the backward's rows per program
GROUPS = ("matmul + attention", "DAR aggregation fwd", "DAR aggregation bwd", "gradient accumulation",
          "other elementwise", "optimizer + EMA")
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward",
           "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}
FREE = {"detach", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
        "_local_scalar_dense", "device", "set_", "alias"}


def distinct_bytes(t):
    """Bytes of the distinct elements a tensor addresses (a zero stride repeats an element)."""
    return math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0) * t.element_size() if t.numel() else 0


class Traffic(TorchDispatchMode):
    """Bytes, kernels and roofline time per group of every op dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.rows = defaultdict(lambda: dict(bytes=0, kernels=0, **{name: 0.0 for name in DEVICES}))

    def charge(self, group, nbytes, kernels, flops=0):
        row = self.rows[group]
        row["bytes"] += nbytes
        row["kernels"] += kernels
        for name, (peak, bandwidth) in DEVICES.items():
            row[name] += max(flops / peak, nbytes / bandwidth) if kernels else 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if func.namespace == "dar":
            group = "DAR aggregation fwd" if name == "aggregate" else "DAR aggregation bwd"
            for nbytes, kernels in kernel.traffic(name, args, SMS):
                self.charge(group, nbytes, kernels)
            return out
        if func.is_view or name in FREE or func.namespace == "prim":
            return out
        tensors = lambda tree: [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
        read = {id(t): distinct_bytes(t) for t in tensors((args, kwargs))}  # each distinct input once
        written = tensors(out)  # in place: read and written
        if not written and name.endswith("_"):  # in place returning nothing (the _foreach_*_ ops): it writes args[0]
            written = tensors(args[0])
        nbytes = sum(read.values()) + sum(distinct_bytes(t) for t in written)
        node = torch._C._current_autograd_node()
        if name in MATMULS:
            group = "matmul + attention"
        elif node is not None:  # the backward
            accumulating = name in ("add", "add_") and type(node).__name__ != "AccumulateGrad"
            group = "gradient accumulation" if accumulating else "other elementwise"
        elif torch.is_grad_enabled():
            group = "other elementwise"
        else:  # after the backward, outside autograd: clipping, AdamW, EMA
            group = "optimizer + EMA"
        flop_formula = flop_registry.get(func._overloadpacket)
        flops = flop_formula(*args, **kwargs, out_val=out) if flop_formula else 0
        self.charge(group, nbytes, 1, flops)
        return out


def saved_bytes():
    """A saved_tensors_hooks context and a function giving the distinct bytes autograd kept for the backward
    (parameters excluded: they are kept anyway)."""
    seen = {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad):
            base = t._base if t._base is not None else t
            seen[id(base)] = distinct_bytes(base)
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), lambda: sum(seen.values())


def floor(model, B, T, itemsize):
    """The fewest bytes DAR's aggregations can move in one step (module docstring), 0 for residual routing."""
    if model.config.routing == "residual":
        return 0
    sets = model.routers.source_sets
    readers = defaultdict(int)
    for S_l in sets:
        for i in S_l:
            readers[i] += 1
    io = B * T * model.config.hidden_size * itemsize
    n = sum(len(S_l) for S_l in sets)
    total = 2 * (n + len(sets)) + sum(2 * k - 1 for k in readers.values())
    return io * (total + (2 * len(sets) if model.config.routing == "dynamic" else 0))


def count_step(args):
    """Build args' model on fake tensors, run one training step (train.train_step, then the EMA update) and
    return (rows by group, bytes saved for the backward, floor bytes)."""
    kernel_choice = "triton" if args.kernel == "auto" else args.kernel  # what a GPU runs
    data = train.load_data("random", args.image_size)
    stream = train.Stream(data, args.global_batch_size, args.seed, torch.device("cpu"))
    draw = stream.draw(0, 0.1)  # real tensors: the step's inputs (small next to what the step moves)
    draw["indices"] = draw["indices"].numpy()  # sliced as data, not traced
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(args.seed)
        model = train.build_model(SimpleNamespace(**{**vars(args), "kernel": kernel_choice}), data)
        ema = train.copy.deepcopy(model).requires_grad_(False)
        projector = None
        if args.repa:
            projector = train.repa.projector(model.config.hidden_size)
        trainee = train.Trainee(model, projector, args.repa_depth)
        opt = torch.optim.AdamW(trainee.parameters(), lr=args.lr, weight_decay=0, foreach=True)  # CUDA's default
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
        encoder = _FakeEncoder() if args.repa else None
        counter, (hooks, saved) = Traffic(), saved_bytes()
        with counter, hooks, _cuda_autocast_lists():
            parts = [data.batch(draw["indices"], draw["flip"], draw["posterior"], images=args.repa)]  # as load_step
            train.train_step(args, trainee, opt, draw, parts, slice(0, args.global_batch_size), args.global_batch_size,
                             1, encoder, autocast, model.config.num_classes)
            train.update_ema(ema, model, args.ema_decay)
    B, T = args.global_batch_size, (data.size // model.config.patch_size) ** 2
    itemsize = 2 if args.precision == "bf16" else 4
    return dict(counter.rows), saved(), floor(model, B, T, itemsize)


class _FakeEncoder(torch.nn.Module):
    """REPA's frozen encoder stands in as its output only: its cost is the same for every routing."""

    def forward(self, images):
        return images.new_zeros(images.shape[0], 256, 768, dtype=torch.float32)


class _cuda_autocast_lists:
    """CPU autocast leaves LayerNorm in bf16; CUDA's runs it in fp32. Make F.layer_norm do what CUDA does."""

    def __enter__(self):
        self.layer_norm = torch.nn.functional.layer_norm

        def layer_norm(x, *a, **k):
            if torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    return self.layer_norm(x.float(), *a, **k)
            return self.layer_norm(x, *a, **k)

        torch.nn.functional.layer_norm = layer_norm

    def __exit__(self, *exc):
        torch.nn.functional.layer_norm = self.layer_norm


def report(args):
    """Print one table for args' model, batch and precision: residual routing, the three query variants at
    args.chunk, and static dense routing (chunk 1)."""
    GB = 1e9
    c = args.chunk
    runs = [("residual", c), ("static", c), ("explicit", c), ("dynamic", c), ("static", 1)]
    results = {}
    for routing, chunk in runs:
        label = routing if routing == "residual" else f"{routing} {'dense' if chunk == 1 else f'c{chunk}'}"
        results[label] = count_step(SimpleNamespace(**{**vars(args), "routing": routing, "chunk": chunk}))
    base = sum(r["bytes"] for r in results["residual"][0].values())
    base_time = {name: sum(r[name] for r in results["residual"][0].values()) for name in DEVICES}
    print(f"One training step of {args.model}, batch {args.global_batch_size}, {args.precision}, "
          f"kernel {'triton' if args.kernel == 'auto' else args.kernel}: GB read + written (kernels launched)")
    head = ("| routing | " + " | ".join(GROUPS) + " | total GB | kernels | x residual | saved for bwd GB | "
            "DAR aggregation + accumulation GB | its floor GB | x floor | "
            + " | ".join(f"{n} ms (model) | x residual" for n in DEVICES) + " |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for label, (rows, saved, floor_bytes) in results.items():
        total = sum(r["bytes"] for r in rows.values())
        kernels = sum(r["kernels"] for r in rows.values())
        cells = [f"{rows[g]['bytes'] / GB:.2f} ({rows[g]['kernels']})" if g in rows else "0" for g in GROUPS]
        dar = sum(rows[g]["bytes"] for g in GROUPS[1:4] if g in rows) if floor_bytes else 0
        times = [sum(r[n] for r in rows.values()) for n in DEVICES]
        ratio = f"{dar / floor_bytes:.2f}" if floor_bytes else "-"
        print(f"| {label} | " + " | ".join(cells) + f" | {total / GB:.2f} | {kernels} | {total / base:.3f} | "
              f"{saved / GB:.2f} | {dar / GB:.2f} | {floor_bytes / GB:.2f} | {ratio} | "
              + " | ".join(f"{t * 1e3:.1f} | {t / base_time[n]:.3f}" for t, n in zip(times, DEVICES)) + " |")
    return results


if __name__ == "__main__":
    report(train.parse_args(["--bench", *sys.argv[1:]]))
