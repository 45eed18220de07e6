import pytest

from rnf_fast import benchmarks


def pytest_addoption(parser):
    parser.addoption(
        "--bench-size",
        choices=["standard", "quick"],
        default="quick",
        help="quick (default): tiny sizes that check the suite runs; standard: the README "
        "problem sizes (use with --benchmark-enable, as `rnf-fast bench` does)",
    )


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(benchmarks.machine_info())


@pytest.fixture(scope="session")
def bench_size(request):
    return request.config.getoption("--bench-size")
