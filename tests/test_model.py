"""The RWMN model (rwmn/model.py) on CPU with the reference backend.

The two central checks rebuild the forward pass independently from docs/model.md, in float64,
with the model's weights copied in:

* legacy mode (docs/model.md section 6): the released TensorFlow graph step by step, NHWC layout,
  F.conv2d with explicit TF SAME padding, the row-major [1, m, d, c] -> [-1, d] reshape;
* paper mode (docs/model.md sections 1-5): CBP of every (channel, slot) row with u (written as a
  direct circular convolution, no FFT), the read convs, unit-norm rows, softmax, the alpha
  update of u.

Also: every mode runs forward and backward with finite values, the attention output, the
state-dict layout, input and configuration errors, torch.compile and bf16 autocast.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rwmn import RWMN, ConfigError, RWMNConfig, RWMNOutput, ops
from rwmn.cbp import tensorflow_hashes

EPS = 1e-12  # docs/model.md: unit_norm(x) = x / sqrt(eps + sum(x^2))
#: float64 model vs float64 independent implementation.
F64_ATOL = 1e-10

SMALL = dict(dim_text=12, dim_memory=10, dim_rgb=16, dim_sub=12, dim_mcb=14)
N_STORY, BATCH = 23, 3


@pytest.fixture(autouse=True)
def reference_backend():
    with ops.use_backend("reference"):
        yield


def config(**kwargs) -> RWMNConfig:
    return RWMNConfig(**{**SMALL, **kwargs})


def make_model(cfg: RWMNConfig, seed: int = 0, dtype=torch.float32) -> RWMN:
    torch.manual_seed(seed)
    return RWMN(cfg).to(dtype)


def make_inputs(cfg: RWMNConfig, n=N_STORY, b=BATCH, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    if cfg.video:
        story = (randn(n, cfg.dim_rgb), randn(n, cfg.dim_sub))
    else:
        story = randn(n, cfg.dim_text)
    return story, randn(b, cfg.dim_text), randn(b, cfg.num_answer, cfg.dim_text)


# --------------------------------------------------------------------------------------
# Every mode: shapes, finiteness, gradients, attention
# --------------------------------------------------------------------------------------

MODES = {
    "sub": dict(write="4-3-2", read="3-1-2"),
    "video_sub": dict(data_source="video_sub", write="4-3-2", read="3-1-2"),
    "legacy": dict(write="4-3-2", read="3-1-2", legacy=True),
    "legacy_video": dict(data_source="video_sub", write="4-3-2", read="3-1-2", legacy=True),
    "baseline": dict(write="", read=""),
    "baseline_legacy": dict(write="", read="", legacy=True),
    "baseline_video": dict(data_source="video_sub", write="", read=""),
    "write_only": dict(write="5-2-3", read=""),
    "write_only_legacy": dict(write="5-2-3", read="", legacy=True),
    "read_only": dict(write="", read="3-2-2"),
    "read_only_legacy": dict(write="", read="3-2-2", legacy=True),
    "multi_layer": dict(write="4-2-3/3-2-2", read="3-1-2/2-2-3"),
    "multi_layer_legacy": dict(write="4-2-3/3-2-2", read="3-1-2/2-2-3", legacy=True),
    "hops2": dict(num_hop=2),
    "hops3_legacy": dict(num_hop=3, legacy=True),
    "hops3_video": dict(data_source="video_sub", num_hop=3, write="3-3-1", read="2-1-1"),
    "sharp": dict(sharp=7.5),
    "alpha0": dict(alpha=0.0),
    "alpha1": dict(alpha=1.0, num_hop=2),
    "alpha_0.3": dict(alpha=0.3),
    "four_answers": dict(num_answer=4),
    "release_layers_short_story": dict(write="40-30-3", read="3-1-3"),  # n < k
    "tensorflow_hash": dict(cbp_hash="tensorflow"),
}


def rows_per_hop(cfg: RWMNConfig, n: int) -> int:
    """Number of attended rows R."""
    c, rows = 1, n
    for layer in cfg.write_layers:
        c, rows = layer.channels, math.ceil(rows / layer.stride)
    if cfg.legacy:
        rows, c = rows * c, 1
    for layer in cfg.read_layers:
        c, rows = layer.channels, math.ceil(rows / layer.stride)
    return rows * c


@pytest.mark.parametrize("mode", list(MODES))
def test_forward_backward_every_mode(mode):
    cfg = config(**MODES[mode])
    model = make_model(cfg)
    story, query, answers = make_inputs(cfg)
    out = model(story, query, answers, return_attention=True)
    assert isinstance(out, RWMNOutput)
    assert out.logits.shape == (BATCH, cfg.num_answer)
    assert torch.isfinite(out.logits).all()
    # Scores are cosines of unit vectors.
    assert out.logits.abs().max() <= 1 + 1e-5
    assert len(out.attention) == cfg.num_hop
    for p in out.attention:
        assert p.shape == (BATCH, rows_per_hop(cfg, N_STORY))
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(BATCH), rtol=0, atol=1e-5)
    plain = model(story, query, answers)
    assert torch.equal(plain, out.logits)

    target = torch.arange(BATCH) % cfg.num_answer
    model.loss(out.logits, target).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{mode}: no gradient for {name}"
        assert torch.isfinite(param.grad).all(), f"{mode}: non-finite gradient for {name}"
    grad_norm = sum(p.grad.abs().sum() for p in model.parameters())
    assert grad_norm > 0


@pytest.mark.parametrize("n, b", [(1, 1), (2, 4)])
@pytest.mark.parametrize("mode", ["sub", "video_sub", "legacy", "multi_layer_legacy", "baseline"])
def test_tiny_story_and_batch(mode, n, b):
    """One- and two-element stories (far shorter than every kernel) and one question."""
    cfg = config(**MODES[mode])
    model = make_model(cfg)
    out = model(*make_inputs(cfg, n=n, b=b), return_attention=True)
    assert out.logits.shape == (b, cfg.num_answer) and torch.isfinite(out.logits).all()
    assert out.attention[0].shape == (b, rows_per_hop(cfg, n))
    model.loss(out.logits, torch.zeros(b, dtype=torch.long)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("legacy", [False, True])
def test_hops_change_the_answer(legacy):
    """A second hop reads again with the updated u: the logits differ from one hop's."""
    one = make_model(config(legacy=legacy))
    two = make_model(config(legacy=legacy, num_hop=2))
    two.load_state_dict(one.state_dict())
    inputs = make_inputs(one.cfg)
    assert not torch.allclose(one(*inputs), two(*inputs))


