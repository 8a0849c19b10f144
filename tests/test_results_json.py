"""Reading the original RLEPD result JSONs (fixtures) and laying them out beside our own numbers."""

import json
import math
import sys
from pathlib import Path

import pytest

from epd.errors import EPDError
from epd.metrics.results import (convert_imagereward, load_result_dir, parse_result_name, read_result_json,
                                 results_table)
from epd.rewards import IMAGEREWARD_RLEPD_OFFSET

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import FIXTURES, needs  # noqa: E402

FIX = FIXTURES / "rlepd"
pytestmark = needs("rlepd/results", "rlepd/smoke")

# spec §9.3 (original-system.md), FLUX.1-dev 1024², 1000 test prompts; ImageReward with the +3.1 offset
SPEC_FLUX = {
    "flux_dpm2_10": {"hps": 0.2971, "pickscore": 22.7310, "imagereward_rlepd": 4.0830, "clip": 0.2862,
                     "aesthetic": 5.6160, "mps": 12.3526},
    "flux_edm_10": {"hps": 0.2913, "pickscore": 22.6533, "imagereward_rlepd": 4.0379, "clip": 0.2845,
                    "aesthetic": 5.6104, "mps": 12.1991},
    "flux_euler_20": {"hps": 0.2947, "pickscore": 22.8093, "imagereward_rlepd": 4.0606, "clip": 0.2762,
                      "aesthetic": 5.7873, "mps": 12.5476},
    "flux_ipndm_20": {"hps": 0.2969, "pickscore": 22.7903, "imagereward_rlepd": 4.0859, "clip": 0.2761,
                      "aesthetic": 5.7587, "mps": 12.3940},
    "flux_epd_step001000": {"hps": 0.3010, "pickscore": 22.8578, "imagereward_rlepd": 4.1145, "clip": 0.2795,
                            "aesthetic": 5.7529, "mps": 12.4585},
}


def test_every_fixture_result_json_reads():
    files = sorted((FIX / "results").rglob("*.json")) + sorted((FIX / "smoke").rglob("results/*.json"))
    assert len(files) == 30 + 8
    for f in files:
        obj = read_result_json(f)
        assert obj["stats"]["count"] >= 1
        parse_result_name(f)


def test_flux_rows_match_spec_table():
    rows = load_result_dir(FIX / "results", imagereward_convention="rlepd")
    assert len(rows) == 30
    got = {(r["label"], r["metric"]): r for r in rows}
    for label, metrics in SPEC_FLUX.items():
        for m, v in metrics.items():
            assert round(got[(label, m)]["mean"], 4) == pytest.approx(v, abs=1e-9), (label, m)
    r = got[("flux_dpm2_10", "hps")]
    assert (r["backbone"], r["solver"], r["steps"], r["count"]) == ("flux", "dpm2", 10, 1000)
    assert r["se"] == pytest.approx(0.040496826171875 / math.sqrt(999))   # population std -> SE of the mean
    e = got[("flux_epd_step001000", "mps")]
    assert (e["solver"], e["rl_step"], e["steps"]) == ("epd", 1000, None)


def test_imagereward_conventions():
    official = {(r["label"], r["metric"]): r for r in load_result_dir(FIX / "results")}
    assert not any(m == "imagereward_rlepd" for _, m in official)
    r = official[("flux_epd_step001000", "imagereward")]
    assert r["mean"] == pytest.approx(4.1145 - 3.1000, abs=1e-4)            # paper convention
    assert r["max"] == pytest.approx(json.loads((FIX / "results/flux_epd_step001000_eval/"
                                                 "flux_epd_step001000_imagereward.json").read_text())["stats"]["max"]
                                     - IMAGEREWARD_RLEPD_OFFSET)
    assert convert_imagereward(convert_imagereward(0.0121, "official", "rlepd"), "rlepd", "official") == \
        pytest.approx(0.0121)
    assert convert_imagereward(0.0121, "official", "rlepd") == pytest.approx(3.1121, abs=1e-4)  # spec §0.7
    with pytest.raises(ValueError):
        convert_imagereward(1.0, "official", "plus3")


def test_smoke_names():
    p = parse_result_name(FIX / "smoke/20260329-162229/results/sd3_512_hps.json")
    assert (p["backbone"], p["metric"], p["solver"]) == ("sd3_512", "hps", None)
    assert parse_result_name("sd15_k20_9000_pick.json") == {
        "label": "sd15_k20_9000", "metric_raw": "pick", "metric": "pickscore", "backbone": "sd15", "solver": "epd",
        "steps": None, "rl_step": 9000, "variant": "k20"}
    rows = load_result_dir(FIX / "smoke/20260329-162229/results")
    assert {r["label"] for r in rows} == {"sd15", "sd3_512", "sd3_1024"}
    one = load_result_dir(FIX / "smoke/flux_smoke_003/results")[0]
    assert one["count"] == 1 and math.isnan(one["se"])


def test_table_places_flux_numbers_beside_ours():
    rows = load_result_dir(FIX / "results")
    ours = {"label": "ours-epd-nfe10", "metric": "hps", "mean": 0.30123, "se": 0.0012, "path": "x"}
    table = results_table(rows + [ours], metrics=["hps", "pickscore", "imagereward"])
    lines = table.splitlines()
    assert lines[0] == "| run | hps | pickscore | imagereward |"
    assert "| flux_epd_step001000 | 0.3010 ± 0.0013 | 22.8578 ± 0.0" in table
    assert lines[-1] == "| ours-epd-nfe10 | 0.3012 ± 0.0012 | – | – |"
    with pytest.raises(EPDError, match="two results"):
        results_table(rows + rows)


def test_bad_result_files(tmp_path):
    (tmp_path / "x_hps.json").write_text(json.dumps({"stats": {"count": 0, "mean": 1.0}}))
    with pytest.raises(EPDError, match="x_hps.json: stats.count"):
        load_result_dir(tmp_path)
    (tmp_path / "x_hps.json").write_text("{broken")
    with pytest.raises(EPDError, match="not valid JSON"):
        load_result_dir(tmp_path)
    (tmp_path / "x_hps.json").write_text(json.dumps({"prompt": "a sidecar, not a result"}))
    with pytest.raises(EPDError, match="no metric result JSONs"):
        load_result_dir(tmp_path)
    with pytest.raises(EPDError, match="cannot tell the metric"):
        parse_result_name("flux_dpm2_10_lpips.json")
