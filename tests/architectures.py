"""Real architectures as users save them, built here (no downloads): the models of
``tests/test_architectures.py`` and ``benchmarks/architectures.py``.

Each entry of :data:`ZOO` is ``(factory, shape of one point, recurrent)``; every model
maps a float batch ``[B, *shape]`` to ``[B, n]`` (or ``[B, *out]``) with independent
points in eval mode, so per-sample derivatives apply. The attention models use what
real code uses: ``nn.TransformerEncoder`` with and without a key-padding mask held as a
buffer (expanded to the batch inside ``forward``), ``nn.MultiheadAttention``, and BERT-
and GPT-2-style blocks written the way their reference implementations are (GPT-2:
``addmm`` on a flattened view, a causal mask filled in place into the scores with
``masked_fill_``, ``cumsum`` positions).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class BatchNormCNN(nn.Module):
    """Conv → BatchNorm → ReLU → MaxPool, twice, then a linear head (a VGG-style classifier)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Tanh(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(4 * 2 * 2, 3)
        _randomise_norm_stats(self)

    def forward(self, x):  # x [B, 2, 8, 8]
        return self.head(self.body(x).flatten(1))


class GroupNormResidual(nn.Module):
    """A ResNet/diffusion-UNet block: GroupNorm → SiLU → conv, twice, plus the skip."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.n1, self.c1 = nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, padding=1)
        self.out = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):  # x [B, 4, 4, 4]
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        return self.out((x + h).flatten(1))


class CausalConv1d(nn.Module):
    """WaveNet-style gated causal convolutions: left padding, dilation 1 and 2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.convs = nn.ModuleList(nn.Conv1d(2, 4, 2, dilation=d) for d in (1, 2))
        self.res = nn.ModuleList(nn.Conv1d(2, 2, 1) for _ in range(2))

    def forward(self, x):  # x [B, 2, 6]
        for d, conv, res in zip((1, 2), self.convs, self.res):
            h = conv(F.pad(x, (d, 0)))
            a, b = h.chunk(2, dim=1)
            x = x + res(torch.tanh(a) * torch.sigmoid(b))
        return x.flatten(1)


class DepthwiseSeparable(nn.Module):
    """MobileNet-style: depthwise 3×3 (groups = channels) → BatchNorm → Hardswish → pointwise 1×1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(14)
        self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.pw = nn.Conv2d(3, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 2)
        _randomise_norm_stats(self)

    def forward(self, x):  # x [B, 3, 5, 5]
        h = self.pw(F.hardswish(self.bn(self.dw(x))))
        return self.head(torch.tanh(self.pool(h).flatten(1)))


class InstanceNormPool(nn.Module):
    """Conv1d → InstanceNorm1d (affine) → tanh → AdaptiveMaxPool1d to a size the length is no
    multiple of (windows of two sizes) → linear (style-transfer and audio front ends)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(23)
        self.conv = nn.Conv1d(2, 3, 3)
        self.norm = nn.InstanceNorm1d(3, affine=True)
        self.pool = nn.AdaptiveMaxPool1d(2)
        self.head = nn.Linear(6, 2)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):  # x [B, 2, 7]
        return self.head(self.pool(torch.tanh(self.norm(self.conv(x)))).flatten(1))


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (2 layers, GELU), optionally with a key-padding mask that
    hides the last token of every sequence (a buffer expanded to the batch)."""

    def __init__(self, padding_mask: bool = False) -> None:
        super().__init__()
        torch.manual_seed(15)
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.padding_mask = padding_mask
        self.register_buffer("pad", torch.tensor([False, False, True]))

    def forward(self, x):  # x [B, 3, 4]
        mask = self.pad.expand(x.shape[0], -1) if self.padding_mask else None
        return self.encoder(x, src_key_padding_mask=mask)[:, :2].flatten(1)


class MHA(nn.Module):
    """Self-attention by ``nn.MultiheadAttention`` with a residual and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(16)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.ln = nn.LayerNorm(4)

    def forward(self, x):  # x [B, 3, 4]
        a, _ = self.mha(x, x, x, need_weights=False)
        return self.ln(x + a).flatten(1)


