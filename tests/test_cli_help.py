"""`epd --help` and every command's help: plain text (no reStructuredText markup), every option explained; the
light commands (`--help`, `predictor show`, `metrics list`) import no torch (their start-up time is a benchmark:
benchmarks/cli_startup.py)."""

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from epd.cli import COMMANDS, _build_parser, _fill_help, main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import FIXTURES, needs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RST = ("``", ":func:", ":class:", ":mod:", ":data:", ".. ")
HEAVY = ("torch", "diffusers", "transformers", "mlflow", "open_clip", "matplotlib", "scipy")


def _parsers():
    _, handlers = _build_parser()
    for words, (p, module) in handlers.items():
        importlib.import_module(module).add_arguments(p)
        _fill_help(p)
        yield words, p


def test_top_level_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert not [m for m in RST if m in out], out
    for words, _, help_ in COMMANDS:
        assert words[0] in out


@pytest.mark.parametrize("words", [w for w, _, _ in COMMANDS], ids=" ".join)
def test_every_option_has_help(words):
    p = dict(_parsers())[words]
    bare = [a.option_strings or a.dest for a in p._actions
            if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not bare, f"epd {' '.join(words)}: options without help: {bare}"
    text = p.format_help()
    assert not [m for m in RST if m in text], text


def test_config_flag_is_explained(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = capsys.readouterr().out
    opts = out[out.index("options:"):]
    line = opts[opts.index("--config"):].split("--backbone")[0]
    assert "workflow config" in line


def _modules_after(argv: list[str]) -> set[str]:
    code = ("import sys, json\nfrom epd.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def test_import_cli_imports_no_torch():
    code = "import sys, epd.cli; print(sorted({m.split('.')[0] for m in sys.modules} & set(%r)))" % (HEAVY,)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["metrics", "list"], ["metrics", "list", "--json"], ["predictor", "--help"],
                                  ["predictor", "show", "--help"], ["evaluate", "--help"], ["report", "--help"]],
                         ids=" ".join)
def test_light_commands_import_nothing_heavy(argv):
    assert not _modules_after(argv) & set(HEAVY)


@needs("rlepd/best_models/sd15/sd15-best.pkl")
def test_predictor_show_imports_nothing_heavy(tmp_path):
    from epd.predictor import load, save

    native = save(load(FIXTURES / "rlepd/best_models/sd15/sd15-best.pkl"), tmp_path / "t")
    for f in (FIXTURES / "rlepd/best_models/sd15/sd15-best.pkl", native):
        assert not _modules_after(["predictor", "show", str(f)]) & set(HEAVY)


def test_metrics_list_calls_alignment_a_log_probability(capsys):
    assert main(["metrics", "list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("digits_alignment "))
    assert "log-probability" in line and "classifier probability" not in line
