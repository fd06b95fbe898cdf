"""Kernel switches around model calls: recurrent layers leave their fused kernels only where
a probe saw one, and the process-wide flags come back as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jaccli
from jaccli.engine.kernels import differentiable

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a build without oneDNN")


class _SeesFlags(nn.Module):
    """Records whether oneDNN was on at each call, around an optional LSTM."""

    def __init__(self, lstm: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(2, 2, batch_first=True) if lstm else None
        self.fc = nn.Linear(2, 1)
        self.seen: list[bool] = []

    def forward(self, x):  # x [B, 3, 2]
        self.seen.append(torch.backends.mkldnn.enabled)
        h = self.lstm(x)[0] if self.lstm is not None else torch.tanh(x)
        return self.fc(h[:, -1])


@needs_onednn
def test_only_models_that_reach_a_fused_recurrent_kernel_leave_onednn():
    x = torch.randn(4, 3, 2)
    plain, recurrent = _SeesFlags(lstm=False).eval(), _SeesFlags(lstm=True).eval()
    jaccli.hessian(plain, x, per_sample=True)
    assert all(plain.seen)  # a model without recurrent layers keeps oneDNN for its convolutions
    jaccli.hessian(recurrent, x, per_sample=True)
    # the first probe finds mkldnn_rnn_layer; every call after it runs on ATen's cell loop
    assert recurrent.seen[0] and not any(recurrent.seen[1:])
    assert torch.backends.mkldnn.enabled


def test_the_flags_come_back_after_a_failing_call():
    def fails(x):
        assert not torch.backends.mkldnn.enabled and not torch.backends.cudnn.enabled
        raise RuntimeError("boom")

    before = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    with pytest.raises(RuntimeError, match="boom"):
        differentiable(fails, native_rnn=True)(torch.zeros(1))
    assert (torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled) == before
