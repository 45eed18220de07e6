"""Bad input raises a clear error that names the argument; singular JᵀJ is reported."""

import pytest
import torch

import rnf_fast
import rnf_fast.testing
from rnf_fast.testing import mlp_decoder, rel_error


@pytest.fixture
def dec():
    return mlp_decoder(3, 6)


@pytest.fixture
def z():
    return torch.randn(4, 3, dtype=torch.float64)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"method": "svd"}, ValueError, "method must be"),
        ({"probes": 0}, ValueError, "probes must be a positive integer"),
        ({"probes": 1.5}, ValueError, "probes must be a positive integer"),
        ({"probes": torch.randn(4, 2, 5, dtype=torch.float64)}, ValueError, r"probes tensor"),
        ({"probe_kind": "sobol"}, ValueError, "probe_kind must be"),
        ({"method": "cg", "probe_kind": "orthogonal", "probes": 4}, ValueError, "probes <= d"),
        ({"tol": -1.0}, ValueError, "tol must be"),
        ({"max_iter": 0}, ValueError, "max_iter must be"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be"),
        ({"backend": "cuda-magic"}, ValueError, "backend must be one of"),
        ({"batching": "loop"}, ValueError, "batching must be"),
        ({"on_singular": "ignore"}, ValueError, "on_singular must be"),
        ({"linalg_dtype": torch.int64}, ValueError, "linalg_dtype must be"),
    ],
)
def test_bad_options(dec, z, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rnf_fast.logdet_grad(dec, z, **kwargs)


def test_bad_z(dec):
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        rnf_fast.logdet_grad(dec, [[0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match=r"z must be \(B, d\).*\(3, 4, 5\)"):
        rnf_fast.logdet_grad(dec, torch.randn(3, 4, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        rnf_fast.logdet_grad(dec, torch.ones(2, 3, dtype=torch.long))
    z = torch.randn(4, 3, dtype=torch.float64)
    z[1, 2] = float("nan")
    with pytest.raises(ValueError, match="z contains NaN or Inf in 1 of 4"):
        rnf_fast.logdet_grad(dec, z)


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_d_not_below_D(z, method):
    square = mlp_decoder(3, 3)
    with pytest.raises(ValueError, match="D > d"):
        rnf_fast.logdet_grad(square, z, method=method)


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_decoder_output_shape_and_finiteness(z, method):
    with pytest.raises(ValueError, match=r"decoder output must be \(B, D\)"):
        rnf_fast.logdet_grad(lambda z: z.repeat(1, 2).unsqueeze(1), z, method=method)
    with pytest.raises(ValueError, match="decoder output contains NaN or Inf in 4 of 4"):
        rnf_fast.logdet_grad(lambda z: torch.log(z - 100).repeat(1, 2), z, method=method)


def test_dtype_and_device_mismatch(dec):
    with pytest.raises(ValueError, match="decoder parameters are torch.float64"):
        rnf_fast.logdet_grad(dec, torch.randn(2, 3))
    with pytest.raises(ValueError, match="decoder output is torch.float32"):
        rnf_fast.logdet_grad(lambda z: z.float().repeat(1, 2), torch.randn(2, 3).double())


def test_decoder_not_callable(z):
    with pytest.raises(TypeError, match="decoder must be callable"):
        rnf_fast.logdet_grad("mlp", z)


def _rank_deficient(z):
    # J has rank 1 for every sample with d = 2: both latents enter only through their sum.
    s = z.sum(1, keepdim=True)
    return torch.cat([s, torch.sin(s), s**2], dim=1)


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_singular_jacobian_raises_on_request(method):
    z = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(rnf_fast.SingularJacobianError, match="rank deficient"):
        rnf_fast.logdet_grad(_rank_deficient, z, method=method, on_singular="raise")


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_singular_jacobian_gives_nan_and_warns_on_request(method):
    z = torch.randn(3, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="rank deficient"):
        v, info = rnf_fast.logdet_grad(
            _rank_deficient, z, method=method, on_singular="nan", return_info=True
        )
    assert bool(info.singular.any())
    assert bool(torch.isnan(v[info.singular]).all())
    assert bool(torch.isfinite(v[~info.singular]).all())


@pytest.mark.parametrize("backend", rnf_fast.available_backends("cpu"))
def test_exactly_zero_column_gives_nan_value_and_finite_gradient(backend):
    W = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)

    def decoder(z):  # sample 0 has z[0, 1] = 0 and loses its second direction entirely
        return torch.tanh(torch.stack([z[:, 0], z[:, 1] * z[:, 1]], dim=1) @ W.T)

    z = torch.tensor([[0.3, 0.0], [0.5, 0.7]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="rank deficient"):
        v = rnf_fast.logdet_grad(decoder, z, method="exact", on_singular="nan", backend=backend)
    assert torch.isnan(v[0]) and torch.isfinite(v[1])
    (g,) = torch.autograd.grad(v[1:].sum() + 0 * v[0].nan_to_num(), [W])
    (g1,) = torch.autograd.grad(rnf_fast.logdet_grad(decoder, z[1:], method="exact").sum(), [W])
    assert torch.isfinite(g).all() and rel_error(g, g1) < 1e-12


def test_singular_jacobian_gets_bounded_reported_jitter_by_default():
    z = torch.randn(3, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="needed jitter"):
        v, info = rnf_fast.logdet_grad(_rank_deficient, z, method="exact", return_info=True)
    A = (lambda J: J.transpose(1, 2) @ J)(rnf_fast.testing.dense_jacobian(_rank_deficient, z))
    bound = 1e3 * torch.finfo(torch.float64).eps * torch.diagonal(A, dim1=1, dim2=2).mean(1)
    # Rounding can leave an exactly singular JᵀJ with a tiny positive pivot: LAPACK's failure
    # is the trigger, so some samples factor without jitter.
    jitter = info.exact.jitter
    assert bool((jitter > 0).any()) and bool((jitter <= bound * (1 + 1e-12)).all())
    assert bool(torch.isfinite(v).all())


@pytest.mark.parametrize("batching", ["auto", "vmap", "repeat"])
@pytest.mark.parametrize("method", ["exact", "cg"])
def test_decoder_returning_a_tuple_says_what_it_returned(z, method, batching):
    # Before: a deep torch.func/vmap error (or a bare "output must be (B, D)").
    def decoder(z):
        return z.repeat(1, 2), z.sum(1)

    with pytest.raises(TypeError, match="decoder must return a \\(B, D\\) tensor, got tuple"):
        rnf_fast.logdet_grad(decoder, z, method=method, batching=batching)


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_decoder_rejecting_the_latent_width_says_so(method):
    dec = mlp_decoder(3, 6)
    z = torch.randn(4, 5, dtype=torch.float64)  # d = 5, the decoder takes 3
    with pytest.raises(ValueError, match=r"decoder failed on z of shape \(B, d\) = \(4, 5\)") as e:
        rnf_fast.logdet_grad(dec, z, method=method)
    assert isinstance(e.value.__cause__, RuntimeError)  # the decoder's own error, chained
    generic = lambda z: torch.tanh(z @ torch.ones(3, 6, dtype=z.dtype))  # noqa: E731
    with pytest.raises(ValueError, match="decoder failed on z of shape"):
        rnf_fast.logdet_grad(generic, z, method=method)


def test_probes_beyond_the_memory_are_refused_before_allocating(dec, z):
    # Before: probes=10**12 reached the allocator ("tried to allocate 64 TB").
    with pytest.raises(ValueError, match=r"probes=1000000000000: the CG buffers .* need at least"):
        rnf_fast.logdet_grad(dec, z, method="cg", probes=10**12)


def test_memory_share_follows_the_available_memory(dec, z, monkeypatch):
    from rnf_fast.engine import checks

    # B·K·((6d + 2d)·8 + 3(d+1)·8) = 4·8·(192 + 96) = 9,216 bytes at probes=8.
    monkeypatch.setattr(checks, "_QUERY_ABOVE", 0)  # query even for these tiny buffers
    monkeypatch.setattr(checks, "available_memory", lambda device: 2 * 9216)
    rnf_fast.logdet_grad(dec, z, method="cg", probes=8)
    with pytest.raises(ValueError, match=r"probes=9: .*10.1 KB, more than 50% of the 18 KB"):
        rnf_fast.logdet_grad(dec, z, method="cg", probes=9)


def test_small_buffers_skip_the_memory_query(dec, z, monkeypatch):
    from rnf_fast.engine import checks

    def no_query(device):
        raise AssertionError("available memory queried for buffers far below any machine's")

    monkeypatch.setattr(checks, "available_memory", no_query)
    rnf_fast.logdet_grad(dec, z, method="cg", probes=8)


def test_available_memory_is_known_on_cpu():
    from rnf_fast.engine.checks import available_memory

    free = available_memory(torch.device("cpu"))
    assert free is not None and free > 2**20
