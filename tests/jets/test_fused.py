"""Fused Taylor kernels (jaccli.jets.fused): the functional chain rule against the eager rules
and closed forms, one small compiled program, the fall-back on a failed compile, and the
policy's decisions with injected costs (no timing)."""

from __future__ import annotations

import shutil

import pytest
import torch

import jaccli
from jaccli.jets import fused
from jaccli.jets.jet import Jet, Layout, _Call
from jaccli.jets.table import RULES
from problems import tanh_mlp

HAS_COMPILER = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def _cx(mode: str, order: int, b: int):
    if mode == "pairs":
        i, j = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])
        return _Call((1, 2, 3), (i, j), b)
    if mode == "collapsed":
        return _Call((1, 3, 1), None, b, collapsed=True)
    return _Call((1, *(2,) * order), None, b)


CASES = [("pairs", 2), ("collapsed", 2), ("series", 2), ("series", 4)]


@pytest.mark.parametrize("name", sorted(fused.ODES))
@pytest.mark.parametrize("mode,order", CASES)
@pytest.mark.parametrize("affine", [False, True], ids=["full", "affine-input"])
@pytest.mark.parametrize("value", [True, False], ids=["value", "no-value"])
def test_functional_kernel_is_the_eager_rule(name, mode, order, affine, value):
    """The kernel's Python (uncompiled) against the eager rule in float64, every ODE op and mode,
    an input with and without rows of order ≥ 2, an output with and without its value row."""
    b, f = 3, 4
    cx = _cx(mode, order, b)
    top = len(cx.counts) - 1
    x_lay = Layout(True, True, *([not affine] * (top - 1)))
    g = torch.Generator().manual_seed(0)
    x = Jet(0.5 * torch.randn(x_lay.rows(cx.counts), b, f, generator=g, dtype=torch.float64), x_lay, cx.counts)
    lay = Layout(value, *([True] * top))
    want = RULES[name].fn(cx, lay, x).t
    key = fused.kernel_key(name, cx, lay, x)
    assert key is not None
    out = torch.empty_like(want)
    fused._kernel(key)(out, *[x.block(k) for k in range(top + 1) if x.block(k) is not None])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_not_fused():
    cx = _Call((1, 1), None, 2)
    x = Jet(torch.zeros(2, 2, 3), Layout(True, True), cx.counts)
    assert fused.kernel_key("sin", cx, Layout(True, True), x) is None  # not an ODE op
    assert fused.kernel_key("tanh", cx, Layout(True, True), Jet(torch.zeros(1, 2, 3), Layout(True), cx.counts)) is None
    ints = Jet(torch.zeros(2, 2, 3, dtype=torch.int64), Layout(True, True), cx.counts)
    assert fused.kernel_key("tanh", cx, Layout(True, True), ints) is None


# ----------------------------------------------------------------- the policy (costs injected)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused, "_WARM", {})
    monkeypatch.setattr(fused, "COLD_S", 10.0)
    monkeypatch.setattr(fused, "WARM_S", 1.0)
    monkeypatch.setattr(fused, "IMPORT_S", 0.0)
    return tmp_path


def test_should_compile_is_ski_rental():
    assert not fused.should_compile("auto", 0.9, 1.0)
    assert fused.should_compile("auto", 1.0, 1.0)
    assert fused.should_compile("on", 0.0, 1e9) and fused.should_compile(True, 0.0, 1e9)
    assert not fused.should_compile("off", 1e9, 0.0) and not fused.should_compile(False, 1e9, 0.0)


def test_predicted_cost_warm_where_the_cache_holds_the_key(cache):
    keys = {("tanh", 1), ("tanh", 2)}
    assert fused.predicted_cost(keys) == 20.0
    marker = fused.cache_marker(("tanh", 1))
    assert marker.is_relative_to(cache)
    marker.parent.mkdir(parents=True)
    marker.touch()
    fused._WARM.clear()
    assert fused.predicted_cost(keys) == 11.0


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fused.cache_dir() == tmp_path / "jaccli" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "t"))
    assert fused.cache_dir() == tmp_path / "t"


def test_auto_turns_on_once_the_eager_time_pays_for_the_compile(cache, monkeypatch):
    """Chunks observe the keys they meet and add their time; the fuser turns active after the
    chunk whose time brings the ledger to the predicted cost (the clock is injected)."""
    clock = iter(range(0, 1000, 4))  # each chunk takes 4 "seconds"
    monkeypatch.setattr(fused.time, "perf_counter", lambda: float(next(clock)))
    spent: dict = {}
    fz = fused.fuser("auto", 8, spent)
    assert not fz.active
    seen = []
    for _ in range(3):
        with fz.chunk():
            fz.seen.add(("tanh", "key"))  # what a pass through a tanh step notes
        seen.append(fz.active)
    assert seen == [False, False, True]  # 4 s, 8 s < 10 s; 12 s ≥ 10 s
    assert spent["s"] == 12.0
    # the ledger is the program's: a later computation starts compiled
    assert fused.fuser("auto", 8, spent).active
    assert not fused.fuser("off", 8, spent).active
    assert fused.fuser("on", 8, {}).active


