"""Fixtures of the adversarial tier: see adv_fixtures.py (shared with tests/fuzz)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from adv_fixtures import attack_lab, bpf_runner  # noqa: E402,F401
