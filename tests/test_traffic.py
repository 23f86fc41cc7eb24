"""Tests of traffic.py, the per-step byte and kernel counter: hand-computed cases, then the targets at SiT-XL/2."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernel
from tools import traffic
from model import SiT
from train import parse_args


def test_counter_charges_reads_and_writes_by_hand():
    with FakeTensorMode():
        x, w = torch.empty(4, 8), torch.empty(8, 3)
        row = torch.empty(1, 8)
        counter = traffic.Traffic()
        with counter:
            x.t()  # a view: nothing moves, nothing launches
            x @ w  # reads 4*8 + 8*3 floats, writes 4*3: 2*4*8*3 FLOPs
            x + x  # reads x once, writes 4*8
            x + row.expand(4, 8)  # the broadcast operand costs its 8 distinct elements
            x.add_(1.0)  # in place: reads and writes x
            torch._foreach_lerp_([x, w], [x, w], 0.1)  # in place, returning nothing (as AdamW's and the EMA's
            # foreach updates): reads both lists (x and w once each) and writes the first
    rows = counter.rows
    assert rows["matmul + attention"]["bytes"] == 4 * (32 + 24 + 12) and rows["matmul + attention"]["kernels"] == 1
    other = rows["other elementwise"]
    assert other["bytes"] == 4 * ((32 + 32) + (32 + 8 + 32) + (32 + 32) + (32 + 24 + 32 + 24)) and other["kernels"] == 4
    peak, bandwidth = traffic.DEVICES["H100"]
    assert rows["matmul + attention"]["H100"] == pytest.approx(max(2 * 4 * 8 * 3 / peak, 272 / bandwidth))


def test_gradients_from_two_readers_are_charged_to_accumulation():
    with FakeTensorMode():
        a = torch.empty(6, 5, requires_grad=True)
        counter = traffic.Traffic()
        with counter:
            b = a * 2.0
            (b.sin() + b.cos()).sum().backward()  # b has two readers: autograd adds their gradients once
    acc = counter.rows["gradient accumulation"]
    assert acc["kernels"] == 1 and acc["bytes"] == 3 * 6 * 5 * 4


def test_fused_aggregation_is_charged_what_its_loops_move():
    B, T, D, N = 2, 5, 16, 3
    with FakeTensorMode():
        srcs = [torch.empty(B, T, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(N)]
        q = torch.empty(B, T, D, dtype=torch.bfloat16, requires_grad=True)
        gamma = torch.empty(D, requires_grad=True)
        shift, scale = (torch.empty(B, 6 * D, dtype=torch.bfloat16, requires_grad=True)[:, :D] for _ in range(2))
        counter = traffic.Traffic()
        with counter:
            x, _, _ = kernel.aggregate_fused_with_tokens(srcs, [None] * N, [False] * N, q, gamma, shift, scale)
            x.sum().backward()
    io, rows_fp32 = B * T * D * 2, B * T * 4
    # Forward: the sources, q, gamma, shift and scale once; x, then h in fp32 and the log-sum-exp for the backward.
    fwd = N * io + io + 4 * D + 2 * (B * D * 2) + io + 2 * io + rows_fp32
    assert counter.rows["DAR aggregation fwd"] == dict(bytes=fwd, kernels=1, **{
        n: pytest.approx(fwd / bw) for n, (_, bw) in traffic.DEVICES.items()})
    # Backward: the sources once, q, gamma, scale, h, lse, dx; every dv_i and dq written; the partials of dgamma,
    # dshift, dscale (J programs per sample on a 132-SM GPU) written and summed.
    J = math.ceil(T / max(1, min(T, math.ceil(B * T / (2 * traffic.SMS)))))
    part = 3 * B * J * D * 4
    kernel_bytes = N * io + io + 4 * D + B * D * 2 + 2 * io + rows_fp32 + io + N * io + io + part
    bwd = counter.rows["DAR aggregation bwd"]
    assert bwd["kernels"] == 1 + 3 and bwd["bytes"] == kernel_bytes + part + 3 * B * D * 4
    # A reader that adds into a later reader's buffer reads that buffer too.
    accumulating = dict(zip(("sources", "dsources", "accumulate"), (srcs, srcs, [True, False, True])))
    args = [accumulating["sources"], accumulating["dsources"], accumulating["accumulate"], q, gamma, shift, scale,
            torch.empty(B, T, D, device="meta"), torch.empty(B, T, device="meta"), srcs[0], None]
    assert kernel.traffic("aggregate_backward", args, traffic.SMS)[0][0] == kernel_bytes + 2 * io


def test_floor_of_the_worked_example_l8_s4():
    # design.md's example: S_1..S_8 and the final set have 1, 2, 3, 4, 2, 3, 4, 5 and 6 sources (30 reads); the
    # readers of v0..v8 are 9, 3, 2, 1, 5, 4, 3, 2, 1, so the gradients cost sum(2k - 1) = 51 io.
    B, T, itemsize = 3, 16, 2
    for routing, extra in (("static", 0), ("dynamic", 2 * 9)):
        with torch.device("meta"):
            model = SiT(input_size=8, patch_size=2, hidden_size=32, depth=4, num_heads=2, routing=routing, chunk=4)
        io = B * T * 32 * itemsize
        assert traffic.floor(model, B, T, itemsize) == (2 * (30 + 9) + 51 + extra) * io


def test_bench_traffic_prints_every_routing(capsys):
    main_args = parse_args(["--bench", "--traffic", "--model=SiT-S/2", "--depth=2", "--global-batch-size=4"])
    results = traffic.report(main_args)
    out = capsys.readouterr().out
    for label in ("residual", "static c4", "explicit c4", "dynamic c4", "static dense"):
        assert f"| {label} |" in out
    rows, saved, floor_bytes = results["static c4"]
    assert saved > 0 and floor_bytes > 0 and rows["DAR aggregation fwd"]["kernels"] == 4 + 1  # 2 blocks: 4 + final


def test_dar_traffic_is_near_its_floor_at_sit_xl_2():
    """The step-cost targets: aggregation and accumulation within 1.2x of the floor for static c4 and dense,
    1.25x for dynamic c4 (whose queries' gradients still reach v_{l-1} through autograd)."""
    args = parse_args(["--bench", "--traffic", "--model=SiT-XL/2", "--global-batch-size=32"])
    for routing, chunk, target in (("static", 4, 1.2), ("dynamic", 4, 1.25), ("static", 1, 1.2)):
        rows, _, floor_bytes = traffic.count_step(SimpleNamespace(**{**vars(args), "routing": routing, "chunk": chunk}))
        dar = sum(rows[g]["bytes"] for g in traffic.GROUPS[1:4])
        assert dar <= target * floor_bytes, (routing, chunk, dar / floor_bytes)
