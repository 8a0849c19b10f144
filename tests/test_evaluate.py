"""`epd evaluate` end to end on tiny local weights: pairing by sidecar, checks, outputs, failure modes."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from epd.cli import main
from epd.metrics.results import load_result_dir, results_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import FIXTURES, needs  # noqa: E402
PROMPTS = ["a cat on a table", "a red car", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from clip.model import CLIP

    from epd.rewards.aesthetic import AestheticMLP

    w = tmp_path_factory.mktemp("weights")
    (w / "clip").mkdir()
    (w / "aesthetic").mkdir()
    torch.manual_seed(0)
    clip = CLIP(embed_dim=768, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    torch.save(clip.state_dict(), w / "clip" / "ViT-L-14.pt")
    mlp = AestheticMLP(768)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.2)
    torch.save(mlp.state_dict(), w / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    return w


@pytest.fixture
def env(weights, tmp_path, monkeypatch):
    """Weights only through EPD_WEIGHTS_DIR; no data/ folder, no HF cache, no MLflow."""
    monkeypatch.setenv("EPD_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("EPD_DATA_DIR", str(tmp_path / "no-data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for var in ("CLIP_L14_WEIGHTS", "AESTHETIC_WEIGHTS", "FID_INCEPTION_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    return weights


def write_samples(d: Path, n_per_prompt=1, seed=0):
    """Sample folder whose sorted file order does NOT follow the prompt file order."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    names = {}
    for k in range(n_per_prompt):
        for i, p in enumerate(PROMPTS):
            s = 100 * k + i
            name = f"{chr(ord('z') - i)}_{s:03d}"  # z_, y_, x_: reversed w.r.t. the prompt order
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{name}.png")
            (d / f"{name}.json").write_text(json.dumps({"prompt": p, "seed": s, "solver": "epd", "nfe": 5,
                                                        "forward_passes": 10}))
            names[name] = (p, s)
    return names


def load(p):
    return torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255


@needs("rlepd/results")
def test_evaluate_pairs_by_sidecar_and_writes_original_schema(env, tmp_path):
    d = tmp_path / "samples"
    names = write_samples(d)
    (d / ".ipynb_checkpoints").mkdir()  # a stray checkpoint copy (with sidecar) must be ignored
    Image.open(d / "z_000.png").save(d / ".ipynb_checkpoints" / "z_000-checkpoint.png")
    (d / ".ipynb_checkpoints" / "z_000-checkpoint.json").write_text(json.dumps({"prompt": "a red car", "seed": 0}))
    (d / "notes.txt").write_text("not an image")
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS))
    out = tmp_path / "eval"
    rc = main(["evaluate", "--images", str(d), "--prompts", str(pf), "--metrics", "clip,aesthetic", "clip100",
               "--out-dir", str(out), "--device", "cpu", "--batch-size", "2"])
    assert rc == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["image"] for r in rows] == sorted(f"{n}.png" for n in names)
    assert list(rows[0]) == ["image", "seed", "prompt", "clip", "aesthetic", "clip100"]
    from epd.rewards import get_scorer

    clip = get_scorer("clip")
    for r in rows:
        prompt, seed = names[r["image"][:-4]]
        assert r["prompt"] == prompt and int(r["seed"]) == seed
        direct = float(clip(load(d / r["image"])[None], [prompt])[0])
        assert float(r["clip"]) == pytest.approx(direct, rel=1e-5, abs=1e-6)  # batch 2 vs 1: fp32 rounding
        assert float(r["clip100"]) == pytest.approx(100 * max(direct, 0), rel=1e-5, abs=1e-4)
    # original schema (keys of a real result file) + se
    orig = json.loads((FIXTURES / "rlepd/results/flux_baseline_eval_20260402/flux_dpm2_10_hps.json").read_text())
    ours = json.loads((out / "clip.json").read_text())
    assert set(orig) <= set(ours) and set(orig["stats"]) <= set(ours["stats"])
    assert set(orig["metadata"]) <= set(ours["metadata"])
    vals = np.array([float(r["clip"]) for r in rows])
    assert ours["stats"]["count"] == 3 and ours["stats"]["mean"] == pytest.approx(vals.mean())
    assert ours["stats"]["std"] == pytest.approx(vals.std())                       # population, as the original
    assert ours["stats"]["se"] == pytest.approx(vals.std(ddof=1) / np.sqrt(3))
    assert ours["metadata"]["solver"] == "epd" and ours["metadata"]["nfe"] == 5
    assert json.loads((out / "summary.json").read_text())["metrics"]["aesthetic"]["count"] == 3
    # the report can put our numbers beside the original FLUX ones
    table = results_table(load_result_dir(FIXTURES / "rlepd/results") + load_result_dir(out),
                          metrics=["hps", "clip", "aesthetic"])
    assert "| flux_dpm2_10 | 0.2971 ± 0.0013 | 0.2862" in table and "| samples | – |" in table


