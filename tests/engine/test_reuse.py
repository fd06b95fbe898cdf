"""Reuse across chunks and calls: the workspace of a computation, and programs kept per model.

Every result is compared with torch.func in float64 (the fast path off): reuse must
change no number, only what is allocated and recorded.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jaccli
from jaccli.engine import memo, planner, programs
from jaccli.jets import program as program_module
from jaccli.jets.workspace import Workspace
from compare import assert_rel, torch_func
from problems import tanh_mlp


pytestmark = pytest.mark.usefixtures("fresh_programs")


def _points(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_workspace_reuses_only_buffers_nothing_refers_to():
    w, like = Workspace(), torch.empty(1)
    a = w.empty((64, 1024), torch.float32, like)
    view = a[3:]
    del a
    b = w.empty((64, 1024), torch.float32, like)  # a's buffer is still viewed: a new one
    assert w.reused == 0 and w.allocated == 2 * 64 * 1024 * 4
    assert b.data_ptr() != view.data_ptr() - 3 * 1024 * 4
    del view, b
    c = w.empty((32, 1024), torch.float32, like)  # smaller fits a free one
    assert w.reused == 1 and w.allocated == 2 * 64 * 1024 * 4 and c.shape == (32, 1024)
    tiny = w.empty((4,), torch.float32, like)  # below the threshold: plain allocation
    assert w.reused == 1 and tiny.shape == (4,)


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian"])
def test_many_chunks_through_one_workspace_match_torch_func(kind):
    f, x = tanh_mlp((3, 64, 64, 2)), _points(300, 3)
    got = getattr(jaccli, kind)(f, x, per_sample=True, mode="forward", chunk_size=7)
    assert_rel(got, torch_func(kind, f, x, per_sample=True, mode="forward", chunk_size=7))


def torch_func_partials(f, x):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planner, "FAST_PATH", False)
        return jaccli.partials(f, x, ["u_xxxx", "u_xy", "u_xxy"], inputs="x,y", per_sample=True)


def test_series_coefficients_kept_by_the_caller_are_not_overwritten():
    f, x = tanh_mlp((2, 64, 64, 1)), _points(200, 2)
    d = jaccli.partials(f, x, ["u_xxxx", "u_xy", "u_xxy"], inputs="x,y", per_sample=True, chunk_size=9)
    ref = torch_func_partials(f, x)
    for name in ("u_xxxx", "u_xy", "u_xxy"):
        assert_rel(d[name], ref[name])


def test_a_model_called_again_reuses_its_program():
    f, x = tanh_mlp((2, 16, 16, 1)), _points(20, 2)
    first = jaccli.hessian(f, x, per_sample=True, mode="forward")
    again = jaccli.hessian(f, _points(20, 2, seed=1), per_sample=True, mode="forward")
    assert programs.STATS["built"] == 1 and programs.STATS["hits"] >= 1
    assert_rel(first, torch_func("hessian", f, x, per_sample=True, mode="forward"))
    assert_rel(again, torch_func("hessian", f, _points(20, 2, seed=1), per_sample=True, mode="forward"))


def test_other_shapes_orders_and_models_record_anew():
    f, x = tanh_mlp((2, 16, 16, 1)), _points(20, 2)
    jaccli.jacobian(f, x, per_sample=True, mode="forward")
    jaccli.hessian(f, x, per_sample=True, mode="forward")  # order 2: another program
    jaccli.hessian(f.float(), x.float(), per_sample=True, mode="forward")  # another dtype
    jaccli.hessian(tanh_mlp((2, 16, 16, 1)), x, per_sample=True, mode="forward")  # another model
    assert programs.STATS["hits"] == 0


def test_an_in_place_update_of_the_weights_is_not_served_a_stale_program():
    f, x = tanh_mlp((2, 16, 16, 1)), _points(20, 2)
    jaccli.hessian(f, x, per_sample=True, mode="forward")
    with torch.no_grad():
        for prm in f.parameters():
            prm.mul_(1.5)  # as an optimizer step does: same tensors, new values
    built = programs.STATS["built"]
    got = jaccli.hessian(f, x, per_sample=True, mode="forward")
    assert programs.STATS["built"] == built + 1
    assert_rel(got, torch_func("hessian", f, x, per_sample=True, mode="forward"))


class _BufferFirst(nn.Module):
    """A float64 buffer ahead of float32 parameters, a shared layer, a child's buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(3, dtype=torch.float64))
        self.a = nn.Linear(3, 3)
        self.b = self.a
        self.norm = nn.BatchNorm1d(3)


