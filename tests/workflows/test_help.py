"""Every console command: ``--help`` shows defaults and one example, ``--version`` the version."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest

from workflows import cli_docs

# (command, module, a flag's help text with its default as argparse prints it)
COMMANDS = [
    ("make-phantoms", "workflows.make_phantoms", "number of studies, 1..999 (default: 8)"),
    ("build-corpus", "workflows.build_corpus", "also cut every k-th unlabelled slice (default: 4)"),
    ("train-detector", "workflows.train_detector", "training epochs (default: 30)"),
    ("browse-catalog", "workflows.browse_catalog", "gallery cards per page (default: 48)"),
    ("train-model", "workflows.train_model", "file path (default: tiny)"),
    ("evaluate-model", "workflows.evaluate_model", "(must exist here) (default: cpu)"),
]


def run_main(module: str, argv: list[str], capsys) -> str:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(("prog", "module", "default_help"), COMMANDS)
def test_help_shows_defaults_and_an_example(prog, module, default_help, capsys):
    out = run_main(module, ["--help"], capsys)
    assert out.startswith(f"usage: {prog} ")
    flat = " ".join(out.split())  # argparse wraps help text at the terminal width
    assert default_help in flat
    assert "(default: None)" not in flat and "(default: False)" not in flat
    assert "(default: [])" not in flat and "(default: )" not in flat
    lines = out.splitlines()
    at = lines.index("example:")
    assert lines[at + 1].startswith(f"  {prog} ")  # the example keeps its own line
    assert "--version" in out


@pytest.mark.parametrize(("prog", "module", "default_help"), COMMANDS)
def test_version(prog, module, default_help, capsys):
    out = run_main(module, ["--version"], capsys)
    assert out == f"{prog} regioncorpus {importlib.metadata.version('regioncorpus')}\n"


def test_cli_docs_carry_the_examples():
    text = cli_docs.help_text("workflows.build_corpus")
    assert "(default: 4)" in " ".join(text.split())
    assert "example:\n  build-corpus " in text
