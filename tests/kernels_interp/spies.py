"""A stand-in for a Triton kernel that records each launch's keyword arguments (the constexprs
and num_warps), then launches the kernel: what the launchers pass, checked without a GPU."""


class KernelSpy:
    """Wraps ``kernel``: ``spy[grid](*args, **kwargs)`` records ``kwargs`` in ``launches``."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch
