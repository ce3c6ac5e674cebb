"""`geko-train --help` documents every TrainArgs and GEKOConfig field, generated from their docstrings."""

import dataclasses
import os
import subprocess
import sys

import pytest

from geko_data.config import GEKOConfig
from geko_data.train.__main__ import build_parser, field_docs
from geko_data.train.args import TrainArgs

FLAG_CLASSES = (TrainArgs, GEKOConfig)


def flag_fields(cls):
    return [f for f in dataclasses.fields(cls) if f.name != "name"]  # GEKOConfig.name labels presets: no flag


@pytest.mark.parametrize("cls", FLAG_CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring_entry_and_no_entry_is_stale(cls):
    # A renamed or added field without its Args entry (or an entry left for a removed field) fails here.
    assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}
    assert all(text.strip() for text in field_docs(cls).values())


@pytest.mark.timeout(60)
def test_help_documents_every_field_with_doc_type_default_and_allowed_values():
    script = os.path.join(os.path.dirname(sys.executable), "geko-train")  # the installed console script
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=50,
                         env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    flat = " ".join(text.split())
    actions = {a.dest: a for a in build_parser()._actions}
    for cls in FLAG_CLASSES:
        docs = field_docs(cls)
        for f in flag_fields(cls):
            assert f"--{f.name}" in text, f"--{f.name} missing from --help"
            help_text = actions[f.name].help
            assert help_text and docs[f.name].replace("``", "")[:40] in help_text.replace("%%", "%"), f.name
            assert f"type {f.type}" in help_text, f.name
            # as printed: the flag, then the start of its docstring entry
            assert f"--{f.name} {actions[f.name].metavar} {docs[f.name].replace('``', '')[:30]}" in flat, f.name
    # allowed values come from the validators, so they cannot drift from what is accepted
    assert "allowed: one of geko, unbiased, uniform, random_subset, infobatch" in actions["mode"].help
    assert "allowed: an int >= 1" in actions["num_epochs"].help
    assert "allowed: a number in (0.0, 1.0]" in actions["q_value_lr"].help
    assert "Defaults to 0.1" in actions["warmup_ratio"].help
