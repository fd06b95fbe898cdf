"""Loading models, and differentiating TorchScript and torch.export models like eager ones."""

from __future__ import annotations

import warnings
import zipfile

import pytest
import torch
from torch import nn

import jaccli
from problems import save_export, save_torchscript, tanh_mlp

KINDS = ["jacobian", "hessian", "laplacian", "divergence"]


def _script(module: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


@pytest.fixture
def square_net():
    return tanh_mlp((3, 10, 10, 3))


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
@pytest.mark.parametrize("kind", KINDS)
def test_saved_models_match_eager_over_many_chunks(tmp_path, square_net, fmt, kind):
    """Every command over several chunks: TorchScript's executor bugs show from the third call."""
    x = torch.randn(11, 3, dtype=torch.float64)
    path = (
        save_torchscript(square_net, tmp_path / "m.pt")
        if fmt == "torchscript"
        else save_export(square_net, x[:4], tmp_path / "m.pt2")
    )
    model = jaccli.load_model(path)
    assert model.info.format == fmt
    for mode in ["forward", "reverse"]:
        want = getattr(jaccli, kind)(square_net, x, per_sample=True, mode=mode)
        got = getattr(jaccli, kind)(model, x, per_sample=True, mode=mode, chunk_size=2)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_raw_script_module_works_through_the_api(square_net):
    scripted = _script(square_net)
    x = torch.randn(7, 3, dtype=torch.float64)
    want = jaccli.hessian(square_net, x, per_sample=True)
    for _ in range(4):  # the profiling executor used to break from the third call on
        torch.testing.assert_close(jaccli.hessian(scripted, x, per_sample=True, chunk_size=2), want)


def test_static_batch_export_is_padded(tmp_path, square_net):
    x = torch.randn(10, 3, dtype=torch.float64)
    path = save_export(square_net, x[:4], tmp_path / "static.pt2", dynamic=False)
    model = jaccli.load_model(path)
    assert model.info.static_batch == 4
    assert "batch size 4" in model.info.notes[0]
    want = jaccli.jacobian(square_net, x, per_sample=True)
    torch.testing.assert_close(jaccli.jacobian(model, x, per_sample=True), want)
    torch.testing.assert_close(jaccli.laplacian(model, x[:3], per_sample=True), jaccli.laplacian(square_net, x[:3], per_sample=True))
    assert jaccli.plan("jacobian", model, x, per_sample=True).points_per_chunk == 4


def test_static_batch_export_explains_other_shapes(tmp_path, square_net):
    path = save_export(square_net, torch.zeros(4, 3, dtype=torch.float64), tmp_path / "static.pt2", dynamic=False)
    model = jaccli.load_model(path)
    with pytest.raises(jaccli.ModelError, match=r"expected \[4, 3\], got \[6, 3\].*axis 0 was fixed at 4"):
        jaccli.jacobian(model, torch.zeros(6, 3, dtype=torch.float64))


def test_export_reports_expected_shape(tmp_path):
    net = tanh_mlp((3, 4, 2))
    model = jaccli.load_model(save_export(net, torch.zeros(2, 3, dtype=torch.float64), tmp_path / "m.pt2"))
    with pytest.raises(jaccli.ModelError, match=r"expected \[\*, 3\]"):
        jaccli.jacobian(model, torch.zeros(5, 4, dtype=torch.float64), per_sample=True)


def test_models_are_recognised_by_content_not_suffix(tmp_path, square_net):
    ts = save_torchscript(square_net, tmp_path / "really_torchscript.pt2")
    ep = save_export(square_net, torch.zeros(2, 3, dtype=torch.float64), tmp_path / "really_export.pt")
    assert jaccli.load_model(ts).info.format == "torchscript"
    assert jaccli.load_model(ep).info.format == "export"


def test_load_model_sets_eval_and_freezes_parameters(tmp_path):
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net.train()), tmp_path / "m.pt")
    model = jaccli.load_model(tmp_path / "m.pt")
    assert not model.module.training
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.ones(3, 2)
    torch.testing.assert_close(model(x), model(x))  # dropout is off


def test_dtype_conversion_on_load(tmp_path, square_net):
    path = save_torchscript(square_net.float(), tmp_path / "m.pt")
    model = jaccli.load_model(path, dtype="float64")
    assert next(model.parameters()).dtype == torch.float64
    assert jaccli.load_model(path).module.forward.schema.arguments[1].name == "input"


