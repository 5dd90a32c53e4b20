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


@pytest.mark.parametrize("value", ["0", "false", "False", "FALSE", "no", "NO", "off", "Off", " off ", ""])
def test_progress_off_words_in_any_case(monkeypatch, value):
    monkeypatch.setenv("SHIN_PROGRESS", value)
    assert progress(range(3)).disable


@pytest.mark.parametrize("value", ["1", "true", "True", "YES", "on", "ON"])
def test_progress_on_words_in_any_case(monkeypatch, value):
    monkeypatch.setenv("SHIN_PROGRESS", value)
    assert not progress(range(3)).disable


def test_progress_warns_about_an_unrecognised_value(monkeypatch):
    monkeypatch.setenv("SHIN_PROGRESS", "sometimes")
    with pytest.warns(UserWarning, match=r"SHIN_PROGRESS='sometimes' is not understood; expected one of 1, true"):
        bar = progress(range(3))
    assert bar.disable  # falls back to the terminal check; pytest's stderr is not a terminal


@pytest.mark.parametrize(("value", "level"), [("10", logging.DEBUG), (" 30 ", logging.WARNING), ("5", 5)])
def test_numeric_level_from_environment(monkeypatch, value, level):
    monkeypatch.setenv("SHIN_LOG_LEVEL", value)
    assert setup_logging() == level
    assert logging.getLogger().level == level
    assert setup_logging(value) == level
