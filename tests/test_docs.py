"""The docs site builds with warnings as errors and covers every public name."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

import geko_data
import geko_data.train
from geko_data.config import GEKOConfig
from geko_data.train.args import TrainArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join(ROOT, "docs", "api.md")


def _documented_names() -> set[str]:
    with open(API, encoding="utf-8") as f:
        return {m.group(1).rsplit(".", 1)[-1] for m in re.finditer(r"^::: (\S+)", f.read(), re.M)}


@pytest.mark.timeout(240)
def test_site_builds_strict(tmp_path):
    # mkdocs --strict turns griffe's warnings into errors: a docstring naming a parameter that is not in
    # the signature (a renamed field), or a reference to a name that does not exist, fails the build.
    mkdocs = os.path.join(os.path.dirname(sys.executable), "mkdocs")
    run = subprocess.run([mkdocs, "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=220)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "api" / "index.html").exists()


@pytest.mark.parametrize("module", [geko_data, geko_data.train], ids=lambda m: m.__name__)
def test_every_public_name_in_the_reference(module):
    public = {n for n in module.__all__ if not n.startswith("_") and n != "MODES"}
    missing = sorted(public - _documented_names())
    assert not missing, f"public names missing from docs/api.md: {missing}"


@pytest.mark.parametrize("module", [geko_data, geko_data.train], ids=lambda m: m.__name__)
def test_every_public_callable_has_a_docstring(module):
    bare = [n for n in module.__all__ if callable(getattr(module, n)) and not (getattr(module, n).__doc__ or "").strip()]
    assert not bare, f"public names without a docstring: {bare}"


@pytest.mark.parametrize("cls", [GEKOConfig, TrainArgs], ids=lambda c: c.__name__)
def test_every_field_documented(cls):
    # The reference renders the class docstring's Args section: every field needs its entry there.
    doc = cls.__doc__ or ""
    documented = set(re.findall(r"^\s{8}(\w+):", doc, re.M))
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields - documented == set(), f"{cls.__name__} fields without a doc entry: {sorted(fields - documented)}"


def test_errors_a_user_catches_are_exported():
    # The README's examples catch these by name from the package itself.
    for name in ("ShardError", "StateFileError", "FingerprintError"):
        assert name in geko_data.__all__
        assert isinstance(getattr(geko_data, name), type)
