"""RDPO export: each original smoke run's ``policy-step000010.pt`` reproduces its shipped exported snapshot,
manifest and options; mismatched checkpoints fail clearly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from epd import predictor
from epd.cli import main as cli_main
from epd.errors import EPDError
from epd.legacy import load_legacy_pickle
from epd.rdpo.export import export_checkpoint, export_run, pred_kwargs_from_meta
from epd.rdpo.policy import EPDParamPolicy
from epd.table import uniform_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import FIXTURES as FIX, needs  # noqa: E402

RUNS = sorted(FIX.glob("rlepd/smoke/*/runs/*/"))
pytestmark = needs("rlepd/smoke", "rlepd/runs")
# run -> its start snapshot inside the (relocated) smoke tree
START = {"smoke_sd15": "fake/f15", "smoke_sd3_512": "fake/f512", "smoke_sd3_1024": "fake/f1024",
         "smoke_flux": "fake/fflux"}


def _start(run: Path) -> Path:
    name = next(k for k in START if run.name.endswith(k))
    return run.parents[1] / START[name] / "network-snapshot-000005.pkl"


def _shipped(run: Path):
    exp = run / "export"
    return (load_legacy_pickle(exp / "network-snapshot-export-step000010.pkl"),
            json.loads((exp / "export-manifest-step000010.json").read_text()),
            json.loads((exp / "training_options-export-step000010.json").read_text()))


@pytest.mark.parametrize("run", RUNS, ids=lambda p: p.name)
def test_export_reproduces_shipped_snapshot(run):
    shipped, _, _ = _shipped(run)
    cfg = yaml.safe_load((run / "configs/resolved_config.yaml").read_text())
    table, manifest, _ = export_checkpoint(run / "checkpoints/policy-step000010.pt", load_legacy_pickle(_start(run)),
                                           run_dir=run, model_config=cfg["model"])
    assert table.positions.shape == shipped.positions.shape
    assert torch.allclose(table.positions, shipped.positions, atol=1e-6, rtol=0)
    assert torch.allclose(table.weights, shipped.weights, atol=1e-6, rtol=0)
    for name in ("scale_dir", "scale_time"):
        mine, theirs = getattr(table, name), getattr(shipped, name)
        assert (mine is None) == (theirs is None), name
        if mine is not None:
            assert torch.allclose(mine, theirs, atol=1e-6, rtol=0), name
    # the run actually moved the table away from the start (so the comparison is not trivial)
    assert (table.positions - load_legacy_pickle(_start(run)).positions).abs().max() > 1e-3
    for key in ("backbone", "img_resolution", "guidance_rate", "schedule_type", "coords", "sigma_min", "sigma_max",
                "flowmatch_mu", "flowmatch_shift", "dataset_name", "afs", "num_steps", "num_points"):
        assert table.meta[key] == shipped.meta[key], key
    assert manifest["export_step"] == 10 and manifest["sanitized_rows"] == {"reordered": 0, "adjusted": 0}


def test_sd15_scale_heads_are_used():
    """SD1.5 smoke run: both scale heads exist and the template's ranges are 0.05, so scales are exported."""
    run = next(r for r in RUNS if r.name.endswith("smoke_sd15"))
    table, _, options = export_checkpoint(run / "checkpoints/policy-step000010.pt", load_legacy_pickle(_start(run)))
    assert table.scale_dir is not None and (table.scale_dir - 1).abs().max() > 1e-3
    assert options["export_info"]["scales"]["scale_dir"].startswith("clamped into template range")


@pytest.mark.parametrize("run", RUNS, ids=lambda p: p.name)
def test_export_run_writes_original_layout(run, tmp_path, capsys):
    """``epd rdpo-export RUN_DIR`` on the relocated fixture tree (the recorded start path is a /data/... path)."""
    assert cli_main(["rdpo-export", str(run), "--output-dir", str(tmp_path)]) == 0
    assert "manifest:" in capsys.readouterr().out
    shipped, s_manifest, s_options = _shipped(run)
    manifest = json.loads((tmp_path / "export-manifest-step000010.json").read_text())
    options = json.loads((tmp_path / "training_options-export-step000010.json").read_text())
    assert list(manifest) == list(s_manifest)
    for key in ("export_step", "sanitized_rows", "latest_metrics"):
        assert manifest[key] == s_manifest[key], key
    assert manifest["run_dir"] == str(run) and manifest["policy_checkpoint"].endswith("policy-step000010.pt")
    assert set(s_options) <= set(options)
    assert {k: options[k] for k in s_options if k not in ("pred_kwargs", "export_info")} == \
        {k: v for k, v in s_options.items() if k not in ("pred_kwargs", "export_info")}
    for key, value in s_options["pred_kwargs"].items():
        if key == "backend_config":  # the original backend adds runtime keys (model_id, latent_resolution, ...)
            assert options["pred_kwargs"][key].items() <= value.items()
        else:
            assert options["pred_kwargs"][key] == value, key
    assert options["export_info"]["sanitized_rows"] == s_options["export_info"]["sanitized_rows"]
    table = predictor.load(tmp_path / "network-snapshot-export-step000010.safetensors")
    assert table.equal(export_checkpoint(run / "checkpoints/policy-step000010.pt",
                                         load_legacy_pickle(_start(run)))[0], atol=1e-12)
    assert torch.allclose(table.positions, shipped.positions, atol=1e-6, rtol=0)