@pytest.mark.parametrize("make", [_BufferFirst, lambda: nn.Sequential(), lambda: tanh_mlp((2, 4, 1))])
def test_the_state_walk_sees_what_the_key_needs(make):
    # one walk gives the cache key and the model's dtype: the dtype is load.models.model_dtype's
    # answer, and any in-place change of a parameter or buffer, or train()/eval(), changes the key
    from jaccli.load.models import model_dtype

    m = make()
    before, dtype = memo.state_and_dtype(m)
    assert dtype == model_dtype(m) and before == memo.state(m)
    tensors = [*m.parameters(), *m.buffers()]
    for t in tensors:
        with torch.no_grad():
            t.add_(0)  # the same values, a new version
        assert memo.state(m) != before
        before = memo.state(m)
    m.train(not m.training)
    assert memo.state(m) != before


class _Switch(nn.Module):
    """A Python flag the key cannot see changes the function: the recheck must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 8).double()
        self.square = False

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return (h * h if self.square else h).sum(1, keepdim=True)


def test_a_change_the_key_cannot_see_is_caught_by_the_recheck():
    f, x = _Switch(), _points(20, 2)
    jaccli.hessian(f, x, per_sample=True, mode="forward")
    f.square = True
    got = jaccli.hessian(f, x, per_sample=True, mode="forward")
    assert programs.STATS["hits"] == 0 and programs.STATS["built"] == 2
    assert_rel(got, torch_func("hessian", f, x, per_sample=True, mode="forward"))


class _Permuted(nn.Module):
    """``tanh(x)[:, perm]`` by a buffer of indices: the Taylor rule selects by ``index_select``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).double()
        self.register_buffer("perm", torch.tensor([2, 0, 1]))

    def forward(self, x):
        return torch.tanh(self.lin(x))[:, self.perm] * x


def test_an_index_made_negative_through_data_still_selects_the_same_entries():
    # the same permutation written with negative indices, through .data (the version stays):
    # the key and the recheck see nothing, and index_select takes no negative index
    f, x = _Permuted(), _points(20, 3)
    jaccli.laplacian(f, x, per_sample=True, mode="forward")
    f.perm.data.copy_(torch.tensor([-1, -3, -2]))
    for kind in ("laplacian", "hessian"):
        got = getattr(jaccli, kind)(f, x, per_sample=True, mode="forward")
        assert_rel(got, torch_func(kind, f, x, per_sample=True, mode="forward"))
    assert programs.STATS["hits"] >= 1


def test_plain_functions_are_not_kept():
    f = tanh_mlp((2, 16, 1))
    x = _points(10, 2)
    for _ in range(2):
        jaccli.jacobian(lambda z: f(z), x, per_sample=True, mode="forward")
    assert programs.STATS["hits"] == 0 and programs.STATS["built"] == 2


def test_one_kept_program_in_two_threads_at_once():
    from concurrent.futures import ThreadPoolExecutor

    f = tanh_mlp((2, 64, 64, 3))
    xs = [_points(400, 2, seed=s) for s in range(4)]
    jaccli.hessian(f, xs[0], per_sample=True, mode="forward")  # recorded once, then shared
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda x: jaccli.hessian(f, x, per_sample=True, mode="forward", chunk_size=16), xs))
    assert programs.STATS["built"] == 1
    for x, h in zip(xs, got):
        assert_rel(h, torch_func("hessian", f, x, per_sample=True, mode="forward"))


