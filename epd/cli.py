"""``epd <command>``: the command-line entry point.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int | None``;
this file only maps command names to modules, so modules are imported lazily (heavy packages such as
torch, diffusers or open_clip load only for the command that needs them: ``epd --help``, ``epd predictor show``
and ``epd metrics list`` import none of them). Options a command module leaves without help get the shared
explanation of that flag from :data:`COMMON_HELP`, so every option's ``--help`` line says what it does.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time

from .errors import EPDError

# (command words, module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("bench", "convergence"), "epd.bench.convergence", "solver convergence orders on the analytic GMM"),
    (("bench", "backbone"), "epd.bench.backbone", "train the embedded digits backbone and measure it"),
    (("bench", "solvers"), "epd.bench.solvers", "baselines vs distilled EPD on the embedded backbone"),
    (("bench", "rdpo"), "epd.bench.rdpo", "RDPO vs distilled table on held-out prompts"),
    (("backbone", "train"), "epd.backbones.digits.train", "train the embedded digits backbone"),
    (("backbone", "check"), "epd.backbones.check", "resolve a backbone's weights (fails listing missing files)"),
    (("weights", "fake"), "epd.fake_weights", "write RANDOM-weight stand-ins (tiny or full) in the weights layout"),
    (("teacher",), "epd.teacher", "generate teacher trajectories on a student grid"),
    (("distill",), "epd.distill", "Stage 1: distil an EPD table from teacher trajectories"),
    (("rdpo",), "epd.rdpo.cli", "Stage 2: RDPO fine-tuning of an EPD table"),
    (("rdpo-export",), "epd.rdpo.export", "export a policy checkpoint's mean table as a snapshot"),
    (("peer", "amed"), "epd.peers", "learned peer: distil an AMED-Solver/-Plugin table (K = 1) from a teacher set"),
    (("peer", "ld3"), "epd.peers", "learned peer: an LD3 time grid for a base solver from a teacher set"),
    (("peer", "gits"), "epd.peers", "learned peer: a GITS time grid (dynamic programming over teacher costs)"),
    (("sample",), "epd.sample", "sample images with any solver or EPD snapshot"),
    (("evaluate",), "epd.evaluate", "score a sample directory with registered metrics"),
    (("metrics", "list"), "epd.rewards.list_cmd", "list registered scorers"),
    (("predictor", "show"), "epd.predictor_cli", "print a summary of a snapshot (.pkl or native)"),
    (("predictor", "convert"), "epd.predictor_cli", "convert a legacy .pkl snapshot to the native format"),
    (("report",), "epd.report", "export MLflow runs and build tables and plots"),
    (("assets", "fetch"), "epd.assets", "fetch the original system's released files, checksummed"),
    (("assets", "verify"), "epd.assets", "check the fetched original files (exit 2 listing problems)"),
    (("validate-config",), "epd.config", "validate a workflow config against the schema"),
]


DESCRIPTION = ("EPD-Solver pipeline: sample with any solver or EPD table, distil (Stage 1), fine-tune with RDPO "
               "(Stage 2), evaluate and report. Run `epd COMMAND --help` for a command's options.")

# One explanation per flag shared by several commands, used where a command's own parser gives none.
COMMON_HELP = {
    "--config": "the study's workflow config (YAML, e.g. configs/default.yaml or the resolved "
                "results/studies/<study>/config.yaml); its backbones section names what --backbone picks",
    "--backbone": "name of a backbone section in --config (e.g. digits)",
    "--device": "torch device to run on, e.g. cpu, cuda or cuda:1",
    "--nfe": "the paper's NFE (sequential network evaluations) of the student grid",
    "--out": "output path (folder or file) this command writes",
    "--batch": "images per batch",
    "--seed": "random seed",
    "--workdir": "keep intermediate files in this folder (default: a temporary folder, deleted afterwards)",
    "--n-eval": "number of held-out (seed, prompt) pairs each row is evaluated on",
}


def _fill_help(p: argparse.ArgumentParser) -> None:
    """Give options without help their shared explanation (:data:`COMMON_HELP`)."""
    for a in p._actions:
        if not a.help:
            a.help = next((COMMON_HELP[o] for o in a.option_strings if o in COMMON_HELP), None)
        if a.help and a.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in a.help \
                and "default" not in a.help:
            a.help += " (default: %(default)s)"


def _build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="epd", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="_cmd", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    handlers = {}
    for words, module, help_ in COMMANDS:
        parent = sub
        for depth, word in enumerate(words[:-1]):
            key = " ".join(words[: depth + 1])
            if key not in groups:
                gp = parent.add_parser(word, help=f"{word} commands")
                groups[key] = gp.add_subparsers(dest=f"_cmd{depth + 1}", metavar="SUBCOMMAND")
            parent = groups[key]
        p = parent.add_parser(words[-1], help=help_, description=help_)
        p.set_defaults(_module=module, _words=words)
        handlers[words] = (p, module)
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 otherwise contacts its telemetry server
    parser, handlers = _build_parser()
    # Only the chosen command's module is imported to add its arguments.
    for words, (p, module) in handlers.items():
        if argv[: len(words)] == list(words) or (len(argv) > len(words) and argv[1: len(words) + 1] == list(words)):
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            _fill_help(p)
            break
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    mod = importlib.import_module(args._module)
    t0 = time.perf_counter()
    try:
        rc = mod.run(args)
    except EPDError as e:
        print(f"epd {' '.join(args._words)}: error: {e}", file=sys.stderr)
        return 2
    _record_resources(args._words, time.perf_counter() - t0)
    return int(rc or 0)


def _record_resources(words: tuple, wall_s: float) -> None:
    """Log the command's wall time and, where it used a GPU, peak allocated/reserved memory; with
    ``$EPD_RESOURCE_LOG`` set, append them as one JSON line there (the GPU study collects them per stage)."""
    row = {"command": " ".join(words), "wall_s": round(wall_s, 3),
           "rule": os.environ.get("SNAKEMAKE_RULE"), "wildcards": os.environ.get("SNAKEMAKE_WILDCARDS")}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        row.update(gpu=torch.cuda.get_device_name(), peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
        logging.getLogger("epd").info("GPU peak memory: %.2f GiB allocated, %.2f GiB reserved (%s)",
                                      row["peak_alloc_gib"], row["peak_reserved_gib"], row["gpu"])
    path = os.environ.get("EPD_RESOURCE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
