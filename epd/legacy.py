"""Read the original system's predictor ``.pkl`` snapshots without executing them.

The original pickles hold a ``torch_utils.persistence`` object whose ``meta`` embeds the full source of
``training/networks.py``; a plain ``pickle.load`` would ``exec`` it (spec §5.1). Here a restricted
:class:`pickle.Unpickler` resolves only an explicit allow-list of globals, each mapped to a local, inert
replacement:

* ``torch_utils.persistence._reconstruct_persistent_obj`` returns the ``meta`` dict (``module_src`` is kept
  as text and hashed, never executed);
* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` build tensors from parsed storages;
* ``torch.storage._load_from_bytes`` parses the legacy ``torch.save`` byte stream itself (magic number,
  protocol 1001, sys-info dict, one ``("storage", FloatStorage, key, location, numel)`` persistent id, the
  key list, then ``int64 numel`` and raw little-endian float32 data) with a nested unpickler whose only
  global is ``torch.FloatStorage``;
* ``collections.OrderedDict``; ``torch.nn.modules.activation.Sigmoid``/``Softmax`` and the original
  sampler functions (``solvers.*_sampler``, referenced by ICCV ``EPD_loss`` objects) become inert stubs.

Anything else raises :class:`~epd.errors.EPDError` naming the file and the refused global.

Parsing yields numpy arrays and imports no torch, so ``epd predictor show`` starts fast (:func:`describe_legacy`
decodes for display with numpy); :func:`decode_predictor` turns the same arrays into the torch
:class:`~epd.table.EPDTable` the samplers use.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, EPDError

__all__ = ["load_legacy_pickle", "read_legacy_pickle", "decode_predictor", "describe_legacy", "BACKEND_TO_BACKBONE",
           "backend_defaults", "MAX_FILE_BYTES"]

MAX_FILE_BYTES = 256 << 20  # the largest original predictor is ~113 KB
MAX_ELEMENTS = 1 << 26  # per storage/tensor (256 MiB of float32)
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER of the pre-zip format
LEGACY_PROTOCOL = 1001

BACKEND_TO_BACKBONE = {"ldm": "sd15", "sd3": "sd3", "flux": "flux"}
_FLOW_BACKBONES = ("sd3", "flux")
_PARAM_NAMES = ("r_params", "weight_s", "scale_dir_params", "scale_time_params")
_SIGMA_FIELDS = ("sigma_min", "sigma_max", "flowmatch_mu", "flowmatch_shift")
# Samplers an ICCV ``EPD_loss`` may reference (``training/loss.py``, ``get_solver_fn``); kept as names only.
_SAMPLER_NAMES = ("epd_sampler", "epd_parallel_sampler", "ipndm_sampler", "dpm_sampler", "dpm_sampler_2",
                  "heun_sampler", "edm_sampler", "ddim_sampler")


# ---------------------------------------------------------------------- inert replacements
class _Refused(EPDError):
    pass


class _Storage:
    """A parsed float32 storage (1-D array)."""

    __slots__ = ("data", "location")

    def __init__(self, data: np.ndarray, location: str):
        self.data, self.location = data, location

    def __setstate__(self, state):
        raise _Refused("pickle tried to set state on a storage")


class _RawTensor:
    """A tensor rebuilt from a storage (as a float32 numpy array); a wrapper so the pickle cannot call
    ``torch.Tensor.__setstate__``."""

    __slots__ = ("tensor", "is_parameter")

    def __init__(self, tensor: np.ndarray, is_parameter: bool = False):
        self.tensor, self.is_parameter = tensor, is_parameter

    def __setstate__(self, state):
        raise _Refused("pickle tried to set state on a tensor")


class _InertModule:
    """Stand-in for a pickled ``torch.nn`` module: records its state as data, has no behaviour."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _Refused(f"{self.qualname}: unexpected state of type {type(state).__name__}")
        self.state = state


class _GlobalRef:
    """A reference to a global function of the original code (not callable)."""

    __slots__ = ("qualname",)

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __repr__(self):
        return f"<ref {self.qualname}>"


def _inert_module(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (_InertModule,), {"qualname": qualname})


_FLOAT_STORAGE = _GlobalRef("torch.FloatStorage")


