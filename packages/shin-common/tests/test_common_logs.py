import logging

import pytest

from shin_common import progress, setup_logging


def test_level_from_environment(monkeypatch):
    monkeypatch.setenv("SHIN_LOG_LEVEL", "debug")
    assert setup_logging() == logging.DEBUG
    assert logging.getLogger().level == logging.DEBUG
    assert setup_logging("WARNING") == logging.WARNING


def test_unknown_level_is_named(monkeypatch):
    monkeypatch.setenv("SHIN_LOG_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="unknown log level 'LOUD' \\(from SHIN_LOG_LEVEL\\)"):
        setup_logging()


def test_progress_quiet_off_terminal_and_on_other_ranks(monkeypatch):
    monkeypatch.delenv("SHIN_PROGRESS", raising=False)
    assert progress(range(3)).disable  # pytest captures stderr: not a terminal
    monkeypatch.setenv("SHIN_PROGRESS", "1")
    assert not progress(range(3)).disable
    assert progress(range(3), rank=1).disable
    assert list(progress(range(3))) == [0, 1, 2]