def test_manifest_schema_matches_long_run_export():
    """The manifest of a real long run (``runs/sd3_512_new``) has the same keys as ours."""
    ship = json.loads((FIX / "rlepd/runs/sd3_512_new/export-manifest-step001000.json").read_text())
    run = next(r for r in RUNS if r.name.endswith("smoke_sd3_512"))
    _, manifest, _ = export_checkpoint(run / "checkpoints/policy-step000010.pt", load_legacy_pickle(_start(run)),
                                       latest_metrics={"step": 3, "kl": float("nan"), "other": 1})
    assert list(manifest) == list(ship) and list(manifest["sanitized_rows"]) == list(ship["sanitized_rows"])
    assert manifest["latest_metrics"] == {"step": 3, "kl": None}


@pytest.mark.parametrize("cfg", ["sd15_k20", "flux_dev"])
def test_resolved_config_keys_map_to_metadata(cfg):
    """Old (sd15_k20) and new (flux_dev) resolved-config key sets override the template's metadata."""
    model = yaml.safe_load((FIX / f"rlepd/runs/{cfg}/resolved_config.yaml").read_text())["model"]
    start = uniform_table(model["num_steps"], model["num_points"], meta={"guidance_rate": 1.0})
    policy = EPDParamPolicy.from_table(start, 10.0)
    table, _, options = export_checkpoint(policy.state_dict(), start, model_config=model, step=7)
    assert table.meta["backbone"] == {"ldm": "sd15", "flux": "flux"}[model["backend"]]
    assert table.meta["guidance_rate"] == model["guidance_rate"] and table.meta["img_resolution"] == model["resolution"]
    assert table.meta["backbone_config"] == model["backend_options"]
    assert options["pred_kwargs"]["backend"] == model["backend"]
    assert options["pred_kwargs"] == pred_kwargs_from_meta(table.meta)
    assert torch.allclose(table.positions, start.positions, atol=1e-7)


@pytest.mark.parametrize("shape", [(4, 3), (5, 2)])
def test_mismatched_checkpoint_names_both_shapes(shape, tmp_path, capsys):
    steps, K = shape
    run = next(r for r in RUNS if r.name.endswith("smoke_sd3_512"))
    ckpt = tmp_path / "checkpoints" / "policy-step000005.pt"
    ckpt.parent.mkdir()
    torch.save(EPDParamPolicy.from_table(uniform_table(steps, K), 10.0).state_dict(), ckpt)
    with pytest.raises(EPDError) as e:
        export_checkpoint(ckpt, load_legacy_pickle(_start(run)))
    msg = str(e.value)
    assert str(ckpt) in msg and f"({steps - 1}, {K + 1})" in msg and f"K={K}" in msg and "(3, 2)" in msg
    assert cli_main(["rdpo-export", str(run), "--checkpoint", str(ckpt), "--output-dir", str(tmp_path / "o")]) == 2
    assert "(3, 2)" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_scale_head_on_range_zero_template_is_dropped_or_kept(tmp_path):
    """Rough edge §10.4: the original drops a trained scale head when the template's range is 0."""
    start = load_legacy_pickle(FIX / "rlepd/smoke/20260329-162229/fake/f512/network-snapshot-000005.pkl")
    policy = EPDParamPolicy.from_table(start, 10.0, train_scale_dir=True)
    with torch.no_grad():
        policy.output_linear.bias[5:7] = 0.2  # move the direction-scale means to exp(0.2 + sigma^2/2)
    dropped, _, options = export_checkpoint(policy.state_dict(), start, step=1)
    assert dropped.scale_dir is None and "dropped" in options["export_info"]["scales"]["scale_dir"]
    kept, _, _ = export_checkpoint(policy.state_dict(), start, step=1, keep_policy_scales=True)
    assert torch.allclose(kept.scale_dir, torch.full_like(kept.positions, torch.exp(torch.tensor(0.2 + 0.05 ** 2 / 2,
                          dtype=torch.float64)).item()), atol=1e-6)


def test_unreadable_checkpoint_and_missing_template(tmp_path):
    bad = tmp_path / "policy-step000001.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(EPDError, match="policy-step000001.pt"):
        export_checkpoint(bad, uniform_table(4, 2))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(EPDError, match="no checkpoints/policy-step"):
        export_run(run)
    policy = EPDParamPolicy.from_table(uniform_table(4, 2), 10.0)
    torch.save(policy.state_dict(), run / "checkpoints/policy-step000002.pt")
    with pytest.raises(EPDError, match="--template"):
        export_run(run)
    paths = export_run(run, template=predictor.save(uniform_table(4, 2), tmp_path / "start"))
    assert paths["manifest"].is_file() and json.loads(paths["manifest"].read_text())["export_step"] == 2