# ---------------------------------------------------------------------- legacy storage bytes
class _NestedUnpickler(pickle.Unpickler):
    """Unpickler for the small pickles inside a legacy ``torch.save`` byte stream."""

    def __init__(self, f, where: str, allow_storage: bool = False):
        super().__init__(f)
        self.where, self.allow_storage, self.refs = where, allow_storage, []

    def find_class(self, module, name):
        if self.allow_storage and (module, name) == ("torch", "FloatStorage"):
            return _FLOAT_STORAGE
        raise _Refused(f"{self.where}: refused global '{module}.{name}' inside storage bytes "
                       "(only torch.FloatStorage is allowed there)")

    def persistent_load(self, pid):
        ok = (self.allow_storage and not self.refs and isinstance(pid, tuple) and len(pid) in (5, 6)
              and pid[0] == "storage" and pid[1] is _FLOAT_STORAGE and isinstance(pid[2], str)
              and isinstance(pid[3], str) and re.fullmatch(r"cpu|cuda(:\d+)?", pid[3])
              and type(pid[4]) is int and (len(pid) == 5 or pid[5] is None))
        if not ok:
            raise _Refused(f"{self.where}: refused persistent id {str(pid)[:120]!r} inside storage bytes "
                           "(expected one ('storage', FloatStorage, key, location, numel))")
        self.refs.append(pid)
        return pid


def _nested(f, where, allow_storage=False):
    u = _NestedUnpickler(f, where, allow_storage)
    return u.load(), u


def _parse_storage_bytes(blob, where: str) -> _Storage:
    """Parse the bytes passed to ``torch.storage._load_from_bytes`` (a legacy-format ``torch.save`` of one
    FloatStorage) without torch's unpickler."""
    if not isinstance(blob, (bytes, bytearray)):
        raise _Refused(f"{where}: _load_from_bytes got {type(blob).__name__}, expected bytes")
    f = io.BytesIO(bytes(blob))
    magic, _ = _nested(f, where)
    if magic != LEGACY_MAGIC:
        raise _Refused(f"{where}: storage bytes do not start with the legacy torch magic number")
    proto, _ = _nested(f, where)
    if proto != LEGACY_PROTOCOL:
        raise _Refused(f"{where}: storage bytes have protocol {proto!r}, expected {LEGACY_PROTOCOL}")
    info, _ = _nested(f, where)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise _Refused(f"{where}: storage sys-info {str(info)[:80]!r} is not a little-endian header")
    root, u = _nested(f, where, allow_storage=True)
    if len(u.refs) != 1 or root is not u.refs[0]:
        raise _Refused(f"{where}: storage bytes must hold exactly one FloatStorage")
    _, _, key, location, numel = root[:5]
    keys, _ = _nested(f, where)
    if keys != [key]:
        raise _Refused(f"{where}: storage key list {str(keys)[:80]!r} does not match the descriptor key {key!r}")
    head = f.read(8)
    if len(head) != 8:
        raise _Refused(f"{where}: storage bytes are truncated before the element count")
    (count,) = struct.unpack("<q", head)
    remaining = len(blob) - f.tell()
    if count != numel or not 0 <= numel <= MAX_ELEMENTS or numel * 4 != remaining:
        raise _Refused(f"{where}: storage declares {numel} float32 elements (count field {count}) but carries "
                       f"{remaining} data bytes; refusing (limit {MAX_ELEMENTS} elements)")
    data = np.frombuffer(f.read(remaining), dtype="<f4").astype(np.float32)
    return _Storage(data, location)


# ---------------------------------------------------------------------- outer unpickler
def _is_int_tuple(t) -> bool:
    return isinstance(t, tuple) and all(type(v) is int and v >= 0 for v in t)