def test_argument_names_come_from_the_archive(tmp_path):
    class Two(nn.Module):
        def forward(self, t, x):
            return torch.sin(t)[:, None] * x

    t, x = torch.rand(3), torch.rand(3, 2)
    save_torchscript(Two(), tmp_path / "two.pt")
    batch = torch.export.Dim("batch")
    torch.export.save(
        torch.export.export(Two(), (t, x), dynamic_shapes={"t": {0: batch}, "x": {0: batch}}), tmp_path / "two.pt2"
    )
    for name in ["two.pt", "two.pt2"]:
        model = jaccli.load_model(tmp_path / name)
        assert model.info.arg_names == ("t", "x")
        jt = jaccli.jacobian(model, {"t": t, "x": x}, wrt="t", per_sample=True)
        torch.testing.assert_close(jt, torch.cos(t)[:, None] * x)


# ----------------------------------------------------------------- refusals


def test_pickled_module_is_refused_without_running_it(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(jaccli.InputError, match="pickled model"):
        jaccli.load_model(path)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "empty"),
        (b"not a model at all", "not a model file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS pointer"),
    ],
)
def test_bad_model_files(tmp_path, content, match):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    with pytest.raises(jaccli.InputError, match=match):
        jaccli.load_model(path)


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_truncated_archives(tmp_path, square_net, fmt):
    src = (
        save_torchscript(square_net, tmp_path / "m.pt")
        if fmt == "torchscript"
        else save_export(square_net, torch.zeros(2, 3, dtype=torch.float64), tmp_path / "m.pt2")
    )
    data = src.read_bytes()
    broken = tmp_path / "broken.bin"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(jaccli.InputError):
        jaccli.load_model(broken)
    # a zip whose members are damaged but whose directory is intact
    damaged = tmp_path / "damaged.bin"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for item in zin.infolist():
            payload = zin.read(item)
            if item.filename.endswith((".pkl", ".json")):
                payload = payload[: len(payload) // 3]
            zout.writestr(item, payload)
    with pytest.raises(jaccli.InputError, match="corrupt"):
        jaccli.load_model(damaged)


def test_missing_and_directory(tmp_path):
    with pytest.raises(jaccli.InputError, match="no such model file"):
        jaccli.load_model(tmp_path / "nope.pt")
    with pytest.raises(jaccli.InputError, match="is a directory"):
        jaccli.load_model(tmp_path)


@pytest.mark.parametrize(
    "device,error,match",
    [
        ("gpu", jaccli.UsageError, "unknown device"),
        ("tpu", jaccli.UsageError, "device"),
        ("cuda:99", jaccli.ResourceError, "not available"),
    ],
)
def test_device_errors_list_what_is_available(tmp_path, square_net, device, error, match):
    path = save_torchscript(square_net, tmp_path / "m.pt")
    with pytest.raises(error, match=match) as info:
        jaccli.load_model(path, device=device)
    assert "cpu" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="only where CUDA is missing")
def test_cuda_requested_without_cuda(tmp_path, square_net):
    path = save_torchscript(square_net, tmp_path / "m.pt")
    with pytest.raises(jaccli.ResourceError, match="expected one of cpu"):
        jaccli.load_model(path, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_saved_models_on_cuda(tmp_path, square_net, fmt):
    x = torch.randn(9, 3, dtype=torch.float64)
    path = (
        save_torchscript(square_net, tmp_path / "m.pt")
        if fmt == "torchscript"
        else save_export(square_net, x[:4], tmp_path / "m.pt2")
    )
    model = jaccli.load_model(path, device="cuda")
    for kind in KINDS:
        got = getattr(jaccli, kind)(model, x.cuda(), per_sample=True, chunk_size=4)
        want = getattr(jaccli, kind)(square_net, x, per_sample=True)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------- weights files


@pytest.mark.parametrize("activation", sorted(jaccli.load.weights.ACTIVATIONS))
def test_save_mlp_round_trip_for_every_activation(tmp_path, activation):
    net = jaccli.load.weights.build_mlp([2, 6, 6, 3], activation).double().eval()
    path = tmp_path / "net.safetensors"
    jaccli.save_mlp(net, path)
    model = jaccli.load_model(path)
    assert model.info.format == "safetensors-mlp" and not model.info.runs_code
    x = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


def test_safetensors_metadata_documents_the_network(tmp_path):
    from safetensors import safe_open

    net = tanh_mlp((3, 5, 2))
    jaccli.save_mlp(net, tmp_path / "n.safetensors")
    with safe_open(str(tmp_path / "n.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta == {"jaccli.arch": "mlp", "jaccli.sizes": "[3, 5, 2]", "jaccli.activation": "tanh", "jaccli.bias": "true"}
    assert set(meta) == set(jaccli.load.weights.MLP_METADATA)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)),
        lambda: nn.Sequential(nn.Linear(2, 2), nn.Softplus(beta=3.0), nn.Linear(2, 1)),
        lambda: nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Linear(2, 1)),
        lambda: nn.Linear(2, 2),
    ],
    ids=["mixed", "non-default", "dropout", "not-sequential"],
)
def test_save_mlp_refuses_what_it_cannot_describe(tmp_path, bad):
    with pytest.raises(jaccli.UsageError):
        jaccli.save_mlp(bad(), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_state_dict_with_mlp_arch_infers_the_widths(tmp_path):
    net = tanh_mlp((1, 7, 7, 4))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(jaccli.UsageError, match="--arch mlp --activation NAME"):
        jaccli.load_model(tmp_path / "w.pt")
    with pytest.raises(jaccli.UsageError, match="needs --activation"):
        jaccli.load_model(tmp_path / "w.pt", arch="mlp")
    model = jaccli.load_model(tmp_path / "w.pt", arch="mlp", activation="tanh")
    x = torch.rand(3, 1, dtype=torch.float64)
    torch.testing.assert_close(model(x), net(x))
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, tmp_path / "ckpt.pt")
    torch.testing.assert_close(jaccli.load_model(tmp_path / "ckpt.pt", arch="mlp", activation="tanh")(x), net(x))


