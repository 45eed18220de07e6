"""How the CLI tests read an error: one line of stderr, no traceback, the usage exit status."""

from __future__ import annotations

import pytest

from rnf_fast.cli import main


def one_error_line(err: str) -> str:
    """The single line of stderr, checked to be an rnf-fast error without a traceback."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rnf-fast: error: "), err
    assert "Traceback" not in err
    return lines[0]


def usage_error(argv: list[str], capsys) -> str:
    """Run ``rnf-fast argv``, expect a usage error (exit status 2), return its one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return one_error_line(capsys.readouterr().err)
