"""Method options as objects (Exact, CG), the flat keywords mapped onto them, and what logdet
shares with logdet_grad."""

import dataclasses
import inspect

import pytest
import torch

import rnf_fast
from rnf_fast import CG, Exact
from rnf_fast.engine import api
from rnf_fast.testing import grads, mlp_decoder


def _problem(B=4, d=3, D=7):
    decoder = mlp_decoder(d, D, hidden=(9,))
    z = torch.randn(B, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return decoder, z.requires_grad_()


@pytest.mark.parametrize(
    "build,error,match",
    [
        (lambda: Exact(chunk_size=0), ValueError, "chunk_size must be a positive integer"),
        (lambda: Exact(chunk_size=2.0), ValueError, "chunk_size must be a positive integer"),
        (lambda: CG(probes=0), ValueError, "probes must be a positive integer"),
        (lambda: CG(probes=True), ValueError, "probes must be a positive integer"),
        (lambda: CG(probes=torch.ones(2, 3)), ValueError, r"probes tensor must be \(B, K, d\)"),
        (lambda: CG(probe_kind="sobol"), ValueError, "probe_kind must be one of"),
        (lambda: CG(generator=3), TypeError, "generator must be None or a torch.Generator"),
        (lambda: CG(tol=-1.0), ValueError, "tol must be a finite number"),
        (lambda: CG(tol=float("nan")), ValueError, "tol must be a finite number"),
        (lambda: CG(tol="0.01"), ValueError, "tol must be a finite number"),
        (lambda: CG(max_iter=0), ValueError, "max_iter must be a positive integer"),
        (lambda: CG(fixed_iterations=1), TypeError, "fixed_iterations must be a bool"),
        (lambda: CG(preconditioner="ilu"), ValueError, "preconditioner must be None"),
        (lambda: CG(preconditioner=3), TypeError, "preconditioner must be None"),
        (lambda: CG(x0=[0.0]), TypeError, "x0 must be None or"),
        (
            lambda: CG(probes=torch.ones(2, 1, 3), probe_kind="gaussian"),
            ValueError,
            "probe_kind applies to drawn probes",
        ),
        (
            lambda: CG(probes=torch.ones(2, 1, 3), generator=torch.Generator()),
            ValueError,
            "generator applies to drawn probes",
        ),
    ],
)
def test_option_objects_validate_their_fields(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_option_objects_are_frozen_and_print_what_was_set():
    options = CG(probes=torch.ones(2, 3, 4), tol=1e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.tol = 1.0
    assert options.K == 3 and CG(probes=5).K == 5
    assert repr(options) == "CG(probes=<tensor (2, 3, 4) torch.float32>, tol=0.001)"
    assert repr(CG()) == "CG()" and repr(Exact(chunk_size=8)) == "Exact(chunk_size=8)"


_TENSOR_PROBES = torch.ones(4, 1, 3, dtype=torch.float64)


@pytest.mark.parametrize(
    "method,kwargs,match",
    [
        # An option of the other method.
        ("exact", {"probes": 2}, "probes applies to method='cg'"),
        ("exact", {"probe_kind": "gaussian"}, "probe_kind applies to method='cg'"),
        ("exact", {"tol": 1e-3}, "tol applies to method='cg'"),
        ("exact", {"max_iter": 5}, "max_iter applies to method='cg'"),
        ("exact", {"fixed_iterations": True}, "fixed_iterations applies to method='cg'"),
        ("exact", {"preconditioner": "jacobi"}, "preconditioner applies to method='cg'"),
        ("exact", {"x0": torch.zeros(4, 1, 3)}, "x0 applies to method='cg'"),
        ("cg", {"chunk_size": 2}, "chunk_size applies to method='exact'"),
        (Exact(), {"tol": 1e-3}, r"tol applies to method='cg' .* got method=Exact\(\)"),
        (CG(), {"chunk_size": 2}, r"chunk_size applies to method='exact' .* got method=CG\(\)"),
        # An option given twice.
        (CG(tol=1e-3), {"tol": 1e-4}, "tol is given both in method=CG"),
        (CG(), {"probes": 2}, "probes is given both"),
        (Exact(chunk_size=1), {"chunk_size": 2}, "chunk_size is given both"),
        # Options that do not apply to a probe tensor.
        ("cg", {"probes": _TENSOR_PROBES, "probe_kind": "gaussian"}, "probe_kind applies to"),
        ("auto", {"probes": _TENSOR_PROBES, "generator": torch.Generator()}, "generator applies"),
    ],
)
def test_an_option_that_does_not_apply_is_an_error_naming_it(method, kwargs, match):
    decoder, z = _problem()
    with pytest.raises(ValueError, match=match):
        rnf_fast.logdet_grad(decoder, z, method, **kwargs)


def test_method_of_another_type_is_a_type_error():
    decoder, z = _problem()
    with pytest.raises(TypeError, match="method must be 'auto', 'exact', 'cg', an Exact or a CG"):
        rnf_fast.logdet_grad(decoder, z, 3)


def _value_and_grads(decoder, z, *args, **kwargs):
    value = rnf_fast.logdet_grad(decoder, z, *args, **kwargs)
    return [value.detach(), *grads(value, [z, *decoder.parameters()])]


@pytest.mark.filterwarnings("ignore:CG reached max_iter")
@pytest.mark.parametrize(
    "method,options",
    [
        ("exact", {}),
        ("exact", {"chunk_size": 2}),
        ("cg", {"probes": "eps"}),
        ("cg", {"probes": "eps", "tol": 1e-6, "max_iter": 2, "preconditioner": "jacobi"}),
        ("cg", {"probes": "eps", "fixed_iterations": True, "x0": "x0"}),
        ("cg", {"probes": 2, "probe_kind": "orthogonal", "generator": "seeded"}),
    ],
    ids=["exact", "exact-chunked", "cg", "cg-preconditioned", "cg-warm-fixed", "cg-drawn"],
)
def test_flat_keywords_and_option_objects_give_identical_results(method, options):
    eps = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tensors = {"eps": eps, "x0": 0.1 * eps}

    def fill():  # a fresh seeded generator per call, the same tensors
        seeded = {"seeded": torch.Generator().manual_seed(5)}
        return {k: tensors.get(v, seeded.get(v, v)) if isinstance(v, str) else v
                for k, v in options.items()}  # fmt: skip

    decoder, z = _problem()
    flat = _value_and_grads(decoder, z, method, **fill())
    obj = _value_and_grads(decoder, z, {"exact": Exact, "cg": CG}[method](**fill()))
    for x, y in zip(flat, obj, strict=True):  # bit for bit (a warm start's value is NaN)
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def test_auto_takes_both_methods_options_and_reports_the_unused(monkeypatch):
    decoder, z = _problem()
    options = {"chunk_size": 2, "tol": 1e-3, "preconditioner": "jacobi", "probes": 2}
    for picked, unused in (("exact", ("probes", "tol", "preconditioner")), ("cg", ("chunk_size",))):
        monkeypatch.setattr(api, "choose_method", lambda d, K, *, path, p=picked: p)
        _, info = rnf_fast.logdet_grad(decoder, z, **options, return_info=True)
        assert info.method == picked and info.unused_options == unused
        assert (info.exact is None) == (picked == "cg") and (info.cg is None) == (picked == "exact")
    monkeypatch.undo()
    _, info = rnf_fast.logdet_grad(decoder, z, return_info=True)
    assert info.unused_options == ()


def test_flat_keywords_at_their_defaults_are_not_set_and_exact_ignores_a_generator_visibly():
    # What a caller that forwards a training configuration passes with method="exact".
    decoder, z = _problem()
    plain = _value_and_grads(decoder, z, "exact")
    forwarded = dict(probes=1, probe_kind="rademacher", tol=rnf_fast.engine.DEFAULT_CG_TOL)
    value, info = rnf_fast.logdet_grad(
        decoder, z, "exact", generator=torch.Generator(), chunk_size=None, return_info=True,
        **forwarded,
    )  # fmt: skip
    assert info.unused_options == ("generator",)
    again = _value_and_grads(decoder, z, "exact", generator=torch.Generator(), **forwarded)
    assert all(torch.equal(x, y) for x, y in zip(plain, again, strict=True))
    _, info = rnf_fast.logdet_grad(
        decoder, z, Exact(), generator=torch.Generator(), return_info=True
    )
    assert info.unused_options == ("generator",)


def test_logdet_takes_every_option_of_logdet_grad_but_return_info(monkeypatch):
    grad_params = dict(inspect.signature(rnf_fast.logdet_grad).parameters)
    del grad_params["return_info"]
    value_params = dict(inspect.signature(rnf_fast.logdet).parameters)
    assert list(value_params) == list(grad_params)
    for name, p in value_params.items():
        q = grad_params[name]
        assert (p.kind, p.annotation) == (q.kind, q.annotation), name
        if name != "method":
            assert p.default is q.default or p.default == q.default, name
    # The value is exact unless asked otherwise.
    assert (value_params["method"].default, grad_params["method"].default) == ("exact", "auto")
    # Every argument reaches the shared handling.
    seen = {}

    def spy(decoder, z, method, flat, **call):
        seen.update(decoder=decoder, z=z, method=method, **flat, **call)
        raise StopIteration

    monkeypatch.setattr(api, "_run", spy)
    marks = {name: object() for name in value_params}
    with pytest.raises(StopIteration):
        rnf_fast.logdet(**marks)
    assert seen.keys() == marks.keys()
    assert all(seen[k] is marks[k] for k in marks)


def test_warnings_point_at_the_callers_line():
    decoder = mlp_decoder(8, 12)
    z = torch.randn(2, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="max_iter") as record:
        rnf_fast.logdet_grad(decoder, z, CG(tol=1e-12, max_iter=2))
    with pytest.warns(RuntimeWarning, match="max_iter") as record_value:
        rnf_fast.logdet(decoder, z, CG(tol=1e-12, max_iter=2))
    assert [w.filename for w in (*record, *record_value)] == [__file__, __file__]


def test_make_probes_defaults_to_rademacher_and_names_its_own_arguments():
    V = rnf_fast.make_probes(3, 2, 4, generator=torch.Generator().manual_seed(0))
    R = rnf_fast.make_probes(3, 2, 4, kind="rademacher", generator=torch.Generator().manual_seed(0))
    assert torch.equal(V, R) and bool((V.abs() == 1).all())
    with pytest.raises(ValueError, match="kind must be one of"):
        rnf_fast.make_probes(3, 2, 4, kind="sobol")
    with pytest.raises(ValueError, match="orthogonal probes need K <= d, got K=5 and d=4"):
        rnf_fast.make_probes(3, 5, 4, kind="orthogonal")
