"""
The fused DAR aggregation (the paper's Appendix E), in Triton: for every token row,

    h = sum_i softmax_i(q . RMSNorm(v_i) * gamma / sqrt(d)) v_i       (Eq. 5)
    x = LN(h) * (1 + scale) + shift                                     (optional: the next sublayer's input)

Why a kernel. The reference, dar.aggregate_reference, stacks the N sources into an fp32 (B, T, N, d) tensor,
builds the keys, the logits, the weights and the weighted sum as separate ops, and autograd keeps several of those
(B, T, N, d) intermediates alive until the backward: each source is read about four times forward and the
activation memory grows with N (N = 57 for dense routing at SiT-XL/2). Here:
- forward: one program per row streams the sources once with an online softmax (running max m, running sum Z,
  running weighted sum), all in fp32 registers, and writes x (and h when asked). For the backward it saves only
  h in fp32 and lse = m + log Z per row;
- backward: one pass over the sources recomputes each key and weight from lse and emits dv_i, added in place
  into a gradient buffer that the source's other readers share (see the custom ops below); dq, dgamma, dscale
  and dshift are summed per program in fp32 registers and the per-program partials are summed afterwards in
  PyTorch (deterministic: no atomics). Saving h costs 8 bytes per element (4 written, 4 read); recovering it
  would read all N sources a second time (2N bytes per element in bf16), so saving wins from N = 5 on, and at
  SiT-XL/2 c4 it saves about a tenth of the aggregations' bytes (tools/traffic.py counts them).
Sources stay separate tensors, never stacked (stacking per layer would make memory quadratic in depth): the
kernels read a small int64 table of their addresses and loop over it at run time, U sources per step, so U
rows of loads are in flight at once (STAGES steps of them with software pipelining). One compiled kernel serves
every N. A row is held as two power-of-two blocks, so no lane is padding at SiT's widths. U, the warps and
STAGES are pinned (PINNED below), so that runs are bit-reproducible; DAR_AUTOTUNE=1 times them and picks.

    python tools/gpu_check.py --part=kernel     the raw kernels and the whole op at SiT-XL/2's widths (CUDA GPU)
    python tools/gpu_check.py --part=configs    every config of each kernel timed alone there (CUDA GPU)
    python tools/sm90.py                        what they compile to for an H100, on a machine without one

Tests: test_parity.py (on a CPU under TRITON_INTERPRET=1 at small shapes, at full size on a GPU).
"""
import contextlib
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EPS = tl.constexpr(1e-6)  # of the keys' RMSNorm and the output LayerNorm, as in dar.aggregate_reference and SiT


# A config: U sources loaded per loop step (more bytes in flight per program, more registers), STAGES loop steps
# whose loads are in flight at once (software pipelining through cp.async; 1 = none) and the warps per program.
# These are the (U, warps, STAGES) that compile for sm_90 without spilling registers on both Triton 3.6 and 3.9
# (`python tools/sm90.py --space` compiles every one and shows which spill: in the backward, U = 4 at 4 or 16 warps
# on both, U = 2 at 4 or 16 warps and U = 1 at 8 warps on one of them); 16-warp forwards are left out, as they
# issue the most instructions per source.
CONFIGS = {"fwd": [triton.Config({"U": u, "STAGES": s}, num_warps=w)
                   for u in (1, 2, 4) for w in (4, 8) for s in (1, 3)],
           "bwd": [triton.Config({"U": u, "STAGES": s}, num_warps=w)
                   for u, w in ((1, 4), (1, 16), (2, 8), (4, 8)) for s in (1, 3)]}
# The config that runs unless DAR_AUTOTUNE=1. U and the warps set the order of the fp32 sums, so a config chosen
# by timing (which varies from run to run) would make two runs, or a run and its resumption, differ in the last
# bits (STAGES does not change the sums). Until a GPU times them (tools/gpu_check.py --part=configs), they are
# chosen from the compile table (tools/sm90.py, docs/kernel.md) for the default chunk 4, whose aggregations read
# N = 5 to 9 sources: the fewest warp instructions per real source at N = 5 and 9 (a loop step of U sources
# runs whole, so U = 4 pays for 12 at N = 9) among the configs that keep about 29 KB of loads in flight per SM,
# as Little's law asks of an H200 (4.8 TB/s over 132 SMs at about 800 ns; 27 KB is let pass), and for the
# backward two programs per SM, which its split of rows over programs (_rows_per_program) assumes.
PINNED = {"fwd": triton.Config({"U": 2, "STAGES": 1}, num_warps=4),
          "bwd": triton.Config({"U": 1, "STAGES": 3}, num_warps=4)}
AUTOTUNE = os.environ.get("DAR_AUTOTUNE") == "1"
_TUNED = {}  # with DAR_AUTOTUNE=1: (kernel, shape class) -> the config timed fastest, for this process


def _configs(kind):
    """The configs kernel `kind` ("fwd" or "bwd") may run: the pinned one, or with DAR_AUTOTUNE=1 all of them.
    The interpreter has no GPU to time on; U = 8 takes the fewest of its slow steps, and its tests' N (1 to
    57) then come in full steps, partly padded ones and both."""
    if INTERPRET or not torch.cuda.is_available():
        return [triton.Config({"U": 8, "STAGES": 1}, num_warps=4)]
    return CONFIGS[kind] if AUTOTUNE else [PINNED[kind]]