def test_a_program_goes_with_its_model():
    import gc

    f = tanh_mlp((2, 16, 1))
    jaccli.jacobian(f, _points(10, 2), per_sample=True, mode="forward")
    assert len(programs._CACHE) == 1
    del f
    gc.collect()
    assert len(programs._CACHE) == 0


def test_a_kept_program_is_verified_once_then_only_its_values_are_checked(monkeypatch):
    """The derivatives are checked against autograd when a program is recorded, not on every
    reuse (that was half of a small request's time); the reused program stays exact."""
    from jaccli.jets import builder

    calls = {"verify": 0, "recheck": 0}
    verify, recheck = builder._verify, builder.recheck

    def counted_verify(*a, **k):
        calls["verify"] += 1
        return verify(*a, **k)

    def counted_recheck(*a, **k):
        calls["recheck"] += 1
        return recheck(*a, **k)

    monkeypatch.setattr(builder, "_verify", counted_verify)
    monkeypatch.setattr(programs.jets, "recheck", counted_recheck)
    f = tanh_mlp((2, 16, 16, 1))
    for seed in range(3):
        x = _points(20, 2, seed=seed)
        got = jaccli.laplacian(f, x, per_sample=True, mode="forward")
        assert_rel(got, torch_func("laplacian", f, x, per_sample=True, mode="forward"))
    assert calls == {"verify": 1, "recheck": 2}
    assert programs.STATS["built"] == 1 and programs.STATS["hits"] == 2


def test_a_model_called_again_is_not_probed_again():
    """The recorded probe (ops, memory, output shape) of a model called again with the same
    per-point shapes is recalled; other requests and updated weights are probed anew."""
    f = tanh_mlp((2, 16, 3))
    xs = [_points(20, 2), _points(33, 2, seed=1)]  # another N: the same per-point shapes
    got = [jaccli.laplacian(f, x, per_sample=True) for x in xs]
    assert memo.STATS == {"hits": 1, "probed": 1}
    jaccli.laplacian(f, xs[0], per_sample=True, select=0)  # another request
    with torch.no_grad():
        f[0].weight.mul_(2.0)  # the same tensors, new values
    updated = jaccli.laplacian(f, xs[0], per_sample=True)
    assert memo.STATS == {"hits": 1, "probed": 3}
    assert_rel(updated, torch_func("laplacian", f, xs[0], per_sample=True))
    with torch.no_grad():
        f[0].weight.mul_(0.5)
    for x, lap in zip(xs, got):
        assert_rel(lap, torch_func("laplacian", f, x, per_sample=True))


class _Wide(nn.Module):
    """A Python flag the key cannot see changes the output's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 4).double()
        self.both = False

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return torch.cat([h, h * h], 1) if self.both else h


def test_a_recalled_probe_whose_output_shape_changed_is_probed_again():
    f, x = _Wide(), _points(10, 2)
    jaccli.jacobian(f, x, per_sample=True)
    f.both = True
    got = jaccli.jacobian(f, x, per_sample=True)
    assert got.shape == (10, 8, 2) and memo.STATS["probed"] == 2
    assert_rel(got, torch_func("jacobian", f, x, per_sample=True))


class _Flagged(nn.Module):
    """Python flags the key cannot see: one mixes the batch, one transposes the output, one
    makes the model fail."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 6).double()
        self.mix = self.transpose = self.broken = False

    def forward(self, x):
        if self.broken:
            raise TypeError("a model broken by its flag")
        h = torch.tanh(self.lin(x))
        h = h - h.mean(0) if self.mix else h
        return h.reshape(-1, 3, 2) if self.transpose else h.reshape(-1, 2, 3)