class _PredictorUnpickler(pickle.Unpickler):
    def __init__(self, f, where: str):
        super().__init__(f)
        self.where = where
        self.allowed = {
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): self._persistent_obj,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): self._load_from_bytes,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch.nn.modules.activation", "Sigmoid"): _inert_module("torch.nn.modules.activation.Sigmoid"),
            ("torch.nn.modules.activation", "Softmax"): _inert_module("torch.nn.modules.activation.Softmax"),
        }
        self.allowed.update({("solvers", n): _GlobalRef(f"solvers.{n}") for n in _SAMPLER_NAMES})

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"{self.where}: refused global '{module}.{name}' (not on the allow-list of predictor "
                           "pickles; the file is not an original EPD snapshot or was tampered with)") from None

    def persistent_load(self, pid):
        raise _Refused(f"{self.where}: refused persistent id {str(pid)[:80]!r} at the top level")

    # -- allow-listed callables
    def _persistent_obj(self, meta):
        if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
            raise _Refused(f"{self.where}: malformed persistent object (expected a class meta dict)")
        return meta

    def _load_from_bytes(self, blob):
        return _parse_storage_bytes(blob, self.where)

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        if not isinstance(storage, _Storage):
            raise _Refused(f"{self.where}: _rebuild_tensor_v2 got {type(storage).__name__}, expected a storage")
        if type(offset) is not int or offset < 0 or not _is_int_tuple(size) or not _is_int_tuple(stride) \
                or len(size) != len(stride) or len(size) > 8:
            raise _Refused(f"{self.where}: malformed tensor geometry offset={offset!r} size={size!r} stride={stride!r}")
        n = storage.data.size
        numel = math.prod(size)
        last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if numel else offset - 1
        if numel > MAX_ELEMENTS or last >= n:
            raise _Refused(f"{self.where}: tensor of size {size} (stride {stride}, offset {offset}) reaches element "
                           f"{last} of a storage holding {n}; refusing")
        if hooks or metadata:
            raise _Refused(f"{self.where}: tensors with backward hooks or metadata are not allowed")
        view = np.lib.stride_tricks.as_strided(storage.data[offset:], shape=size,
                                               strides=tuple(4 * st for st in stride), writeable=False)
        return _RawTensor(np.array(view, dtype=np.float32))

    def _rebuild_parameter(self, data, requires_grad=False, hooks=None):
        if not isinstance(data, _RawTensor) or hooks:
            raise _Refused(f"{self.where}: _rebuild_parameter got {type(data).__name__}, expected a tensor")
        return _RawTensor(data.tensor, is_parameter=True)


def read_legacy_pickle(path: str | Path) -> dict:
    """Unpickle an original predictor file through the allow-list, returning the raw object tree.

    Args:
        path (`str` or `Path`): the ``.pkl`` file.

    Returns:
        `dict`: the top-level dict (``{"model": meta}`` or ``{"model": meta, "loss_fn": meta}``) where each meta is
        the persistence dict ``{"type", "version", "module_src", "class_name", "state"}``; tensors are wrapped.

    Raises:
        EPDError: missing/oversized/corrupt file, or a global, persistent id or storage outside the allow-list.
    """
    path = Path(path)
    where = f"predictor pickle {path}"
    try:
        size = path.stat().st_size
    except OSError as e:
        raise EPDError(f"{where}: cannot read ({e.strerror or e})") from None
    if size > MAX_FILE_BYTES:
        raise EPDError(f"{where}: {size} bytes is larger than any EPD predictor (limit {MAX_FILE_BYTES}); refusing")
    data = path.read_bytes()
    f = io.BytesIO(data)
    try:
        obj = _PredictorUnpickler(f, where).load()
    except EPDError:
        raise
    except Exception as e:  # anything the unpickler raises on malformed input
        raise EPDError(f"{where}: not a readable predictor pickle, truncated or corrupt "
                       f"({type(e).__name__}: {str(e)[:200]})") from None
    if f.tell() != len(data):
        raise EPDError(f"{where}: {len(data) - f.tell()} unexpected bytes after the pickle's end; the file is corrupt")
    if not isinstance(obj, dict):
        raise EPDError(f"{where}: top level is {type(obj).__name__}, expected a dict with key 'model'")
    return obj


