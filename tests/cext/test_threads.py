"""Thread-count settings: environment default, validation, restoring."""

from __future__ import annotations

import pytest

from meshmerge.cext import threads


def test_environment_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_threads", None)
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.get_threads() == 3


def test_default_is_the_cpus_we_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(threads, "_threads", None)
    monkeypatch.delenv(threads.ENV, raising=False)
    assert threads.get_threads() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("raw", ["0", "-1", "two", "100000"])
def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setattr(threads, "_threads", None)
    monkeypatch.setenv(threads.ENV, raw)
    with pytest.raises(ValueError, match="MESHMERGE_THREADS must be an integer"):
        threads.get_threads()


def test_using_threads_restores_the_previous_setting() -> None:
    before = (threads.get_threads(), threads.get_grain())
    with threads.using_threads(2, grain=8):
        assert (threads.get_threads(), threads.get_grain()) == (2, 8)
    assert (threads.get_threads(), threads.get_grain()) == before