def test_auto_goes_back_to_eager_where_fused_passes_are_not_faster(cache, monkeypatch):
    """After PROGRAM_CHUNKS fused full chunks whose median is above PROGRAM_MARGIN of the eager
    median, the program is eager for good, and the note says so (durations injected)."""
    monkeypatch.setattr(fused, "PROGRAM_MARGIN", 0.95)
    monkeypatch.setattr(fused, "PROGRAM_CHUNKS", 3)
    spent: dict = {}
    fz = fused.fuser("auto", 8, spent)
    fz.seen.add(("tanh", "key"))
    fz._account(6.0, True, False)  # one eager chunk of 6 s: 6 < 10 s predicted
    assert not fz.active
    fz._account(6.0, True, False)  # 12 s ≥ 10 s: compile from the next chunk on
    assert fz.active
    fz._account(9.0, True, True)  # the chunk that compiled is not timed
    fz._account(5.9, False, False)  # nor a short last chunk
    assert "fused" not in spent
    for _ in range(2):
        fz._account(5.9, True, False)
        assert fz.active  # fewer than three fused chunks: not judged yet
    fz._account(5.9, True, False)  # 5.9 > 0.95 × 6: back to eager
    assert not fz.active and spent["rejected"]
    assert "0.98× the eager ones" in fz.note()
    assert not fused.fuser("auto", 8, spent).active
    faster: dict = {"keys": {("tanh", "key")}, "s": 12.0, "eager": [6.0]}
    fz = fused.fuser("auto", 8, faster)
    for _ in range(5):
        fz._account(3.0, True, False)
    assert fz.active and not faster.get("rejected")


def test_auto_prices_only_the_kernels_a_pass_meets(cache, fresh_programs, monkeypatch):
    """The ``first-rows`` fold computes the first activation itself, kernels on or off: ``auto``
    prices the second layer's tanh only, where the program with no folds meets both
    (compiling never pays here: 10 s a key)."""
    from jaccli.jets import fold

    priced: list[set] = []
    predicted = fused.predicted_cost
    monkeypatch.setattr(fused, "predicted_cost", lambda keys: priced.append(set(keys)) or predicted(keys))
    monkeypatch.setattr(fold, "MAX_FOLDED_BYTES", 0)  # the first layer by first-rows
    net = tanh_mlp((3, 16, 16, 1), dtype=torch.float32, seed=2)
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(2))

    def keys(folds: dict) -> set:
        monkeypatch.setattr(fold, "FOLDS", folds)
        priced.clear()
        jaccli.hessian(net, x, per_sample=True, mode="forward", chunk_size=6)
        from jaccli.engine import programs

        programs.clear()
        return set().union(*priced)

    with_folds, without = keys(dict(fold.FOLDS)), keys({})
    assert len(without) == 2 and with_folds < without and len(with_folds) == 1


def test_compile_choice_is_checked():
    with pytest.raises(jaccli.UsageError):
        jaccli.laplacian(torch.tanh, torch.zeros(3, 2), per_sample=True, compile="sometimes")


# ----------------------------------------------------------------- compiled programs


def _net(monkeypatch):
    """One tanh layer, its activation left to the rules (a fold would compute it with no kernel)."""
    from jaccli.jets import fold

    monkeypatch.setattr(fold, "FOLDS", {})
    return tanh_mlp((1, 8, 1), seed=3)


def _closed_form_hessian(net, x):
    """``u = w₂ᵀ tanh(w₁ x + b₁) + b₂``: ``u″ = Σ w₂ᵢ w₁ᵢ² tanh″(aᵢ)``, ``tanh″ = -2 t (1 - t²)``."""
    w1, b1, w2 = net[0].weight[:, 0], net[0].bias, net[2].weight[0]
    t = torch.tanh(x * w1 + b1)
    return ((w2 * w1**2) * (-2 * t * (1 - t * t))).sum(-1)


def test_a_failed_compile_runs_eager_with_a_note(failing_compile, monkeypatch):
    net, x = _net(monkeypatch), torch.linspace(-1, 1, 7, dtype=torch.float64)[:, None]
    with fused.collect_notes() as notes:
        got = jaccli.hessian(net, x, per_sample=True, mode="forward", compile="on")
    torch.testing.assert_close(got.reshape(-1), _closed_form_hessian(net, x).detach(), rtol=1e-10, atol=1e-12)
    assert len(notes) == 1 and "failed, ran eager: RuntimeError: no C++ compiler here" in notes[0]


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler for inductor")
def test_compiled_program_matches_eager_and_the_closed_form(monkeypatch, tmp_path):
    """One tiny compiled kernel (one tanh layer, float64): the chunks of 4 points run fused,
    the last chunk of 3 eager; both agree with the eager pass and the closed form."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused, "_KERNELS", {})
    monkeypatch.setattr(fused, "_WHY", {})
    monkeypatch.setattr(fused, "MARGIN", float("inf"))  # keep the kernel however fast it is
    net, x = _net(monkeypatch), torch.linspace(-1, 1, 11, dtype=torch.float64)[:, None]
    with fused.collect_notes() as notes:
        got = jaccli.hessian(net, x, per_sample=True, mode="forward", chunk_size=4, compile="on")
    eager = jaccli.hessian(net, x, per_sample=True, mode="forward", chunk_size=4, compile="off")
    assert "2 pass(es) through them, 1 compiled" in notes[0], notes
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.reshape(-1), _closed_form_hessian(net, x).detach(), rtol=1e-10, atol=1e-12)
    assert any(p.name != "jaccli-keys" for p in tmp_path.iterdir())  # inductor's cache went there
    assert (tmp_path / "jaccli-keys").is_dir()
