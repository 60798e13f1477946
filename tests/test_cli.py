import subprocess
import sys

from dcdit import __version__
from dcdit.cli import main


def test_version_and_info(capsys):
    out = subprocess.run([sys.executable, "-m", "dcdit", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"dcdit {__version__}"
    assert main(["info", "--filter", "S/2"]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("DiT-S/2"))
    assert row.split()[1:] == ["33.0", "256", "6.06", "5.45"]


def test_no_command_prints_help(capsys):
    assert main([]) == 1
    assert "usage: dcdit" in capsys.readouterr().out
