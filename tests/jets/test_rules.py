"""Every Taylor rule against torch.func in float64, one case per supported op.

A new rule is one entry in :data:`jaccli.jets.RULES` and one row in :data:`OP_CASES`:
each case is checked as a Jacobian, Hessian (pairs), Laplacian (collapsed) and
divergence, and as univariate series of orders 1 to 4 along several directions at once.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jaccli
from jaccli import jets as taylor
from jaccli.engine import planner
from jaccli.jets.elementwise import _nonlinear, _unary
from compare import KINDS, REL, assert_rel, mlp3, points, square, torch_func
from problems import BY_NAME, EXAMPLES, PROBLEMS, save_export, save_torchscript, tanh_mlp


# ----------------------------------------------------------------- one case per supported op

_g = torch.Generator().manual_seed(7)
C = torch.randn(3, 3, generator=_g, dtype=torch.float64)
c = torch.randn(3, generator=_g, dtype=torch.float64)
EXPO = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
BASE = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)


def _b(x):
    return x.shape[0]


W1 = torch.randn(2, 1, 2, generator=_g, dtype=torch.float64)
W2 = torch.randn(4, 1, 2, 2, generator=_g, dtype=torch.float64)
W3 = torch.randn(2, 1, 1, 2, 2, generator=_g, dtype=torch.float64)
WT = torch.randn(1, 2, 2, 2, generator=_g, dtype=torch.float64)
b2 = torch.randn(4, generator=_g, dtype=torch.float64)
RUNNING = (torch.rand(3, generator=_g, dtype=torch.float64), torch.rand(3, generator=_g, dtype=torch.float64) + 0.5)


def _six(x):
    """``[B, 3, 6]``: six curves of each input (a contraction too long for broadcast multiply-adds)."""
    return torch.stack([x, torch.sin(x), x * x, torch.tanh(x), torch.exp(x / 3), torch.cos(x)], 2)


def img(x):
    """``[B, 1, 3, 3]`` images with distinct entries (no ties for the maxima)."""
    return (x[:, :, None] * (x[:, None, :] + c[None, None, :]))[:, None]


def ups(x):
    i = torch.tanh(img(x))
    return torch.cat([
        F.interpolate(i, scale_factor=2, mode="nearest").flatten(1),
        F.interpolate(i, scale_factor=1.5, mode="bilinear").flatten(1),
        F.interpolate(i, size=(4, 5), mode="bicubic", align_corners=True).flatten(1),
        F.interpolate(i, size=(2, 2), mode="bilinear", antialias=True).flatten(1),
        F.interpolate(i, size=(2, 2), mode="bicubic", antialias=True).flatten(1),
        F.interpolate(i, scale_factor=2, mode="nearest-exact").flatten(1),
        F.interpolate(i[:, 0], scale_factor=2, mode="linear").flatten(1),
        F.interpolate(i[:, 0], scale_factor=2, mode="nearest").flatten(1),
        F.interpolate(i[:, 0], scale_factor=2, mode="nearest-exact").flatten(1),
        F.interpolate(i[:, None], scale_factor=2, mode="trilinear").flatten(1),
        F.interpolate(i[:, None], scale_factor=2, mode="nearest").flatten(1),
        F.interpolate(i[:, None], scale_factor=2, mode="nearest-exact").flatten(1),
    ], 1)  # fmt: skip


def pads(x):
    i = torch.sin(img(x))
    return torch.cat([
        F.pad(i, (1, 1, 0, 1), value=0.5).flatten(1),
        F.pad(i, (1, 2, 2, 1), mode="reflect").flatten(1) * F.pad(i, (1, 2, 2, 1), mode="replicate").flatten(1),
        F.pad(i[:, 0], (1, 2), mode="reflect").flatten(1) + F.pad(i[:, 0], (1, 2), mode="replicate").flatten(1),
        F.pad(torch.stack([i, i * i], 2), (1, 1, 1, 1, 1, 1), mode="reflect").flatten(1),
        F.pad(torch.stack([i, i * i], 2), (1, 1, 1, 1, 1, 1), mode="replicate").flatten(1),
    ], 1)  # fmt: skip


def pools(x):
    i = torch.sin(img(x)) * img(x)
    return torch.cat([
        F.avg_pool1d(i[:, 0], 2, 1).flatten(1), F.avg_pool2d(i, 2, 1).flatten(1),
        F.avg_pool3d(i[:, None], (1, 2, 2)).flatten(1), F.adaptive_avg_pool2d(i, (2, 2)).flatten(1),
        F.adaptive_avg_pool3d(i[:, None], (1, 2, 2)).flatten(1), F.adaptive_avg_pool1d(i[:, 0], 2).flatten(1),
        F.max_pool1d(i[:, 0], 2, 1).flatten(1), F.max_pool2d(i, 2, 1).flatten(1),
        F.max_pool3d(i[:, None], (1, 2, 2), 1).flatten(1),
    ], 1)  # fmt: skip


# name -> (f: [B, 3] -> [B, m] for points in (0.5, 1.5), ATen ops its trace must contain)
OP_CASES = {
    "tanh": (torch.tanh, {"tanh"}),
    "sigmoid": (torch.sigmoid, {"sigmoid"}),
    "sin-cos": (lambda x: torch.sin(x) * torch.cos(2 * x), {"sin", "cos"}),
    "tan": (lambda x: torch.tan(x - 1), {"tan"}),
    "sinh-cosh": (lambda x: torch.sinh(x) + torch.cosh(x * x), {"sinh", "cosh"}),
    "exp-expm1": (lambda x: torch.exp(-x) + torch.expm1(x), {"exp", "expm1"}),
    "log-log1p": (lambda x: torch.log(x) * torch.log1p(x), {"log", "log1p"}),
    "sqrt-rsqrt": (lambda x: torch.sqrt(x) + torch.rsqrt(x + 1), {"sqrt", "rsqrt"}),
    "reciprocal": (torch.reciprocal, {"reciprocal"}),
    "atan-erf": (lambda x: torch.atan(x) + torch.erf(x - 1), {"atan", "erf"}),
    "softplus": (lambda x: F.softplus(4 * x - 4, beta=2.0, threshold=1.5), {"softplus"}),  # both branches
    "silu": (lambda x: F.silu(2 * x - 2), {"silu"}),
    "gelu": (lambda x: F.gelu(2 * x - 2), {"gelu"}),
    "gelu-tanh": (lambda x: F.gelu(2 * x - 2, approximate="tanh"), {"gelu"}),
    "elu": (lambda x: F.elu(2 * x - 2, alpha=0.7), {"elu"}),
    "selu": (lambda x: torch.selu(2 * x - 2), {"elu"}),
    "leaky_relu": (lambda x: F.leaky_relu(x - 1, 0.1) * x, {"leaky_relu"}),
    "abs": (lambda x: torch.abs(x - 1) * x, {"abs"}),
    "relu": (lambda x: torch.relu(x - 1) * x, {"relu"}),
    "hardtanh": (lambda x: F.hardtanh(4 * x - 4) * x, {"hardtanh"}),
    "clamp": (lambda x: torch.clamp(x - 1, -0.2, 0.3) * x, {"clamp"}),
    "clamp-min-max": (lambda x: torch.clamp_min(x, 1.0) * torch.clamp_max(x, 1.0), {"clamp_min", "clamp_max"}),
    "pow": (lambda x: x**3 + x**0.5 + x**0 + x**1 + torch.square(x), {"pow"}),
    "pow-base": (lambda x: 2.0**x + BASE**x, {"pow"}),
    "pow-tensor": (lambda x: x**EXPO, {"pow"}),
    "view": (lambda x: (x.reshape(_b(x), 3, 1) * x.reshape(_b(x), 1, 3)).reshape(_b(x), -1), {"view", "mul"}),
    "flatten-batch": (lambda x: torch.tanh(x.reshape(-1)).reshape(_b(x), 3), {"view"}),
    "t-transpose": (lambda x: torch.tanh(x.t()).t() + x[:, :, None].transpose(1, 2)[:, 0], {"t", "transpose"}),
    "permute": (lambda x: (x[:, :, None] * x[:, None, :]).permute(0, 2, 1).reshape(_b(x), 9), {"permute"}),
    "squeeze": (lambda x: torch.sin(x[:, None, :, None]).squeeze(1).squeeze() * x, {"squeeze", "unsqueeze"}),
    "expand": (lambda x: x[:, :1].expand(-1, 3) * x, {"expand"}),
    "slice-select": (lambda x: torch.cat([x[:, 1:] * x[:, :2], x[:, 0:1] * x[:, 2, None]], 1), {"slice", "select"}),
    "slice-whole": (lambda x: x[:, 0:] * torch.tanh(x[:, :3]) + x[:, -3:], {"slice"}),  # the jet itself
    "diagonal": (lambda x: (x[:, :, None] * x[:, None, :]).diagonal(dim1=1, dim2=2), {"diagonal"}),
    "clone-alias": (lambda x: torch.ops.aten.alias(x.clone()) * x, {"clone", "alias"}),
    "to-copy": (lambda x: x.float().double() * x, {"_to_copy"}),
    "split": (lambda x: (lambda a, b, cc: a * b + cc)(*torch.tanh(x).split(1, dim=1)), {"split", "getitem"}),
    "split-sizes": (lambda x: (lambda a, b: a * b[:, :1] + b[:, 1:])(*x.split([1, 2], dim=1)), {"split_with_sizes"}),
    "unbind-stack": (lambda x: (lambda a, b, cc: torch.stack([a * b, cc], 1))(*x.unbind(1)), {"unbind", "stack"}),
    "neg": (lambda x: -(x * x), {"neg"}),
    "sum-mean": (lambda x: (x * x).sum(1, keepdim=True) + torch.sin(x).mean(-1, keepdim=True) * x, {"sum", "mean"}),
    "index": (lambda x: x.index_select(1, torch.tensor([2, 0])) * x[:, [1, 2]] + x[:, [-1, 0]], {"index_select", "index"}),
    "flip-roll": (lambda x: x.flip(1) * x.roll(1, 1), {"flip", "roll"}),
    "cumsum": (lambda x: torch.sin(x).cumsum(1) * x.cumsum(-1, dtype=x.dtype), {"cumsum"}),
    "masked-fill": (lambda x: torch.sin(x).masked_fill_(x > 1, 0.5) * x.masked_fill(x < 1, torch.tensor(2.0, dtype=x.dtype)), {"where"}),
    "prelu": (lambda x: F.prelu(torch.sin(x) - 0.9, c[:1].abs()) + F.prelu((x - 1)[:, :, None], c.abs()).flatten(1), {"where"}),
    "instance-norm": (lambda x: F.instance_norm((x * x)[:, None], weight=c[:1], bias=C[0, :1], eps=1e-5).flatten(1) * x, {"rsqrt"}),
    "adaptive-max-pool": (  # windows of one size (max pooling) and of two sizes (slices and amax)
        lambda x: torch.cat([F.adaptive_max_pool1d(torch.sin(x)[:, None] * x[:, None], k).flatten(1) for k in (3, 2)], 1),
        {"max_pool2d_with_indices", "amax"},
    ),
    "traced-convolution": (  # what torch.jit.trace records for a Conv1d
        lambda x: torch.ops.aten._convolution(x[:, None] * x[:, None], C[:2, None, :2], c[:2], [1], [0], [1], False, [0], 1,
                                              False, False, True, True).flatten(1),
        {"convolution"},
    ),  # fmt: skip
    "repeat": (lambda x: x.repeat(1, 2) * torch.cat([x, x * x], 1), {"repeat"}),
    "cat-const": (lambda x: torch.cat([x, torch.ones(_b(x), 1, dtype=x.dtype), torch.sin(x)], 1) * 2, {"cat"}),
    "cat-jets": (lambda x: torch.cat([torch.sin(x), x * x], -1) ** 2, {"cat"}),  # every block at hand: one cat
    "where": (lambda x: torch.where(x > 1, x**2, 3 * x), {"where", "gt"}),
    # a mask that picks one side everywhere: that side's jet as it is; broadcast to a larger shape: not
    "where-one-side": (
        lambda x: torch.where(x != x, 0.0, torch.sin(x) * x) + torch.where(x == x, x**2, 1.0)
        + torch.where((x != x)[:, :, None], 0.0, torch.tanh(x)[:, None, :]).sum(1),
        {"where", "ne", "eq"},
    ),  # fmt: skip
    "add-sub": (lambda x: x + torch.sin(x) + 1.5 + c - 2 * torch.exp(x) - c, {"add", "sub"}),
    "affine-plus-curved": (lambda x: x @ C + torch.tanh(x), {"add"}),  # a sum with a zero second-order term
    "rsub": (lambda x: (1 - x) * x, {"rsub"}),
    "div": (lambda x: x / c + c / x + torch.sin(x) / torch.exp(x) + x / 2, {"div"}),
    "mm": (lambda x: torch.tanh(x @ C) @ C.T + (C @ x.T).T, {"mm"}),
    "bmm": (lambda x: (x[:, :, None] @ torch.tanh(x)[:, None, :]).reshape(_b(x), 9), {"bmm", "_unsafe_view"}),
    # two jets of small matrices (a short contraction: broadcast multiply-adds) and of longer ones (bmm)
    "bmm-small": (lambda x: (torch.stack([x, torch.sin(x)], 1) @ torch.stack([torch.tanh(x), x * x], 2)).flatten(1), {"bmm"}),
    "bmm-long": (lambda x: (_six(x) @ torch.cos(_six(x)).transpose(1, 2)).flatten(1), {"bmm"}),
    "bmm-const": (lambda x: (x[:, None, :] @ C.expand(_b(x), 3, 3)).reshape(_b(x), 3), {"bmm"}),
    "mv": (lambda x: (x @ c)[:, None] * x, {"mv"}),
    "addmm": (mlp3(), {"addmm"}),
    "baddbmm": (lambda x: torch.baddbmm(x[:, :, None], x[:, :, None], x[:, None, :]).reshape(_b(x), 9), {"baddbmm"}),
    "addmv": (lambda x: torch.addmv(x[:, 0], x, c, beta=0.5, alpha=2.0)[:, None] * x, {"addmv"}),
    "detach": (lambda x: x * torch.sin(x).detach(), {"detach"}),
    "sign-floor": (lambda x: x * torch.sign(x - 1) + x * torch.floor(3 * x), {"sign", "floor"}),
    # convolutional nets
    "conv1d": (lambda x: F.conv1d(torch.tanh(x)[:, None] * x[:, None], W1, c[:2], padding=1).flatten(1), {"convolution"}),
    "conv2d-strided-grouped": (
        lambda x: F.conv2d(torch.cat([img(x), torch.sin(img(x))], 1), W2, b2, stride=(1, 2), padding=1, groups=2).flatten(1),
        {"convolution"},
    ),
    "conv3d-transposed": (
        lambda x: torch.cat([F.conv3d(img(x)[:, None] ** 2, W3).flatten(1),
                             F.conv_transpose2d(torch.tanh(img(x)), WT, c[:2], stride=2).flatten(1)], 1),
        {"convolution"},
    ),  # fmt: skip
    "upsample": (ups, {"upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d",
                       "upsample_trilinear3d", "_upsample_bilinear2d_aa"}),  # fmt: skip
    "pad": (pads, {"constant_pad_nd", "reflection_pad2d", "replication_pad2d"}),
    "pool": (pools, {"avg_pool2d", "_adaptive_avg_pool2d", "max_pool2d_with_indices"}),
    "pixel-shuffle-fold": (
        lambda x: torch.cat([
            F.pixel_unshuffle(F.pixel_shuffle(torch.tanh(img(x)).repeat(1, 4, 1, 1), 2), 2).flatten(1),
            F.fold(F.unfold(torch.sin(img(x)), 2), (3, 3), 2).flatten(1)], 1),
        {"pixel_shuffle", "pixel_unshuffle", "im2col", "col2im"},
    ),  # fmt: skip
    "maxima": (
        lambda x: torch.cat([x.amax(1, keepdim=True) * x, x.amin(1, keepdim=True) * torch.sin(x),
                             img(x).amax((2, 3)), torch.max(x * x, 1).values[:, None], torch.min(x, 1, keepdim=True)[0] * x], 1),
        {"amax", "amin", "max", "min"},
    ),  # fmt: skip
    "tril-triu": (lambda x: ((x[:, :, None] * x[:, None, :]).tril() + torch.sin(img(x)[:, 0]).triu(1)).flatten(1), {"tril", "triu"}),
    # decomposed into ops with rules as they are recorded
    "layer-norm": (lambda x: F.layer_norm(x * x, (3,), c, C[0]), {"rsqrt"}),
    "rms-norm": (lambda x: F.rms_norm(torch.sin(x) + x, (3,), c, 1e-5), {"rsqrt"}),
    "group-norm": (lambda x: F.group_norm(torch.cat([x, x * x], 1).reshape(_b(x), 2, 3), 1, c[:2], C[0, :2]).flatten(1), {"reshape", "rsqrt"}),
    "batch-norm-eval": (lambda x: F.batch_norm(torch.tanh(x), *RUNNING, c, C[1], training=False), {"mul"}),
    "softmax": (lambda x: F.softmax(x * x, 1) + F.log_softmax(torch.sin(x), 1) + torch.ops.aten._safe_softmax(x / c, 1), {"exp", "amax", "all"}),
    "logsumexp-var-std": (
        lambda x: torch.cat([torch.logsumexp(x * x, 1, keepdim=True), torch.var(torch.sin(x), 1, keepdim=True),
                             torch.std(x * x, 1, keepdim=True), torch.var_mean(x * x, 1)[0][:, None]], 1),
        {"exp", "log", "sqrt"},
    ),  # fmt: skip
    "activations": (lambda x: F.mish(2 * x - 2) + F.hardswish(4 * x - 4) + F.glu(torch.cat([x, x * x], 1), 1), {"softplus", "clamp"}),
}


@functools.cache
def _program(name: str) -> taylor.TaylorProgram:
    return taylor.build(OP_CASES[name][0], points())


@pytest.mark.parametrize("name", list(OP_CASES))
def test_each_op_matches_torch_func_in_float64(name):
    # torch.func's own advice that vmap falls back to a loop for some upsampling modes
    warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
    f, ops = OP_CASES[name]
    program = _program(name)
    assert ops <= program.ops()
    x = points()
    # forward mode, as the program runs: through a cast to float32 (to-copy) the two modes
    # round differently, and auto mode may pick reverse mode for a square Jacobian or divergence
    want_j = torch_func("jacobian", f, x, per_sample=True, mode="forward")
    assert_rel(program.jacobian(x), want_j.reshape(5, -1, 3))
    want_h = torch_func("hessian", f, x, per_sample=True).reshape(5, -1, 3, 3)
    assert_rel(program.hessian(x), want_h)
    assert_rel(program.hessian(x, directions=2), want_h)  # pairs split over passes
    want_l = torch_func("laplacian", f, x, per_sample=True).reshape(5, -1)
    assert_rel(program.laplacian(x), want_l)
    assert_rel(program.laplacian(x, directions=2), want_l)
    if square(f, x):
        assert_rel(program.divergence(x, directions=2), torch_func("divergence", f, x, per_sample=True, mode="forward"))


def _layer_norm_twin(x):
    y = x * x
    d = y - y.mean(1, keepdim=True)
    return d / torch.sqrt((d * d).mean(1, keepdim=True) + 1e-5) * c + C[0]


def _batch_norm_eval_twin(x):
    mean, var = RUNNING
    return (torch.tanh(x) - mean) / torch.sqrt(var + 1e-5) * c + C[1]


#: a case's function written without the fused kernel whose derivatives PyTorch gets wrong
#: (``planner.FORWARD_OVER_FORWARD_WRONG``: forward over forward at order 2, and autograd
#: itself past order 2): the reference at orders 3 and 4
_TWINS = {"layer-norm": _layer_norm_twin, "batch-norm-eval": _batch_norm_eval_twin}


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _directional(f, x: torch.Tensor, v: torch.Tensor, k: int, reverse: bool = False) -> torch.Tensor:
    """``dᵏ/dtᵏ f(x + t v)`` at 0 per point, by ``k`` nested ``torch.func.jvp`` (or, ``reverse``,
    ``torch.func.jacrev`` in ``t``)."""
    if not reverse:
        h = f
        for _ in range(k):
            h = (lambda g: lambda z: torch.func.jvp(g, (z,), (v,))[1])(h)
        with torch.no_grad():
            return h(x)

    def h(t, z, d):
        return f((z + t * d)[None])[0]

    for _ in range(k):
        h = torch.func.jacrev(h)
    return torch.func.vmap(h, in_dims=(None, 0, 0))(torch.zeros((), dtype=x.dtype), x, v)


def _reference(name: str, x: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor | None:
    """The order-``k`` reference of a case: nested forward mode; nested reverse mode where
    PyTorch has no (or a wrong) forward-over-forward formula; past order 2 through such a
    kernel, the case's twin (None without one: autograd is wrong there too)."""
    f = OP_CASES[name][0]
    with _Ops() as ops:
        f(x)
    if ops.names & planner.FORWARD_OVER_FORWARD_WRONG:
        if k <= 2:
            return _directional(f, x, v, k, reverse=True)
        return None if name not in _TWINS else _directional(_TWINS[name], x, v, k)
    try:
        return _directional(f, x, v, k)
    except NotImplementedError:  # no forward-mode formula of some backward (silu, mish): reverse
        return _directional(f, x, v, k, reverse=True)