def _benchmark(fn):
    """ms of fn() on the GPU, the median of triton.testing.do_bench (a test puts a stand-in here)."""
    return triton.testing.do_bench(fn, return_mode="median")


def _choose(kind, key, make_trial):
    """The config kernel `kind` runs for the shape class `key`: the only candidate, or (DAR_AUTOTUNE=1) the fastest
    of them, timed once per key. make_trial() returns a launch(config) on scratch buffers: a timing runs the
    kernel many times, and the backward adds into the gradient buffers it is given, so timing it on the live
    ones would add a source's gradient once per run (Triton's own autotuner cannot know that, which is why this
    file does not use it)."""
    configs = _configs(kind)
    if len(configs) == 1:
        return configs[0]
    if (kind, key) not in _TUNED:
        trial = make_trial()
        _TUNED[kind, key] = min(configs, key=lambda c: _benchmark(lambda: trial(c)))
    return _TUNED[kind, key]


#################################################################################
#                                   Kernels                                     #
#################################################################################
# A row of d elements is held as two power-of-two blocks (Triton's blocks are powers of two): a = [0, BA) and
# b = [BA, BA + BB), with masks ma and mb. At d = 1152 the split 1024 + 128 pads nothing, where one 2048-lane
# block leaves 44% of its lanes (registers, instructions) on padding. So each row vector below comes as a pair
# (its a and b blocks), and every sum over a row adds the two blocks' sums.
# Loads say how long their data is worth keeping in L2: the rows of sources, h, dx and dh are read once per
# kernel ("evict_first"); the query, gamma and the per-sample adaLN rows by many programs ("evict_last").

