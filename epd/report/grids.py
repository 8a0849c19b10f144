"""Sample grids for the report, cut from the sampled folders (nothing is re-sampled).

* ``grid_nfe<N>.png``, one per NFE: one row per solver at that NFE, one column per seed; every row shows the same
  seeds (and so the same prompts), the first ``columns`` seeds all the folders share.
* ``grid_overview.png``: one row per solver, one column per NFE, each cell the same first seeds.

Small images (digits) are upscaled by an integer factor with nearest-neighbour sampling and separated by gutters;
large ones (real backbones) become thumbnails. Column headers carry the seed and its prompt, row headers the
solver label (and its wall-clock per image when recorded).
"""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path

from ..io import atomic_path
from .tables import PIPELINE, Row

log = logging.getLogger(__name__)

__all__ = ["write_grids", "grid_names", "CELL", "THUMB", "GUTTER", "LABEL_W", "STRIP_GAP"]

CELL = 128        # drawn image size (px): small images are upscaled to at least this, large ones shrunk to it
THUMB = 192       # thumbnail size of large images
GUTTER = 6        # px between cells
LABEL_W = 150     # row-label column
TITLE_H = 30      # title line
STRIP_GAP = 2     # px between the seeds of one overview cell
SMALL = 64        # images up to this size are "small" (upscaled, more seeds per row)
BG, INK, EMPTY = (255, 255, 255), (20, 20, 20), (225, 225, 225)


def grid_names(nfes) -> list[str]:
    """File names :func:`write_grids` writes for these NFEs (what the workflow declares)."""
    return [f"grid_nfe{int(n)}.png" for n in sorted(set(nfes))] + ["grid_overview.png"]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _folder_images(images_dir: str) -> dict[int, tuple[Path, str]]:
    """``{seed: (png, prompt)}`` of a sampled folder, through its sidecars (empty when the folder is gone)."""
    from ..metrics.imagedir import pair_samples

    if not images_dir or not Path(images_dir).is_dir():
        return {}
    return {s.seed: (s.path, s.prompt) for s in pair_samples(images_dir) if s.seed is not None}


def _cell(path: Path, size: int):
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if max(w, h) <= SMALL:
            k = max(1, math.ceil(size / max(w, h)))
            return im.resize((w * k, h * k), Image.NEAREST)
        im.thumbnail((size, size), Image.LANCZOS)
        return im.copy()


def _canvas(n_rows: int, n_cols: int, col_w: int, row_h: int, header_h: int, title: str):
    """A white canvas for ``n_rows`` x ``n_cols`` cells of ``col_w`` x ``row_h`` px under a title and a header."""
    from PIL import Image, ImageDraw

    w = LABEL_W + n_cols * (col_w + GUTTER) + GUTTER
    h = TITLE_H + header_h + n_rows * (row_h + GUTTER) + GUTTER
    img = Image.new("RGB", (w, h), BG)
    draw = ImageDraw.Draw(img)
    draw.text((GUTTER, 8), title, fill=INK, font=_font(15))
    return img, draw


def _origin(r: int, c: int, col_w: int, row_h: int, top: int) -> tuple[int, int]:
    return LABEL_W + GUTTER + c * (col_w + GUTTER), top + GUTTER + r * (row_h + GUTTER)