def test_a_recalled_probe_still_checks_batch_independence():
    """The batch check of a recalled probe also confirms its output shape (one forward): it
    still refuses a model that now mixes the batch."""
    from jaccli.errors import ModelError

    f, x = _Flagged(), _points(10, 2)
    jaccli.jacobian(f, x, per_sample=True)
    f.mix = True
    with pytest.raises(ModelError, match="mixes batch elements"):
        jaccli.jacobian(f, x, per_sample=True)
    assert memo.STATS == {"hits": 1, "probed": 1}


def test_a_recalled_probe_whose_output_is_transposed_is_probed_again():
    """The same number of outputs in another shape is another output: probed anew."""
    f, x = _Flagged(), _points(10, 2)
    jaccli.jacobian(f, x, per_sample=True)
    f.transpose = True
    got = jaccli.jacobian(f, x, per_sample=True)
    assert got.shape == (10, 3, 2, 2) and memo.STATS["probed"] == 2
    assert_rel(got, torch_func("jacobian", f, x, per_sample=True))


def test_a_recalled_model_that_now_fails_gets_the_probes_error():
    """A model that fails on the recalled path's forward is probed anew, which reports the
    failure as one ModelError, not a traceback."""
    from jaccli.errors import ModelError

    f, x = _Flagged(), _points(10, 2)
    jaccli.laplacian(f, x, per_sample=True)
    f.broken = True
    with pytest.raises(ModelError, match="a model broken by its flag"):
        jaccli.laplacian(f, x, per_sample=True)
    assert memo.STATS["hits"] == 1  # recalled, then probed anew (a failed probe is not kept)