# --------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------


def test_state_dict_layout_text():
    cfg = config(write="4-3-2/3-1-3", read="3-1-2/2-2-4")
    d = cfg.dim_memory
    shapes = {k: tuple(v.shape) for k, v in make_model(cfg).state_dict().items()}
    assert shapes == {
        "embed.weight": (d, cfg.dim_text),
        "embed.bias": (d,),
        "write.convs.0.weight": (2, 1, 4, d),
        "write.convs.0.bias": (2,),
        "write.convs.1.weight": (3, 2, 3, d),
        "write.convs.1.bias": (3,),
        "read.convs.0.weight": (2, 3, 3, d),
        "read.convs.0.bias": (2,),
        "read.convs.1.weight": (4, 2, 2, d),
        "read.convs.1.bias": (4,),
        "read.cbp.h1": (d,),
        "read.cbp.s1": (d,),
        "read.cbp.h2": (d,),
        "read.cbp.s2": (d,),
    }
    params = {name for name, _ in make_model(cfg).named_parameters()}
    assert not any(".cbp." in name for name in params), "CBP hashes must be buffers"


def test_state_dict_layout_video_and_legacy():
    cfg = config(data_source="video_sub", write="4-3-2", read="3-1-2")
    keys = set(make_model(cfg).state_dict())
    assert {"story_cbp.h1", "story_cbp.s1", "story_cbp.h2", "story_cbp.s2"} <= keys
    assert {"story_embed.weight", "story_embed.bias", "read.cbp.h1"} <= keys
    # Legacy has no read CBP, and its read convs see the reshaped memory as one channel.
    legacy = make_model(config(write="4-3-2", read="3-1-2", legacy=True)).state_dict()
    assert not any(".cbp." in k for k in legacy)
    assert legacy["read.convs.0.weight"].shape == (2, 1, 3, SMALL["dim_memory"])
    baseline = make_model(config(write="", read="")).state_dict()
    assert set(baseline) == {"embed.weight", "embed.bias"}


