import subprocess
import sys


def test_help_lists_examples_and_exits_zero():
    out = subprocess.run([sys.executable, "-m", "skyguard.cli.main", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0
    assert "Examples:" in out.stdout
