"""normbench.norms.native: where a C++ port cannot be built, or is switched off, its layer runs its Python path
(after one warning where the build failed). That each port computes what its Python path does is its layer's
test (tests/test_mabn.py)."""

import warnings

import pytest
import torch

from normbench.norms import build_norm, native


@pytest.fixture
def fresh_extensions():
    native.extension.cache_clear()
    yield
    native.extension.cache_clear()  # later tests load the real ports again


def train_step(layer):
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    return x.grad


def test_a_port_that_cannot_be_built_warns_once_and_its_layer_runs_in_python(fresh_extensions, monkeypatch):
    from torch.utils import cpp_extension

    def fail(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore lines")

    monkeypatch.setattr(cpp_extension, "load", fail)
    with pytest.warns(RuntimeWarning, match=r"cannot build the C\+\+ port mabn_step \(Ninja is required to load C\+\+ "
                                            r"extensions\); its layer runs its Python path"):
        assert native.extension("mabn_step") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.extension("mabn_step") is None  # decided once per process
        assert train_step(build_norm("mabn", 4)).shape == (2, 4, 3, 3)


def test_normbench_native_0_switches_the_ports_off(fresh_extensions, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("a port was built"))
    monkeypatch.setattr(native, "ENABLED", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.extension("mabn_step") is None
        assert train_step(build_norm("mabn", 4)).shape == (2, 4, 3, 3)