@pytest.mark.parametrize("name", list(OP_CASES))
def test_each_op_matches_nested_torch_func_at_orders_one_to_four(name):
    warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
    f = OP_CASES[name][0]
    program = _program(name)
    x = points()
    v = torch.randn(2, *x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(5))  # two directions
    got = program.series(x, v, 4)
    with torch.no_grad():
        assert_rel(got[0], f(x))
        if name in _TWINS:
            assert_rel(_TWINS[name](x), f(x))
    for k in range(1, 5):
        for i in range(2):
            want = _reference(name, x, v[i], k)
            if want is None:
                continue
            want = want.reshape(x.shape[0], -1)
            assert_rel(torch.zeros_like(want) if got[k] is None else got[k][i] * math.factorial(k), want)


def test_composite_ops_reach_the_recorder_as_ops_with_rules():
    """narrow, flatten, unflatten, movedim, contiguous and matmul (entries of the old series
    table) are CompositeImplicitAutograd: the recorder only ever sees their decompositions,
    so the one table needs no rule for them."""
    from jaccli.jets.record import _trace

    def g(x):
        a = torch.ops.aten.narrow(x, 1, 0, 2)
        b = x.flatten(0).unflatten(0, (x.shape[0], 3))
        return torch.matmul(a, C[:2]) + torch.movedim(b[:, None], 1, 2).contiguous()[:, :, 0]

    recs, _, _ = _trace(g, points())
    names = {r[0].overloadpacket.__name__ for r in recs[1:]}
    assert not names & {"narrow", "flatten", "unflatten", "movedim", "contiguous", "matmul"}
    assert names <= set(taylor.RULES) | taylor.VALUE_OPS
    x = points()
    program = taylor.build(g, x, orders=3)
    assert_rel(program.jacobian(x), torch_func("jacobian", g, x, per_sample=True))