# ---------------------------------------------------------------------- decoding
def backend_defaults(backend: str | None, resolution: int | None = None) -> dict:
    """The sigma range / flow-matching settings the original backends use when a snapshot records none.

    Args:
        backend (`str`): ``"ldm"``, ``"sd3"`` or ``"flux"`` (anything else: EDM pixel-model defaults).
        resolution (`int`, *optional*): image resolution; FLUX's ``mu`` depends on it (``calculate_flux_mu``).
    """
    if backend == "ldm":
        # SD1.5 scaled-linear betas (0.00085 -> 0.012, 1000 steps): sigma(t=1e-3) and sigma(t=1).
        betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
        abar = np.cumprod(1 - betas)
        s = np.sqrt((1 - abar) / abar)
        return {"sigma_min": float(s[0]), "sigma_max": float(s[-1]), "flowmatch_mu": None, "flowmatch_shift": None}
    if backend == "sd3":  # static shift 3: sigma_min = 3 * 1e-3 / (1 + 2 * 1e-3)
        return {"sigma_min": 3 * 1e-3 / (1 + 2 * 1e-3), "sigma_max": 1.0, "flowmatch_mu": None, "flowmatch_shift": 3.0}
    if backend == "flux":  # dynamic shifting; mu linear in the packed token count (256 -> 0.5, 4096 -> 1.15)
        mu = None
        if resolution:
            tokens = (int(resolution) // 16) ** 2
            m = (1.15 - 0.5) / (4096 - 256)
            mu = tokens * m + (0.5 - 256 * m)
        return {"sigma_min": 0.001, "sigma_max": 1.0, "flowmatch_mu": mu, "flowmatch_shift": 3.0}
    return {"sigma_min": 0.002, "sigma_max": 80.0, "flowmatch_mu": None, "flowmatch_shift": None}


def _raw(params: dict, name: str, where: str) -> np.ndarray | None:
    v = params.get(name)
    if v is None:
        return None
    if not isinstance(v, _RawTensor) or v.tensor.ndim != 2:
        raise EPDError(f"{where}: parameter {name} is not a 2-D tensor")
    if not np.isfinite(v.tensor).all():
        raise EPDError(f"{where}: parameter {name} contains NaN or inf")
    return v.tensor


def _sigmoid(x):
    if isinstance(x, np.ndarray):
        return 1.0 / (1.0 + np.exp(-x))
    import torch

    return torch.sigmoid(x)


def _scale(raw, s: float):
    """``c = (1 - s) + 2 s sigmoid(p / 2)`` when the range ``s > 0`` (spec §3.1); None (all ones) otherwise."""
    if raw is None or not s > 0:
        return None
    return (1 - s) + 2 * s * _sigmoid(0.5 * raw)


def _lookup(field: str, state: dict, init_kwargs: dict, backend_config: dict, extra: dict, defaults: dict):
    for source, d in (("attribute", state), ("init_kwargs", init_kwargs), ("backend_config", backend_config),
                      ("loss_fn", extra)):
        if d.get(field) is not None:
            return d[field], source
    return defaults.get(field), "default" if defaults.get(field) is not None else None


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, _RawTensor):
        return v.tensor.tolist() if v.tensor.size <= 64 else f"<tensor {tuple(v.tensor.shape)}>"
    return repr(v)


def _loss_fn_info(meta: Any, where: str) -> dict:
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise EPDError(f"{where}: 'loss_fn' is not a persistent object")
    st = meta["state"]
    info = {"class_name": meta.get("class_name"),
            "module_src_sha1": _sha1(meta.get("module_src"))}
    for k in ("num_steps", "schedule_type", "schedule_rho", "afs", "max_order", "sigma_min", "sigma_max",
              "predict_x0", "lower_order_final", "num_steps_teacher", "tea_slice", "M"):
        if k in st:
            info[k] = _jsonable(st[k])
    for k in ("solver_stu", "solver_tea"):
        if isinstance(st.get(k), _GlobalRef):
            info[k] = st[k].qualname
    t = st.get("t_steps")
    if isinstance(t, _RawTensor):
        if t.tensor.ndim != 1:
            raise EPDError(f"{where}: loss_fn t_steps has shape {tuple(t.tensor.shape)}, expected 1-D")
        info["t_steps"] = t.tensor.tolist()
    return info


def _sha1(src) -> str | None:
    return hashlib.sha1(src.encode()).hexdigest() if isinstance(src, str) else None


def decode_predictor(obj: dict, source: str = "<memory>"):
    """Turn the raw object tree of :func:`read_legacy_pickle` into an :class:`~epd.table.EPDTable`.

    Positions ``sigmoid(r_params)``, weights ``softmax(weight_s)``, scales ``(1 - s) + 2 s sigmoid(p / 2)`` only
    where the snapshot's range ``s > 0`` (``fcn`` forces the last step's ``c`` to 1). Rows are sorted by
    position (EPD does not depend on point order); sorted rows are listed in ``provenance["reordered_rows"]``.
    Metadata is looked up attribute -> ``_init_kwargs`` -> ``backend_config`` -> ``loss_fn`` -> backend default;
    ``provenance["meta_sources"]`` says where each sigma/flow field came from.
    """
    import torch

    from .table import EPDTable

    raw, meta, provenance = _decode_parts(obj, source)
    rows = _decode_rows({n: None if a is None else torch.from_numpy(a).double() for n, a in raw.items()}, meta)
    try:
        return EPDTable(*rows[:4], meta=meta, provenance=_with_reordered(provenance, rows[4]))
    except ConfigError as e:
        raise EPDError(f"predictor pickle {source}: {e}") from None


