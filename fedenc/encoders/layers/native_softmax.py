"""The full-softmax loss in native AVX2/FMA kernels (``full_softmax_kernels.cpp``), for training.

:func:`~fedenc.encoders.layers.full_softmax.full_softmax_cross_entropy` keeps exp'd logits when
the items are normalised (the default ``srgnn``); that path runs here when it can: the catalog in
panels of 24 items, each panel's unit item vectors packed once into L1 and every product, ``exp``
and sum on it done while it is there, instead of MKL's products and torch's passes over 1.6 MB
blocks. On the 2-core reference machine the loss's forward and backward take about 0.7x the
time; with the item table's Adam step inside the backward kernel (:func:`backward_adam`,
:mod:`fedenc.training.table_adam`) a Diginetica training step takes 0.72x
(``benchmarks/speed.py`` prints both paths).

The kernels are compiled on first use (``$CXX`` or ``g++``, about 2 s) into
``$FEDENC_CACHE_DIR`` (default ``~/.cache/fedenc``), keyed by a hash of the source and flags, and
loaded with :mod:`ctypes`: no torch headers, no build step at install. Where they cannot be used
(no x86-64 AVX2 CPU, no compiler, a float64 or GPU table, items not normalised, a session norm
past the exp-keeping bound, ``FEDENC_NATIVE_SOFTMAX=0``) the PyTorch path runs, after one warning
when a build failed. Both give the loss and gradients of the float64 expression to float32
rounding (relative 1e-6 at the default scale; tested), through different ``exp`` and summation
orders: a run is bit-reproducible on one path and thread count.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fedenc import atomic

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("full_softmax_kernels.cpp")
ENV_SWITCH = "FEDENC_NATIVE_SOFTMAX"  # "0" keeps the PyTorch path
ENV_CACHE = "FEDENC_CACHE_DIR"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None  # why the kernels are unavailable, once known
calls = 0  # forward calls so far: benchmarks read it to say which loss actually ran


@dataclass(frozen=True)
class NativeBlocks:
    """The forward's exp'd logits, kept for the backward: ``z`` is flat, laid out as
    ``[panels][bpad][24]`` (panel-major, then session, then the panel's 24 items)."""

    z: Tensor
    num_items: int
    bpad: int  # sessions padded to a multiple of 4
    dp: int  # width padded to a multiple of 8


_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def switched_on() -> bool:
    """``$FEDENC_NATIVE_SOFTMAX`` read: unset or 1/true/yes/on allows the kernels, 0/false/no/off
    keeps the PyTorch path; any other value is a ValueError naming the variable."""
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if value and value not in _ON + _OFF:
        raise ValueError(f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r}: use 1 (on) or 0 (off)")
    return value not in _OFF


def enabled() -> bool:
    """Whether the native path is allowed here: not switched off, an x86-64 CPU with AVX2."""
    if not switched_on():
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def active() -> bool:
    """Whether the native kernels are enabled and built here (builds them on first call): the
    normalised loss then runs in them on CPU float32 tables, for session norms up to the
    exp-keeping bound. A run records it, since the two paths' results differ (about 1e-6)."""
    return enabled() and library() is not None


def usable(session: Tensor, items: Tensor) -> bool:
    """Whether :func:`forward` can take these operands (and the kernels load)."""
    if not (
        session.device.type == "cpu"
        and items.device.type == "cpu"
        and session.dtype == torch.float32
        and items.dtype == torch.float32
        and items.dim() == 2
        and items.stride(1) == 1
        and items.shape[0] > 0
    ):
        return False
    return active()


def unavailable_reason() -> str | None:
    """Why the kernels could not be built or loaded, or None (not tried yet, or loaded)."""
    return _failure


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first call; None (after one warning) when that fails."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = _load_or_rebuild()
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
                _failure = str(exc)
                log.warning(
                    "native full-softmax kernels unavailable (%s); training uses the PyTorch "
                    "path (slower). Set %s=0 to skip this attempt.",
                    _failure,
                    ENV_SWITCH,
                )
    return _library


def _compiler() -> list[str]:
    """The compiler command: ``$CXX`` split like a shell would (``ccache g++`` works)."""
    cxx = os.environ.get("CXX", "g++")
    words = shlex.split(cxx)
    path = shutil.which(words[0]) if words else None
    if path is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX to one)")
    return [path, *words[1:]]


