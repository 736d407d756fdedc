"""`make` installs the torch build that fits the machine: the CPU wheel when no NVIDIA GPU is
visible, the CUDA one when one is; TORCH_SPEC / TORCH_INDEX override, and CI's TORCH_SPEC installs
exactly as it always did (from the one package index CI reaches).

The recipe runs for real, against a fake `.venv/bin/python` that records its arguments (and has
no torch yet) and a fake `nvidia-smi`: nothing is installed."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import ROOT

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def fake(path, script: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def install_torch(tmp_path, gpu: bool, args=(), env=None) -> tuple[list[str], str]:
    """Run the setup recipe; returns (the pip commands the fake python got, what make printed)."""
    log = tmp_path / "python.log"
    venv = tmp_path / "venv"
    fake(venv / "bin" / "python", f'echo "$*" >> {log}\n[ "$1" = -c ] && exit 1\nexit 0\n')
    gpus = (
        'echo "GPU 0: NVIDIA A100 (UUID: GPU-0)"' if gpu else "echo 'NVIDIA-SMI has failed'; exit 9"
    )
    fake(tmp_path / "bin" / "nvidia-smi", gpus + "\n")
    unset = ("TORCH_SPEC", "TORCH_INDEX", "MAKEFLAGS")
    clean = {k: v for k, v in os.environ.items() if k not in unset}
    run_env = clean | {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"} | (env or {})
    p = subprocess.run(["make", "-C", str(ROOT), f"VENV={venv}", f"{venv}/.runtime-installed", *args],
                       capture_output=True, text=True, env=run_env, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    pip = [line for line in log.read_text().splitlines() if "pip install" in line]
    return [line for line in pip if "requirements" not in line], p.stdout


def test_without_a_gpu_the_cpu_wheel_is_installed_and_make_says_so(tmp_path):
    pip, printed = install_torch(tmp_path, gpu=False)
    assert pip == [f"-m pip install -q torch>=2.4 --index-url {CPU_INDEX}"]
    assert "no NVIDIA GPU visible, installing the CPU build" in printed


def test_with_a_gpu_the_default_cuda_build_is_installed(tmp_path):
    pip, printed = install_torch(tmp_path, gpu=True)
    assert pip == ["-m pip install -q torch>=2.4"]
    assert "an NVIDIA GPU is visible, installing the CUDA build" in printed


def test_ci_torch_spec_installs_exactly_as_before_from_the_default_index(tmp_path):
    pip, printed = install_torch(tmp_path, gpu=False, env={"TORCH_SPEC": "torch==2.13.0"})
    assert pip == ["-m pip install -q torch==2.13.0"]  # no --index-url: CI reaches only its own
    assert "NVIDIA" not in printed


@pytest.mark.parametrize(
    "args, expected",
    [
        ((f"TORCH_INDEX={CPU_INDEX}",), f"-m pip install -q torch>=2.4 --index-url {CPU_INDEX}"),
        (("TORCH_INDEX=",), "-m pip install -q torch>=2.4"),  # PyPI's default, on any machine
        (("TORCH_SPEC=torch==2.5.1",), "-m pip install -q torch==2.5.1"),
    ],
)
def test_torch_spec_and_torch_index_override_the_choice(tmp_path, args, expected):
    pip, _ = install_torch(tmp_path, gpu=False, args=args)
    assert pip == [expected]