def test_plain_safetensors_weights_need_an_arch(tmp_path):
    from safetensors.torch import save_file

    net = tanh_mlp((2, 4, 1))
    save_file(dict(net.state_dict()), str(tmp_path / "w.safetensors"))
    with pytest.raises(jaccli.UsageError, match="holds weights only"):
        jaccli.load_model(tmp_path / "w.safetensors")
    model = jaccli.load_model(tmp_path / "w.safetensors", arch="mlp", activation="tanh")
    x = torch.rand(3, 2, dtype=torch.float64)
    torch.testing.assert_close(model(x), net(x))


ARCH_FILE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.inner = nn.Linear(2, width)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(torch.sin(self.inner(x)))


def make(width=4):
    return Net(width)
'''


def test_user_architecture_from_a_file_with_kwargs(tmp_path):
    (tmp_path / "arch.py").write_text(ARCH_FILE)
    spec = f"{tmp_path / 'arch.py'}:make"
    torch.manual_seed(0)
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("arch_for_test", tmp_path / "arch.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    net = mod.make(width=6).double()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    model = jaccli.load_model(tmp_path / "w.pt", arch=spec, arch_kwargs={"width": 6})
    assert model.info.format == "weights+arch" and model.info.runs_code
    x = torch.rand(4, 2, dtype=torch.float64)
    torch.testing.assert_close(model.double()(x), net(x))
    # wrong width: the mismatch is listed
    with pytest.raises(jaccli.ModelError, match=r"head.weight \[1, 6\] in the file, \[1, 4\] in the model"):
        jaccli.load_model(tmp_path / "w.pt", arch=spec)


def test_missing_and_unexpected_keys_are_listed_sorted(tmp_path):
    net = tanh_mlp((2, 3, 1))
    state = dict(net.state_dict())
    del state["2.bias"], state["0.weight"]
    state["zeta"] = torch.zeros(1)
    state["alpha"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pt")
    (tmp_path / "arch.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))\n"
    )
    with pytest.raises(jaccli.ModelError, match=r"missing: 0.weight, 2.bias.*unexpected: alpha, zeta"):
        jaccli.load_model(tmp_path / "w.pt", arch=f"{tmp_path / 'arch.py'}:make")


@pytest.mark.parametrize(
    "spec,error,match",
    [
        ("nonsense", jaccli.UsageError, "bad --arch"),
        ("{d}/none.py:make", jaccli.InputError, "no such architecture file"),
        ("{d}/arch.py:missing", jaccli.UsageError, "no function 'missing'"),
        ("{d}/broken.py:make", jaccli.ModelError, "importing the architecture failed"),
        ("no_such_package_xyz.mod:make", jaccli.ModelError, "importing the architecture failed"),
    ],
)
def test_bad_arch_specs(tmp_path, spec, error, match):
    (tmp_path / "arch.py").write_text(ARCH_FILE)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    torch.save(tanh_mlp((2, 4, 1)).state_dict(), tmp_path / "w.pt")
    with pytest.raises(error, match=match):
        jaccli.load_model(tmp_path / "w.pt", arch=spec.format(d=tmp_path))


def test_arch_is_refused_for_saved_programs(tmp_path, square_net):
    path = save_torchscript(square_net, tmp_path / "m.pt")
    with pytest.raises(jaccli.UsageError, match="--arch applies to weights files"):
        jaccli.load_model(path, arch="mlp", activation="tanh")
