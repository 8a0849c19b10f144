"""The report's sample grids, cost column and RMSE-reference note, on a synthetic study: sampled folders laid out as
`epd sample` writes them (PNG + sidecar per seed, summary.json with the recorded cost) and a runs CSV as the MLflow
export holds them. Grid cells are compared pixel for pixel with the source images upscaled by numpy."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from epd.cli import main
from epd.report import build_report
from epd.report.grids import CELL, GUTTER, LABEL_W, STRIP_GAP, THUMB

SEEDS = list(range(100, 110))
ROWS = [("euler", 5), ("dpmpp_2m", 5), ("epd_distilled", 5), ("euler", 9), ("epd_distilled", 9)]
COST = {"euler": 0.012, "dpmpp_2m": 0.0125, "epd_distilled": 0.0151}


def _image(solver: str, nfe: int, seed: int, size: int) -> np.ndarray:
    """A random RGB image unique to (solver, NFE, seed), so each grid cell can be found exactly."""
    rng = np.random.default_rng([sum(map(ord, solver)), nfe, seed])
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _study(tmp: Path, size: int = 16, folders_missing=()) -> Path:
    """Sampled folders and a runs CSV of evaluate runs pointing at them; returns the CSV."""
    recs = []
    for i, (solver, nfe) in enumerate(ROWS):
        d = tmp / "samples" / solver / f"nfe{nfe}"
        d.mkdir(parents=True)
        for s in SEEDS:
            Image.fromarray(_image(solver, nfe, s, size)).save(d / f"{s:06d}.png")
            (d / f"{s:06d}.json").write_text(json.dumps({"seed": s, "prompt": f"a handwritten {s % 10}"}))
        (d / "summary.json").write_text(json.dumps({"seconds_per_image": COST[solver], "machine": "TestCPU (2 threads)",
                                                    "cost_batch": 100}))
        recs.append({"experiment": "epd/evaluate", "run_id": f"r{i}", "status": "FINISHED",
                     "start_time": f"2026-01-01T00:00:0{i}", "tags.stage": "evaluate", "tags.backbone": "digits",
                     "tags.solver": solver, "tags.nfe": str(nfe), "tags.steps": str(nfe), "tags.forward_passes":
                     str(2 * nfe), "tags.images_dir": "" if solver in folders_missing else str(d),
                     "tags.seconds_per_image": str(COST[solver]), "tags.cost_batch": "100",
                     "tags.machine": "TestCPU (2 threads)", "metrics.rmse_vs_teacher_mean": str(0.1 + i / 100),
                     "metrics.rmse_vs_teacher_se": "0.01", "metrics.rmse_vs_teacher_count": str(len(SEEDS))})
    path = tmp / "runs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]))
        w.writeheader()
        w.writerows(recs)
    return path


def _find_rows(grid: np.ndarray, tile: np.ndarray, x: int) -> list[int]:
    """Every y at which ``tile`` sits exactly in ``grid`` with its left edge at column ``x``."""
    h, w = tile.shape[:2]
    col = grid[:, x:x + w]
    return [y for y in range(grid.shape[0] - h + 1) if np.array_equal(col[y:y + h], tile)]


def test_grid_per_nfe_holds_the_same_seeds_in_every_row(tmp_path):
    out = tmp_path / "reports"
    build_report(_study(tmp_path), out)
    assert sorted(p.name for p in (out / "digits").glob("grid*.png")) == ["grid_nfe5.png", "grid_nfe9.png",
                                                                          "grid_overview.png"]
    k = -(-CELL // 16)  # integer upscale of a 16-px digit to at least CELL
    for nfe in (5, 9):
        grid = np.asarray(Image.open(out / "digits" / f"grid_nfe{nfe}.png").convert("RGB"))
        solvers = [s for s, n in ROWS if n == nfe]   # table order: baselines before EPD, euler before dpmpp_2m
        assert grid.shape[1] == LABEL_W + 8 * (CELL + GUTTER) + GUTTER     # 8 seed columns for small images
        for c, seed in enumerate(SEEDS[:8]):
            ys = []
            for solver in solvers:
                tile = _image(solver, nfe, seed, 16).repeat(k, 0).repeat(k, 1)
                found = _find_rows(grid, tile, LABEL_W + GUTTER + c * (CELL + GUTTER) + (CELL - 16 * k) // 2)
                assert len(found) == 1, (nfe, solver, seed)
                ys.append(found[0])
            assert ys == sorted(ys) and all(b - a == CELL + GUTTER for a, b in zip(ys, ys[1:]))


def test_overview_has_solver_rows_and_nfe_columns(tmp_path):
    out = tmp_path / "reports"
    build_report(_study(tmp_path), out)
    grid = np.asarray(Image.open(out / "digits" / "grid_overview.png").convert("RGB"))
    k = -(-CELL // 16)
    strip = 4 * CELL + STRIP_GAP * 3
    for c, nfe in enumerate((5, 9)):
        for solver in COST:   # a cell for each (solver, NFE) sampled, a blank one for dpmpp_2m at NFE 9
            tile = _image(solver, nfe, SEEDS[0], 16).repeat(k, 0).repeat(k, 1)
            found = _find_rows(grid, tile, LABEL_W + GUTTER + c * (strip + GUTTER))
            assert len(found) == ((solver, nfe) in ROWS), (solver, nfe)
    assert grid.shape[1] == LABEL_W + 2 * (strip + GUTTER) + GUTTER


def test_large_images_become_thumbnails(tmp_path):
    out = tmp_path / "reports"
    build_report(_study(tmp_path, size=300), out)
    grid = Image.open(out / "digits" / "grid_nfe5.png")
    assert grid.width == LABEL_W + 4 * (THUMB + GUTTER) + GUTTER      # 4 seed columns of thumbnails


def test_row_without_folder_is_left_out(tmp_path, caplog):
    out = tmp_path / "reports"
    build_report(_study(tmp_path, folders_missing=("dpmpp_2m",)), out)
    grid = np.asarray(Image.open(out / "digits" / "grid_nfe5.png").convert("RGB"))
    k = -(-CELL // 16)
    assert not _find_rows(grid, _image("dpmpp_2m", 5, SEEDS[0], 16).repeat(k, 0).repeat(k, 1), LABEL_W + GUTTER)
    assert "dpmpp_2m NFE 5: sampled folder" in caplog.text


def test_cost_column_and_rmse_reference_note(tmp_path):
    runs = _study(tmp_path)
    cfg = tmp_path / "study.yaml"
    cfg.write_text(Path(__file__).resolve().parents[1].joinpath("configs", "smoke.yaml").read_text())
    out = tmp_path / "reports"
    assert main(["report", "--build-only", "--runs-csv", str(runs), "--out", str(out), "--config", str(cfg)]) == 0
    md = (out / "digits" / "table.md").read_text()
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| Solver"))
    head = lines[start]
    assert "| s/img |" in head
    body = [ln.split(" | ") for ln in lines[start + 2:start + 2 + len(ROWS)]]
    col = head.split(" | ").index("s/img")
    assert {(r[0].lstrip("| "), r[col]) for r in body} == {(s, f"{COST[s]:.3g}") for s, _ in ROWS}
    assert md.count("heun with 30 steps") == 1          # configs/smoke.yaml: reference_solver heun, 30 steps
    assert "measured on TestCPU (2 threads) at batch 100" in md
    rows = list(csv.DictReader(open(out / "digits" / "table.csv")))
    assert {(r["solver"], float(r["seconds_per_image"])) for r in rows} == {(s, COST[s]) for s, _ in ROWS}


def test_readme_lists_the_grids(tmp_path):
    out = tmp_path / "reports"
    build_report(_study(tmp_path), out)
    readme = (out / "README.md").read_text()
    for name in ("grid_nfe5.png", "grid_nfe9.png", "grid_overview.png"):
        assert f"(digits/{name})" in readme
