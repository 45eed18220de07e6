"""A stand-in for a Triton kernel that records each launch's keyword arguments (the constexprs
and num_warps), then launches the kernel: what the launchers pass, checked without a GPU; and a
counter of the autotuner's timings."""


class KernelSpy:
    """Wraps ``kernel``: ``spy[grid](*args, **kwargs)`` records ``kwargs`` in ``launches``."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def count_timings(monkeypatch, tuning) -> list[int]:
    """Count the autotuner's timed runs (``tuning._seconds`` calls): one entry per run."""
    timed: list[int] = []
    seconds = tuning._seconds

    def counted(run, device):
        timed.append(1)
        return seconds(run, device)

    monkeypatch.setattr(tuning, "_seconds", counted)
    return timed