@triton.jit
def _load(PTR, offs, mask, KEEP: tl.constexpr = False):
    """One block of a row, in fp32."""
    if KEEP:
        return tl.load(PTR + offs, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    return tl.load(PTR + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)


@triton.jit
def _store(PTR, oa, ma, a, ob, mb, b):
    """A row, blocks a and b, in PTR's element type."""
    tl.store(PTR + oa, a.to(PTR.dtype.element_ty), mask=ma)
    tl.store(PTR + ob, b.to(PTR.dtype.element_ty), mask=mb)


@triton.jit
def _query(Q, row, T, offs, mask, D: tl.constexpr, Q_MODE: tl.constexpr):
    """One block of this row's query, fp32. The kernels fold the keys' gain into it, qw = q * gamma, so a key
    costs no extra multiply."""
    if Q_MODE == 0:  # one vector (static)
        return _load(Q, offs, mask, KEEP=True)
    elif Q_MODE == 1:  # one per sample (explicit)
        return _load(Q + (row // T) * D, offs, mask, KEEP=True)
    return _load(Q + row * D, offs, mask)  # one per token (dynamic)


@triton.jit
def _tile(SRC, i, N, U: tl.constexpr, TYPE: tl.constexpr):
    """Pointers to sources i .. i + U - 1 (a [U] vector, read from the pointer table SRC) and which are real.
    The launchers align every source to 16 bytes; saying so lets the compiler emit 16-byte vector loads and
    stores, which it cannot prove for an address read from memory (it would load one element at a time)."""
    us = i + tl.arange(0, U)
    valid = us < N
    ptrs = tl.load(SRC + us, mask=valid, other=0).to(tl.pointer_type(TYPE))
    return tl.multiple_of(ptrs, 16), valid


@triton.jit
def _sources(ptrs, valid, base, offs, mask):
    """One block of U source rows, [U, block] in fp32 (zero where the source or the lane is padding)."""
    return tl.load(ptrs[:, None] + base + offs[None, :], mask=valid[:, None] & mask[None, :], other=0.0,
                   eviction_policy="evict_first").to(tl.float32)


@triton.jit
def _logits(va, vb, qwa, qwb, D: tl.constexpr, SM_SCALE: tl.constexpr):
    """For U source rows (blocks va, vb): s = q . (v * rstd * gamma) / sqrt(d) and rstd = 1 / RMS(v), both [U]
    fp32."""
    rstd = tl.rsqrt((tl.sum(va * va, axis=1) + tl.sum(vb * vb, axis=1)) / D + EPS)
    return (tl.sum(va * qwa[None, :], axis=1) + tl.sum(vb * qwb[None, :], axis=1)) * rstd * SM_SCALE, rstd


@triton.jit
def _softmax_mix(SRC, N, base, oa, ma, ob, mb, qwa, qwb, D: tl.constexpr, U: tl.constexpr,
                 STAGES: tl.constexpr, SM_SCALE: tl.constexpr, TYPE: tl.constexpr):
    """One pass over a row's sources, U at a time, with an online softmax; returns (m, Z, ha, hb) with
    h = sum_i p_i v_i."""
    m = tl.full([], float("-inf"), tl.float32)  # running max of the logits
    z = tl.zeros([], tl.float32)  # running sum of exp(s_i - m)
    acc_a, acc_b = tl.zeros_like(qwa), tl.zeros_like(qwb)  # running sum of exp(s_i - m) v_i
    for i in tl.range(0, N, U, num_stages=STAGES):
        ptrs, valid = _tile(SRC, i, N, U, TYPE)
        va, vb = _sources(ptrs, valid, base, oa, ma), _sources(ptrs, valid, base, ob, mb)
        s, _ = _logits(va, vb, qwa, qwb, D, SM_SCALE)
        s = tl.where(valid, s, float("-inf"))  # padding gets no weight
        m_new = tl.maximum(m, tl.max(s, axis=0))
        r, p = tl.exp(m - m_new), tl.exp(s - m_new)
        z = z * r + tl.sum(p, axis=0)
        acc_a = acc_a * r + tl.sum(p[:, None] * va, axis=0)
        acc_b = acc_b * r + tl.sum(p[:, None] * vb, axis=0)
        m = m_new
    return m, z, acc_a / z, acc_b / z


@triton.jit
def _layer_norm(ha, ma, hb, mb, D: tl.constexpr):
    """(h - mean) / std over the row (no affine), padding lanes kept at zero; returns (xhat_a, xhat_b, rstd)."""
    mean = (tl.sum(ha, axis=0) + tl.sum(hb, axis=0)) / D
    ca, cb = tl.where(ma, ha - mean, 0.0), tl.where(mb, hb - mean, 0.0)
    rstd = tl.rsqrt((tl.sum(ca * ca, axis=0) + tl.sum(cb * cb, axis=0)) / D + EPS)
    return ca * rstd, cb * rstd, rstd


@triton.jit(do_not_specialize=["N", "NB"])
def _forward_kernel(
    SRC,  # (N,) int64: the addresses of the sources v_i, each (M, D) contiguous
    N,  # number of sources
    NB,  # N rounded up to a power of two: with DAR_AUTOTUNE=1, a config is picked per such class of N
    Q,  # query: (D,), (B, D) or (M, D) by Q_MODE
    GAMMA,  # (D,) RMSNorm gain of the keys
    SHIFT,  # (B, D) adaLN shift, rows MOD_STRIDE apart (read when HAS_MOD)
    SCALE,  # (B, D) adaLN scale, rows MOD_STRIDE apart (read when HAS_MOD)
    X,  # (M, D) out: LN(h) * (1 + scale) + shift, or h without HAS_MOD
    H,  # (M, D) out: h in the sources' type (written when STORE_H)
    H32,  # (M, D) fp32 out: h for the backward (written when SAVE)
    LSE,  # (M,) fp32 out: the log-sum-exp of the row's logits, for the backward (written when SAVE)
    T,  # rows per sample
    MOD_STRIDE,  # elements between the rows of shift and scale (views of the adaLN output are not copied)
    D: tl.constexpr,  # width d
    BA: tl.constexpr,  # the row's first block: the largest power of two below D
    BB: tl.constexpr,  # its second block: D - BA rounded up to a power of two
    TYPE: tl.constexpr,  # the sources' element type
    Q_MODE: tl.constexpr,  # 0 one query, 1 one per sample, 2 one per row
    HAS_MOD: tl.constexpr,  # fuse LayerNorm + adaLN modulate
    STORE_H: tl.constexpr,  # also write h
    SAVE: tl.constexpr,  # also write what the backward reads: h in fp32 and the log-sum-exp
    SM_SCALE: tl.constexpr,  # 1 / sqrt(D)
    U: tl.constexpr,  # sources per loop step (a config: PINNED, or timed with DAR_AUTOTUNE=1)
    STAGES: tl.constexpr,  # loop steps whose loads are in flight at once (a config; 1: no software pipelining)
):
    row = tl.program_id(0).to(tl.int64)
    oa, ob = tl.arange(0, BA), BA + tl.arange(0, BB)
    ma, mb = oa < D, ob < D
    base = row * D
    # The query and gain are loaded before the source loop. Shift and scale are not: held through the loop they
    # cost up to 40 more registers per thread at d = 1152 (fewer programs per SM) to save one load latency per
    # row; issued before the LayerNorm, their latency overlaps its reductions instead.
    qwa = _query(Q, row, T, oa, ma, D, Q_MODE) * _load(GAMMA, oa, ma, KEEP=True)
    qwb = _query(Q, row, T, ob, mb, D, Q_MODE) * _load(GAMMA, ob, mb, KEEP=True)
    m, z, ha, hb = _softmax_mix(SRC, N, base, oa, ma, ob, mb, qwa, qwb, D, U, STAGES, SM_SCALE, TYPE)
    if SAVE:
        tl.store(LSE + row, m + tl.log(z))
        _store(H32 + base, oa, ma, ha, ob, mb, hb)
    if HAS_MOD:
        if STORE_H:
            _store(H + base, oa, ma, ha, ob, mb, hb)
        mod = (row // T) * MOD_STRIDE
        scale_a, scale_b = _load(SCALE + mod, oa, ma, KEEP=True), _load(SCALE + mod, ob, mb, KEEP=True)
        shift_a, shift_b = _load(SHIFT + mod, oa, ma, KEEP=True), _load(SHIFT + mod, ob, mb, KEEP=True)
        xa, xb, _ = _layer_norm(ha, ma, hb, mb, D)
        _store(X + base, oa, ma, xa * (1.0 + scale_a) + shift_a, ob, mb, xb * (1.0 + scale_b) + shift_b)
    else:
        _store(X + base, oa, ma, ha, ob, mb, hb)


@triton.jit
def _source_grad(dptrs, valid, add, base, offs, mask, v, p, ds, c_q, c_v, dh, qw, TYPE: tl.constexpr):
    """One block of dv_i = p_i dh + ds_i (c_q qw - c_v v_i) for U sources, added in place to what another reader
    of v_i left in its gradient buffer where `add`, stored otherwise."""
    ptrs = dptrs[:, None] + base + offs[None, :]
    tile = valid[:, None] & mask[None, :]
    dv = p[:, None] * dh[None, :] + ds[:, None] * (c_q[:, None] * qw[None, :] - c_v[:, None] * v)
    dv += tl.load(ptrs, mask=tile & add[:, None], other=0.0, eviction_policy="evict_first").to(tl.float32)
    tl.store(ptrs, dv.to(TYPE), mask=tile)


@triton.jit(do_not_specialize=["N", "NB"])
def _backward_kernel(
    SRC,  # (N,) int64 source addresses, as in the forward
    DSRC,  # (N,) int64 addresses of the gradient buffers dL/dv_i, each (M, D) of the sources' type
    ACC,  # (N,) int32: 1 adds this aggregation's dv_i into its buffer (another reader wrote it), 0 stores it
    N, NB,  # as in the forward
    Q, GAMMA, SHIFT, SCALE,  # the forward's inputs
    H32,  # (M, D) fp32: h as the forward saved it
    LSE,  # (M,) fp32: the forward's log-sum-exp per row
    DX,  # (M, D) dL/dx
    DH,  # (M, D) dL/dh from h's own uses (read when HAS_DH)
    DQ,  # (M, D) out: dL/dq per row (written when Q_MODE == 2)
    PART,  # (P, B, J, D) fp32 out: per-program partial sums of dgamma, then dq (Q_MODE < 2), dshift, dscale (HAS_MOD)
    T,  # rows per sample
    J,  # programs per sample
    R,  # rows per program
    MOD_STRIDE,  # as in the forward
    D: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, TYPE: tl.constexpr, Q_MODE: tl.constexpr,
    HAS_MOD: tl.constexpr, HAS_DH: tl.constexpr, SM_SCALE: tl.constexpr, U: tl.constexpr, STAGES: tl.constexpr,
):
    # Program (b, j) owns rows [j R, (j + 1) R) of sample b, so its dshift/dscale partials belong to one sample.
    b, j = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    oa, ob = tl.arange(0, BA), BA + tl.arange(0, BB)
    ma, mb = oa < D, ob < D
    zero_a, zero_b = tl.zeros([BA], tl.float32), tl.zeros([BB], tl.float32)
    dgamma_a, dgamma_b, dq_a, dq_b = zero_a, zero_b, zero_a, zero_b
    dshift_a, dshift_b, dscale_a, dscale_b = zero_a, zero_b, zero_a, zero_b
    gamma_a, gamma_b = _load(GAMMA, oa, ma, KEEP=True), _load(GAMMA, ob, mb, KEEP=True)
    if HAS_MOD:
        scale_a = _load(SCALE + b * MOD_STRIDE, oa, ma, KEEP=True)
        scale_b = _load(SCALE + b * MOD_STRIDE, ob, mb, KEEP=True)
    for t in range(j * R, tl.minimum(j * R + R, T)):
        row = b * T + t
        base = row * D
        qa, qb = _query(Q, row, T, oa, ma, D, Q_MODE), _query(Q, row, T, ob, mb, D, Q_MODE)
        qwa, qwb = qa * gamma_a, qb * gamma_b
        # The forward saved h and lse = m + log Z, so one pass over the sources suffices: recovering them would
        # read every source a second time, and h costs one fp32 row (fp32, as the reference's autograd keeps it:
        # a rounded h would shift delta below, which the softmax backward subtracts from like-sized terms).
        lse = tl.load(LSE + row)
        ha, hb = _load(H32 + base, oa, ma), _load(H32 + base, ob, mb)
        # dh from x = LN(h) * (1 + scale) + shift: dxhat = dx (1 + scale), then the LayerNorm backward
        # dh = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)).
        dxa, dxb = _load(DX + base, oa, ma), _load(DX + base, ob, mb)
        if HAS_MOD:
            xa, xb, rstd_ln = _layer_norm(ha, ma, hb, mb, D)
            dshift_a, dshift_b = dshift_a + dxa, dshift_b + dxb
            dscale_a, dscale_b = dscale_a + dxa * xa, dscale_b + dxb * xb
            ga, gb = dxa * (1.0 + scale_a), dxb * (1.0 + scale_b)
            mean_g = (tl.sum(ga, axis=0) + tl.sum(gb, axis=0)) / D
            mean_gx = (tl.sum(ga * xa, axis=0) + tl.sum(gb * xb, axis=0)) / D
            dha = tl.where(ma, rstd_ln * (ga - mean_g - xa * mean_gx), 0.0)
            dhb = tl.where(mb, rstd_ln * (gb - mean_g - xb * mean_gx), 0.0)
        else:
            dha, dhb = dxa, dxb
        if HAS_DH:
            dha, dhb = dha + _load(DH + base, oa, ma), dhb + _load(DH + base, ob, mb)
        # U sources at a time, with p_i = exp(s_i - lse) and delta = sum_i p_i <dh, v_i> = <dh, h>:
        #   ds_i = p_i (<dh, v_i> - delta)                                   (softmax backward)
        #   dv_i = p_i dh + ds_i (rstd_i qw / sqrt(d) - s_i rstd_i^2 v_i / d)  (weighted sum + logit through RMSNorm)
        #   dqw += ds_i rstd_i v_i / sqrt(d)                                 (then dq = dqw gamma, dgamma = dqw q)
        # dv_i goes into its buffer, added to what later readers of v_i left there (no separate dv per reader).
        delta = tl.sum(dha * ha, axis=0) + tl.sum(dhb * hb, axis=0)
        dqwa, dqwb = zero_a, zero_b
        for i in tl.range(0, N, U, num_stages=STAGES):
            ptrs, valid = _tile(SRC, i, N, U, TYPE)
            dptrs, _ = _tile(DSRC, i, N, U, TYPE)
            add = tl.load(ACC + i + tl.arange(0, U), mask=valid, other=0) != 0
            va, vb = _sources(ptrs, valid, base, oa, ma), _sources(ptrs, valid, base, ob, mb)
            s, rstd = _logits(va, vb, qwa, qwb, D, SM_SCALE)
            p = tl.where(valid, tl.exp(s - lse), 0.0)
            ds = p * (tl.sum(dha[None, :] * va, axis=1) + tl.sum(dhb[None, :] * vb, axis=1) - delta)
            ds = tl.where(N > 1, ds, 0.0)  # one source: weight 1 whatever the logit; the two sums round apart
            c_q, c_v = rstd * SM_SCALE, s * rstd * rstd / D
            _source_grad(dptrs, valid, add, base, oa, ma, va, p, ds, c_q, c_v, dha, qwa, TYPE)
            _source_grad(dptrs, valid, add, base, ob, mb, vb, p, ds, c_q, c_v, dhb, qwb, TYPE)
            dqwa += tl.sum((ds * c_q)[:, None] * va, axis=0)
            dqwb += tl.sum((ds * c_q)[:, None] * vb, axis=0)
        dgamma_a, dgamma_b = dgamma_a + dqwa * qa, dgamma_b + dqwb * qb
        if Q_MODE == 2:
            _store(DQ + base, oa, ma, dqwa * gamma_a, ob, mb, dqwb * gamma_b)
        else:
            dq_a, dq_b = dq_a + dqwa * gamma_a, dq_b + dqwb * gamma_b
    # Only the partials of gradients that exist: a plane each, (B, J, D) apart.
    part = PART + (b * J + j) * D
    plane = tl.num_programs(0).to(tl.int64) * J * D
    _store(part, oa, ma, dgamma_a, ob, mb, dgamma_b)
    if Q_MODE < 2:
        part += plane
        _store(part, oa, ma, dq_a, ob, mb, dq_b)
    if HAS_MOD:
        _store(part + plane, oa, ma, dshift_a, ob, mb, dshift_b)
        _store(part + 2 * plane, oa, ma, dscale_a, ob, mb, dscale_b)


#################################################################################
#                                   Launchers                                   #
#################################################################################

TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float64: tl.float64}


def _aligned(t):
    """t contiguous and 16-byte aligned (a view can start anywhere), as the kernels' source tables promise."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _on(device):
    """Launch on the inputs' device, not on whichever CUDA device is current (a model on cuda:1 while cuda:0 is
    current would otherwise run its kernels against the wrong device's context)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _table(values, device, dtype=torch.int64):
    """A small host-made table (the sources' addresses, the accumulate flags) as a tensor on `device`. It is
    built in pinned memory and copied without blocking, so the host never waits for the GPU to drain its queue."""
    table = torch.tensor(values, dtype=dtype)
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table


def _addresses(tensors):
    """The kernels' table of sources: the tensors' addresses, on their device."""
    return _table([t.data_ptr() for t in tensors], tensors[0].device)


def _check(sources, q, gamma, shift, scale):
    """Shapes, dtypes and devices a caller can get wrong, each with a clear error; returns (B, T, D, q_mode)."""
    if not sources:
        raise ValueError("DAR aggregation needs at least one source")
    v = sources[0]
    if v.dim() != 3:
        raise ValueError(f"sources must be (B, T, d), got {tuple(v.shape)}")
    B, T, D = v.shape
    for s in sources:
        if s.shape != v.shape or s.dtype != v.dtype or s.device != v.device:
            raise ValueError(f"all sources must share shape, dtype and device; got {tuple(s.shape)} {s.dtype} "
                             f"{s.device} vs {tuple(v.shape)} {v.dtype} {v.device}")
    shapes = {(D,): 0, (B, D): 1, (B, T, D): 2}
    if tuple(q.shape) not in shapes:
        raise ValueError(f"q must be ({D},), ({B}, {D}) or ({B}, {T}, {D}); got {tuple(q.shape)}")
    if tuple(gamma.shape) != (D,):
        raise ValueError(f"gamma must be ({D},), got {tuple(gamma.shape)}")
    if (shift is None) != (scale is None) or (shift is not None and (shift.shape != (B, D) or scale.shape != (B, D))):
        raise ValueError(f"shift and scale must both be ({B}, {D}) or both None")
    if v.dtype not in TYPES:
        raise ValueError(f"sources must be one of {list(TYPES)}, got {v.dtype}")
    if v.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("the fused DAR kernel runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, "
                           "for tests); use kernel='torch' elsewhere")
    return B, T, D, shapes[tuple(q.shape)]


def _meta(sources):
    N, D = len(sources), sources[0].shape[-1]
    BA = max(1, triton.next_power_of_2(D) // 2)  # the largest power of two below D, the rest rounded up to one
    return dict(N=N, NB=triton.next_power_of_2(N), D=D, BA=BA, BB=triton.next_power_of_2(max(1, D - BA)),
                TYPE=TYPES[sources[0].dtype], SM_SCALE=1.0 / math.sqrt(D))


def _modulation(shift, scale, fallback):
    """(shift, scale, row stride) as the kernels read them: (B, d) rows with unit inner stride and one row stride
    for both, which the views that chunk() cuts from the adaLN output already are (so nothing is copied)."""
    if shift is None:
        return fallback, fallback, 0
    if shift.stride(1) != 1 or scale.stride(1) != 1 or shift.stride(0) != scale.stride(0):
        shift, scale = shift.contiguous(), scale.contiguous()
    return shift, scale, shift.stride(0)


def forward_call(sources, q, gamma, shift, scale, store_h, save):
    """The forward's launch, with its table and outputs built once: returns (launch, key, outputs). launch(config)
    runs the kernel into outputs = (x, h, h32, lse) and does nothing else (tools/gpu_check.py times it alone); key is
    the shape class a config is chosen for. h is in the sources' type when store_h and the LayerNorm is fused,
    h32 (B, T, d) and lse (B, T) in fp32 are what the backward reads, when save; else empty tensors."""
    B, T, D, q_mode = _check(sources, q, gamma, shift, scale)
    sources = [_aligned(s) for s in sources]
    meta = _meta(sources)
    has_mod = shift is not None
    store_h = store_h and has_mod
    x = torch.empty_like(sources[0], memory_format=torch.contiguous_format)
    h = torch.empty_like(x) if store_h else x.new_empty(0)
    fp32 = dict(dtype=torch.float32, device=x.device)
    h32 = torch.empty(B, T, D, **fp32) if save else x.new_empty(0, dtype=torch.float32)
    lse = torch.empty(B, T, **fp32) if save else x.new_empty(0, dtype=torch.float32)
    shift, scale, mod_stride = _modulation(shift, scale, x)
    args = dict(Q=q.contiguous(), GAMMA=gamma.contiguous(), SHIFT=shift, SCALE=scale, X=x, H=h if store_h else x,
                H32=h32 if save else x, LSE=lse if save else x, T=T, MOD_STRIDE=mod_stride, Q_MODE=q_mode,
                HAS_MOD=has_mod, STORE_H=store_h, SAVE=save, **meta)
    table = _addresses(sources)

    def launch(config, alive=sources):  # the table holds only addresses: the closure keeps the tensors alive
        with _on(x.device):
            _forward_kernel[(B * T,)](table, **args, **config.all_kwargs())
    key = (D, meta["NB"], str(x.dtype), q_mode, has_mod, store_h, save)
    return launch, key, (x, h, h32, lse)


def launch_forward(sources, q, gamma, shift, scale, store_h, save):
    """Launch the forward; returns (x, h, h32, lse) as forward_call describes them."""
    launch, key, outputs = forward_call(sources, q, gamma, shift, scale, store_h, save)
    launch(_choose("fwd", key, lambda: launch))  # timed runs only rewrite the same outputs
    return outputs


ROWS_PER_PROGRAM = None  # set to force the backward's rows per program (tests cover R < T on a CPU this way)


def _rows_per_program(B, T, device):
    """Rows per backward program. Each program writes one row of fp32 partials per gradient, so fewer, longer
    programs write fewer partials; about two programs per SM still keep every SM busy."""
    if ROWS_PER_PROGRAM is not None:
        return max(1, min(T, ROWS_PER_PROGRAM))
    if device.type != "cuda":
        return T
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(T, math.ceil(B * T / programs)))


def backward_call(sources, dsources, accumulate, q, gamma, shift, scale, h32, lse, dx, dh):
    """The backward's launch, with its tables and partial-sum buffer built once: returns (launch, key, finish).
    launch(config) runs the kernel, which puts dL/dv_i into dsources[i], added to its contents where
    accumulate[i] (a later reader of v_i left its gradient there) and stored otherwise; finish() then sums the
    per-program partials into (dq, dgamma, dshift, dscale), the last two empty when the LayerNorm was not fused."""
    B, T, D, q_mode = _check(sources, q, gamma, shift, scale)
    sources = [_aligned(s) for s in sources]
    if any(not g.is_contiguous() or g.data_ptr() % 16 for g in dsources):
        raise ValueError("gradient buffers must be contiguous and 16-byte aligned (torch.empty_like gives such)")
    meta = _meta(sources)
    has_mod = shift is not None
    R = _rows_per_program(B, T, dx.device)
    J = math.ceil(T / R)
    planes = 1 + (q_mode < 2) + 2 * has_mod  # dgamma, dq (one query or one per sample), dshift and dscale
    part = torch.empty(planes, B, J, D, dtype=torch.float32, device=dx.device)
    dq_rows = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_mode == 2 else part  # row-major, as written
    x = sources[0]
    shift, scale, mod_stride = _modulation(shift, scale, x)
    tables = (_addresses(sources), _addresses(dsources), _table([int(a) for a in accumulate], x.device, torch.int32))
    args = dict(Q=q.contiguous(), GAMMA=gamma.contiguous(), SHIFT=shift, SCALE=scale, H32=h32, LSE=lse,
                DX=dx.contiguous(), DH=dh.contiguous() if dh is not None else x, DQ=dq_rows, PART=part, T=T, J=J, R=R,
                MOD_STRIDE=mod_stride, Q_MODE=q_mode, HAS_MOD=has_mod, HAS_DH=dh is not None, **meta)

    def launch(config, alive=(sources, dsources)):  # as in forward_call
        with _on(x.device):
            _backward_kernel[(B, J)](*tables, **args, **config.all_kwargs())

    def finish():
        dgamma = part[0].sum((0, 1)).to(gamma.dtype)
        dq = {0: lambda: part[1].sum((0, 1)), 1: lambda: part[1].sum(1), 2: lambda: dq_rows}[q_mode]().to(q.dtype)
        if not has_mod:
            return dq, dgamma, x.new_empty(0), x.new_empty(0)
        return dq, dgamma, part[-2].sum(1).to(shift.dtype), part[-1].sum(1).to(scale.dtype)
    key = (D, meta["NB"], str(x.dtype), q_mode, has_mod, dh is not None)
    return launch, key, finish


def launch_backward(sources, dsources, accumulate, q, gamma, shift, scale, h32, lse, dx, dh):
    """Launch the one-pass backward; returns (dq, dgamma, dshift, dscale) as backward_call describes them."""
    launch, key, finish = backward_call(sources, dsources, accumulate, q, gamma, shift, scale, h32, lse, dx, dh)
    scratch = lambda: backward_call(sources, [torch.zeros_like(g) for g in dsources], accumulate, q, gamma, shift,
                                    scale, h32, lse, dx, dh)[0]  # timed runs add into these, not into dsources
    launch(_choose("bwd", key, scratch))
    return finish()


def traffic(op, args, sms):
    """[(bytes read + written, launches)] of one call of dar::aggregate or dar::aggregate_backward as their loops
    run on a GPU with `sms` SMs (tools/traffic.py counts training steps with it): the kernel, then (backward) the sums of its
    partials. args are the op's arguments; only their shapes and dtypes are read."""
    nbytes = lambda t: t.numel() * t.element_size() if t is not None else 0
    if op == "aggregate":
        sources, _, _, _, q, gamma, shift, scale, store_h, save = args
        v = sources[0]
        B, T, D = v.shape
        written = nbytes(v) * (1 + (store_h and shift is not None)) + (B * T * D * 4 + B * T * 4) * save
        return [(len(sources) * nbytes(v) + nbytes(q) + nbytes(gamma) + nbytes(shift) + nbytes(scale) + written, 1)]
    sources, dsources, accumulate, q, gamma, shift, scale, h32, lse, dx, dh = args
    v = sources[0]
    B, T, D = v.shape
    J = math.ceil(T / max(1, min(T, math.ceil(B * T / (2 * sms)))))  # as _rows_per_program on such a GPU
    planes = 1 + (q.dim() < 3) + 2 * (shift is not None)
    part = planes * B * J * D * 4
    read = (len(sources) + sum(accumulate)) * nbytes(v) + nbytes(q) + nbytes(gamma) + nbytes(scale) + nbytes(h32) \
        + nbytes(lse) + nbytes(dx) + nbytes(dh)
    written = len(sources) * nbytes(v) + (nbytes(q) if q.dim() == 3 else 0) + part
    return [(read + written, 1), (part + planes * B * D * 4, planes)]


#################################################################################
#                 Custom ops: autograd, autocast, torch.compile                 #
#################################################################################
# torch.library custom ops with fake implementations: torch.compile(fullgraph=True) traces through them
# (a graph sees one opaque op), autograd uses the registered backward, activation checkpointing just reruns
# the forward. Autocast passes the inputs through unchanged; the kernels read any dtype and compute in fp32.
# Every call copies a freshly built address table from pinned host memory, which a captured CUDA graph would
# replay from a host buffer since reused: the tag keeps torch.compile's CUDA graphs away from these ops.
#
# Gradients of sources read by several aggregations. Autograd would take a separate dv_i from each reader and
# add them up (a read of two tensors and a write per extra reader). Instead, the aggregation that reads v_i
# hands the next reader of v_i a "token": an extra output of v_i's shape that costs no memory (a zero-stride
# view of one element). That reader takes the token as an input, so in the backward, which runs the readers
# in reverse, the later reader's gradient buffer for v_i arrives as the token's gradient, and the earlier
# reader adds its dv_i into it in place. The first reader returns the buffer as v_i's gradient; every other
# reader returns None for v_i. Autograd's own ordering does the rest, so gradient accumulation, activation
# checkpointing, DDP and partial backward passes (a token whose reader never ran has no gradient: the buffer
# starts there) need nothing special.
TAGS = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}


def _tokens(like, wanted):
    return [like.new_zeros(()).expand(like.shape) for want in wanted if want]


@torch.library.custom_op("dar::aggregate", mutates_args=(), **TAGS)
def _aggregate_op(sources: list[torch.Tensor], tokens: list[torch.Tensor], has_token: list[bool], hand_on: list[bool],
            q: torch.Tensor, gamma: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None,
            store_h: bool, save: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    x, h, h32, lse = launch_forward(sources, q, gamma, shift, scale, store_h, save)
    return x, h, h32, lse, _tokens(x, hand_on)


@_aggregate_op.register_fake
def _(sources, tokens, has_token, hand_on, q, gamma, shift, scale, store_h, save):
    v = sources[0]
    x = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    h = torch.empty_like(x) if store_h and shift is not None else x.new_empty(0)
    h32 = x.new_empty(v.shape if save else (0,), dtype=torch.float32)
    lse = x.new_empty(v.shape[:2] if save else (0,), dtype=torch.float32)
    return x, h, h32, lse, _tokens(x, hand_on)


@torch.library.custom_op("dar::aggregate_backward", mutates_args=("dsources",), **TAGS)
def _aggregate_backward_op(sources: list[torch.Tensor], dsources: list[torch.Tensor], accumulate: list[bool],
                     q: torch.Tensor, gamma: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None,
                     h32: torch.Tensor, lse: torch.Tensor, dx: torch.Tensor, dh: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_backward(sources, dsources, accumulate, q, gamma, shift, scale, h32, lse, dx, dh)


@_aggregate_backward_op.register_fake
def _(sources, dsources, accumulate, q, gamma, shift, scale, h32, lse, dx, dh):
    x = sources[0]
    mod = (torch.empty(shift.shape, dtype=shift.dtype, device=shift.device),
           torch.empty(scale.shape, dtype=scale.dtype, device=scale.device)) if shift is not None else (
        x.new_empty(0), x.new_empty(0))
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty_like(gamma), *mod


def _setup_context(ctx, inputs, output):
    sources, _, has_token, hand_on, q, gamma, shift, scale, _, _ = inputs
    _, _, h32, lse, _ = output
    ctx.has_token, ctx.hand_on = has_token, hand_on
    ctx.save_for_backward(q, gamma, shift, scale, h32, lse, *sources)
    ctx.set_materialize_grads(False)  # an unused output (h, a token) must cost no zero-filled gradient


def _backward(ctx, dx, dh, _h32, _lse, dtokens):
    q, gamma, shift, scale, h32, lse, *sources = ctx.saved_tensors
    dx = torch.zeros_like(sources[0]) if dx is None else dx
    dh = None if dh is None or dh.numel() == 0 else dh
    later = iter(dtokens)  # the gradients of the tokens handed on: buffers a later reader filled, or None
    dsources, accumulate = [], []
    for v, handed in zip(sources, ctx.hand_on):
        buffer = next(later) if handed else None
        accumulate.append(buffer is not None)
        dsources.append(buffer if buffer is not None else torch.empty_like(v, memory_format=torch.contiguous_format))
    dq, dgamma, dshift, dscale = _aggregate_backward_op(sources, dsources, accumulate, q, gamma, shift, scale, h32,
                                                        lse, dx, dh)
    if shift is None:
        dshift = dscale = None
    # The buffer goes back to v_i from its first reader, else to the token this reader was given.
    dv = [None if has else g for has, g in zip(ctx.has_token, dsources)]
    dtokens_in = [g for has, g in zip(ctx.has_token, dsources) if has]
    return dv, dtokens_in, None, None, dq, dgamma, dshift, dscale, None, None


_aggregate_op.register_autograd(_backward, setup_context=_setup_context)


def aggregate_fused(sources, q, gamma, shift=None, scale=None, need_h=False):
    """dar.aggregate_reference on the fused kernel: returns (x, h, None); h is None unless need_h (the routing
    weights are never materialised here, so the third entry is always None)."""
    x, h, _ = aggregate_fused_with_tokens(sources, [None] * len(sources), [False] * len(sources), q, gamma, shift,
                                          scale, need_h)
    return x, h, None


def aggregate_fused_with_tokens(sources, tokens, hand_on, q, gamma, shift=None, scale=None, need_h=False):
    """aggregate_fused for an aggregation that shares its sources' gradient buffers with their other readers (see the
    comment above _aggregate_op). tokens: for each source, the token its previous reader handed on, or None for its
    first reader; hand_on: for each source, whether a later aggregation reads it. Returns (x, h, new_tokens),
    new_tokens holding the tokens of the sources handed on, in order."""
    inputs = (*sources, q, gamma, shift, scale)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    x, h, _, _, new_tokens = _aggregate_op(list(sources), [t for t in tokens if t is not None],
                                     [t is not None for t in tokens], list(hand_on), q, gamma, shift, scale, need_h,
                                     grad)
    if shift is None:
        h = x
    return x, (h if need_h else None), new_tokens
