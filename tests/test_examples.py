"""The shipped example models: reproducible from their script, right against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaccli
from problems import EXAMPLES, POTENTIAL, _field_j, _osc_h, _osc_j, _potential_h, make_examples

FORMATS = ["pt", "pt2"]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    make_examples.main(out)
    return out


@pytest.mark.parametrize("name", ["pinn", "ode", "field", "potential", "decay", "heat", "cnn", "transformer"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_shipped_files_are_what_the_script_makes(regenerated, name, fmt):
    shipped = jaccli.load_model(EXAMPLES / f"{name}.{fmt}")
    fresh = jaccli.load_model(regenerated / f"{name}.{fmt}")
    inputs = "x.npy" if name != "decay" else "inputs.npz"
    assert (EXAMPLES / f"{name}_{inputs}").read_bytes() == (regenerated / f"{name}_{inputs}").read_bytes()
    args = tuple(jaccli.load_tensors(EXAMPLES / f"{name}_{inputs}").values())
    torch.testing.assert_close(shipped(*args), fresh(*args), rtol=0, atol=0)


def test_weights_files_match_the_pinn(regenerated):
    x = jaccli.load_tensor(EXAMPLES / "pinn_x.npy")
    want = jaccli.load_model(EXAMPLES / "pinn.pt2")(x)
    torch.testing.assert_close(jaccli.load_model(EXAMPLES / "pinn.safetensors")(x), want)
    torch.testing.assert_close(jaccli.load_model(EXAMPLES / "pinn_state.pt", arch="mlp", activation="tanh")(x), want)
    from jaccli.io import safetensors_metadata

    shipped, fresh = (EXAMPLES / "pinn.safetensors").read_bytes(), (regenerated / "pinn.safetensors").read_bytes()
    assert safetensors_metadata(shipped) == safetensors_metadata(fresh)  # key order in the header may differ
    for key, value in jaccli.load_tensors(EXAMPLES / "pinn.safetensors").items():
        torch.testing.assert_close(value, jaccli.load_tensors(regenerated / "pinn.safetensors")[key], rtol=0, atol=0)


def _load64(name: str, fmt: str):
    model = jaccli.load_model(EXAMPLES / f"{name}.{fmt}", dtype="float64")
    x = jaccli.load_tensor(EXAMPLES / f"{name}_x.npy", dtype="float64")
    return model, x


@pytest.mark.parametrize("fmt", FORMATS)
def test_ode_derivatives_in_closed_form(fmt):
    model, t = _load64("ode", fmt)
    torch.testing.assert_close(jaccli.jacobian(model, t, per_sample=True), torch.stack([_osc_j(ti) for ti in t]))
    torch.testing.assert_close(jaccli.hessian(model, t, per_sample=True), torch.stack([_osc_h(ti) for ti in t]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_field_divergence_in_closed_form(fmt):
    model, x = _load64("field", fmt)
    A, b = make_examples.VectorField().A.detach().double(), make_examples.VectorField().b.detach().double()
    want = A.trace() + (b * (1 - torch.tanh(x) ** 2)).sum(-1)
    torch.testing.assert_close(jaccli.divergence(model, x, per_sample=True), want)
    torch.testing.assert_close(jaccli.jacobian(model, x, per_sample=True), torch.stack([_field_j(xi) for xi in x]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_potential_hessian_and_laplacian_in_closed_form(fmt):
    model, x = _load64("potential", fmt)
    want = torch.stack([_potential_h(xi) for xi in x])
    torch.testing.assert_close(jaccli.hessian(model, x, per_sample=True), want)
    torch.testing.assert_close(jaccli.laplacian(model, x, per_sample=True), want.diagonal(dim1=-2, dim2=-1).sum(-1))
    assert POTENTIAL is not None


@pytest.mark.parametrize("fmt", FORMATS)
def test_decay_derivatives_in_closed_form(fmt):
    model = jaccli.load_model(EXAMPLES / f"decay.{fmt}", dtype="float64")
    data = {k: v.double() for k, v in jaccli.load_tensors(EXAMPLES / "decay_inputs.npz").items()}
    t, x = data["t"], data["x"]
    jt, jx = jaccli.jacobian(model, data, wrt=("t", "x"), per_sample=True)
    tt = t[:, None, None, None]
    torch.testing.assert_close(jt, -torch.exp(-tt) * torch.sin(x) + 2 * tt * x)
    diag = (torch.exp(-tt) * torch.cos(x) + tt * tt).reshape(len(t), 12)
    torch.testing.assert_close(jx.reshape(len(t), 12, 12), torch.diag_embed(diag))


@pytest.mark.parametrize("name", ["pinn", "ode", "field", "potential"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_and_gradgradcheck(name, fmt):
    """The models' own autograd is what jaccli builds on: check it in float64."""
    model, x = _load64(name, fmt)
    pick = x[:: max(1, len(x) // 3)][:3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(model, (pick,))
    assert torch.autograd.gradgradcheck(model, (pick,))


def test_pinn_passes_its_self_check():
    model = jaccli.load_model(EXAMPLES / "pinn.pt")
    report = jaccli.check(model, jaccli.load_tensor(EXAMPLES / "pinn_x.npy"), points=5, hessian_too=True)
    assert report.passed, report.failures


def test_example_inputs_are_what_the_readme_says():
    assert np.load(EXAMPLES / "pinn_x.npy").shape == (1000, 1)
    assert np.load(EXAMPLES / "field_x.npy").shape == (500, 3)
    with np.load(EXAMPLES / "decay_inputs.npz") as data:
        assert data["t"].shape == (64,) and data["x"].shape == (64, 3, 2, 2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_cnn_and_transformer_jacobians_match_torch_func(name, fmt):
    from torch.func import jacrev, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x = _load64(name, fmt)
    x = x[:2]
    eager = make_examples.examples()[name][0].eval().double()
    for p in eager.parameters():
        p.requires_grad_(False)
    with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no vmap rule
        want = vmap(jacrev(lambda xi: eager(xi[None])[0]))(x)
    got = jaccli.jacobian(model, x, per_sample=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
