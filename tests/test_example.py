"""examples/lora_in_one_screen.py runs as a reader runs it, and stays one screen long."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

EXAMPLE = ROOT / "examples" / "lora_in_one_screen.py"


def test_lora_in_one_screen_runs_and_checks_what_it_claims(tmp_path):
    # From another directory, as `python examples/lora_in_one_screen.py` would be run anywhere.
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    # r · (in + out) per adapter, 2 layers: q_proj 4 · (64 + 64), v_proj 4 · (64 + 32) (2 kv heads)
    assert lines[0].startswith("trainable params: 1,792 ")
    losses = [float(line.split()[-1]) for line in lines if line.startswith("step")]
    assert losses[-1] < 0.5 * losses[0]  # it learned
    assert lines[-1].startswith("merged == unmerged") and lines[-1].endswith("done")


def test_it_fits_on_one_screen():
    assert len(EXAMPLE.read_text(encoding="utf-8").splitlines()) <= 60
