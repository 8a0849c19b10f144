"""The GPU study driver's bookkeeping: counts scaled down with the paper's batch settings kept, and per-stage rows
whose projection to the full paper study is per-item time x the full study's item count."""

import pytest

from benchmarks.gpu_study import COUNTS, aggregate, study_config
from epd.config import load_config, study_rows


@pytest.mark.parametrize("name,backbone", [("sd15", "sd15"), ("sd3_1024", "sd3_1024"), ("flux_dev", "flux_dev")])
def test_study_config_scales_counts_and_keeps_batches(name, backbone, tmp_path):
    full = load_config(f"configs/{name}.yaml")
    cfg = study_config(full, backbone, COUNTS, "sqlite:///x.db")
    sec, ref = cfg["backbones"][backbone], full["backbones"][backbone]
    for key in ("sample", "teacher", "distill"):
        assert sec[key]["batch"] == ref[key]["batch"]
    for key in ("rollout_batch_size", "rloo_k", "minibatch_size", "eval_batch"):
        assert sec["rdpo"][key] == ref["rdpo"][key]
    assert sec["sample"]["seeds"] == f"0-{COUNTS['eval_prompts'] - 1}"
    assert sec["rdpo"]["steps"] == COUNTS["rdpo_steps"] == sec["rdpo"]["eval_interval"]
    assert [s for s, _ in study_rows(sec)] == ["euler", "epd_distilled", "epd_rdpo"]
    assert cfg["run"]["study"] == f"gpu_{backbone}"


def test_rows_project_per_item_time_to_the_paper_study():
    full = load_config("configs/sd15.yaml")
    cfg = study_config(full, "sd15", COUNTS, "sqlite:///x.db")
    log = [{"command": "teacher", "wall_s": 16.0, "peak_alloc_gib": 10.0, "peak_reserved_gib": 12.0},
           {"command": "rdpo", "wall_s": 40.0, "peak_alloc_gib": 30.0, "peak_reserved_gib": 31.0},
           {"command": "sample", "wall_s": 8.0, "peak_alloc_gib": 5.0, "peak_reserved_gib": 6.0},
           {"command": "sample", "wall_s": 8.0, "peak_alloc_gib": 7.0, "peak_reserved_gib": 9.0},
           {"command": "evaluate", "wall_s": 48.0}]
    rows = {r["stage"]: r for r in aggregate(log, cfg, full, "sd15", failed={"distill"}, gpu="H100")}
    assert rows["teacher"]["per_item_s"] == 16.0 / COUNTS["teacher_seeds"]
    assert rows["teacher"]["projected_gpu_hours"] == pytest.approx(2.0 * 512 / 3600)
    # RDPO to the released table's step count (configs/sd15.yaml paper_scale.rdpo_steps: 9,000)
    assert full["backbones"]["sd15"]["paper_scale"]["rdpo_steps"] == 9000
    assert rows["rdpo"]["projected_gpu_hours"] == pytest.approx(10.0 * 9000 / 3600)
    n_rows = len(study_rows(full["backbones"]["sd15"]))
    assert rows["sample"]["per_item_s"] == 16.0 / (2 * COUNTS["eval_prompts"])
    assert rows["sample"]["projected_gpu_hours"] == pytest.approx(1.0 * 1000 * n_rows / 3600)
    assert rows["sample"]["peak_reserved_gib"] == 9.0 and rows["sample"]["jobs"] == 2
    assert rows["evaluate"]["per_item_s"] == 48.0 / (COUNTS["eval_prompts"] * 6)
    assert not rows["distill"]["ok"] and rows["distill"]["wall_s"] == 0 and rows["teacher"]["ok"]