def describe_legacy(path: str | Path) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """``(meta, provenance, arrays)`` of an original ``.pkl`` without torch, for display (``epd predictor show``).

    The arrays (``positions``, ``weights`` and the scales present) are decoded with numpy: the same formulas as
    :func:`decode_predictor`, equal to its float64 values up to the last bits (the samplers use the latter).
    """
    raw, meta, provenance = _decode_parts(read_legacy_pickle(path), str(path))
    rows = _decode_rows({n: None if a is None else a.astype(np.float64) for n, a in raw.items()}, meta)
    arrays = {k: v for k, v in zip(("positions", "weights", "scale_dir", "scale_time"), rows[:4]) if v is not None}
    meta = {**meta, "num_steps": raw["r_params"].shape[0] + 1, "num_points": raw["r_params"].shape[1]}
    return meta, _with_reordered(provenance, rows[4]), arrays


def _decode_parts(obj: dict, source: str) -> tuple[dict, dict, dict]:
    """The raw parameter arrays, the metadata and the provenance (less the reordered rows) of a predictor."""
    where = f"predictor pickle {source}"
    model, raw = _predictor_parameters(obj, where)
    attrs, init_kwargs, backend_config = _predictor_settings(model["state"], tuple(raw["r_params"].shape), where)
    loss_info = _loss_fn_info(obj["loss_fn"], where) if "loss_fn" in obj else None
    backend, sources = _backend(attrs, init_kwargs, where)
    meta = _decode_meta(attrs, init_kwargs, backend_config, loss_info, backend, sources)
    provenance = {
        "source": str(source), "format": "legacy-pkl",
        "layout": "model+loss_fn" if loss_info else "model",
        "generation": "backend" if "backend" in attrs else "pre-backend",
        "module_src_sha1": _sha1(model.get("module_src")),
        "raw": {n: t.tolist() for n, t in raw.items() if t is not None},
        "reordered_rows": None,
        "meta_sources": sources,
    }
    if loss_info:
        provenance["loss_fn"] = loss_info
        if "t_steps" in loss_info:
            provenance["reference_t_steps"] = loss_info["t_steps"]
    return raw, meta, provenance


def _with_reordered(provenance: dict, order_changed) -> dict:
    return {**provenance, "reordered_rows": [int(i) for i in np.flatnonzero(np.asarray(order_changed))]}


def _predictor_parameters(obj: dict, where: str) -> tuple[dict, dict]:
    """The ``EPD_predictor`` persistence dict and its raw parameter tensors (all of ``r_params``' shape)."""
    model = obj.get("model")
    if not isinstance(model, dict) or model.get("class_name") != "EPD_predictor":
        raise EPDError(f"{where}: key 'model' does not hold an EPD_predictor (keys {sorted(map(str, obj))}, "
                       f"class {model.get('class_name') if isinstance(model, dict) else type(model).__name__!r})")
    params = model["state"].get("_parameters")
    if not isinstance(params, dict):
        raise EPDError(f"{where}: predictor state has no _parameters dict")
    raw = {n: _raw(params, n, where) for n in _PARAM_NAMES}
    for n in ("r_params", "weight_s"):
        if raw[n] is None:
            raise EPDError(f"{where}: predictor has no parameter {n}")
    shape = tuple(raw["r_params"].shape)
    for n, t in raw.items():
        if t is not None and tuple(t.shape) != shape:
            raise EPDError(f"{where}: parameter {n} has shape {tuple(t.shape)}, r_params has {shape}")
    return model, raw


def _predictor_settings(state: dict, shape: tuple, where: str) -> tuple[dict, dict, dict]:
    """``(attributes, _init_kwargs, backend_config)`` of the predictor, checked against the parameter shape."""
    init_kwargs = state.get("_init_kwargs") if isinstance(state.get("_init_kwargs"), dict) else {}
    attrs = {k: v for k, v in state.items() if not k.startswith("_") and k != "training"}
    for k in ("num_steps", "num_points"):
        want = shape[0] + 1 if k == "num_steps" else shape[1]
        have = attrs.get(k, init_kwargs.get(k))
        if have is not None and have != want:
            raise EPDError(f"{where}: metadata {k}={have} contradicts the parameter shape {shape}")
    backend_config = attrs.get("backend_config") or init_kwargs.get("backend_config") or {}
    if not isinstance(backend_config, dict):
        raise EPDError(f"{where}: backend_config is {type(backend_config).__name__}, expected a dict")
    return attrs, init_kwargs, backend_config