def _cache_dirs() -> list[Path]:
    """Where to keep the built library: $FEDENC_CACHE_DIR, else ~/.cache/fedenc; the temp dir
    when that is not writable (a read-only home)."""
    env = os.environ.get(ENV_CACHE)
    first = Path(env) if env else Path.home() / ".cache" / "fedenc"
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return [first / "native", Path(tempfile.gettempdir()) / f"fedenc-native-{user}"]


def _trusted(path: Path) -> str | None:
    """Why a library or its folder must not be loaded from, or None: it must belong to this
    user and be writable by no one else (the temp folder is shared: another user could plant
    a library under the name this one looks for, and loading it runs its code)."""
    if not hasattr(os, "getuid"):
        return None
    st = path.stat()
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {st.st_mode & 0o777:o})"
    # Another user who can rename entries of a folder above could swap this one for theirs
    # between this check and the load: every folder above must be writable by no one else, or
    # sticky (as /tmp: there only an entry's owner may rename it).
    for above in path.resolve().parents:
        mode = above.stat().st_mode
        if mode & 0o022 and not mode & stat.S_ISVTX:
            return f"{above}, above {path}, is writable by others and not sticky"
    return None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(target: Path) -> bool:
    """Whether ``target`` is the file its build wrote: a digest kept next to it must match (a
    truncated library crashes the process in dlopen; a corrupt one fails on every load)."""
    sidecar = target.with_suffix(".sha256")
    try:
        return sidecar.read_text().strip() == _digest(target)
    except OSError:
        return False


def _load_or_rebuild() -> ctypes.CDLL:
    """Load the cached build; a file that fails to load is removed and built once more, and
    if that fails too the folder cannot serve libraries (a ``noexec`` mount): the next one."""
    path = _build()
    try:
        return _load(path)
    except OSError:
        for stale in (path, path.with_suffix(".sha256")):
            with contextlib.suppress(OSError):
                stale.unlink()
    path = _build()
    try:
        return _load(path)
    except OSError as exc:
        log.info("cannot load %s (%s): building elsewhere", path, exc)
        return _load(_build(skip=path.parent))