class MADE(nn.Module):
    """A masked autoregressive flow (MAF) of two MADE layers with a permutation between:
    ``z = (x - μ(x)) · exp(-α(x))`` with autoregressive masks on the weights."""

    def __init__(self, n: int = 4, hidden: int = 8) -> None:
        super().__init__()
        torch.manual_seed(17)
        self.layers = nn.ModuleList()
        deg_in = torch.arange(1, n + 1)
        deg_h = torch.arange(hidden) % (n - 1) + 1
        for _ in range(2):
            self.layers.append(nn.ModuleList([nn.Linear(n, hidden), nn.Linear(hidden, 2 * n)]))
        self.register_buffer("m1", (deg_h[:, None] >= deg_in[None, :]).double())
        self.register_buffer("m2", (deg_in[:, None] > deg_h[None, :]).double().repeat(2, 1))
        self.register_buffer("perm", torch.arange(n - 1, -1, -1))

    def forward(self, x):  # x [B, 4] -> z [B, 4]
        for l1, l2 in self.layers:
            h = torch.tanh(F.linear(x, l1.weight * self.m1.to(x.dtype), l1.bias))
            mu, alpha = F.linear(h, l2.weight * self.m2.to(x.dtype), l2.bias).chunk(2, dim=1)
            x = ((x - mu) * torch.exp(-torch.tanh(alpha)))[:, self.perm]
        return x