def _backend(attrs: dict, init_kwargs: dict, where: str) -> tuple[str | None, dict]:
    """The original backend name (``ldm``/``sd3``/``flux`` or None) and ``{"backbone": where it came from}``."""
    sources = {}
    backend = attrs.get("backend", init_kwargs.get("backend"))
    sources["backbone"] = "attribute" if "backend" in attrs else "init_kwargs"
    if backend is None and attrs.get("dataset_name") == "ms_coco":
        backend, sources["backbone"] = "ldm", "inferred from dataset_name=ms_coco (pre-backend layout)"
    elif backend is None:
        sources["backbone"] = None
    if backend is not None and backend not in BACKEND_TO_BACKBONE:
        raise EPDError(f"{where}: unknown backend {backend!r}; expected one of {sorted(BACKEND_TO_BACKBONE)}")
    return backend, sources


def _decode_meta(attrs: dict, init_kwargs: dict, backend_config: dict, loss_info: dict | None,
                 backend: str | None, sources: dict) -> dict:
    """The table's metadata in this package's names; records in ``sources`` where each sigma/flow field came from."""
    backbone = BACKEND_TO_BACKBONE.get(backend)
    resolution = attrs.get("img_resolution") or init_kwargs.get("img_resolution") or backend_config.get("resolution")
    defaults = backend_defaults(backend, resolution)
    meta = {k: _jsonable(v) for k, v in attrs.items() if k not in ("backend", "backend_config")}
    meta.update(backbone=backbone, backbone_config=_jsonable(backend_config) if backend is not None else None,
                img_resolution=resolution, coords="flow" if backbone in _FLOW_BACKBONES else "edm")
    for fld in _SIGMA_FIELDS:
        meta[fld], sources[fld] = _lookup(fld, attrs, init_kwargs, backend_config, loss_info or {}, defaults)
    meta.pop("num_steps", None), meta.pop("num_points", None)
    return meta


def _decode_rows(raw: dict, meta: dict):
    """Positions, weights and scales from the raw float64 parameters (torch tensors, or numpy arrays for display),
    rows sorted by position; plus which rows moved."""
    s_dir = float(meta.get("scale_dir") or 0.0)
    s_time = float(meta.get("scale_time") or 0.0)
    positions = _sigmoid(raw["r_params"])
    if isinstance(positions, np.ndarray):
        e = np.exp(raw["weight_s"] - raw["weight_s"].max(1, keepdims=True))
        weights = e / e.sum(1, keepdims=True)
    else:
        import torch

        weights = torch.softmax(raw["weight_s"], dim=1)
    scale_dir = _scale(raw["scale_dir_params"], s_dir)
    scale_time = _scale(raw["scale_time_params"], s_time)
    if scale_dir is not None and meta.get("fcn"):
        scale_dir[-1] = 1.0
    order = positions.argsort(1) if isinstance(positions, np.ndarray) else positions.argsort(dim=1)
    order_changed = (np.asarray(order) != np.arange(positions.shape[1])).any(1)
    if isinstance(positions, np.ndarray):
        g = lambda t: None if t is None else np.take_along_axis(t, order, 1)  # noqa: E731
        return g(positions), g(weights), g(scale_dir), g(scale_time), order_changed
    from .table import EPDTable

    return (*EPDTable.sort_rows(positions, weights, scale_dir, scale_time)[:4], order_changed)


def load_legacy_pickle(path: str | Path):
    """Load an original EPD predictor snapshot (``network-snapshot-*.pkl``) safely.

    Args:
        path (`str` or `Path`): the ``.pkl`` file (any of the three historical layouts, RLEPD or ICCV).

    Returns:
        :class:`~epd.table.EPDTable` with metadata mapped to this package's names (``backend`` ldm/sd3/flux ->
        ``backbone`` sd15/sd3/flux, ``coords`` ``"flow"`` for SD3/FLUX) and provenance holding the raw parameter
        tables, the reordered rows, where each metadata field came from and, for Stage-1 snapshots, the
        reference schedule ``reference_t_steps`` stored in the ``loss_fn``.

    Raises:
        EPDError: for unreadable, corrupt or disallowed content (the message names the file and the cause).
    """
    return decode_predictor(read_legacy_pickle(path), str(path))
