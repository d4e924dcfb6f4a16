"""The launch path's host helpers: the same integers as Triton's (which cost about 10 µs a call), the device lookups
read once per device."""
import triton

from composer.kernels.triton import configs
from composer.kernels.triton._jit import cdiv, next_pow2


def test_cdiv_and_next_pow2_match_triton():
    for n in range(0, 5000):
        assert next_pow2(n) == max(1, triton.next_power_of_2(n)), n
        for b in (1, 2, 3, 7, 16, 128, 4096):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_device_props_are_read_once_per_device_and_function(monkeypatch):
    calls = []

    def name(i):
        calls.append(i)
        return f"Fake GPU {i}"

    monkeypatch.setattr(configs, "_cuda_index", lambda d: 0 if d is None else int(str(d).rsplit(":", 1)[-1]))
    monkeypatch.setattr("torch.cuda.get_device_name", name)
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda i: (9, i))
    assert [configs.device_name("cuda:1") for _ in range(3)] == ["Fake_GPU_1"] * 3
    assert configs.device_capability("cuda:1") == "9.1" and configs.device_name(None) == "Fake_GPU_0"
    assert calls == [1, 0]
    monkeypatch.setattr("torch.cuda.get_device_name", lambda i: "Other")  # (a swapped function is asked again)
    assert configs.device_name("cuda:1") == "Other"


def test_config_dirs_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(configs.ENV_VAR, str(tmp_path))
    assert configs.config_dirs()[0] == tmp_path
    monkeypatch.delenv(configs.ENV_VAR)
    assert tmp_path not in configs.config_dirs() and configs.config_dirs()[-1] == configs.PACKAGE_DIR


def test_eager_calls_skip_the_op_dispatcher(monkeypatch):
    """kernel=triton's eager forward calls the implementation the custom op wraps, directly (the dispatcher cost
    about 45 µs a call on the host); torch.compile still traces the op."""
    import torch

    from composer.kernels.triton import fused
    from composer.kernels.triton_backend import TritonExperts
    from composer.layers.modular_kernel import ExpertWeights

    seen = []
    monkeypatch.setattr(fused, "fused_experts", lambda *a: seen.append(a) or a[0])
    x = torch.randn(2, 8)
    w = ExpertWeights(w13=torch.randn(2, 8, 8), w2=torch.randn(2, 8, 4), w13_bias=None, w2_bias=None)
    out = TritonExperts().apply(x, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32), w, "silu")
    assert out is x and len(seen) == 1 and seen[0][-1] == "silu"


def test_tracers_and_autograd_still_see_the_op(monkeypatch):
    """make_fx / fake tensors / jit.trace record the op (its fake implementation), and an input that needs a gradient
    meets the op's "no autograd formula" error instead of a result with the experts silently left out."""
    import pytest
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    import composer.kernels.ops  # noqa: F401
    from composer.kernels.triton import fused
    from composer.kernels.triton_backend import TritonExperts
    from composer.layers.modular_kernel import ExpertWeights

    monkeypatch.setattr(fused, "fused_experts", lambda *a: torch.zeros_like(a[0]))  # (what the op runs)
    w = ExpertWeights(w13=torch.randn(2, 8, 8), w2=torch.randn(2, 8, 4), w13_bias=None, w2_bias=None)
    ids = torch.zeros(2, 1, dtype=torch.int32)
    gm = make_fx(lambda x, tw: TritonExperts().apply(x, tw, ids, w, "silu"))(torch.randn(2, 8), torch.ones(2, 1))
    assert any("composer.fused_experts" in str(n.target) for n in gm.graph.nodes)
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        TritonExperts().apply(x, torch.ones(2, 1), ids, w, "silu").sum().backward()


def test_config_dirs_that_are_not_folders_are_refused(monkeypatch, tmp_path):
    """A tuned file itself, or a typo, was passed over silently: the shipped tables ran instead of the user's."""
    import pytest

    from composer.errors import ConfigError

    f = tmp_path / "E=8,N=32,K=16,device_name=X,dtype=bfloat16.json"
    f.write_text("{}")
    for value, says in ((f, f"is a file; .* point it at the folder that holds it \\({tmp_path}\\)"),
                        (tmp_path / "typo", "does not exist; .* create it")):
        monkeypatch.setenv(configs.ENV_VAR, str(value))
        with pytest.raises(ConfigError, match=f"COMPOSER_KERNEL_CONFIGS = .*{says}"):
            configs.config_dirs()
