"""
Diffusion-Adaptive Routing (DAR): the residual stream of a DiT replaced by softmax routing over depth.

Number the sublayers l = 1..L (attention, MLP, attention, MLP, ...; L = 2 * depth) and call v_l the output
of sublayer l, adaLN-Zero gate included; v_0 is the embedded input. A residual DiT feeds sublayer l the
running sum h_l = v_0 + ... + v_{l-1}. DAR feeds it a learned, timestep-adaptive convex combination instead:

    h_l = sum_{i in S_l} alpha_{i->l} v_i,   alpha_{i->l} = softmax_i(q_l . k_i / sqrt(d)),   k_i = RMSNorm_l(v_i)   Eq. (5)

The query q_l comes in three variants (Eq. 6 and "Timestep injection"), chosen by `routing`:
    static     q_l = w_l                 one learned vector per aggregator
    explicit   q_l = w_l + e(t)          e(t) is the model's own timestep embedding (no extra parameters)
    dynamic    q_l = W_q^(l) v_{l-1}     one bias-free d x d projection per aggregator, a query per token
All queries start at zero, so every aggregator starts as a uniform average of its sources.

The source set S_l is chunked (Eq. 7) and a dedicated final aggregator (Eq. 11) feeds the prediction head;
`source_set` below is the one definition of both. Everything here is plain PyTorch: `aggregate_reference` is
the readable reference of Eq. (5) and the CPU path, `aggregate` is the one place where the fused kernel
(kernel.py) takes over.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from kernel import aggregate_fused_with_tokens
except ImportError:  # no triton: only the reference path runs
    aggregate_fused_with_tokens = None

ROUTINGS = ("residual", "static", "explicit", "dynamic")
FINAL_AGGS = ("dedicated", "reuse")
KERNELS = ("auto", "triton", "torch")


def source_set(l, chunk, num_sublayers):
    """S_l: the indices i of the sources v_i that aggregator l reads (v_0 the embedding, v_i sublayer i's output).

    l = 1..L are the sublayers, l = L + 1 is the final aggregator. chunk is S, counted in sublayers (S = 4 is
    two transformer blocks; S = 1 is dense routing over every earlier output). The chunk summaries are
    c_0 = v_0 and c_j = v_{jS}, the last output of chunk j; sublayer l lies in chunk n = ceil(l / S).
    Worked example, L = 8 (four blocks), S = 4:

        l   chunk n   summaries c_0..c_{n-1}   outputs since the last boundary   S_l
        1   1         v_0                      -                                 [0]
        3   1         v_0                      v_1, v_2                          [0, 1, 2]
        4   1         v_0                      v_1, v_2, v_3                     [0, 1, 2, 3]
        5   2         v_0, v_4                 -                                 [0, 4]
        7   2         v_0, v_4                 v_5, v_6                          [0, 4, 5, 6]
        9   final     v_0, v_4                 v_5, v_6, v_7, v_8 (Eq. 11)       [0, 4, 5, 6, 7, 8]
    """
    L, S = num_sublayers, chunk
    if not (isinstance(S, int) and 1 <= S <= L):
        raise ValueError(f"chunk size must be an integer in [1, {L}] (the number of sublayers), got {S!r}")
    if not 1 <= l <= L + 1:
        raise ValueError(f"aggregator index must be in [1, {L + 1}] (L + 1 is the final aggregator), got {l}")
    if l <= L:
        n = math.ceil(l / S)  # sublayer l lies in chunk n
        # Eq. (7): prior chunk summaries c_0 = v_0, c_j = v_{jS}, then the current chunk's earlier outputs
        return [j * S for j in range(n)] + list(range((n - 1) * S + 1, l))
    N = math.ceil(L / S)
    # Eq. (11): summaries of every chunk before the last, then the raw outputs of the last chunk
    return [j * S for j in range(N)] + list(range((N - 1) * S + 1, L + 1))


def aggregate_reference(sources, q, gamma, shift=None, scale=None, eps=1e-6):
    """Reference path of Eq. (5), optionally followed by the next sublayer's LayerNorm + adaLN modulate.

    sources: N tensors (B, T, d) of one dtype; q: (d,) static, (B, d) explicit or (B, T, d) dynamic;
    gamma: (d,) the RMSNorm gain of the keys; shift, scale: (B, d) or None.
    Returns (x, h, alpha): h (B, T, d) the aggregated state, x = LN(h) * (1 + scale) + shift (h itself when
    shift and scale are None), both in the sources' dtype, and alpha (B, T, N) the routing weights.
    Statistics, softmax and accumulation run in fp32 (fp64 for fp64 inputs), elementwise, so bf16 autocast
    cannot lower them.
    """
    dtype, d = sources[0].dtype, sources[0].shape[-1]
    if any(v.dtype != dtype for v in sources):
        raise TypeError(f"DAR sources must share one dtype, got {sorted({str(v.dtype) for v in sources})}")
    acc = torch.promote_types(dtype, torch.float32)
    v = torch.stack([s.to(acc) for s in sources], dim=2)  # (B, T, N, d)
    k = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps) * gamma.to(acc)  # RMSNorm keys
    if q.dim() == 2:
        q = q[:, None]  # one query per sample -> broadcast over tokens
    logits = (k * q.to(acc).unsqueeze(-2)).sum(-1) / math.sqrt(d)  # (B, T, N)
    alpha = logits.softmax(dim=-1)
    h = (alpha.unsqueeze(-1) * v).sum(dim=2)  # (B, T, d)
    x = h
    if shift is not None:
        x = F.layer_norm(h, (d,), eps=eps) * (1 + scale.to(acc)[:, None]) + shift.to(acc)[:, None]
    return x.to(dtype), h.to(dtype), alpha


def aggregate(sources, q, gamma, shift=None, scale=None, kernel="auto", need_h=False, need_alpha=False,
              tokens=None, hand_on=None):
    """Eq. (5) on the fused kernel or the reference path: the one place that chooses. Arguments and returns as
    `aggregate_reference`, plus a fourth return: the gradient tokens handed on (kernel.py, above _aggregate_op).
    The fused path returns h only when need_h and never returns alpha (None instead).

    kernel: "torch" the reference path; "triton" the fused kernel (CUDA, or a CPU under TRITON_INTERPRET=1);
    "auto" the fused kernel on CUDA tensors, the reference elsewhere. need_alpha asks for the routing
    weights, which only the reference path materialises, so it runs the reference path. tokens and hand_on
    (per source: the token its previous reader handed on or None, and whether a later reader follows) let the
    fused path add every reader's gradient of a source into one buffer; the reference path leaves that to
    autograd and hands on no tokens.
    """
    available = aggregate_fused_with_tokens is not None
    fused = kernel == "triton" or (kernel == "auto" and sources[0].is_cuda and available)
    if need_alpha or not fused:
        return (*aggregate_reference(sources, q, gamma, shift, scale), [])
    if not available:
        raise RuntimeError("kernel='triton' needs the triton package (pip install triton); or use kernel='torch'")
    tokens = tokens if tokens is not None else [None] * len(sources)
    hand_on = hand_on if hand_on is not None else [False] * len(sources)
    x, h, new_tokens = aggregate_fused_with_tokens(sources, tokens, hand_on, q, gamma, shift, scale, need_h)
    return x, h, None, new_tokens


class Router(nn.Module):
    """One DAR aggregator's parameters: the RMSNorm gain gamma of its keys, and its query's (Eq. 6): the vector
    w (w_l; static and explicit) or the projection W_q (W_q^(l); dynamic)."""

    def __init__(self, dim, routing):
        super().__init__()
        self.routing = routing
        self.gamma = nn.Parameter(torch.ones(dim))
        if routing == "dynamic":
            self.W_q = nn.Linear(dim, dim, bias=False)
        else:
            self.w = nn.Parameter(torch.zeros(dim))
        self.reset_parameters()

    def reset_parameters(self):
        # Zero queries make every softmax uniform at step 0 (as AttnRes prescribes); unit gains as RMSNorm's.
        nn.init.ones_(self.gamma)
        nn.init.zeros_(self.W_q.weight if self.routing == "dynamic" else self.w)

    def query(self, v_prev, e):
        """q_l from v_{l-1} (B, T, d) and e(t) (B, d): (d,), (B, d) or (B, T, d) by variant."""
        if self.routing == "dynamic":
            return self.W_q(v_prev)
        if self.routing == "explicit":
            return self.w + e
        return self.w


class Routing(nn.ModuleDict):
    """Every aggregator of a DAR model, keyed by the paper's l: routers["1"] ... routers[str(L)], and
    routers["final"] for the dedicated final aggregator (Appendix C.3).

    With final_agg="reuse" (the REPA-specific design, Appendix C.3) there is no "final" router: the final
    aggregation runs over the same source set with the query and gamma of router L, the last MLP sublayer.
    """

    def __init__(self, dim, num_sublayers, routing, chunk=4, final_agg="dedicated", kernel="auto"):
        L = num_sublayers
        source_sets = [source_set(l, chunk, L) for l in range(1, L + 2)]  # validates chunk
        routers = {str(l): Router(dim, routing) for l in range(1, L + 1)}
        if final_agg == "dedicated":
            routers["final"] = Router(dim, routing)
        super().__init__(routers)
        self.num_sublayers, self.final_agg, self.kernel = L, final_agg, kernel
        self.source_sets = source_sets  # source_sets[l - 1] is S_l
        # The last aggregator that reads each source: later ones need not keep it (at inference it is freed then,
        # the memory saving of Eq. 7; under autograd the graph keeps every source until the backward).
        self.last_reader = {i: l for l, S_l in enumerate(source_sets, start=1) for i in S_l}

    def router(self, l):
        """The Router that aggregator l (1..L+1) uses."""
        if l <= self.num_sublayers:
            return self[str(l)]
        return self["final"] if self.final_agg == "dedicated" else self[str(self.num_sublayers)]

    def aggregate(self, l, v, e, shift=None, scale=None, need_h=False, need_alpha=False, shared=None):
        """Aggregation l (Eq. 5) over v, a dict {i: v_i} holding at least S_l; e is the timestep embedding
        (B, d). With shift and scale it is followed by sublayer l's LayerNorm + modulate: x is the sublayer's input.

        The query input is v_{l-1}, which is always in S_l; for the final aggregator it is v_L (Eq. 6).
        shared, a SharedGradients kept over one forward pass, lets the fused kernel add every reader's gradient
        of a source into one buffer. Returns (x, h, alpha) as `aggregate_reference` does.
        """
        router = self.router(l)
        q = router.query(v[l - 1], e)
        S_l = self.source_sets[l - 1]
        inputs = [v[i] for i in S_l]
        if shared is None:
            return aggregate(inputs, q, router.gamma, shift, scale, self.kernel, need_h, need_alpha)[:3]
        tokens, hand_on = shared.read(l, S_l)
        x, h, alpha, new_tokens = aggregate(inputs, q, router.gamma, shift, scale, self.kernel, need_h, need_alpha,
                                            tokens, hand_on)
        shared.hand_on(l, S_l, new_tokens)
        return x, h, alpha


class SharedGradients:
    """One gradient buffer per source for the fused kernel, over one forward pass: every reader of v_i adds its
    gradient into the same buffer, instead of autograd summing one per reader. Each reader hands the next a
    token through which the buffer travels back in the backward (kernel.py, above _aggregate_op, says how);
    this holds the tokens handed on and not yet taken."""

    def __init__(self, last_reader):
        self.last_reader = last_reader  # {i: the last aggregator l that reads v_i}
        self.tokens = {}

    def read(self, l, S_l):
        """(tokens, hand_on) for aggregator l: per source the token its previous reader handed on (None for its
        first reader), and whether a later aggregator reads it."""
        return [self.tokens.pop(i, None) for i in S_l], [self.last_reader[i] > l for i in S_l]

    def hand_on(self, l, S_l, new_tokens):
        """Keep the tokens aggregator l handed on, one per source of S_l that a later aggregator reads."""
        self.tokens.update(zip([i for i in S_l if self.last_reader[i] > l], new_tokens))