def test_hardsigmoid_has_its_exact_slope():
    # torch's float64 kernel differentiates with a float32 1/6; the closed form is exact
    x = points()
    f = lambda x: F.hardsigmoid(4 * x - 4) * x  # (4x - 1)/6 · x on these points
    assert jaccli.plan("hessian", f, x, per_sample=True).engine == "taylor"
    assert_rel(jaccli.jacobian(f, x, per_sample=True), torch.diag_embed((8 * x - 1) / 6))
    with pytest.warns(jaccli.JaccliWarning, match="hardsigmoid"):  # its kinks, though none is near
        h = jaccli.hessian(f, x, per_sample=True)
    assert_rel(h, torch.diag_embed(torch.diag_embed(torch.full_like(x, 8 / 6))))


def test_every_rule_is_exercised_by_an_op_case():
    seen = set().union(*(_program(name).ops() for name in OP_CASES))
    assert set(taylor.RULES) <= seen


def test_values_and_arbitrary_tangents_match_the_model_and_torch_func():
    f = OP_CASES["div"][0]
    x = points()
    v = torch.randn(4, *x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    program = _program("div")
    assert_rel(program.value(x), f(x))
    want = torch.stack([torch.func.jvp(f, (x,), (vi,))[1] for vi in v])
    assert_rel(program.jvp(x, v), want)


@pytest.mark.parametrize("numpy_tanh", [False, True], ids=["expm1", "numpy"])
def test_float32_tanh_is_within_a_few_ulp_of_float64_relative_to_itself(monkeypatch, numpy_tanh):
    # both forms, whichever this CPU would pick (NumPy's loop on one without AVX-512 is its AVX2 one)
    from jaccli.jets import elementwise
    from jaccli.jets.elementwise import _tanh

    monkeypatch.setattr(elementwise, "NUMPY_TANH", numpy_tanh)
    monkeypatch.setattr(elementwise, "NUMPY_TANH_THREADS", torch.get_num_threads())  # whatever this machine runs
    tiny = torch.logspace(-30, 0, 301)  # where a subtraction from 1 would lose every digit
    x = torch.cat([torch.linspace(-12, 12, 20001), tiny, -tiny, torch.tensor([0.0, -0.0, 50.0, -50.0])])
    want = torch.tanh(x.double())
    out = torch.empty_like(x)
    for got in (_tanh(x, None), _tanh(x, out)):
        assert got.dtype == torch.float32
        assert ((got.double() - want).abs() <= 4e-7 * want.abs()).all()  # relative: ~3 ulp, as torch.tanh
    small = torch.cat([x[::7][:300], tiny])  # the same formula at every size: chunking moves no bit
    assert torch.equal(_tanh(small, None), _tanh(x, None)[torch.cat([torch.arange(0, 2100, 7), torch.arange(20001, 20302)])])
    assert _tanh(torch.tensor([-0.0]), None).signbit().item()
    assert out.abs().max().item() <= 1.0 and _tanh(x, out) is out
    ends = _tanh(torch.tensor([float("inf"), -float("inf"), float("nan")]), None)
    assert ends[:2].tolist() == [1.0, -1.0] and ends[2].isnan()
    # float64 keeps torch's kernel: bitwise equal
    assert torch.equal(_tanh(x.double(), None), torch.tanh(x.double()))
    # every element gets the same bits at any offset and length of the block (SIMD body or tail)
    for start in (0, 1, 5, 13):
        for n in (1, 3, 15, 16, 17, 31, 1000):
            assert torch.equal(_tanh(x[start : start + n].clone(), None), _tanh(x, None)[start : start + n])
    # a tensor NumPy cannot see (autograd) takes the five passes, still within the bound
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        got = _tanh(xg, None)
    assert ((got.double() - want).abs() <= 4e-7 * want.abs()).all()


@pytest.mark.parametrize("vector512", [True, False])
def test_numpy_tanh_is_chosen_by_its_build_only(monkeypatch, vector512):
    """The first float32 tanh decides once, by what NumPy's build says of this CPU (not by a
    timing): NumPy's loop where it is an AVX-512 one, torch's five passes elsewhere."""
    from jaccli.jets import elementwise

    monkeypatch.setattr(elementwise, "NUMPY_TANH", None)
    monkeypatch.setattr(elementwise, "_numpy_tanh_is_vector512", lambda: vector512)
    calls = []
    real = elementwise.np.tanh
    monkeypatch.setattr(elementwise.np, "tanh", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.linspace(-3, 3, 64)
    got = elementwise._tanh(x, None)
    assert elementwise.NUMPY_TANH is vector512 and bool(calls) is vector512
    torch.testing.assert_close(got, torch.tanh(x), rtol=4e-7, atol=1e-7)


def test_float32_hessian_of_tanh_near_zero_keeps_its_relative_accuracy():
    """u = tanh(w·x) at w·x ≈ 1e-5: its Hessian -2u(1-u²)wwᵀ is as small as u, so an absolute
    error of the activation (≈ 2e-7) would be a relative 2 % of it."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Tanh()).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, -2.0]], dtype=torch.float64))
        net[0].bias.zero_()
    x = torch.tensor([[1e-5, 1e-5], [2e-4, -1e-4], [0.3, 0.1]], dtype=torch.float64)
    want = jaccli.hessian(net, x, per_sample=True, mode="forward")
    got = jaccli.hessian(net.float(), x.float(), per_sample=True, mode="forward").double()
    assert ((got - want).abs() <= 1e-6 * want.abs()).all()


def test_float32_tanh_mlp_derivatives_match_float64():
    net = tanh_mlp((2, 16, 16, 3), seed=4)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want_j = jaccli.jacobian(net, x, per_sample=True, mode="forward")
    want_h = jaccli.hessian(net, x, per_sample=True, mode="forward")
    net32, x32 = net.float(), x.float()
    assert (jaccli.jacobian(net32, x32, per_sample=True, mode="forward").double() - want_j).abs().max() <= 2e-5 * want_j.abs().max()
    assert (jaccli.hessian(net32, x32, per_sample=True, mode="forward").double() - want_h).abs().max() <= 2e-5 * want_h.abs().max()


@pytest.mark.parametrize("pairs", [
    ([0, 0, 1], [0, 1, 1]),  # the upper triangle of two directions: two runs
    ([0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]),
    ([2, 0, 1, 0], [2, 1, 2, 0]),  # scattered: one run per pair
])
@pytest.mark.parametrize("gather_below", [0, 10**9], ids=["runs", "small-gathered"])
def test_pair_runs_give_the_gathered_square(pairs, gather_below, monkeypatch):
    from jaccli.jets import jet
    from jaccli.jets.jet import _Call

    monkeypatch.setattr(jet, "_GATHER_BELOW", gather_below)  # blocks this small are gathered by default
    i, j = (torch.tensor(p) for p in pairs)
    d1 = torch.randn(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cx = _Call((1, 3, len(pairs[0])), (i, j), 5)
    assert cx.runs is not None and sum(r1 - r0 for r0, r1, _, _ in cx.runs) == len(pairs[0])
    got = cx.square(d1, torch.empty(len(pairs[0]), 5, 4, dtype=torch.float64))
    assert torch.equal(got, d1[i] * d1[j])


def test_many_scattered_pairs_are_gathered():
    from jaccli.jets import jet

    k = jet._MAX_RUNS + 1
    i = torch.arange(k).flip(0)
    cx = jet._Call((1, k, k), (i, i), 2)
    assert cx.runs is None
    d1 = torch.randn(k, 2, 3, dtype=torch.float64)
    assert torch.equal(cx.square(d1, torch.empty(k, 2, 3, dtype=torch.float64)), d1[i] * d1[i])


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "tan", "exp", "expm1"])
def test_ode_recurrence_to_order_six_matches_nested_derivatives(name):
    # past order 4 the recurrence's sums hold several pairs and a middle square at once
    from jaccli.engine.partials import nested_derivative

    fn = getattr(torch, name)
    w = torch.tensor([[0.7, -0.4], [0.3, 0.9]], dtype=torch.float64)

    def g(x):
        return fn(0.5 * x @ w) * 0.8

    z = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 0.5
    v = torch.tensor([[1.0, -0.5]], dtype=torch.float64).expand(5, 2)
    program = taylor.build(g, z, orders=6)
    coeffs = program.series(z, v[None], 6)
    for k in range(1, 7):
        want = nested_derivative(g, z, v, k) / math.factorial(k)
        assert_rel(coeffs[k][0], want)


def test_scalar_constants_are_kept_only_outside_dispatch_modes():
    # a constant made while a mode traces (make_fx for fused kernels, fake tensors) is not kept
    from torch.utils._python_dispatch import TorchDispatchMode

    from jaccli.jets import jet

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    like = torch.zeros(2, dtype=torch.float64)
    with Passthrough():
        first = jet._scalar(0.123, like)
    assert (0.123, torch.float64, like.device) not in jet._SCALARS
    kept = jet._scalar(0.123, like)
    assert kept is jet._scalar(0.123, like) and kept is not first
    assert kept.dim() == 0 and kept.dtype == torch.float64 and float(kept) == 0.123


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "tan", "exp", "expm1"])
def test_ode_polynomials_match_their_coefficients(name):
    # f′ and f″ of the ODE ops by one add/addcmul per degree, against the polynomial summed plainly
    from jaccli.jets.chain import _horner
    from jaccli.jets.elementwise import _ODES, _ode_polys

    y = torch.linspace(-0.9, 0.9, 11, dtype=torch.float64)
    for poly in _ode_polys(_ODES[name], 3):
        expected = sum(cf * y**k for k, cf in enumerate(poly))
        torch.testing.assert_close(_horner(poly, y), expected, rtol=1e-12, atol=1e-12)


def test_numpys_tanh_steps_aside_for_more_threads_than_it_was_measured_on(monkeypatch):
    # NumPy's loop is one thread: with torch on more threads than NUMPY_TANH_THREADS the five
    # passes (which torch shares out) run, whatever NumPy offers
    from jaccli.jets import elementwise

    calls = []
    monkeypatch.setattr(elementwise, "NUMPY_TANH", True)
    monkeypatch.setattr(elementwise.np, "tanh", lambda *a, **k: calls.append(1))
    x = torch.linspace(-3, 3, 101)
    monkeypatch.setattr(elementwise, "NUMPY_TANH_THREADS", 0)
    got = elementwise._tanh(x, None)
    assert not calls and ((got.double() - torch.tanh(x.double())).abs() <= 4e-7 * torch.tanh(x.double()).abs()).all()
    monkeypatch.setattr(elementwise, "NUMPY_TANH_THREADS", torch.get_num_threads())
    elementwise._tanh(x, None)
    assert calls
