"""DDP with 2 gloo processes on halves of each batch matches one process on whole batches:
the update of one SGD step (exact log det, ActNorm initialised on rank 0 and broadcast), a
short run of the trainer, and one whose batches hold singular samples (left out of the loss:
each rank weighs its mean by its share of the kept samples; the counts are summed)."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rnf_fast.models import FlowConfig, RectangularFlow
from rnf_fast.training import Objective, distributed, train

from .kinked import Kinked

DTYPE = torch.float64
CONFIG = FlowConfig(D=3, d=2, f_layers=2, f_hidden=(8,), h_layers=1, h_hidden=(8,))
TRAIN_OPTIONS = {
    "epochs": 2,
    "batch_size": 16,
    "lr": 1e-2,
    "method": "exact",
    "warmup_end": 1,
    "progress": False,
    "restore_best": False,
}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def data(n: int, *, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, CONFIG.D, generator=generator, dtype=DTYPE) @ torch.tensor(
        [[1.0, 0.2, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 0.1]], dtype=DTYPE
    )


def one_step(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One SGD step of the ML loss on x (this rank's half under DDP); the updated state."""
    model = RectangularFlow(CONFIG).to(DTYPE)
    batch = data(8, seed=0)
    if distributed.rank_and_world()[0] == 0:
        model.initialize(batch)
    distributed.broadcast_module(model)
    objective = distributed.wrap(Objective(model, method="exact", beta=5.0), device=x.device)
    loss, _ = objective(x)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return model.state_dict()


def run(run_dir, *, kinked: bool = False) -> dict:
    """A short run; its final state and records (the model is rank 1 where z_1 <= 0 if kinked)."""
    model = (Kinked(CONFIG) if kinked else RectangularFlow(CONFIG)).to(DTYPE)
    history = train(model, data(64, seed=1), data(16, seed=2), TRAIN_OPTIONS, run_dir)
    return {"state": model.state_dict(), "records": history.records}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    distributed.init_from_env(backend="gloo")
    try:
        stepped = one_step(distributed.shard(data(8, seed=0)))
        trained = run(os.path.join(out, "ddp"))
        kinked = run(os.path.join(out, "kinked"), kinked=True)
        torch.save(
            {"step": stepped, "train": trained, "kinked": kinked},
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_states_close(got: dict, want: dict) -> None:
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected_step = one_step(data(8, seed=0))
    expected_run = run(tmp_path / "single")["state"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected_kinked = run(tmp_path / "single-kinked", kinked=True)
    assert sum("JᵀJ is numerically singular" in str(w.message) for w in caught) == 2
    model = RectangularFlow(CONFIG).to(DTYPE)
    initial = model.state_dict()
    names = [name for name, _ in model.named_parameters()]
    moved = max(float((expected_step[k] - initial[k]).abs().max()) for k in names)
    assert moved > 1e-3  # the step does something
    for result in ranks:
        assert_states_close(result["step"], expected_step)
        assert_states_close(result["train"]["state"], expected_run)
        assert_states_close(result["kinked"]["state"], expected_kinked["state"])
        counts = [
            [r[k] for k in ("singular_skipped", "singular_steps", "val_singular")]
            for r in result["kinked"]["records"]
        ]
        want = [
            [r[k] for k in ("singular_skipped", "singular_steps", "val_singular")]
            for r in expected_kinked["records"]
        ]
        assert counts == want and want[-1][0] > 0  # summed over the ranks, as one process
        for got, ref in zip(result["kinked"]["records"], expected_kinked["records"]):
            assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-9)
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # written once, by rank 0
