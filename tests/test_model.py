"""Tests of model.py and dar.py on the CPU: SiT fidelity, DAR's definition, initialisation and gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from dar import aggregate_reference, source_set
from model import SiT, SiT_models, get_2d_sincos_pos_embed
from test_parity import batch, perturb

DAR_ROUTINGS = ("static", "explicit", "dynamic")
TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=3, num_heads=4, num_classes=5)


def tiny(routing="residual", **kwargs):
    torch.manual_seed(0)
    return SiT(**{**TINY, "routing": routing, **kwargs})


#################################################################################
#                       Parameter counts and SiT's state dict                   #
#################################################################################

def count(name, **kwargs):
    with torch.device("meta"):
        model = SiT_models[name](**kwargs)
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_table_1_at_sit_xl_2():
    assert count("SiT-XL/2") == 675_129_632
    assert abs(count("SiT-XL/2", routing="static", chunk=4) - 675.26e6) < 0.2e6
    assert abs(count("SiT-XL/2", routing="explicit", chunk=4) - 675.26e6) < 0.2e6
    assert abs(count("SiT-XL/2", routing="dynamic", chunk=4) - 751e6) < 1e6
    # The REPA reuse has no final-aggregator parameters: one query vector and one gain fewer.
    assert count("SiT-XL/2", routing="static") - count("SiT-XL/2", routing="static", final_agg="reuse") == 2 * 1152


def official_sit_xl_2_shapes():
    """Key -> shape of the released SiT-XL/2 checkpoint (as released by the SiT authors)."""
    d, shapes = 1152, {}
    shapes["pos_embed"] = (1, 256, d)
    shapes["x_embedder.proj.weight"], shapes["x_embedder.proj.bias"] = (d, 4, 2, 2), (d,)
    shapes["t_embedder.mlp.0.weight"], shapes["t_embedder.mlp.0.bias"] = (d, 256), (d,)
    shapes["t_embedder.mlp.2.weight"], shapes["t_embedder.mlp.2.bias"] = (d, d), (d,)
    shapes["y_embedder.embedding_table.weight"] = (1001, d)
    for i in range(28):
        for name, (rows, cols) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (4 * d, d),
                                   "mlp.fc2": (d, 4 * d), "adaLN_modulation.1": (6 * d, d)}.items():
            shapes[f"blocks.{i}.{name}.weight"], shapes[f"blocks.{i}.{name}.bias"] = (rows, cols), (rows,)
    shapes["final_layer.adaLN_modulation.1.weight"] = (2 * d, d)
    shapes["final_layer.adaLN_modulation.1.bias"] = (2 * d,)
    shapes["final_layer.linear.weight"], shapes["final_layer.linear.bias"] = (32, d), (32,)
    return shapes


def test_residual_state_dict_has_the_official_keys_and_shapes():
    with torch.device("meta"):
        model = SiT_models["SiT-XL/2"]()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_sit_xl_2_shapes()


def sit_reference(sd, x, t, y, depth, heads, p):
    """SiT's forward written from its published definition, reading a state dict by the official key names."""
    lin = lambda x, name: F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])
    ln = lambda x: F.layer_norm(x, x.shape[-1:], eps=1e-6)
    mod = lambda x, shift, scale: x * (1 + scale[:, None]) + shift[:, None]
    B, C, H, W = x.shape
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=x.dtype) / 128)
    tf = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    c = lin(F.silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    T, d = h.shape[1:]
    for i in range(depth):
        b = f"blocks.{i}"
        m = lin(F.silu(c), f"{b}.adaLN_modulation.1").chunk(6, dim=1)
        qkv = lin(mod(ln(h), m[0], m[1]), f"{b}.attn.qkv").reshape(B, T, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        h = h + m[2][:, None] * lin(a.transpose(1, 2).reshape(B, T, d), f"{b}.attn.proj")
        mlp = lin(F.gelu(lin(mod(ln(h), m[3], m[4]), f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
        h = h + m[5][:, None] * mlp
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(mod(ln(h), shift, scale), "final_layer.linear")  # (B, T, p * p * 2C)
    g = H // p
    out = out.reshape(B, g, g, p, p, 2 * C).permute(0, 5, 1, 3, 2, 4).reshape(B, 2 * C, H, W)
    return out[:, :C]


def test_residual_routing_is_sit():
    model = perturb(tiny()).double().eval()
    x, t, y = batch(model, dtype=torch.float64)
    expected = sit_reference(model.state_dict(), x, t, y, depth=3, heads=4, p=2)
    torch.testing.assert_close(model(x, t, y), expected, rtol=1e-10, atol=1e-10)


def test_residual_state_dict_round_trips_strictly_with_identical_outputs():
    model = perturb(tiny()).eval()
    other = SiT(**TINY)
    other.load_state_dict(model.state_dict(), strict=True)
    x, t, y = batch(model)
    assert torch.equal(model(x, t, y), other.eval()(x, t, y))


def test_pos_embed_encodes_column_then_row():
    dim, grid = 16, 5
    emb = torch.from_numpy(get_2d_sincos_pos_embed(dim, grid))
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    for i in range(grid):
        for j in range(grid):
            expected = torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)])
            torch.testing.assert_close(emb[i * grid + j], expected)


#################################################################################
#                                 Source sets                                   #
#################################################################################

def test_sources_worked_example_l8_s4():
    assert source_set(1, 4, 8) == [0]
    assert source_set(3, 4, 8) == [0, 1, 2]
    assert source_set(4, 4, 8) == [0, 1, 2, 3]
    assert source_set(5, 4, 8) == [0, 4]
    assert source_set(7, 4, 8) == [0, 4, 5, 6]
    assert source_set(9, 4, 8) == [0, 4, 5, 6, 7, 8]  # final aggregator


def test_sources_dense_is_every_earlier_output():
    for l in range(1, 10):
        assert source_set(l, 1, 8) == list(range(l))
    assert source_set(57, 1, 56) == list(range(57))  # the paper's N = 57 at SiT-XL/2


def test_sources_with_a_chunk_that_does_not_divide_l():
    # L = 8, S = 3: chunks {1,2,3}, {4,5,6}, {7,8}; the last chunk is shorter.
    assert source_set(4, 3, 8) == [0, 3]
    assert source_set(6, 3, 8) == [0, 3, 4, 5]
    assert source_set(7, 3, 8) == [0, 3, 6]
    assert source_set(8, 3, 8) == [0, 3, 6, 7]
    assert source_set(9, 3, 8) == [0, 3, 6, 7, 8]


def test_sources_are_bounded_by_n_plus_s():
    for L in (2, 8, 24, 56):
        for S in range(1, L + 1):
            N = math.ceil(L / S)
            for l in range(1, L + 2):
                got = source_set(l, S, L)
                assert got == sorted(set(got)) and all(i < l for i in got) and 0 in got and l - 1 in got
                assert len(got) <= N + S


@pytest.mark.parametrize("bad", [0, -1, 9, 2.0, None])
def test_invalid_chunk_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match="chunk size"):
        source_set(1, bad, 8)
    with pytest.raises(ValueError, match="chunk size"):
        SiT(**TINY, routing="static", chunk=bad)


#################################################################################
#                  DAR against an independent loop from Eq. (5)-(7)             #
#################################################################################

def dar_reference(model, x, t, y):
    """DAR's forward written from Eq. (5)-(7) and (11), with its own chunk bookkeeping; returns (out, z)."""
    cfg = model.config
    L, S, d = 2 * cfg.depth, cfg.chunk, cfg.hidden_size
    ln = lambda h: F.layer_norm(h, (d,), eps=1e-6)
    v0 = model.x_embedder(x) + model.pos_embed
    e = model.t_embedder(t)
    c = e + model.y_embedder(y)

    def route(name, srcs, v_prev):
        router = model.routers[name]
        w, gamma = (router.W_q.weight if cfg.routing == "dynamic" else router.w), router.gamma
        if cfg.routing == "static":
            q = w[None, None, :]
        elif cfg.routing == "explicit":
            q = (w + e)[:, None, :]
        else:
            q = v_prev @ w.T
        V = torch.stack(srcs)  # (N, B, T, d)
        K = V / torch.sqrt(V.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma
        a = torch.softmax((K * q).sum(-1) / math.sqrt(d), dim=0)  # (N, B, T)
        return (a[..., None] * V).sum(0)

    summaries, current, finished_chunk, v_prev, z = [v0], [], [], v0, []
    for l in range(1, L + 1):
        block = model.blocks[(l - 1) // 2]
        m = block.adaLN_modulation(c).chunk(6, dim=1)
        shift, scale, gate = m[0:3] if l % 2 else m[3:6]
        f = block.attn if l % 2 else block.mlp
        h = route(str(l), summaries + current, v_prev)
        if l % 2 and l > 1:
            z.append(h)
        v = gate[:, None] * f(ln(h) * (1 + scale[:, None]) + shift[:, None])
        current.append(v)
        if l % S == 0:  # chunk complete: its last output becomes its summary
            summaries, finished_chunk, current = summaries + [v], current, []
        v_prev = v
    N = math.ceil(L / S)
    final_name = "final" if cfg.final_agg == "dedicated" else str(L)
    h = route(final_name, summaries[:N] + (current or finished_chunk), v_prev)
    z.append(h)
    shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    out = model.final_layer.linear(ln(h) * (1 + scale[:, None]) + shift[:, None])
    return model.unpatchify(out)[:, : cfg.in_channels], z


@pytest.mark.parametrize("routing", DAR_ROUTINGS)
@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_dar_forward_equals_independent_loop(routing, chunk):
    model = perturb(tiny(routing, chunk=chunk)).double().eval()
    x, t, y = batch(model, dtype=torch.float64)
    out, extras = model(x, t, y, return_states=True)
    expected, z = dar_reference(model, x, t, y)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert len(extras["z"]) == model.config.depth
    for got, want in zip(extras["z"], z):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("routing", ["residual", "dynamic"])
def test_states_at_keeps_only_the_blocks_it_names(routing):
    """REPA asks for one z_k: states_at returns it (the same tensor values as all states give) and None for the
    others; a block outside 1..depth is an error, not z of another block."""
    model = perturb(tiny(routing, chunk=2)).double().eval()
    x, t, y = batch(model, dtype=torch.float64)
    _, every = model(x, t, y, return_states=True)
    _, some = model(x, t, y, return_states=True, states_at=(2,))
    assert [z is None for z in some["z"]] == [True, False, True]
    torch.testing.assert_close(some["z"][1], every["z"][1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="states_at names blocks 1..3"):
        model(x, t, y, return_states=True, states_at=(0,))


@pytest.mark.parametrize("routing", DAR_ROUTINGS)
def test_reuse_final_aggregation_equals_independent_loop(routing):
    model = perturb(tiny(routing, chunk=4, depth=3, final_agg="reuse")).double().eval()
    assert "final" not in model.routers
    x, t, y = batch(model, dtype=torch.float64)
    torch.testing.assert_close(model(x, t, y), dar_reference(model, x, t, y)[0], rtol=1e-10, atol=1e-10)


def test_mix_accepts_every_query_shape_and_fuses_the_modulate():
    torch.manual_seed(0)
    B, T, d, N = 2, 5, 7, 3
    vs = [torch.randn(B, T, d, dtype=torch.float64) for _ in range(N)]
    gamma = torch.rand(d, dtype=torch.float64) + 0.5
    shift, scale = torch.randn(B, d, dtype=torch.float64), torch.randn(B, d, dtype=torch.float64)
    per_token = torch.randn(B, T, d, dtype=torch.float64)
    for q, q_full in ((per_token[0, 0], per_token[0, 0].expand(B, T, d)),
                      (per_token[:, 0], per_token[:, :1].expand(B, T, d)),
                      (per_token, per_token)):
        x, h, alpha = aggregate_reference(vs, q, gamma, shift, scale)
        for b in range(B):
            for i in range(T):
                keys = [v[b, i] / v[b, i].pow(2).mean().add(1e-6).sqrt() * gamma for v in vs]
                a = torch.softmax(torch.stack([q_full[b, i] @ k for k in keys]) / math.sqrt(d), dim=0)
                hi = sum(a[n] * vs[n][b, i] for n in range(N))
                xi = (hi - hi.mean()) / (hi.var(unbiased=False) + 1e-6).sqrt() * (1 + scale[b]) + shift[b]
                torch.testing.assert_close(alpha[b, i], a)
                torch.testing.assert_close(h[b, i], hi)
                torch.testing.assert_close(x[b, i], xi)


#################################################################################
#                         Initialisation and timestep use                       #
#################################################################################

@pytest.mark.parametrize("routing", DAR_ROUTINGS)
def test_routing_starts_uniform(routing):
    model = tiny(routing, chunk=2).eval()
    x, t, y = batch(model)
    _, extras = model(x, t, y, return_weights=True)
    assert len(extras["alpha"]) == 2 * model.config.depth + 1
    for alpha in extras["alpha"]:
        torch.testing.assert_close(alpha, torch.full_like(alpha, 1 / alpha.shape[-1]))
    if routing == "explicit":
        assert torch.count_nonzero(model.t_embedder(t)) == 0  # e(t) = 0


def test_explicit_with_zero_timestep_embedding_equals_static():
    static = perturb(tiny("static", chunk=2)).eval()
    explicit = tiny("explicit", chunk=2).eval()
    explicit.load_state_dict(static.state_dict(), strict=True)
    for model in (static, explicit):
        torch.nn.init.zeros_(model.t_embedder.mlp[2].weight)
        torch.nn.init.zeros_(model.t_embedder.mlp[2].bias)
    x, t, y = batch(static)
    assert torch.count_nonzero(static.routers["3"].w) > 0
    torch.testing.assert_close(explicit(x, t, y), static(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("routing", DAR_ROUTINGS)
def test_routing_weights_sum_to_one_and_follow_t_except_static(routing):
    model = perturb(tiny(routing, chunk=2)).eval()
    x, _, y = batch(model)
    alphas = [model(x, torch.full((3,), t), y, return_weights=True)[1]["alpha"] for t in (0.1, 0.9)]
    for alpha in alphas[0]:
        torch.testing.assert_close(alpha.sum(-1), torch.ones(alpha.shape[:-1]))
    # The routing weights change with t for every variant, static too, since the keys RMSNorm(v_i) do...
    assert not torch.allclose(alphas[0][-1], alphas[1][-1])
    # ...but with the sources held fixed only explicit's query moves with t: static is blind to t, and
    # dynamic sees t only through v_{l-1} (the paper's implicit injection).
    torch.manual_seed(3)
    L, d = 2 * model.config.depth, model.config.hidden_size
    vs = {i: torch.randn(3, 16, d) for i in range(L + 1)}
    weights = [model.routers.aggregate(L + 1, vs, model.t_embedder(torch.full((3,), t)))[2] for t in (0.1, 0.9)]
    assert torch.equal(weights[0], weights[1]) == (routing != "explicit")


#################################################################################
#                          Gradients, precision, guidance                       #
#################################################################################

@pytest.mark.parametrize("routing", ("residual",) + DAR_ROUTINGS)
def test_every_parameter_learns_except_the_single_source_router(routing):
    model = perturb(tiny(routing, chunk=2)).train()
    x1, t, y = batch(model, B=4)
    eps = torch.randn_like(x1)
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * eps
    loss = (model(xt, t, y) - (x1 - eps)).pow(2).mean()
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0).step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert name == "pos_embed" and p.grad is None
        elif name.startswith("routers.1."):  # one source: softmax is 1 whatever the query, so no gradient
            assert torch.count_nonzero(p.grad) == 0, name
        else:
            assert torch.count_nonzero(p.grad) > 0, name
            assert not torch.equal(p, before[name]), name


@pytest.mark.parametrize("routing", ("residual",) + DAR_ROUTINGS)
def test_bf16_autocast_forward_and_backward_are_finite(routing):
    model = perturb(tiny(routing, chunk=2)).train()
    x, t, y = batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, extras = model(x, t, y, return_states=True)
        loss = out.float().pow(2).mean() + extras["z"][1].float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(out.float()).all()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_guidance_on_all_channels_and_legacy_three():
    model = perturb(tiny("dynamic", in_channels=4)).eval()
    x, t, _ = batch(model, B=2)
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.tensor([1, 2, 5, 5])  # labels, then the null class
    cond, uncond = model(xx, tt, yy).chunk(2)
    guided = uncond + 1.5 * (cond - uncond)
    full = model.forward_with_cfg(xx, tt, yy, cfg_scale=1.5)
    torch.testing.assert_close(full, torch.cat([guided, guided]))
    legacy = model.forward_with_cfg(xx, tt, yy, cfg_scale=1.5, legacy_channels=True)
    torch.testing.assert_close(legacy[:, :3], torch.cat([guided, guided])[:, :3])
    torch.testing.assert_close(legacy[:, 3], torch.cat([cond, uncond])[:, 3])  # the 4th channel stays unguided


def test_bad_inputs_raise_clear_errors():
    model = tiny("static")
    x, t, y = batch(model)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :2], t, y)
    with pytest.raises(ValueError, match="one per sample"):
        model(x, t[:2], y)
    with pytest.raises(ValueError, match="routing must be"):
        tiny("attnres")
    with pytest.raises(ValueError, match="final_agg"):
        tiny("static", final_agg="last")
    with pytest.raises(ValueError, match="kernel"):
        tiny("static", kernel="cuda")


@pytest.mark.parametrize("routing", ("residual", "dynamic"))
def test_gradient_checkpointing_leaves_gradients_unchanged(routing):
    grads = []
    for ckpt in (False, True):
        model = perturb(tiny(routing, chunk=2)).train()
        model.grad_checkpoint = ckpt
        x, t, y = batch(model)
        out, extras = model(x, t, y, return_states=True)
        (out.pow(2).mean() + extras["z"][0].pow(2).mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)