class _Coupled(nn.Module):
    """A Python flag the key cannot see couples the points: through the gradient (``grad``),
    through batch statistics without one (``stats``), or by ``tiny`` (a coupling far below
    the recheck's tolerance)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 6).double()
        self.grad = self.stats = False
        self.tiny = 0.0

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if self.grad:
            h = h - h.mean(0)
        if self.stats:
            h = h / h.detach().norm(dim=0)
        return (h + self.tiny * h.sum(0)).sum(1, keepdim=True)


def _counting_batch_checks(monkeypatch) -> list:
    from jaccli.engine import probe

    ran = []
    check = probe.check_batch_independence

    def counted(problem, rows):
        ran.append(rows.numel())
        return check(problem, rows)

    monkeypatch.setattr(probe, "check_batch_independence", counted)
    return ran


def test_a_kept_program_vouches_for_the_batch_check_of_a_model_called_again(monkeypatch):
    """A repeated call whose kept program passes the recheck does not run the batch check:
    the program's model passed it when it was recorded, and the model still computes that
    function on the probe rows. Where nothing vouches, the check runs: the first call, another
    order (a new program), torch.func's engine, a program recorded without the check (once:
    its passing vouches from then on), and a single point (the probe's rows repeat it)."""
    ran = _counting_batch_checks(monkeypatch)
    f, x = _Coupled(), _points(20, 2)
    jaccli.laplacian(f, x, per_sample=True)
    assert ran == [8]
    jaccli.laplacian(f, _points(20, 2, seed=1), per_sample=True)
    jaccli.hessian(f, x, per_sample=True, mode="forward")  # order 2 too: the same program
    assert ran == [8] and programs.STATS["hits"] == 2
    jaccli.jacobian(f, x, per_sample=True, mode="forward")  # order 1: recorded now, checked now
    jaccli.jacobian(f, x, per_sample=True, mode="forward")  # ... and vouched for from then on
    jaccli.jacobian(f, x, per_sample=True, mode="reverse")  # torch.func: no program
    assert ran == [8, 8, 8]
    g = _Coupled()
    jaccli.laplacian(g, x, per_sample=True, check_batch=False)  # recorded unchecked
    jaccli.laplacian(g, x, per_sample=True)  # checked now: vouched for from then on
    jaccli.laplacian(g, x, per_sample=True)
    assert ran == [8, 8, 8, 8]
    jaccli.laplacian(f, x[:1], per_sample=True)
    jaccli.laplacian(f, x[:1], per_sample=True)
    assert ran == [8, 8, 8, 8, 2, 2]


@pytest.mark.parametrize("flag", ["grad", "stats"])
@pytest.mark.parametrize("kind", ["laplacian", "jacobian"])
def test_a_kept_programs_model_that_now_couples_the_points_is_refused(flag, kind):
    """The coupling changes the values on the probe rows: the recheck records the model anew,
    and then nothing vouches for it; the batch check runs and refuses it."""
    from jaccli.errors import ModelError

    f, x = _Coupled(), _points(20, 2)
    getattr(jaccli, kind)(f, x, per_sample=True, mode="forward")
    getattr(jaccli, kind)(f, x, per_sample=True, mode="forward")
    setattr(f, flag, True)
    with pytest.raises(ModelError, match="mixes batch elements"):
        getattr(jaccli, kind)(f, x, per_sample=True, mode="forward")


def test_what_a_vouched_call_no_longer_refuses_a_coupling_below_the_rechecks_tolerance():
    """The narrowing, pinned (docs/reuse.md): a coupling a Python flag adds after the program
    was kept, too small to move the probe rows' values past the recheck's tolerance (1e-7
    relative in float64), is no longer refused on a repeated call; the batch check itself
    (run on a fresh model, or with the program forgotten) refuses it."""
    from jaccli.errors import ModelError

    f, x = _Coupled(), _points(20, 2)
    jaccli.laplacian(f, x, per_sample=True)
    f.tiny = 1e-10
    jaccli.laplacian(f, x, per_sample=True)  # vouched for by the kept program
    programs.clear()
    with pytest.raises(ModelError, match="mixes batch elements"):
        jaccli.laplacian(f, x, per_sample=True)


def test_partials_are_vouched_for_and_refuse_a_model_that_now_couples(monkeypatch):
    from jaccli.errors import ModelError

    ran = _counting_batch_checks(monkeypatch)
    f, x = _Coupled(), _points(20, 2)
    first = jaccli.partials(f, x, "y_xx", inputs="x,t", outputs="y", per_sample=True)
    again = jaccli.partials(f, x, "y_xx", inputs="x,t", outputs="y", per_sample=True)
    assert ran == [8] and programs.STATS["hits"] == 1
    assert_rel(again["y_xx"], first["y_xx"])
    assert_rel(first["y_xx"][:, 0], torch_func("hessian", f, x, per_sample=True)[:, 0, 0, 0])
    f.grad = True
    with pytest.raises(ModelError, match="mixes batch elements"):
        jaccli.partials(f, x, "y_xx", inputs="x,t", outputs="y", per_sample=True)


def test_a_program_keeps_its_workspace_for_its_next_computation(monkeypatch):
    # a computation of one pass would page-fault its buffers afresh on every call
    made = []
    init = Workspace.__init__

    def counted(self):
        init(self)
        made.append(self)

    monkeypatch.setattr(Workspace, "__init__", counted)
    f, x = tanh_mlp((3, 64, 64, 2), dtype=torch.float32), torch.randn(2000, 3, generator=torch.Generator().manual_seed(1))
    first = jaccli.laplacian(f, x, per_sample=True, mode="forward")
    kept = first.clone()
    assert made and made[-1].allocated > 0
    count, held = len(made), made[-1].allocated
    second = jaccli.laplacian(f, x, per_sample=True, mode="forward")
    assert len(made) == count and made[-1].allocated == held and made[-1].reused > 0
    assert torch.equal(first, kept) and torch.equal(second, first)  # the first result was not written over
    monkeypatch.setattr(program_module, "KEEP_BYTES", 0)  # past the bound: let go, the next call starts anew
    jaccli.laplacian(f, x, per_sample=True, mode="forward")
    jaccli.laplacian(f, x, per_sample=True, mode="forward")
    assert len(made) == count + 1  # the kept one served the first of the two