class RealNVP(nn.Module):
    """A RealNVP flow on R⁴: two affine couplings (scale by exp(tanh))."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(18)
        self.nets = nn.ModuleList(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4)) for _ in range(2))

    def forward(self, x):  # x [B, 4]
        for k, net in enumerate(self.nets):
            a, b = (x[:, :2], x[:, 2:]) if k == 0 else (x[:, 2:], x[:, :2])
            s, t = net(a).chunk(2, dim=1)
            b = b * torch.exp(torch.tanh(s)) + t
            x = torch.cat([a, b], 1) if k == 0 else torch.cat([b, a], 1)
        return x


class BertLike(nn.Module):
    """A small BERT: learned position embeddings of ``arange`` positions added to the input
    embeddings, embedding LayerNorm, a post-norm encoder layer written out (q/k/v heads,
    scaled scores plus an additive attention mask, softmax, GELU feed-forward) and a tanh pooler."""

    def __init__(self, tokens: int = 3, dim: int = 4, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(19)
        self.heads = heads
        self.pos = nn.Embedding(tokens, dim)
        self.ln0, self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.pool = nn.Linear(dim, dim)
        self.register_buffer("attention_mask", torch.tensor([1.0, 1.0, 0.0]))

    def split(self, t):
        b, s, d = t.size()
        return t.view(b, s, self.heads, d // self.heads).permute(0, 2, 1, 3)

    def forward(self, x):  # x [B, 3, 4]: input embeddings
        positions = torch.arange(x.size(1), device=x.device).unsqueeze(0).expand(x.size(0), -1)
        h = self.ln0(x + self.pos(positions))
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
        extended = (1.0 - self.attention_mask[None, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        ctx = torch.softmax(scores + extended, dim=-1) @ v
        ctx = ctx.permute(0, 2, 1, 3).contiguous().view(h.size())
        h = self.ln1(h + self.o(ctx))
        h = self.ln2(h + self.ff2(F.gelu(self.ff1(h))))
        return torch.tanh(self.pool(h[:, 0]))


class GPT2Like(nn.Module):
    """A small GPT-2: ``Conv1D`` projections (``addmm`` on a flattened view, shapes read with
    ``size()``), a causal mask from a ``tril`` buffer filled into the scores in place
    (``masked_fill_``), tanh-GELU, pre-norm, positions by ``cumsum`` of ones."""

    def __init__(self, tokens: int = 3, dim: int = 4, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(20)
        self.heads = heads
        self.wpe = nn.Embedding(tokens, dim)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn_w, self.c_attn_b = nn.Parameter(0.5 * torch.randn(dim, 3 * dim)), nn.Parameter(torch.zeros(3 * dim))
        self.c_proj_w, self.c_proj_b = nn.Parameter(0.5 * torch.randn(dim, dim)), nn.Parameter(torch.zeros(dim))
        self.fc_w, self.fc_b = nn.Parameter(0.5 * torch.randn(dim, 4 * dim)), nn.Parameter(torch.zeros(4 * dim))
        self.mp_w, self.mp_b = nn.Parameter(0.5 * torch.randn(4 * dim, dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer("bias", torch.tril(torch.ones(tokens, tokens, dtype=torch.bool)).view(1, 1, tokens, tokens))

    @staticmethod
    def conv1d(x, w, b):
        size_out = x.size()[:-1] + (w.size(-1),)
        return torch.addmm(b, x.view(-1, x.size(-1)), w).view(size_out)

    def heads_of(self, t):
        new = t.size()[:-1] + (self.heads, t.size(-1) // self.heads)
        return t.view(new).permute(0, 2, 1, 3)

    def forward(self, x):  # x [B, 3, 4]: token embeddings
        positions = torch.ones(x.shape[:2], dtype=torch.long, device=x.device).cumsum(1) - 1
        h = x + self.wpe(positions)
        q, k, v = self.conv1d(self.ln1(h), self.c_attn_w, self.c_attn_b).split(h.size(-1), dim=2)
        q, k, v = self.heads_of(q), self.heads_of(k), self.heads_of(v)
        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(v.size(-1))
        t = w.size(-2)
        w.masked_fill_(~self.bias[:, :, :t, :t], torch.finfo(w.dtype).min)
        a = torch.matmul(torch.softmax(w, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        a = a.view(a.size()[:-2] + (a.size(-2) * a.size(-1),))
        h = h + self.conv1d(a, self.c_proj_w, self.c_proj_b)
        m = self.conv1d(F.gelu(self.conv1d(self.ln2(h), self.fc_w, self.fc_b), approximate="tanh"), self.mp_w, self.mp_b)
        h = self.lnf(h + m)
        return h.cumsum(1)[:, -1]  # a running sum over the tokens: a linear read-out


class LSTMNet(nn.Module):
    """An LSTM into a linear head on the last step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.lstm = nn.LSTM(2, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # x [B, 4, 2]
        h, _ = self.lstm(x)
        return self.head(h[:, -1])


class SiLUMLP(nn.Module):
    """A SiLU MLP, 4 → 16 → 16 → 3."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(22)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class _GRUCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(3, 3)

    def forward(self, x):  # the state computed from the input
        return self.cell(x, torch.tanh(x))


def _layers() -> dict:
    """Single layers (with a linear or conv in front where the layer alone is linear):
    name -> (factory, shape of one point)."""
    lin, conv = (lambda: nn.Linear(4, 4)), (lambda: nn.Conv2d(2, 2, 1))
    return {
        "AvgPool1d": (lambda: nn.Sequential(nn.Conv1d(3, 3, 1), nn.Tanh(), nn.AvgPool1d(2)), (3, 8)),
        "AdaptiveAvgPool1d": (lambda: nn.Sequential(nn.Conv1d(3, 3, 1), nn.Tanh(), nn.AdaptiveAvgPool1d(3)), (3, 8)),
        "MaxPool1d": (lambda: nn.Sequential(nn.Conv1d(3, 3, 1), nn.Tanh(), nn.MaxPool1d(2)), (3, 8)),
        "AdaptiveMaxPool2d": (lambda: nn.Sequential(conv(), nn.Tanh(), nn.AdaptiveMaxPool2d(2)), (2, 4, 4)),
        "AvgPool2d": (lambda: nn.Sequential(conv(), nn.Tanh(), nn.AvgPool2d(2)), (2, 4, 4)),
        "ConvTranspose2d": (lambda: nn.Sequential(nn.ConvTranspose2d(2, 2, 3, stride=2), nn.Tanh()), (2, 3, 3)),
        "PixelShuffle": (lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.Tanh(), nn.PixelShuffle(2)), (4, 2, 2)),
        "Upsample": (lambda: nn.Sequential(conv(), nn.Tanh(), nn.Upsample(scale_factor=2, mode="bilinear")), (2, 3, 3)),
        "ZeroPad2d": (lambda: nn.Sequential(conv(), nn.Tanh(), nn.ZeroPad2d(1)), (2, 3, 3)),
        "ReflectionPad1d": (lambda: nn.Sequential(nn.Conv1d(2, 2, 1), nn.Tanh(), nn.ReflectionPad1d(1)), (2, 4)),
        "Conv3d": (lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh()), (1, 3, 3, 3)),
        "PReLU": (lambda: nn.Sequential(lin(), nn.PReLU(4), lin(), nn.Tanh()), (4,)),
        "LeakyReLU": (lambda: nn.Sequential(lin(), nn.LeakyReLU(), lin(), nn.Tanh()), (4,)),
        "ELU": (lambda: nn.Sequential(lin(), nn.ELU()), (4,)),
        "Softplus": (lambda: nn.Sequential(lin(), nn.Softplus()), (4,)),
        "Mish": (lambda: nn.Sequential(lin(), nn.Mish()), (4,)),
        "BatchNorm1d": (lambda: nn.Sequential(lin(), nn.Tanh(), nn.BatchNorm1d(4)), (4,)),
        "InstanceNorm2d": (lambda: nn.Sequential(conv(), nn.Tanh(), nn.InstanceNorm2d(2, affine=True)), (2, 3, 3)),
        "LayerNorm": (lambda: nn.Sequential(nn.LayerNorm(4), nn.Tanh()), (3, 4)),
        "GRUCell": (_GRUCell, (3,)),
        "Dropout": (lambda: nn.Sequential(lin(), nn.Tanh(), nn.Dropout(0.1)), (4,)),
        "Unflatten": (lambda: nn.Sequential(nn.Flatten(), nn.Unflatten(1, (2, 6)), nn.Tanh()), (3, 4)),
    }


#: name -> (factory, shape of one point)
LAYERS = _layers()


def _randomise_norm_stats(module: nn.Module) -> None:
    """Running statistics away from (0, 1), so that eval-mode BatchNorm is not the identity."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


#: name -> (factory, shape of one point, recurrent)
ZOO = {
    "batchnorm_cnn": (BatchNormCNN, (2, 8, 8), False),
    "groupnorm_residual": (GroupNormResidual, (4, 4, 4), False),
    "causal_conv1d": (CausalConv1d, (2, 6), False),
    "depthwise_separable": (DepthwiseSeparable, (3, 5, 5), False),
    "instance_norm_pool": (InstanceNormPool, (2, 7), False),
    "encoder": (Encoder, (3, 4), False),
    "encoder_padding_mask": (lambda: Encoder(padding_mask=True), (3, 4), False),
    "multihead_attention": (MHA, (3, 4), False),
    "maf": (MADE, (4,), False),
    "realnvp": (RealNVP, (4,), False),
    "bert": (BertLike, (3, 4), False),
    "gpt2": (GPT2Like, (3, 4), False),
    "silu_mlp": (SiLUMLP, (4,), False),
    "lstm": (LSTMNet, (4, 2), True),
}


def trace(name: str, batch: int = 2, dtype: torch.dtype = torch.float32):
    """``torch.jit.trace`` of the model at ``batch`` points (as users save them), and the eager module."""
    import warnings

    factory, shape, _ = ZOO[name]
    module = factory().eval().to(dtype)
    example = torch.randn(batch, *shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, example, check_trace=False), module