def test_tensorflow_hash_option():
    cfg = config(data_source="video_sub", cbp_hash="tensorflow")
    model = make_model(cfg)
    d = cfg.dim_memory
    for module, (n1, n2, out) in (
        (model.read.cbp, (d, d, d)),
        (model.story_cbp, (cfg.dim_rgb, cfg.dim_sub, cfg.dim_mcb)),
    ):
        for got, want in zip(module.hashes, tensorflow_hashes(n1, n2, out), strict=True):
            assert torch.equal(got, want)
    # "random" draws from torch's generator: different seeds, different hashes.
    a = make_model(config(), seed=0).read.cbp.h1
    b = make_model(config(), seed=1).read.cbp.h1
    assert not torch.equal(a, b)


# --------------------------------------------------------------------------------------
# Independent float64 implementations of docs/model.md sections 1-6
# --------------------------------------------------------------------------------------


def un(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(EPS + (x * x).sum(-1, keepdim=True))


def tf_same(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def tf_conv_nhwc(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int) -> torch.Tensor:
    """tf.nn.conv2d(x, HWIO kernel, strides [1, s, 1, 1], "SAME") + b, ReLU, in NHWC.

    w is the model's [c_out, c_in, k, d] (= OIHW, what F.conv2d takes; TF's HWIO kernel is
    its permutation (2, 3, 1, 0))."""
    _, height, width, _ = x.shape
    top, bottom = tf_same(height, w.shape[2], stride)
    left, right = tf_same(width, w.shape[3], 1)
    nchw = F.pad(x.permute(0, 3, 1, 2), (left, right, top, bottom))
    return F.relu(F.conv2d(nchw, w, b, stride=(stride, 1))).permute(0, 2, 3, 1)


def conv_params(model: RWMN, stack: str):
    convs = getattr(model, stack).convs
    return [(c.weight.detach().double(), c.bias.detach().double(), c.stride) for c in convs]


def legacy_release_logits(model: RWMN, story, query, answers, interleave=True):
    """docs/model.md section 6, the released text graph step by step (float64, NHWC).

    interleave=False flattens channel-first instead of the release's row-major reshape of
    [1, m, d, c]: only to show that the test can tell the two apart."""
    cfg = model.cfg
    d = cfg.dim_memory
    w_e, b_e = model.embed.weight.detach().double(), model.embed.bias.detach().double()
    story, query, answers = un(story), un(query), un(answers)  # step 1
    u = un(query @ w_e.T + b_e)  # step 2
    g = un(answers @ w_e.T + b_e)
    memory = un(story @ w_e.T + b_e)

    def to_rows(nhwc):
        if interleave:
            return nhwc.reshape(-1, d)  # row-major [1, m, d, c] -> [-1, d]
        return nhwc.permute(0, 3, 1, 2).reshape(-1, d)

    rows = memory
    write = conv_params(model, "write")
    if write:  # step 3
        x = memory.reshape(1, -1, d, 1)
        for w, b, s in write:
            x = tf_conv_nhwc(x, w, b, s)
        rows = to_rows(x)
    read = conv_params(model, "read")
    if read:  # step 4
        x = rows.reshape(1, -1, d, 1)
        for w, b, s in read:
            x = tf_conv_nhwc(x, w, b, s)
        rows = un(to_rows(x))
    for _ in range(cfg.num_hop):  # step 5
        p = torch.softmax(cfg.sharp * u @ rows.T, dim=-1)
        o = un(p @ rows)
        u = un(o + u)
    return torch.einsum("bad,bd->ba", g, u)


def cbp_direct(x, y, h1, s1, h2, s2, out_dim):
    """Count sketches as matrices, then the circular convolution as an explicit sum."""
    sk1 = torch.zeros(x.shape[-1], out_dim, dtype=torch.float64)
    sk1[torch.arange(x.shape[-1]), h1] = s1.double()
    sk2 = torch.zeros(y.shape[-1], out_dim, dtype=torch.float64)
    sk2[torch.arange(y.shape[-1]), h2] = s2.double()
    px, py = x @ sk1, y @ sk2
    j = torch.arange(out_dim)
    shift = (j[:, None] - j[None, :]) % out_dim  # [j, t] -> (j - t) mod D
    return torch.einsum("...t,...jt->...j", px, py[..., shift])


def nchw_conv(x, w, b, s):
    top, bottom = tf_same(x.shape[-2], w.shape[2], s)
    left, right = tf_same(x.shape[-1], w.shape[3], 1)
    return F.relu(F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride=(s, 1)))


def paper_logits(model: RWMN, story, query, answers):
    """docs/model.md sections 1-5 composed directly (float64), one question at a time."""
    cfg = model.cfg
    w_e, b_e = model.embed.weight.detach().double(), model.embed.bias.detach().double()
    if cfg.video:
        rgb, sub = story
        hashes = [t.detach() for t in model.story_cbp.hashes]
        e = cbp_direct(un(rgb), un(sub), *hashes, cfg.dim_mcb)
        w_s, b_s = model.story_embed.weight.detach().double(), model.story_embed.bias.detach()
        memory = un(e @ w_s.T + b_s.double())
    else:
        memory = un(un(story) @ w_e.T + b_e)
    x = memory[None, None]  # [1, C=1, n, d]
    for w, b, s in conv_params(model, "write"):
        x = nchw_conv(x, w, b, s)
    memory = x[0]  # [C, m, d]
    read = conv_params(model, "read")
    hashes = [t.detach() for t in model.read.cbp.hashes] if read else None
    logits = []
    for q, a in zip(un(query), un(answers), strict=True):
        u = un(q @ w_e.T + b_e)
        g = un(a @ w_e.T + b_e)
        for _ in range(cfg.num_hop):
            if read:
                mq = torch.stack(
                    [
                        torch.stack([cbp_direct(slot, u, *hashes, cfg.dim_memory) for slot in ch])
                        for ch in memory
                    ]
                )[None]  # [1, C, m, d]: Mq[i, :, k] = CBP(M[i, :, k], u)
                for w, b, s in read:
                    mq = nchw_conv(mq, w, b, s)
                rows = mq[0]
            else:
                rows = memory
            rows = un(rows.reshape(-1, cfg.dim_memory))  # (channel, slot) rows
            p = torch.softmax(cfg.sharp * rows @ u, dim=0)
            o = p @ rows
            u = un(cfg.alpha * un(o) + (1 - cfg.alpha) * u)
        logits.append(g @ u)
    return torch.stack(logits)


def model64(cfg: RWMNConfig, seed=0) -> RWMN:
    model = make_model(cfg, seed, torch.float64)
    # Positive conv biases keep ReLU from zeroing whole rows, so every weight matters.
    with torch.no_grad():
        for conv in list(model.write.convs) + list(model.read.convs):
            conv.bias.uniform_(0.0, 0.2)
    return model


LEGACY_CASES = {
    "channels_3_3": dict(write="4-3-3", read="3-1-3"),
    "channels_2_then_4": dict(write="4-2-3/3-2-2", read="3-1-4/2-2-3", sharp=3.0),
    "write_only_c3": dict(write="5-2-3", read=""),
    "read_only_c2": dict(write="", read="3-2-2"),
    "baseline": dict(write="", read=""),
    "hops2": dict(write="4-3-3", read="3-1-3", num_hop=2),
    "release_spec_n_lt_k": dict(write="40-30-3", read="3-1-3"),
}


@pytest.mark.parametrize("case", list(LEGACY_CASES))
def test_legacy_matches_release_graph(case):
    cfg = config(legacy=True, reg=0.01, **LEGACY_CASES[case])
    model = model64(cfg)
    story, query, answers = make_inputs(cfg, n=31, b=4, dtype=torch.float64)
    logits = model(story, query, answers)
    expected = legacy_release_logits(model, story, query, answers)
    torch.testing.assert_close(logits, expected, rtol=0, atol=F64_ATOL)

    # Loss: softmax cross-entropy of softmax(scores), + reg * sum ||param||^2 / 2.
    target = torch.tensor([0, 3, 1, 4])
    probs = torch.softmax(expected, -1)
    ce = (torch.logsumexp(probs, -1) - probs[torch.arange(4), target]).mean()
    l2 = sum((p.detach() ** 2).sum() for p in model.parameters()) / 2
    torch.testing.assert_close(model.loss(logits, target), ce + cfg.reg * l2, rtol=1e-6, atol=0)


def test_legacy_interleaving_matters():
    """With c > 1 the release's row-major reshape differs from channel-first rows: the
    legacy check above would fail if the model flattened channel-first."""
    cfg = config(legacy=True, write="4-3-3", read="3-1-3")
    model = model64(cfg)
    inputs = make_inputs(cfg, n=31, b=4, dtype=torch.float64)
    interleaved = legacy_release_logits(model, *inputs)
    channel_first = legacy_release_logits(model, *inputs, interleave=False)
    assert (interleaved - channel_first).abs().max() > 1e-4


PAPER_CASES = {
    "sub": dict(write="4-3-3", read="3-1-2"),
    "multi_layer": dict(write="4-2-3/3-2-2", read="3-1-4/2-2-3", sharp=3.0, alpha=0.3),
    "write_only": dict(write="5-2-3", read=""),
    "read_only": dict(write="", read="3-2-2"),
    "baseline": dict(write="", read=""),
    "hops2": dict(write="4-3-2", read="3-1-2", num_hop=2, alpha=0.7),
    "video_sub": dict(data_source="video_sub", write="4-3-2", read="3-1-2"),
    "tensorflow_hash": dict(write="4-3-2", read="3-1-2", cbp_hash="tensorflow"),
}


@pytest.mark.parametrize("case", list(PAPER_CASES))
def test_paper_mode_matches_direct_composition(case):
    cfg = config(reg=0.02, **PAPER_CASES[case])
    model = model64(cfg)
    story, query, answers = make_inputs(cfg, n=19, b=3, dtype=torch.float64)
    logits = model(story, query, answers)
    expected = paper_logits(model, story, query, answers)
    torch.testing.assert_close(logits, expected, rtol=0, atol=F64_ATOL)
    target = torch.tensor([4, 0, 2])
    ce = F.cross_entropy(expected, target)
    l2 = sum((p.detach() ** 2).sum() for p in model.parameters()) / 2
    torch.testing.assert_close(model.loss(logits, target), ce + cfg.reg * l2, rtol=1e-6, atol=0)


def test_paper_and_legacy_differ():
    """Same weights (no read CBP in legacy, so compare write-only with c = 3): the paper
    mode attends over unit-normalised channel-first rows, legacy over interleaved rows."""
    paper = model64(config(write="4-3-3", read=""))
    legacy = model64(config(write="4-3-3", read="", legacy=True))
    legacy.load_state_dict(paper.state_dict())
    inputs = make_inputs(paper.cfg, n=31, dtype=torch.float64)
    assert (paper(*inputs) - legacy(*inputs)).abs().max() > 1e-4


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_bad_inputs_text():
    cfg = config()
    model = make_model(cfg)
    story, query, answers = make_inputs(cfg)
    with pytest.raises(ValueError, match=r"story has shape \(23, 11\), expected \[n, 12\]"):
        model(story[:, :11], query, answers)
    with pytest.raises(ValueError, match=r"story has shape \(23,\)"):
        model(story[:, 0], query, answers)
    with pytest.raises(ValueError, match="story is empty"):
        model(story[:0], query, answers)
    with pytest.raises(ValueError, match=r"query has shape \(3, 13\), expected \[B, 12\]"):
        model(story, torch.randn(3, 13), answers)
    with pytest.raises(ValueError, match=r"query has shape \(12,\)"):
        model(story, query[0], answers)
    with pytest.raises(ValueError, match=r"answers has shape \(3, 4, 12\), expected \[3, 5, 12\]"):
        model(story, query, answers[:, :4])
    with pytest.raises(ValueError, match=r"answers has shape \(2, 5, 12\)"):
        model(story, query, answers[:2])
    with pytest.raises(ValueError, match="one tensor"):
        model((story, story), query, answers)


def test_bad_inputs_video():
    cfg = config(data_source="video_sub")
    model = make_model(cfg)
    (rgb, sub), query, answers = make_inputs(cfg)
    with pytest.raises(ValueError, match="must be a pair"):
        model(sub, query, answers)
    with pytest.raises(ValueError, match="must be a pair"):
        model((rgb, sub, sub), query, answers)
    with pytest.raises(ValueError, match=r"rgb has shape \(23, 15\), expected \[n, 16\]"):
        model((rgb[:, :15], sub), query, answers)
    with pytest.raises(ValueError, match=r"sub has shape \(23, 5\), expected \[n, 12\]"):
        model((rgb, sub[:, :5]), query, answers)
    with pytest.raises(ValueError, match=r"rgb \(23, 16\) and sub \(22, 12\)"):
        model((rgb, sub[:22]), query, answers)
    with pytest.raises(ValueError, match="rgb is empty"):
        model((rgb[:0], sub[:0]), query, answers)


@pytest.mark.parametrize("flag", ["write", "read"])
@pytest.mark.parametrize("spec", ["40-30", "a-b-c", "0-1-1", "40-30-3/", "40-30-3-1", "3--1-2"])
def test_malformed_layer_spec(flag, spec):
    with pytest.raises(ConfigError, match=f"--{flag} '{spec}'"):
        RWMNConfig(**{flag: spec})


def test_layer_spec_parses():
    cfg = RWMNConfig(write=" 40-30-3 / 3-1-2 ", read="")
    assert [str(layer) for layer in cfg.write_layers] == ["40-30-3", "3-1-2"]
    assert cfg.read_layers == ()


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(data_source="youtube"), "--data_source 'youtube'"),
        (dict(cbp_hash="md5"), "--cbp_hash"),
        (dict(num_hop=0), "--num_hop"),
        (dict(alpha=1.5), "--alpha"),
        (dict(dim_memory=0), "--dim_memory"),
    ],
)
def test_config_errors(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        RWMNConfig(**kwargs)


def test_config_dict_round_trip():
    cfg = config(data_source="video_sub", legacy=True, write="3-2-1")
    assert RWMNConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown RWMNConfig fields: bogus"):
        RWMNConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# --------------------------------------------------------------------------------------
# torch.compile and autocast
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    """fullgraph=True: any graph break in the reference model is an error. Measured on 2
    shared CPU cores: ~25-30 s with cold Inductor caches, ~7 s warm."""
    cfg = RWMNConfig(dim_text=8, dim_memory=6, write="3-2-2", read="2-1-2", num_hop=2)
    model = make_model(cfg)
    inputs = make_inputs(cfg, n=9, b=2)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_whole_model():
    cfg = config(write="4-3-2", read="3-1-2", num_hop=2)
    model = make_model(cfg)
    inputs = make_inputs(cfg)
    ref = model(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(*inputs)
        low.float().sum().backward()
    assert torch.isfinite(low).all()
    # Logits are cosines in [-1, 1]; a few bf16 roundings (u = 2^-8) per step.
    err = (low.float() - ref).abs().max().item()
    assert err < 0.05, err
    assert err > 0, "autocast left the model in fp32: the test would be vacuous"
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# --------------------------------------------------------------------------------------
# The fused model against the reference (bench.checks.check_model)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_fused_model_matches_reference(precision):
    """The whole model on the fused backend vs the reference backend vs float64: logits and
    every parameter's gradient, both CBP paths (story D = 300 factorised, read D = 24
    dense), under autocast in bf16/fp16; on the interpreter with the GPU's semantics
    (bench.checks.fused_guard)."""
    from bench import checks

    dims = dict(dim_text=12, dim_memory=24, dim_mcb=300, write="3-2-2", read="2-1-2", num_hop=2)
    result = checks.check_model("sub", precision, "cpu", 0, dims, n=5, batch=2)
    assert result["verdict"] == "pass", [r for r in result["tensors"] if not r["ok"]]