def _build(skip: Path | None = None) -> Path:
    """The cached library for this source, flags and compiler, built if needed, in the first
    trusted cache folder (not ``skip``)."""
    cxx = _compiler()
    source = SOURCE.read_bytes()
    version = subprocess.run(
        [*cxx, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    errors = []
    for folder in _cache_dirs():
        if folder == skip:
            continue
        target = folder / f"full_softmax-{key}.so"
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            distrust = _trusted(folder) or (_trusted(target) if target.is_file() else None)
        except OSError as exc:
            errors.append(f"{folder}: {exc}")
            continue
        if distrust is not None:
            errors.append(distrust)
            continue
        if target.is_file() and _intact(target):
            return target
        _remove_stale_builds(folder)
        try:
            # Built under a private name, then renamed: concurrent first uses (a simulation's
            # worker processes) never load a half-written file.
            fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=folder)
            os.close(fd)
        except OSError as exc:
            errors.append(f"{folder}: {exc}")
            continue
        log.info("building the native full-softmax kernels (once, a few seconds): %s", target)
        try:
            done = subprocess.run(
                [*cxx, *FLAGS, str(SOURCE), "-o", tmp],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"{Path(cxx[0]).name} failed on {SOURCE.name} (exit {done.returncode}): "
                    + _head_and_tail(done.stderr.strip())
                )
            # Readable by others (mkstemp makes it 0600): a shared cache then serves them too.
            os.chmod(tmp, 0o755)
            atomic.write_text(target.with_suffix(".sha256"), _digest(Path(tmp)) + "\n")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target
    raise RuntimeError("no writable cache folder: " + "; ".join(errors))


def _remove_stale_builds(folder: Path, age_s: float = 600.0) -> None:
    """Temp files of builds killed midway (a build takes seconds: older ones are dead)."""
    now = time.time()
    for tmp in folder.glob("full_softmax-*.so.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > age_s:
                tmp.unlink()


def _head_and_tail(text: str, keep: int = 300) -> str:
    """The first error and the last lines of a compiler's output."""
    if len(text) <= 2 * keep:
        return text
    return f"{text[:keep]} [...] {text[-keep:]}"


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.fedenc_softmax_panel.restype = i
    lib.fedenc_softmax_chunk.restype = i
    lib.fedenc_softmax_forward.argtypes = [p, i, i, i, p, i64, p, i64, p, p, p, i]
    lib.fedenc_softmax_forward.restype = i
    lib.fedenc_softmax_backward.argtypes = [p, i, i, i, p, i64, p, i64, p, p, i64, i]
    lib.fedenc_softmax_backward.restype = None
    f = ctypes.c_float
    lib.fedenc_softmax_backward_adam.argtypes = [
        p, i, i, i, p, i64, p, i64, p, p, p, i64, f, f, f, f, f, f, f, p, p, p, i64, i,
    ]  # fmt: skip
    lib.fedenc_softmax_backward_adam.restype = None
    lib.fedenc_adam_rows.argtypes = [p, i64, p, i64, i64, i, p, p, i64, f, f, f, f, f, f, f, i]
    lib.fedenc_adam_rows.restype = None
    if lib.fedenc_softmax_panel() != PANEL or lib.fedenc_softmax_chunk() != CHUNK:
        raise RuntimeError(f"{path} has another panel width or unit than {PANEL}, {CHUNK}")
    return lib


PANEL = 24  # items per panel, as in the kernels
CHUNK = 48  # panels per unit of work, each with its own partial sums, as in the kernels


def _ensure_library() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"native full-softmax kernels unavailable: {_failure}")
    return lib


def _check_float32_cpu(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")


def _ptr(t: Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _interleave4(x: Tensor, rows: int, cols: int) -> Tensor:
    """``x`` (R, C) zero-padded to (rows, cols), rows a multiple of 4, as ``[rows/4][cols][4]``:
    the tiles' broadcast operand, four rows side by side."""
    padded = x.new_zeros(rows, cols)
    padded[: x.shape[0], : x.shape[1]] = x
    return padded.view(rows // 4, 4, cols).transpose(1, 2).contiguous()


def forward(
    scaled_session: Tensor, items: Tensor, normalize: bool, want_acc: bool
) -> tuple[NativeBlocks, Tensor, Tensor | None, Tensor | None]:
    """``Z = exp2(ê sᵀ)`` for ``scaled_session`` (B, d) (the session times log2(e)) and the item
    rows, unit rows ``ê = e / ||e||`` with ``normalize``: the kept blocks, each session's
    ``Σ_j Z_bj`` (B,), with ``want_acc`` ``Σ_j Z_bj ê_j`` (B, d), and with ``normalize`` every
    row's ``1 / ||e_j||`` (n,) (as :func:`.full_softmax.inverse_norms`, computed while packing)."""
    global calls
    lib = _ensure_library()
    b, d = scaled_session.shape
    n = items.shape[0]
    bpad, dp = -(-b // 4) * 4, -(-d // 8) * 8
    panels = -(-n // PANEL)
    units = -(-panels // CHUNK)
    s = _interleave4(scaled_session.detach(), bpad, d)
    f32 = torch.float32  # whatever the default dtype: the kernels write float32
    z = torch.empty(panels * bpad * PANEL, dtype=f32)
    # Each unit's partial sums (the kernels fill them), added here in unit order.
    sums = torch.empty(units, bpad, dtype=f32)
    acc = torch.empty(units, bpad, dp, dtype=f32) if want_acc else None
    r = torch.empty(n, dtype=f32) if normalize else None
    lib.fedenc_softmax_forward(
        _ptr(s), bpad, d, dp, _ptr(items), items.stride(0), _ptr(r), n, _ptr(z),
        _ptr(sums), _ptr(acc), max(1, torch.get_num_threads()),
    )  # fmt: skip
    calls += 1
    total = sums.sum(0)[:b]
    grad_acc = None if acc is None else acc.sum(0)[:b, :d]
    return NativeBlocks(z, n, bpad, dp), total, grad_acc, r


def backward(
    blocks: NativeBlocks,
    session_f: Tensor,
    items: Tensor,
    inv_norm: Tensor | None,
    out: Tensor,
) -> None:
    """Writes every item's gradient row into ``out`` (n, d), rows of stride ``out.stride(0)``:
    ``Σ_b Z_bj f_b s_b`` for the gradient of ê_j, mapped through the normalisation when
    ``inv_norm`` is given. ``session_f`` (B, d) holds the rows ``f_b s_b``."""
    lib = _ensure_library()
    d = session_f.shape[1]
    if out.shape != (blocks.num_items, d) or out.stride(1) != 1:
        raise ValueError(f"out must be ({blocks.num_items}, {d}) with unit column stride")
    sf = _interleave4(session_f.detach().t(), blocks.dp, blocks.bpad)
    r = None if inv_norm is None else inv_norm.contiguous()
    lib.fedenc_softmax_backward(
        _ptr(sf), blocks.bpad, d, blocks.dp, _ptr(items), items.stride(0), _ptr(r),
        blocks.num_items, _ptr(blocks.z), _ptr(out), out.stride(0), max(1, torch.get_num_threads()),
    )  # fmt: skip


@dataclass(frozen=True)
class AdamHyper:
    """One Adam step's constants as the kernel takes them (from ``lr``, the betas, ``eps``,
    L2 ``weight_decay`` and the step count t, in double precision before the float cast)."""

    lr_c1: float  # lr / (1 - beta1^t)
    one_b1: float  # 1 - beta1
    b2: float
    one_b2: float  # 1 - beta2
    inv_c2: float  # 1 / sqrt(1 - beta2^t)
    eps: float
    wd: float

    @classmethod
    def of(
        cls, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float
    ) -> AdamHyper:
        if step < 1:
            raise ValueError(f"an Adam step count starts at 1, got {step}")
        return cls(
            lr / (1.0 - beta1**step),
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            1.0 / (1.0 - beta2**step) ** 0.5,
            eps,
            weight_decay,
        )


def backward_adam(
    blocks: NativeBlocks,
    session_f: Tensor,
    items: Tensor,
    inv_norm: Tensor | None,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    extra_index: Tensor,
    extra_offsets: Tensor,
    extra_rows: Tensor,
    hyper: AdamHyper,
) -> None:
    """:func:`backward`, with each item row's gradient going straight into an Adam step of that
    row (:func:`adam_rows`' update): ``items``, ``exp_avg`` and ``exp_avg_sq`` (all (n, d), rows
    of the same stride) are updated in place, and the gradient is never written out. Item
    ``extra_index[x]`` (sorted, distinct, 0-based) first gets ``extra_rows[extra_offsets[x]]``,
    ..., ``extra_rows[extra_offsets[x + 1] - 1]`` added, one by one in that order."""
    lib = _ensure_library()
    n, d = items.shape
    if n != blocks.num_items or session_f.dim() != 2 or session_f.shape[1] != d:
        raise ValueError(f"items must be ({blocks.num_items}, {session_f.shape[-1]})")
    for name, t in (("items", items), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if (
            t.shape != (n, d)
            or t.stride() != (items.stride(0), 1)
            or t.dtype != torch.float32
            or t.device.type != "cpu"
            or items.stride(0) < d
        ):
            raise ValueError(
                f"{name} must be float32 CPU ({n}, {d}) rows of stride {items.stride(0)} >= {d}"
            )
    _check_float32_cpu(session_f=session_f, extra_rows=extra_rows)
    if session_f.shape[0] > blocks.bpad:
        raise ValueError(f"session_f has {session_f.shape[0]} rows, the blocks {blocks.bpad}")
    if inv_norm is not None:
        _check_float32_cpu(inv_norm=inv_norm)
        if inv_norm.shape != (n,):
            raise ValueError(f"inv_norm must have {n} entries, got {tuple(inv_norm.shape)}")
    m = extra_index.numel()
    if extra_index.dim() != 1 or extra_offsets.shape != (m + 1,):
        raise ValueError(f"extra_index must be 1-D and extra_offsets have {m + 1} entries")
    if m and (
        bool((extra_index[1:] <= extra_index[:-1]).any())
        or int(extra_index[0]) < 0
        or int(extra_index[-1]) >= n
    ):
        raise ValueError(f"extra_index must be sorted, distinct item ids in [0, {n})")
    if int(extra_offsets[0]) != 0 or bool((extra_offsets[1:] < extra_offsets[:-1]).any()):
        raise ValueError("extra_offsets must start at 0 and never decrease")
    if extra_rows.shape != (int(extra_offsets[-1]), d):
        raise ValueError(f"extra_rows must be ({int(extra_offsets[-1])}, {d})")
    sf = _interleave4(session_f.detach().t(), blocks.dp, blocks.bpad)
    r = None if inv_norm is None else inv_norm.contiguous()
    index = extra_index.to(torch.int64).contiguous()
    offsets = extra_offsets.to(torch.int64).contiguous()
    rows = extra_rows.to(torch.float32).contiguous()
    h = hyper
    lib.fedenc_softmax_backward_adam(
        _ptr(sf), blocks.bpad, d, blocks.dp, _ptr(items), items.stride(0), _ptr(r), n,
        _ptr(blocks.z), _ptr(exp_avg), _ptr(exp_avg_sq), exp_avg.stride(0), h.lr_c1, h.one_b1,
        h.b2, h.one_b2, h.inv_c2, h.eps, h.wd, _ptr(index), _ptr(offsets), _ptr(rows), m,
        max(1, torch.get_num_threads()),
    )  # fmt: skip


def adam_rows(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, hyper: AdamHyper
) -> None:
    """One Adam step (L2 weight decay, bias-corrected) of the rows of ``param`` (n, d) from the
    dense ``grad``, in place with the moments: per row, bit for bit the update
    :func:`backward_adam` makes from the same gradient row.

        g ← grad + wd·p;  m ← m + (1 − β1)(g − m);  v ← β2·v + (1 − β2)·g²
        p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
    """
    lib = _ensure_library()
    n, d = param.shape
    for name, t in (
        ("param", param),
        ("grad", grad),
        ("exp_avg", exp_avg),
        ("exp_avg_sq", exp_avg_sq),
    ):
        if (
            t.shape != (n, d)
            or t.stride(1) != 1
            or (n > 1 and t.stride(0) < d)
            or t.dtype != torch.float32
            or t.device.type != "cpu"
        ):
            raise ValueError(f"{name} must be float32 CPU ({n}, {d}) rows, {d} or more apart")
    if exp_avg.stride(0) != exp_avg_sq.stride(0):
        raise ValueError("exp_avg and exp_avg_sq must have the same row stride")
    h = hyper
    lib.fedenc_adam_rows(
        _ptr(param), param.stride(0), _ptr(grad), grad.stride(0), n, d, _ptr(exp_avg),
        _ptr(exp_avg_sq), exp_avg.stride(0), h.lr_c1, h.one_b1, h.b2, h.one_b2, h.inv_c2, h.eps,
        h.wd, max(1, torch.get_num_threads()),
    )  # fmt: skip
