"""A study's checks before any job: prompt-file slices, every input file on disk (naming the command that brings
the original's released files), solvers that cannot run at any configured NFE, every missing weight file of the
study in one error, and progress lines for logs that are files."""

import logging

import pytest
import yaml

from epd.backbones.check import study_weights
from epd.backbones.weights import MissingWeightsError, check_all
from epd.config import ASSETS_DIR, check_study, load_config, skipped_pairs, study_files
from epd.errors import ConfigError
from epd.progress import Heartbeat
from epd.prompts import resolve_prompts, split_spec


def test_prompt_slices_partition_a_file(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("id,caption\n" + "".join(f"{i},caption {i}\n" for i in range(10)))
    whole = resolve_prompts(str(f))
    head, tail = resolve_prompts(f"{f}[:7]"), resolve_prompts(f"{f}[7:]")
    assert head + tail == whole and len(tail) == 3 and not set(head) & set(tail)
    assert resolve_prompts(f"{f}[-2:]") == whole[-2:] and resolve_prompts(f"{f}[2:4]") == whole[2:4]
    assert split_spec("a[b].txt") == ("a[b].txt", None)
    with pytest.raises(ConfigError, match=r"selects no rows \(.*has 10 prompts\)"):
        resolve_prompts(f"{f}[20:]")


def _study(tmp_path, **sec):
    base = yaml.safe_load(open("configs/sd15.yaml"))
    base["backbones"]["sd15"].update(sec)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(base))
    return load_config(p)


def test_real_configs_name_only_files_inside_the_repository():
    for name in ("sd15", "sd3_512", "sd3_1024", "flux_dev", "paper", "default", "smoke"):
        for key, path in study_files(load_config(f"configs/{name}.yaml")):
            assert not path.startswith(("/", "..")), (name, key, path)
            assert path.startswith("builtin:") or path.startswith(ASSETS_DIR + "/"), (name, key, path)


def test_missing_assets_stop_the_study_naming_the_command(tmp_path):
    cfg = _study(tmp_path)
    with pytest.raises(ConfigError) as e:
        check_study(cfg, root=tmp_path)
    msg = str(e.value)
    for key in ("backbones.sd15.prompts.train", "backbones.sd15.prompts.eval", "backbones.sd15.predictors.original_best"):
        assert key in msg
    assert "data/original/src/prompts/test.txt not found" in msg and "epd assets fetch" in msg
    # with every file present the same config passes
    for _, f in study_files(cfg):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x\n")
    check_study(cfg, root=tmp_path)


def test_other_missing_files_get_no_assets_hint(tmp_path):
    cfg = _study(tmp_path, prompts={"eval": "prompts/mine.txt", "train": "builtin:digits"}, predictors={})
    with pytest.raises(ConfigError) as e:
        check_study(cfg, root=tmp_path)
    assert "backbones.sd15.prompts.eval: prompts/mine.txt not found" in str(e.value)
    assert "assets" not in str(e.value)


def test_a_solver_that_runs_at_no_configured_nfe_is_rejected(tmp_path):
    cfg = _study(tmp_path, nfes=[5, 7], prompts={}, predictors={})
    with pytest.raises(ConfigError, match=r"backbones.sd15.solvers: heun runs at none of nfes \[5, 7\]"):
        check_study(cfg, root=tmp_path)
    mixed = _study(tmp_path, nfes=[5, 10], prompts={}, predictors={})
    check_study(mixed, root=tmp_path)  # heun@10 runs: heun@5 is listed in the report instead
    assert skipped_pairs(mixed) == {"sd15": ["heun@5", "dpm2@5"]}
    assert skipped_pairs(load_config("configs/default.yaml")) == {}


def test_weights_check_lists_every_scorer_of_the_study(tmp_path, monkeypatch):
    for var in ("SD15_MODEL_PATH", "EPD_WEIGHTS_DIR", "HF_HUB_CACHE", "HPS_WEIGHTS", "MPS_WEIGHTS",
                "CLIP_L14_WEIGHTS", "AESTHETIC_WEIGHTS", "IMAGEREWARD_WEIGHTS", "PICKSCORE_MODEL_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EPD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    sec = dict(load_config("configs/sd15.yaml")["backbones"]["sd15"], metrics=["hps", "aesthetic", "fid_clean"])
    pairs = study_weights(sec)
    assert pairs[0] == ("backbone", "sd15") and len(pairs) == len(set(pairs))
    assert {("scorer", n) for n in ("hps", "clip_l14", "aesthetic", "inception")} <= set(pairs)
    with pytest.raises(MissingWeightsError) as e:
        check_all(pairs)
    msg = str(e.value)
    assert msg.startswith(f"weights not found: {len(pairs)} missing")
    for rel in ("data/weights/sd15", "hps/HPS_v2.1_compressed.pt", "clip/ViT-L-14.pt",
                "aesthetic/sac+logos+ava1-l14-linearMSE.pth", "fid/pt_inception-2015-12-05.pth"):
        assert rel in msg, rel


def test_heartbeat_logs_at_most_every_interval_and_at_the_end(caplog):
    now = [0.0]
    beat = Heartbeat("job", total=100, every_s=30.0, clock=lambda: now[0])
    logged = []
    with caplog.at_level(logging.INFO, logger="epd.progress"):
        for step in range(1, 101):
            now[0] = step * 1.0  # one step a second
            logged.append(beat(step, loss=0.5))
    assert [i + 1 for i, ok in enumerate(logged) if ok] == [30, 60, 90, 100]
    first = caplog.records[0].getMessage()
    assert first.startswith("job: 30/100 (30%), 1 steps/s, 30 s elapsed, ETA 70 s, loss 0.5"), first


def test_every_command_appends_its_resources_to_the_log(tmp_path, monkeypatch):
    import json

    from epd.cli import main

    log = tmp_path / "res.jsonl"
    monkeypatch.setenv("EPD_RESOURCE_LOG", str(log))
    monkeypatch.setenv("SNAKEMAKE_RULE", "report")
    assert main(["metrics", "list"]) == 0 and main(["metrics", "list"]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["command"] for r in rows] == ["metrics list"] * 2 and rows[0]["rule"] == "report"
    assert all(r["wall_s"] >= 0 and "peak_alloc_gib" not in r for r in rows)  # no GPU used here


def test_study_rows_of_the_default_study():
    from epd.config import study_rows

    rows = study_rows(load_config("configs/default.yaml")["backbones"]["digits"])
    base = [(s, n) for s in ("euler", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm") for n in (3, 5, 7, 9)]
    peers = [(p, n) for p in ("amed", "amed_plugin", "ld3_dpmpp_2m", "gits_ipndm", "gits_dpmpp_2m") for n in (3, 5, 7, 9)]
    assert rows == base + [("epd_distilled", n) for n in (3, 5, 7, 9)] + [("epd_rdpo", 5)] + peers
    sec = dict(load_config("configs/sd15.yaml")["backbones"]["sd15"], nfes=[5, 10])
    rows = study_rows(sec)
    assert ("heun", 10) in rows and ("heun", 5) not in rows and ("euler", 5) in rows
    assert ("epd_distilled", 20) in rows and ("released_original_best", 0) in rows
