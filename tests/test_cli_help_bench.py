"""``--help`` states every option's default (issue 16), and ``upi-fast bench`` writes under the
current folder (or ``--out``) and reports a bad suite in one line."""
from __future__ import annotations

import argparse
import os

import pytest

from upi_fast.cli import build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices), {a.dest: a.help for a in action._choices_actions}
    raise AssertionError("no subcommands")


def _in_required_group(parser, action) -> bool:
    return any(g.required and action in g._group_actions for g in parser._mutually_exclusive_groups)


def _rendered_default(default) -> list[str]:
    if isinstance(default, (list, tuple)):
        return [str(v) for v in default]
    if isinstance(default, float):
        return [f"{default:g}"] if f"{default:g}" != str(default) else [str(default)]
    return [str(default)]


def test_every_option_of_every_subcommand_says_its_default():
    parser = build_parser()
    subs, sub_help = _subparsers(parser)
    assert {"demo", "compute", "evaluate", "show", "bench", "info"} <= set(subs)
    checked = 0
    for name, sub in [("upi-fast", parser), *subs.items()]:
        if name != "upi-fast":
            assert sub_help.get(name), f"subcommand {name} has no help"
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            text = formatter._expand_help(action) if action.help else ""
            assert text.strip(), f"{where}: empty help"
            if action.nargs == 0 or not action.option_strings:  # flags and positionals: help is enough
                continue
            if action.required or _in_required_group(sub, action):  # no default: the usage line says required
                continue
            assert "default" in text.lower(), f"{where}: help does not state the default: {text!r}"
            if action.default is not None:
                missing = [d for d in _rendered_default(action.default) if d not in text]
                assert not missing, f"{where}: default {action.default!r} not in help {text!r}"
            checked += 1
    assert checked > 40  # every subcommand was walked


def test_help_shows_units_and_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compute", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--norm NORM norm bounding the perturbation: 2 or inf (default: 2)" in out
    assert "pixels in [0, 1]" in out and "(default: 64)" in out and "224 for an ImageFolder" in out
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: the perturbation file's, else simple" in out


def test_bench_unknown_suite_is_one_line(capsys):
    capsys.readouterr()
    assert main(["bench", "nosuch"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("upi-fast: error: ") and "'nosuch'" in err[0], err
    assert "upi_grad" in err[0]


def test_bench_writes_under_the_current_folder(tmp_path, monkeypatch):
    import upi_fast.bench.__main__ as bench_main
    from upi_fast.bench.harness import results_dir

    monkeypatch.chdir(tmp_path)
    path = results_dir("cpu")
    assert os.path.commonpath([path, str(tmp_path)]) == str(tmp_path)
    assert os.path.commonpath([path, REPO]) != REPO
    assert os.path.isdir(path)
    seen = []
    monkeypatch.setattr(bench_main, "main", lambda argv: seen.append(argv) or 0)
    assert main(["bench", "svd", "--quick"]) == 0
    argv = seen[-1]
    assert argv[:2] == ["svd", "--quick"] and argv[argv.index("--out") + 1] == os.path.join("upi_out", "bench")
    assert main(["bench", "--out", str(tmp_path / "r"), "--threads", "1"]) == 0
    argv = seen[-1]
    assert argv[argv.index("--out") + 1] == str(tmp_path / "r") and argv[argv.index("--threads") + 1] == "1"


def test_python_m_bench_unknown_suite_is_one_line(capsys):
    from upi_fast.bench.__main__ import main as bench_main
    assert bench_main(["nosuch"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "'nosuch'" in err[0], err
