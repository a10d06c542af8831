"""The package re-exports its public names lazily: importing it loads no torch (train.py validates first)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import senseflow_algos


def test_public_names_resolve():
    for name in senseflow_algos.__all__:
        assert getattr(senseflow_algos, name) is not None, name
    with pytest.raises(AttributeError, match='no attribute'):
        senseflow_algos.does_not_exist  # noqa: B018


def test_import_is_light():
    code = 'import sys, senseflow_algos, senseflow_algos.config; print("torch" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == 'False'
