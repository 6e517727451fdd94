"""conftest's resource checks: a missing resource skips on a laptop and fails under CI=true; an import
error in an installed module is never turned into a skip."""

from __future__ import annotations

import sys

import conftest
import pytest


def test_require_skips_locally_and_fails_in_ci(monkeypatch):
    conftest.require(True, "present")  # nothing happens
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="data missing"):
        conftest.require(False, "data missing")
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match=r"data missing \[CI=true"):
        conftest.require(False, "data missing")


def test_require_module_only_skips_when_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="opd_no_such_module is not installed: pip install x"):
        conftest.require_module("opd_no_such_module", "pip install x")
    with pytest.raises(pytest.skip.Exception):
        conftest.require_module("opd_no_such_package.sub", "pip install x")
    (tmp_path / "opd_broken_module.py").write_text("import opd_missing_dependency_of_a_broken_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="opd_missing_dependency_of_a_broken_module"):
        conftest.require_module("opd_broken_module", "pip install x")  # installed but broken: an error
    sys.modules.pop("opd_broken_module", None)
    assert conftest.require_module("json", "stdlib").dumps([1]) == "[1]"