@pytest.mark.parametrize("case", ["extra_prompt", "unknown_prompt", "uneven", "empty", "no_sidecar", "bad_sidecar"])
def test_evaluate_refuses_mismatches(env, tmp_path, capsys, case):
    d = tmp_path / "samples"
    write_samples(d)
    prompts = list(PROMPTS)
    if case == "extra_prompt":
        prompts.append("a prompt without image")
    elif case == "unknown_prompt":
        (d / "y_001.json").write_text(json.dumps({"prompt": "something else", "seed": 1}))
    elif case == "uneven":
        Image.open(d / "z_000.png").save(d / "w_999.png")
        (d / "w_999.json").write_text(json.dumps({"prompt": PROMPTS[0], "seed": 999}))
    elif case == "empty":
        d = tmp_path / "empty"
        (d / ".ipynb_checkpoints").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(d / ".ipynb_checkpoints" / "a.png")
    elif case == "no_sidecar":
        (d / "x_002.json").unlink()
    elif case == "bad_sidecar":
        (d / "x_002.json").write_text("{not json")
    pf = tmp_path / "p.txt"
    pf.write_text("\n".join(prompts))
    out = tmp_path / "eval"
    rc = main(["evaluate", "--images", str(d), "--prompts", str(pf), "--metrics", "clip", "--out-dir", str(out),
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    expected = {"extra_prompt": "have no image", "unknown_prompt": "not in", "uneven": "count mismatch",
                "empty": "contains no images", "no_sidecar": "no sidecar x_002.json",
                "bad_sidecar": "not valid JSON"}[case]
    assert expected in err
    assert not out.exists()


def test_bad_images_and_modes(env, tmp_path, capsys):
    d = tmp_path / "samples"
    write_samples(d)
    pf = tmp_path / "p.txt"
    pf.write_text("\n".join(PROMPTS))
    data = (d / "y_001.png").read_bytes()
    (d / "y_001.png").write_bytes(data[: len(data) // 2])  # truncated
    (d / "x_002.png").write_bytes(b"\x89PNG garbage")         # corrupt
    out = tmp_path / "eval"
    rc = main(["evaluate", "--images", str(d), "--prompts", str(pf), "--metrics", "clip", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "2 unreadable image(s)" in err and "y_001.png" in err and "x_002.png" in err
    assert not out.exists()
    # documented conversions: grayscale replicated, alpha dropped
    from epd.metrics.imagedir import load_image

    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "g.png")
    rgba = np.concatenate([rgb, np.full((20, 24, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    g = load_image(tmp_path / "g.png")
    assert g.shape == (3, 20, 24) and torch.equal(g[0], g[1]) and torch.equal(g[0], torch.from_numpy(rgb[:, :, 0]) / 255)
    assert torch.equal(load_image(tmp_path / "a.png"), torch.from_numpy(rgb).permute(2, 0, 1) / 255)
    Image.new("I;16", (4, 4)).save(tmp_path / "h.png")
    with pytest.raises(Exception, match="16-bit"):
        load_image(tmp_path / "h.png")


def test_wrong_weights_file_leaves_no_outputs(env, tmp_path, capsys, monkeypatch):
    d = tmp_path / "samples"
    write_samples(d)
    monkeypatch.setenv("AESTHETIC_WEIGHTS", str(env / "clip" / "ViT-L-14.pt"))  # a CLIP file, not the MLP
    out = tmp_path / "eval"
    rc = main(["evaluate", "--images", str(d), "--metrics", "clip", "aesthetic", "--out-dir", str(out)])
    assert rc == 2 and "not a LAION aesthetic predictor" in capsys.readouterr().err
    assert not out.exists()  # clip had already been scored: still nothing written


def test_missing_weights_fail_before_loading_without_network(tmp_path):
    d = tmp_path / "samples"
    write_samples(d)
    pf = tmp_path / "p.txt"
    pf.write_text("\n".join(PROMPTS))
    script = textwrap.dedent(f"""
        import socket, sys
        def no_network(*a, **k):
            raise AssertionError("network access attempted")
        socket.socket.connect = no_network
        socket.socket.connect_ex = no_network
        socket.create_connection = no_network
        socket.getaddrinfo = no_network
        from epd.cli import main
        rc = main(["evaluate", "--images", {str(d)!r}, "--prompts", {str(pf)!r},
                   "--metrics", "hps,pickscore,imagereward,clip,aesthetic,mps", "--device", "cpu"])
        heavy = [m for m in ("open_clip", "transformers", "ImageReward", "clip", "mlflow") if m in sys.modules]
        print("HEAVY", heavy)
        sys.exit(rc)
    """)
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_WEIGHTS", "_PATH")) and k != "MLFLOW_TRACKING_URI"}
    env.update(EPD_WEIGHTS_DIR=str(tmp_path / "weights"), EPD_DATA_DIR=str(tmp_path / "data"),
               HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "HEAVY []" in r.stdout, r.stdout
    assert "network access attempted" not in r.stderr
    for f in ("hps/HPS_v2.1_compressed.pt", "pickscore/PickScore_v1", "imagereward/ImageReward.pt",
              "imagereward/med_config.json", "clip/ViT-L-14.pt", "aesthetic/sac+logos+ava1-l14-linearMSE.pth",
              "mps/MPS_overall_state_dict.pt", str(tmp_path / "weights" / "clip" / "ViT-L-14.pt")):
        assert f in r.stderr, f
    assert "dvc pull" not in r.stderr  # DVC tracks none of these scorer files
    assert not (tmp_path / "samples_eval").exists()


def test_fid_and_mlflow(env, tmp_path, monkeypatch):
    from epd.metrics.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    (env / "fid").mkdir(exist_ok=True)
    torch.save(net.net.state_dict(), env / "fid" / "pt_inception-2015-12-05.pth")
    d, ref = tmp_path / "samples", tmp_path / "ref"
    write_samples(d)
    write_samples(ref, seed=1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core CI box: avoid OpenMP/BLAS contention stalls
    try:
        with threadpool_limits(1):
            rc = main(["evaluate", "--images", str(d), "--metrics", "clip,fid_clean", "--fid-ref", str(ref),
                       "--out-dir", str(tmp_path / "eval"), "--label", "epd-test"])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    fid = json.loads((tmp_path / "eval" / "fid_clean.json").read_text())
    assert fid["protocol"] == "clean" and fid["fid"] > 0 and fid["stats"]["count"] == 3
    with open(tmp_path / "eval" / "scores.csv") as f:
        assert next(csv.reader(f)) == ["image", "seed", "prompt", "clip"]  # set metrics have no per-image column
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    clip = json.loads((tmp_path / "eval" / "clip.json").read_text())["stats"]
    assert runs["metrics.clip_mean"][0] == pytest.approx(clip["mean"])
    assert runs["metrics.clip_se"][0] == pytest.approx(clip["se"])
    assert runs["metrics.fid_clean"][0] == pytest.approx(fid["fid"])  # a set statistic: no _mean/_se
    assert runs["tags.stage"][0] == "evaluate"


def test_out_of_memory_names_the_batch_setting_and_leaves_no_outputs(env, tmp_path, capsys, monkeypatch):
    """CUDA's out-of-memory error inside a metric's batches becomes one error naming --batch-size (exit 2)."""
    import epd.evaluate

    d = tmp_path / "samples"
    write_samples(d)
    real = epd.evaluate._run_metric

    def oom_on_aesthetic(name, *a, **k):
        if name == "aesthetic":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(name, *a, **k)

    monkeypatch.setattr(epd.evaluate, "_run_metric", oom_on_aesthetic)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--images", str(d), "--metrics", "clip", "aesthetic", "--batch-size", "6",
               "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "metric aesthetic: out of GPU memory at epd evaluate --batch-size=6" in err
    assert "lower epd evaluate --batch-size (e.g. 3)" in err
    assert not out.exists()
