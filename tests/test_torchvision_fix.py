"""The torchvision trap: timm and transformers' GPT-2 must import beside a CPU-only torch, and the fix must do
nothing where torchvision imports on its own."""

import os
import subprocess
import sys

import pytest
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


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CI"), reason="installs a whole virtual environment (minutes); runs in CI, CI=true"
)
def test_a_fresh_virtual_environment_from_the_readme_install_command_imports_timm_and_gpt2(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements.txt")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    code = PROBE.format(root=str(ROOT), first="") + (
        "from transformers import GPT2Config\n"
        "GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, add_cross_attention=True))\n"
        "import timm; timm.create_model('vit_tiny_patch16_224', num_classes=0)\n"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
