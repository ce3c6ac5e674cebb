"""Importing geko_data (and the integrations package) does not import transformers, TRL or Lightning."""

import subprocess
import sys

import pytest


@pytest.mark.timeout(60)
def test_frameworks_are_imported_only_by_their_integration():
    code = ("import sys, geko_data, geko_data.integrations, geko_data.sampler, geko_data.stream\n"
            "heavy = [m for m in ('transformers', 'trl', 'lightning', 'accelerate') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "import geko_data.integrations.hf\n"
            "assert 'transformers' in sys.modules and 'trl' not in sys.modules\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