def _paste(img, draw, tile, r: int, c: int, col_w: int, row_h: int, top: int) -> None:
    x, y = _origin(r, c, col_w, row_h, top)
    if tile is None:
        draw.rectangle([x, y, x + col_w - 1, y + row_h - 1], fill=EMPTY)
        draw.text((x + col_w // 2 - 4, y + row_h // 2 - 8), "–", fill=INK, font=_font(14))
        return
    img.paste(tile, (x + (col_w - tile.width) // 2, y + (row_h - tile.height) // 2))


def _row_label(draw, text: str, r: int, row_h: int, top: int) -> None:
    y = top + GUTTER + r * (row_h + GUTTER) + row_h // 2 - 10
    for i, line in enumerate(text.splitlines()):
        draw.text((GUTTER, y + 16 * i), line, fill=INK, font=_font(13))


def _header(draw, lines: list[str], c: int, col_w: int) -> None:
    x = LABEL_W + GUTTER + c * (col_w + GUTTER)
    for i, line in enumerate(lines):
        draw.text((x, TITLE_H + 13 * i), line, fill=INK, font=_font(11))


def _prompt_lines(prompt: str, cell: int, max_lines: int = 3) -> list[str]:
    lines = textwrap.wrap(prompt, width=max(8, cell // 6)) or [""]
    return lines[:max_lines - 1] + [textwrap.shorten(" ".join(lines[max_lines - 1:]), cell // 6, placeholder="…")] \
        if len(lines) > max_lines else lines


def _label(r: Row) -> str:
    cost = getattr(r, "seconds_per_image", math.nan)
    return r.solver + (f"\n{cost:.3g} s/img" if isinstance(cost, float) and math.isfinite(cost) else "")


def _save(img, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")


def _nfe_grid(rows: list[Row], folders: dict, seeds: list[int], cell: int, path: Path, title: str) -> None:
    prompts = [folders[rows[0].run_id][s][1] for s in seeds]
    header_h = 14 + 13 * max(len(_prompt_lines(p, cell)) for p in prompts)
    img, draw = _canvas(len(rows), len(seeds), cell, cell, header_h, title)
    for c, (s, p) in enumerate(zip(seeds, prompts)):
        _header(draw, [f"seed {s}", *_prompt_lines(p, cell)], c, cell)
    for r, row in enumerate(rows):
        _row_label(draw, _label(row), r, cell, TITLE_H + header_h)
        for c, s in enumerate(seeds):
            _paste(img, draw, _cell(folders[row.run_id][s][0], cell), r, c, cell, cell, TITLE_H + header_h)
    _save(img, path)


def _overview(rows: list[Row], folders: dict, seeds: list[int], cell: int, path: Path, title: str) -> None:
    """Rows: solver labels; columns: NFE; each cell the same ``seeds`` side by side."""
    from PIL import Image

    nfes = sorted({r.nfe for r in rows})
    labels = list(dict.fromkeys(r.solver for r in rows))
    at = {(r.solver, r.nfe): r for r in rows}
    strip = cell * len(seeds) + STRIP_GAP * (len(seeds) - 1)
    img, draw = _canvas(len(labels), len(nfes), strip, cell, 18, title)
    for c, n in enumerate(nfes):
        _header(draw, [f"NFE {n:g}"], c, strip)
    for r, label in enumerate(labels):
        _row_label(draw, label, r, cell, TITLE_H + 18)
        for c, n in enumerate(nfes):
            row = at.get((label, n))
            tile = None
            if row is not None:
                tile = Image.new("RGB", (strip, cell), BG)
                for i, s in enumerate(seeds):
                    tile.paste(_cell(folders[row.run_id][s][0], cell), (i * (cell + STRIP_GAP), 0))
            _paste(img, draw, tile, r, c, strip, cell, TITLE_H + 18)
    _save(img, path)


def write_grids(rows: list[Row], out_dir: Path, backbone: str, columns: int | None = None) -> list[str]:
    """Write the grids of one backbone's table rows from their sampled folders (``Row.images_dir``).

    Args:
        rows (`list[Row]`): the table's rows in table order; rows without a readable folder are left out (a
            warning names them).
        out_dir (`Path`): the backbone's report folder.
        backbone (`str`): for titles.
        columns (`int`, *optional*): seeds per NFE grid (default: 8 for small images, 4 for large ones).

    Returns:
        `list[str]`: names of the files written.
    """
    folders = {}
    for r in rows:
        if r.source == PIPELINE and math.isfinite(r.nfe):
            imgs = _folder_images(r.images_dir)
            if imgs:
                folders[r.run_id] = imgs
            else:
                log.warning("%s NFE %g: sampled folder %r not found; left out of the grids", r.solver, r.nfe,
                            r.images_dir)
    rows = [r for r in rows if r.run_id in folders]
    if not rows:
        return []
    shared = sorted(set.intersection(*(set(f) for f in folders.values())))
    if not shared:
        log.warning("%s: the sampled folders share no seed; no grids", backbone)
        return []
    small = _is_small(folders[rows[0].run_id][shared[0]][0])
    cell, k = (CELL, columns or 8) if small else (THUMB, columns or 4)
    seeds = shared[:k]
    written = []
    for n in sorted({r.nfe for r in rows}):
        at_n = [r for r in rows if r.nfe == n]
        name = f"grid_nfe{n:g}.png"
        _nfe_grid(at_n, folders, seeds, cell, out_dir / name,
                  f"{backbone}, NFE {n:g}: same seeds and prompts in every row")
        written.append(name)
    _overview(rows, folders, seeds[:4 if small else 1], cell, out_dir / "grid_overview.png",
              f"{backbone}: solvers by NFE (seeds {', '.join(map(str, seeds[:4 if small else 1]))})")
    return written + ["grid_overview.png"]


def _is_small(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return max(im.size) <= SMALL
