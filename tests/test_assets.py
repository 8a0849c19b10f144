"""``epd assets fetch`` / ``verify``: checksummed copies of the original system's released files."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import urllib.error
import sys
from pathlib import Path

import pytest

from epd import assets
from epd.cli import main
from epd.errors import EPDError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import UPSTREAM_LAYOUT as LAYOUT, build_mirror, fixture, restore_upstream as restore  # noqa: E402

MANIFEST = assets.load_manifest()
ALL = {a.path for a in MANIFEST.files}
PKLS = sorted(p for p in ALL if p.endswith(".pkl"))


@pytest.fixture(scope="module")
def rlepd() -> Path:
    """The original system's files shipped for tests; skips where they are absent."""
    return fixture("rlepd")


def published_sums(rlepd: Path) -> dict[str, str]:
    """``SHA256SUMS.upstream`` of the fixtures, keyed by upstream repo-relative path."""
    out = {}
    for folder in ("best_models", "prompts"):
        for line in (rlepd / folder / "SHA256SUMS.upstream").read_text().splitlines():
            digest, name = line.split(None, 1)
            out[f"{LAYOUT[folder]}/{name.strip().removeprefix('./')}"] = digest
    return out


@pytest.fixture
def mirror(rlepd, tmp_path) -> Path:
    """A folder laid out like the upstream repository, built from the fixtures with upstream bytes restored."""
    return build_mirror(tmp_path / "mirror")


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- the manifest
def test_manifest_lists_the_released_files():
    assert MANIFEST.repo == "Ziyuli1121/RLEPD"
    assert MANIFEST.commit == "7b0882ba747ad557728c34ccb7a62c330284f958"
    assert MANIFEST.url("src/prompts/test.txt") == \
        f"https://raw.githubusercontent.com/Ziyuli1121/RLEPD/{MANIFEST.commit}/src/prompts/test.txt"
    assert len(PKLS) == 10 and "exps/best_models/flux.pkl" in ALL
    assert {f"exps/best_models/{m}/{m}-{v}.pkl" for m in ("sd15", "sd3-512", "sd3-1024")
            for v in ("start", "distilled", "best")} < ALL
    assert {"src/prompts/test.txt", "src/prompts/MS-COCO_val2014_30k_captions.csv", "src/prompts/coco10k.csv"} < ALL
    assert sum(p.startswith("results/flux_baseline_eval_20260402/") for p in ALL) == 24
    assert sum(p.startswith("results/flux_epd_step001000_eval/") for p in ALL) == 6
    assert "no published checksums" in MANIFEST.note


def test_manifest_checksums_equal_the_published_ones(rlepd):
    """Independent of how the manifest was built: every pkl/prompt checksum is the one upstream published."""
    published = published_sums(rlepd)
    checked = [a for a in MANIFEST.files if not a.path.startswith("results/")]
    assert len(checked) == 13
    for a in checked:
        assert a.sha256 == published[a.path], a.path


def test_restored_flux_matches_the_published_checksum(rlepd, mirror):
    published = published_sums(rlepd)["exps/best_models/flux.pkl"]
    assert published.startswith("1cfe3d77")
    assert sha(rlepd / "best_models" / "flux.pkl") != published  # the local copy has rewritten paths
    assert sha(mirror / "exps/best_models/flux.pkl") == published


# ---------------------------------------------------------------------- fetch from a mirror
def test_fetch_from_mirror_fills_every_file_and_verifies(mirror, tmp_path):
    dest = tmp_path / "out"
    lines = []
    paths = assets.fetch(dest, mirror=mirror, report=lines.append)
    assert paths == [dest / a.path for a in MANIFEST.files]
    assert files_under(dest) == ALL  # nothing else: no temporaries, no extra mirror files
    assert lines == [f"ok (fetched)  {a.path}" for a in MANIFEST.files]
    assert assets.verify(dest) == []
    assert assets.missing(dest, ["exps/best_models", "src/prompts/test.txt"]) == []
    for a in MANIFEST.files:
        assert sha(dest / a.path) == a.sha256 == sha(mirror / a.path)


