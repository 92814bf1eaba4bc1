"""Fixtures of the fuzz tier: the adversarial tier's (tests/adversarial/adv_fixtures.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adversarial"))
sys.path.insert(0, str(Path(__file__).parent))

from adv_fixtures import attack_lab, bpf_runner  # noqa: E402,F401
