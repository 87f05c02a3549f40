"""The torchvision trap: timm and transformers' GPT-2 must import beside a CPU-only torch, and the fix must do
nothing where torchvision imports on its own."""

import subprocess
import sys

from conftest import ROOT

PROBE = """
import sys
sys.path.insert(0, {root!r})
{first}
import torchvision_fix, timm
from transformers import GPT2LMHeadModel
print("applied" if torchvision_fix.WORKAROUND_APPLIED else "not-needed")
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_timm_and_gpt2_import_after_the_fix():
    plain = _run("import torchvision")
    result = _run(PROBE.format(root=str(ROOT), first=""))
    assert result.returncode == 0, result.stderr[-2000:]
    if plain.returncode == 0:  # a machine where torchvision works: the fix must stay out of the way
        assert result.stdout.strip() == "not-needed"
    else:  # our machines: the CUDA torchvision wheel beside CPU torch
        assert "torchvision::nms does not exist" in plain.stderr
        assert result.stdout.strip() == "applied"


def test_fix_is_a_no_op_once_torchvision_imports():
    # After a successful import (here, the fix's own), running it again changes nothing.
    code = PROBE.format(root=str(ROOT), first="") + "print(torchvision_fix.ensure_torchvision_importable())"
    result = _run(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "False"
