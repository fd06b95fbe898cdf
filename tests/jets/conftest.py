"""Fixtures of the Taylor-engine tests."""

from __future__ import annotations

import pytest

from jaccli.jets import fold


@pytest.fixture
def runs(monkeypatch):
    """How many passes each fold pattern computed (its ``run`` returned a jet)."""
    counts = {"first-layer": 0, "first-rows": 0, "first-series": 0}

    def counting(pattern: str, finder):
        def made(*args):
            run = finder(*args)

            def wrapped(*a):
                jet = run(*a)
                counts[pattern] += jet is not None
                return jet

            return wrapped

        return made

    monkeypatch.setattr(fold, "_first_layer_run", counting("first-layer", fold._first_layer_run))
    monkeypatch.setattr(fold, "_first_rows_run", counting("first-rows", fold._first_rows_run))
    monkeypatch.setattr(fold, "_first_series_run", counting("first-series", fold._first_series_run))
    return counts
