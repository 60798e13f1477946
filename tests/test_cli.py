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


def test_shared_options_agree_across_subcommands():
    """--ckpt / --device / --precision / --seed / --tail-drop come from dcdit.cli.options: same defaults everywhere."""
    from dcdit.cli import COMMANDS, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "sample" in a.choices).choices
    seen = {}
    for name in COMMANDS:
        for action in subparsers[name]._actions:
            if action.dest in ("device", "precision", "seed", "ckpt"):
                seen.setdefault(action.dest, set()).add((action.default, action.type, tuple(action.choices or ())))
    assert seen["device"] == {("auto", None, ())}
    assert seen["precision"] == {("auto", None, ("auto", "fp32", "bf16", "fp16"))}
    assert seen["seed"] == {(0, int, ())}
    assert len(seen["ckpt"]) == 1


def test_tail_drop_options_reject_bad_values_in_one_line(capsys):
    """Every command's tail-drop option is read by the one parser (dcdit.sampling.budget.parse_tail_drop)."""
    import pytest

    cases = [
        (["sample", "--ckpt", "x", "--npz", "s.npz", "--tail-drop", "1.5"], "--tail-drop: the tail-drop fraction must lie in [0, 1), got '1.5'"),
        (["sample", "--ckpt", "x", "--npz", "s.npz", "--uncond-drop", "nan"], "--uncond-drop: the tail-drop fraction must lie in [0, 1), got 'nan'"),
        (["sample", "--ckpt", "x", "--npz", "s.npz", "--cond-drop", "abc"], "--cond-drop: the tail-drop fraction must be a number in [0, 1), got 'abc'"),
        (["visualize", "--ckpt", "x", "--out", "o", "--tail-drop", "1"], "--tail-drop: the tail-drop fraction must lie in [0, 1), got '1'"),
        (["flops", "--model", "DiT-S/2", "--tail-drop", "0,1.2"], "--tail-drop: each tail-drop fraction must lie in [0, 1), got '1.2'"),
        (["flops", "--model", "DiT-S/2", "--uncond-drop", "-0.1"], "--uncond-drop: the tail-drop fraction must lie in [0, 1), got '-0.1'"),
        (["bench", "--tail-drop", "0.3,x"], "--tail-drop: each tail-drop fraction must be a number in [0, 1), got 'x'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], (argv, err)
