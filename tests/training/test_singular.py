"""Samples whose JᵀJ is numerically singular in training: left out of the loss (value and
gradient) and of the validation metrics, counted per epoch in metrics.jsonl, one warning per
epoch; a batch of them only takes no step; a healthy run counts none and keeps the plain loss."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from rnf_fast import logdet_grad
from rnf_fast.models import FlowConfig, RectangularFlow
from rnf_fast.testing import grads
from rnf_fast.training import ml_loss, train

from .kinked import Kinked, per_epoch

CONFIG = FlowConfig(D=3, d=2, f_layers=1, f_hidden=(8,), h_layers=1, h_hidden=(8,))
EPOCHS = 2
ENGINE = "JᵀJ is numerically singular"  # how the engine's warning per call begins


def data(n: int, *, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, CONFIG.D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def fit(model, x, run_dir, **changes):
    """Train on x[:64], validate on x[64:]; the history and the warnings raised."""
    options = {"epochs": EPOCHS, "batch_size": 16, "lr": 1e-2, "method": "exact"}
    options.update(progress=False, restore_best=False, **changes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = train(model, x[:64], x[64:], options, run_dir)
    return history, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize(
    ("method", "dtype"),
    [("exact", torch.float32), ("cg", torch.float32), ("exact", torch.float64)],
    ids=["exact-float32", "cg-float32", "exact-float64"],
)
@pytest.mark.parametrize("seed", range(4))
def test_singular_samples_are_left_out_counted_and_warned_once_per_epoch(
    tmp_path, method, dtype, seed
):
    model = Kinked({**CONFIG.to_dict(), "seed": seed}).to(dtype)
    history, messages = fit(model, data(80, seed=seed, dtype=dtype), tmp_path, method=method)
    steps, validations = model.singular_counts()
    # The rank-1 half of latent space, counted from the encodings the steps saw: the engine's
    # flags match it, step by step summed per epoch, for training and validation.
    train_counts, val_counts = per_epoch(steps, EPOCHS), validations
    assert sum(train_counts) > 0 and sum(val_counts) > 0  # the run met singular samples
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["singular_skipped"] for r in records] == train_counts
    assert [r["val_singular"] for r in records] == val_counts
    assert [r["singular_steps"] for r in records] == [0] * EPOCHS
    # Left out, not poisoning: every step was taken and every logged mean is finite.
    assert [r["skipped_steps"] for r in records] == [0] * EPOCHS
    for record in records:
        for key in ("train_loss", "train_logdet", "train_nll", "val_loss", "val_logdet"):
            assert record[key] is not None and math.isfinite(record[key]), key
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # One warning per epoch, naming the counts, and none of the engine's per call.
    assert not [m for m in messages if m.startswith(ENGINE)]
    ours = [m for m in messages if ENGINE in m]
    assert len(ours) == EPOCHS
    for epoch, (message, count, val) in enumerate(zip(ours, train_counts, val_counts)):
        assert message.startswith(f"epoch {epoch}: ")
        assert f"{count} of the epoch's 64 training samples were left out" in message
        assert f"{val} of 16 validation samples" in message
    assert history.records[-1]["singular_skipped"] == train_counts[-1]


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_the_loss_is_the_mean_over_the_other_samples(method):
    """ml_loss on a batch with singular rows equals, in value and gradient, ml_loss on the batch
    without them: their log det, latent density and reconstruction all leave the mean."""
    x = data(12, seed=5, dtype=torch.float64)
    model = Kinked(CONFIG).to(torch.float64)
    model.initialize(x)
    singular = model.encode(x)[:, 0] <= 0
    assert 0 < int(singular.sum()) < len(x)
    params = list(model.parameters())
    probes = torch.randint(0, 2, (len(x), 2, 2), generator=torch.Generator().manual_seed(0))
    probes = 2.0 * probes.to(torch.float64) - 1
    kw = {"method": method, "weight": 0.7, "beta": 3.0}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ENGINE)
        kw_all = {"probes": probes} if method == "cg" else {}
        loss, parts = ml_loss(model, x, **kw, **kw_all)
        kw_kept = {"probes": probes[~singular]} if method == "cg" else {}
        kept_loss, kept_parts = ml_loss(model, x[~singular], **kw, **kw_kept)
    assert int(parts["singular"]) == int(singular.sum()) and int(kept_parts["singular"]) == 0
    torch.testing.assert_close(loss, kept_loss, rtol=1e-12, atol=0)
    for name in ("recon", "log_pz", "logdet", "nll"):
        torch.testing.assert_close(parts[name], kept_parts[name], rtol=1e-12, atol=0)
    for got, want in zip(grads(loss, params), grads(kept_loss, params)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_batch_of_singular_samples_only_takes_no_step(tmp_path):
    model = Kinked(CONFIG, threshold=math.inf).to(torch.float64)
    x = data(80, seed=0, dtype=torch.float64)
    initial = Kinked(CONFIG).to(torch.float64)
    initial.initialize(x[:64])  # what the trainer starts from, up to the order of the batch
    history, messages = fit(model, x, tmp_path)
    for record in history.records:
        assert record["singular_steps"] == 4 and record["singular_skipped"] == 64
        assert record["val_singular"] == 16 and record["val_loss"] is None
        assert not [k for k in record if k.startswith("train_")]  # no step left a loss
        assert record["skipped_steps"] == 0  # not counted as non-finite steps
    # No step: the weights are the initial ones (an Adam step at lr 1e-2 moves them by ~1e-2;
    # the trainer's ActNorm batch is x[:64] shuffled, equal up to rounding).
    for p, q in zip(model.parameters(), initial.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert len([m for m in messages if ENGINE in m]) == EPOCHS
    assert "4 step(s) had no other sample and were skipped" in messages[-1]


def test_a_healthy_loss_is_the_plain_mean_bit_for_bit():
    """Without singular samples the loss and its gradient are exactly those of the plain
    formula with the engine's default call (as before singular samples were left out), the
    reconstruction through the decoder output that call ran (LogdetInfo.output), as ml_loss's."""
    x = data(10, seed=2, dtype=torch.float32)
    model = RectangularFlow(CONFIG)
    model.initialize(x)
    loss, parts = ml_loss(model, x, weight=0.6, beta=2.0, method="exact")
    z = model.encode(x)
    ld, info = logdet_grad(model.decoder, z, "exact", return_info=True)
    log_p = model.latent_log_prob(z) - 0.5 * ld
    plain = 2.0 * ((x - info.output) ** 2).sum(1).mean() - 0.6 * log_p.mean()
    assert int(parts["singular"]) == 0
    assert torch.equal(loss, plain)
    params = list(model.parameters())
    for got, want in zip(grads(loss, params), grads(plain, params)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("threshold", [0.0, -math.inf], ids=["singular", "healthy"])
def test_validation_is_log_prob_terms_over_the_samples_not_singular(tmp_path, threshold):
    """The val_ metrics are the means of RectangularFlow.log_prob_terms (exact, chunks of
    eval_chunk_size) over the samples it does not mark, bit for bit; without singular samples
    that is the plain mean over all of them."""
    x = data(80, seed=1, dtype=torch.float64)
    model = Kinked(CONFIG, threshold=threshold).to(torch.float64)
    history, _ = fit(model, x, tmp_path, epochs=1, eval_chunk_size=5)
    record = history.records[-1]  # restore_best=False: the model is the one validated
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ENGINE)
        terms = model.eval().log_prob_terms(x[64:], chunk_size=5)
    kept = ~terms.singular
    assert record["val_singular"] == int(terms.singular.sum())
    assert (record["val_singular"] > 0) == (threshold == 0.0)
    n = int(kept.sum())
    for key, values in (
        ("nll", -terms.log_prob),
        ("recon", terms.sq_error),
        ("logdet", terms.logdet),
    ):
        assert record[f"val_{key}"] == float(values[kept].sum() / n), key
