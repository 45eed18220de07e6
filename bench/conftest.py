"""bench/'s tests: the ``--bench-size`` option, the machine in pytest-benchmark's JSON. pytest
puts this folder on ``sys.path`` (rootdir-relative conftest, no ``__init__.py``), so the tests
import the harness as ``harness``."""

import harness
import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--bench-size",
        choices=["standard", "quick"],
        default="quick",
        help="quick (default): tiny sizes that check the suite runs; standard: the README "
        "problem sizes (use with --benchmark-enable, as `rnf-fast bench` does)",
    )


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(harness.machine_info())


@pytest.fixture(scope="session")
def bench_size(request):
    return request.config.getoption("--bench-size")