def test_second_fetch_is_a_no_op(mirror, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    assets.fetch(dest, mirror=mirror)
    stamps = {p: (dest / p).stat().st_mtime_ns for p in ALL}

    def no_network(*a, **k):
        raise AssertionError("nothing to download")

    monkeypatch.setattr(assets.urllib.request, "urlopen", no_network)
    lines = []
    assets.fetch(dest, report=lines.append)  # no mirror, no network: everything is present already
    assert lines == [f"ok (already present)  {a.path}" for a in MANIFEST.files]
    assert {p: (dest / p).stat().st_mtime_ns for p in ALL} == stamps


def test_only_fetches_the_named_files_and_folders(mirror, tmp_path):
    dest = tmp_path / "out"
    got = assets.fetch(dest, mirror=mirror, only=["exps/best_models/sd15", "src/prompts/test.txt"])
    want = {f"exps/best_models/sd15/sd15-{v}.pkl" for v in ("start", "distilled", "best")} | {"src/prompts/test.txt"}
    assert {p.relative_to(dest).as_posix() for p in got} == want == files_under(dest)
    assert set(assets.missing(dest, ["exps/best_models"])) == {p for p in PKLS if "sd15" not in p}
    with pytest.raises(EPDError, match="exps/best_models/sd99.*not a file or folder of the asset manifest"):
        assets.fetch(dest, mirror=mirror, only=["exps/best_models/sd99"])


def test_corrupt_mirror_file_is_refused_and_nothing_left(mirror, tmp_path):
    bad = "exps/best_models/sd3-512/sd3-512-best.pkl"
    data = bytearray((mirror / bad).read_bytes())
    data[100] ^= 0xFF
    (mirror / bad).write_bytes(bytes(data))
    dest = tmp_path / "out"
    with pytest.raises(EPDError) as e:
        assets.fetch(dest, mirror=mirror)
    msg = str(e.value)
    expected = next(a.sha256 for a in MANIFEST.files if a.path == bad)
    assert bad in msg and expected in msg and hashlib.sha256(data).hexdigest() in msg
    assert "check" in msg and "--mirror" in msg
    assert not (dest / bad).exists()
    assert not [p for p in dest.rglob(".*")]  # no temporaries
    assert bad not in files_under(dest) and files_under(dest) < ALL
    assert assets.verify(dest) and all(p.endswith(": missing") for p in assets.verify(dest))


def test_corrupt_local_copy_is_replaced(mirror, tmp_path):
    dest = tmp_path / "out"
    assets.fetch(dest, mirror=mirror, only=["src/prompts/test.txt"])
    (dest / "src/prompts/test.txt").write_text("tampered\n")
    assert assets.missing(dest, ["src/prompts/test.txt"]) == ["src/prompts/test.txt"]
    lines = []
    assets.fetch(dest, mirror=mirror, only=["src/prompts/test.txt"], report=lines.append)
    assert lines == ["ok (fetched, replaced a corrupt copy)  src/prompts/test.txt"]
    assert assets.missing(dest, ["src/prompts/test.txt"]) == []


def test_mirror_missing_a_file_writes_nothing(mirror, tmp_path):
    gone = "results/flux_epd_step001000_eval/flux_epd_step001000_hps.json"  # the last file: fails up front
    (mirror / gone).unlink()
    dest = tmp_path / "out"
    with pytest.raises(EPDError, match="missing 1 of the 43 requested files") as e:
        assets.fetch(dest, mirror=mirror)
    assert str(mirror / gone) in str(e.value) and "nothing was written" in str(e.value)
    assert files_under(dest) == set()


def test_unwritable_destination_is_an_epd_error(mirror, tmp_path):
    (tmp_path / "out").write_text("a file, not a folder")
    with pytest.raises(EPDError, match="cannot write .*check --out"):
        assets.fetch(tmp_path / "out", mirror=mirror, only=["src/prompts/test.txt"])


def test_mirror_that_is_not_a_folder(tmp_path):
    with pytest.raises(EPDError, match="not a directory"):
        assets.fetch(tmp_path / "out", mirror=tmp_path / "nowhere")


# ---------------------------------------------------------------------- download
def test_unreachable_url_suggests_a_mirror(tmp_path, monkeypatch):
    dead = dataclasses.replace(MANIFEST, url_template="http://127.0.0.1:9/{commit}/{path}")
    monkeypatch.setattr(assets, "load_manifest", lambda: dead)
    monkeypatch.setattr(assets, "TIMEOUT_S", 5.0)
    dest = tmp_path / "out"
    with pytest.raises(EPDError, match="--mirror DIR") as e:
        assets.fetch(dest, only=["src/prompts/test.txt"])
    assert f"http://127.0.0.1:9/{MANIFEST.commit}/src/prompts/test.txt" in str(e.value)
    assert files_under(dest) == set()


@pytest.mark.parametrize("error, why", [
    (TimeoutError("timed out"), "timed out after 30 s"),
    (urllib.error.URLError(TimeoutError("timed out")), "timed out after 30 s"),
    (urllib.error.URLError("[Errno -3] Temporary failure in name resolution"), "name resolution"),
    (urllib.error.HTTPError("u", 404, "Not Found", None, None), "HTTP 404 Not Found"),
])
def test_download_errors_name_the_url_and_the_mirror_option(tmp_path, monkeypatch, error, why):
    def urlopen(url, timeout):
        assert timeout == 30
        raise error

    monkeypatch.setattr(assets.urllib.request, "urlopen", urlopen)
    with pytest.raises(EPDError) as e:
        assets.fetch(tmp_path / "out", only=["exps/best_models/flux.pkl"])
    msg = str(e.value)
    assert MANIFEST.url("exps/best_models/flux.pkl") in msg and why in msg and "--mirror DIR" in msg


class _Response(io.BytesIO):
    """A urlopen response serving ``data``; raises ``fail`` after ``cut`` bytes if given."""

    def __init__(self, data: bytes, cut: int | None = None, fail: BaseException | None = None):
        super().__init__(data if cut is None else data[:cut])
        self.fail = fail

    def read(self, n=-1):
        block = super().read(n)
        if not block and self.fail is not None:
            raise self.fail
        return block


def serve(mirror: Path, broken: str | None = None, **kw):
    """A fake urlopen serving the mirror by URL; ``broken`` gets ``_Response(data, **kw)``."""
    prefix = MANIFEST.url("")
    calls = []

    def urlopen(url, timeout):
        path = url.removeprefix(prefix)
        calls.append(path)
        data = (mirror / path).read_bytes()
        return _Response(data, **kw) if path == broken else _Response(data)

    return urlopen, calls


def test_download_checks_and_installs_every_file(mirror, tmp_path, monkeypatch):
    urlopen, calls = serve(mirror)
    monkeypatch.setattr(assets.urllib.request, "urlopen", urlopen)
    dest = tmp_path / "out"
    assets.fetch(dest)
    assert calls == [a.path for a in MANIFEST.files]
    assert files_under(dest) == ALL and assets.verify(dest) == []


def test_download_failing_midway_keeps_verified_files_only(mirror, tmp_path, monkeypatch):
    broken = PKLS[3]
    order = [a.path for a in MANIFEST.files]
    urlopen, _ = serve(mirror, broken, cut=1000, fail=ConnectionResetError(104, "Connection reset by peer"))
    monkeypatch.setattr(assets.urllib.request, "urlopen", urlopen)
    dest = tmp_path / "out"
    with pytest.raises(EPDError, match="Connection reset by peer.*--mirror DIR"):
        assets.fetch(dest)
    before = set(order[: order.index(broken)])
    assert files_under(dest) == before  # the verified ones, no partial file, no temporary
    assert assets.missing(dest, sorted(before)) == []
    urlopen, calls = serve(mirror)
    monkeypatch.setattr(assets.urllib.request, "urlopen", urlopen)
    assets.fetch(dest)  # resumes
    assert calls == order[order.index(broken):]
    assert assets.verify(dest) == []


def test_download_of_wrong_bytes_is_refused(mirror, tmp_path, monkeypatch):
    target = "src/prompts/coco10k.csv"

    def urlopen(url, timeout):
        return _Response(b"<html>rate limited</html>")

    monkeypatch.setattr(assets.urllib.request, "urlopen", urlopen)
    dest = tmp_path / "out"
    with pytest.raises(EPDError, match="checksum mismatch") as e:
        assets.fetch(dest, only=[target])
    assert target in str(e.value) and "re-fetch" in str(e.value)
    assert hashlib.sha256(b"<html>rate limited</html>").hexdigest() in str(e.value)
    assert files_under(dest) == set()


def test_download_longer_than_expected_stops_reading(tmp_path, monkeypatch):
    size = next(a.size for a in MANIFEST.files if a.path == "exps/best_models/flux.pkl")
    monkeypatch.setattr(assets, "_CHUNK", 64)
    monkeypatch.setattr(assets.urllib.request, "urlopen", lambda url, timeout: _Response(b"x" * (size * 100)))
    with pytest.raises(EPDError, match=f"more than {size} bytes"):
        assets.fetch(tmp_path / "out", only=["exps/best_models/flux.pkl"])
    assert files_under(tmp_path / "out") == set()


# ---------------------------------------------------------------------- CLI
def test_cli_fetch_then_verify(mirror, tmp_path, capsys):
    dest = tmp_path / "out"
    assert main(["assets", "fetch", "--mirror", str(mirror), "--out", str(dest)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(ALL) + 1 and "43 fetched, 0 already present" in out[-1]
    assert main(["assets", "verify", "--out", str(dest)]) == 0
    assert "all verified" in capsys.readouterr().out
    removed = "src/prompts/coco10k.csv"
    (dest / removed).unlink()
    assert assets.verify(dest) == [f"{removed}: missing"]
    assert main(["assets", "verify", "--out", str(dest)]) == 2
    cap = capsys.readouterr()
    assert f"{removed}: missing" in cap.out.splitlines()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "1 of 43 files" in err[0] and "epd assets fetch" in err[0]
    assert main(["assets", "fetch", "--mirror", str(mirror), "--out", str(dest), "--only", removed]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("1 files")


def test_cli_corrupt_mirror_is_one_error_line(mirror, tmp_path, capsys):
    bad = "exps/best_models/flux.pkl"
    (mirror / bad).write_bytes((mirror / bad).read_bytes()[:-1] + b"!")
    dest = tmp_path / "out"
    assert main(["assets", "fetch", "--mirror", str(mirror), "--out", str(dest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("epd assets fetch: error:") and bad in err[0]
    assert not (dest / bad).exists() and not list(dest.rglob(".*"))


def test_cli_default_destination_is_data_original(mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["assets", "fetch", "--mirror", str(mirror), "--only", "src/prompts/test.txt"]) == 0
    assert (tmp_path / "data/original/src/prompts/test.txt").is_file()


# ---------------------------------------------------------------------- the fetched tables
def test_fetched_tables_load_through_the_allow_list_reader(mirror, tmp_path):
    from epd.predictor import load

    dest = tmp_path / "out"
    assets.fetch(dest, mirror=mirror, only=["exps/best_models"])
    for path in PKLS:
        table = load(dest / path)
        assert table.num_points == 2, path
        assert table.num_steps == (9 if path.endswith("flux.pkl") else 11), path
        backbone = "flux" if "flux" in path else "sd3" if "sd3" in path else "sd15"
        assert table.meta["backbone"] == backbone, path
