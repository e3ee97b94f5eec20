"""The native full-softmax kernels give the loss and gradients of autograd's expression, are
deterministic whatever the thread count, fall back to the PyTorch path when they cannot be
built, and are used by the encoders' training loss."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from fedenc.encoders.layers import native_softmax
from fedenc.encoders.layers.full_softmax import full_softmax_cross_entropy, inverse_norms
from fedenc.encoders.registry import build_encoder

needs_native = pytest.mark.usefixtures("native")


def _case(b: int, d: int, n: int, seed: int, magnitude: float = 8.0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(n + 1, d, generator=gen)
    session = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1) * magnitude
    targets = torch.randint(1, n + 1, (b,), generator=gen)
    targets[0] = n  # the last item, in the last (possibly partial) panel
    return table, session, targets


def _grads(session, table, targets, native: bool, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(native_softmax.ENV_SWITCH, "1" if native else "0")
    s, t = session.clone().requires_grad_(), table.clone().requires_grad_()
    loss = full_softmax_cross_entropy(s, t, targets, True)
    gs, gt = torch.autograd.grad(loss, (s, t))
    return loss.detach(), gs, gt


@needs_native
@pytest.mark.parametrize(
    ("b", "d", "n"),
    [(1, 8, 1), (5, 6, 23), (4, 17, 24), (7, 100, 25), (100, 100, 1000), (3, 9, 97)],
)
def test_matches_autograd_in_float64(b: int, d: int, n: int, monkeypatch) -> None:
    table, session, targets = _case(b, d, n, seed=b * 1000 + n)
    loss, gs, gt = _grads(session, table, targets, True, monkeypatch)
    t64 = table.double().requires_grad_()
    s64 = session.double().requires_grad_()
    ref = F.cross_entropy(s64 @ F.normalize(t64[1:], dim=1).t(), targets - 1)
    rs, rt = torch.autograd.grad(ref, (s64, t64))
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(gs.double(), rs, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gt.double(), rt, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(gt[0]) == 0  # the padding row gets no gradient


@needs_native
def test_matches_the_pytorch_path(monkeypatch) -> None:
    table, session, targets = _case(100, 100, 43097 // 8, seed=3, magnitude=12.0)
    native = _grads(session, table, targets, True, monkeypatch)
    python = _grads(session, table, targets, False, monkeypatch)
    assert float(native[0]) == pytest.approx(float(python[0]), rel=1e-6)
    for a, b in zip(native[1:], python[1:], strict=True):
        assert float((a - b).norm() / b.norm()) < 1e-5


@needs_native
def test_the_same_bits_whatever_the_thread_count(monkeypatch) -> None:
    # 3001 items: 126 panels, three units of work (partial sums kept per unit, not per thread).
    table, session, targets = _case(33, 40, 3001, seed=5)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 2, 3):
            torch.set_num_threads(threads)
            runs.append(_grads(session, table, targets, True, monkeypatch))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(other, runs[0], strict=True):
            assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("normalized", [True, False])
def test_kernels_without_normalisation_and_without_the_session_sum(normalized: bool) -> None:
    # The kernels also take items as they are (no inverse norms) and skip the session sum.
    table, session, _ = _case(6, 12, 50, seed=9, magnitude=2.0)
    items = table[1:]
    inv = inverse_norms(items) if normalized else None
    unit = items * inv[:, None] if inv is not None else items
    blocks, sums, acc, r = native_softmax.forward(
        session * 1.4426950408889634, items, normalized, True
    )
    if inv is None:
        assert r is None
    else:  # the inverse norms, taken while packing
        assert r is not None
        torch.testing.assert_close(r, inv, rtol=1e-6, atol=0)
    # The reference in float64; tolerances relative to each result's largest entry (sums of
    # terms of both signs leave small entries with few exact digits in float32).
    s64, unit64 = session.double(), unit.double()
    z = torch.exp(s64 @ unit64.t())  # (B, n)

    def close(got: torch.Tensor, want: torch.Tensor) -> None:
        torch.testing.assert_close(
            got.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max())
        )

    close(sums, z.sum(1))
    assert acc is not None
    close(acc, z @ unit64)
    _, sums_only, none, _ = native_softmax.forward(
        session * 1.4426950408889634, items, normalized, False
    )
    assert none is None
    torch.testing.assert_close(sums_only, sums)
    f = torch.rand(6, generator=torch.Generator().manual_seed(4))
    out = torch.full_like(items, float("nan"))
    native_softmax.backward(blocks, session * f[:, None], items, inv, out)
    g_hat = z.t() @ (s64 * f.double()[:, None])  # d/dê
    if inv is not None:
        r = inv.double()[:, None]
        g = g_hat * r
        expected = g - (g * items.double()).sum(1, keepdim=True) * r * r * items.double()
    else:
        expected = g_hat
    close(out, expected)


@needs_native
def test_backward_rejects_a_wrong_output() -> None:
    table, session, _ = _case(2, 8, 30, seed=1)
    blocks, _, _, _ = native_softmax.forward(session, table[1:], False, False)
    with pytest.raises(ValueError, match=r"\(30, 8\)"):
        native_softmax.backward(blocks, session, table[1:], None, torch.empty(29, 8))


def test_switched_off_or_not_float32_takes_the_pytorch_path(monkeypatch) -> None:
    table, session, _ = _case(2, 8, 30, seed=1)
    monkeypatch.setenv(native_softmax.ENV_SWITCH, "0")
    assert not native_softmax.usable(session, table[1:])
    monkeypatch.setenv(native_softmax.ENV_SWITCH, "1")
    assert not native_softmax.usable(session.double(), table[1:].double())
    assert not native_softmax.usable(session, table[1:].t())  # rows not contiguous


def test_a_failed_build_warns_once_and_training_goes_on(
    monkeypatch, tmp_path: Path, caplog
) -> None:
    monkeypatch.setattr(native_softmax, "_library", None)
    monkeypatch.setattr(native_softmax, "_failure", None)
    monkeypatch.setenv("CXX", "no-such-compiler-fedenc")
    monkeypatch.setenv(native_softmax.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(native_softmax, "enabled", lambda: True)
    table, session, targets = _case(4, 8, 40, seed=2)
    with caplog.at_level(logging.WARNING, logger=native_softmax.__name__):
        assert not native_softmax.usable(session, table[1:])
        assert not native_softmax.usable(session, table[1:])
        loss = full_softmax_cross_entropy(session, table, targets, True)
    assert torch.isfinite(loss)
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert "no-such-compiler-fedenc" in warnings[0].getMessage()
    assert "no-such-compiler-fedenc" in (native_softmax.unavailable_reason() or "")


@needs_native
def test_a_build_is_cached_by_source_and_flags(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(native_softmax.ENV_CACHE, str(tmp_path))
    first = native_softmax._build()
    assert first.parent == tmp_path / "native" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert native_softmax._build() == first  # found, not rebuilt
    assert first.stat().st_mtime_ns == stamp
    assert not list(first.parent.glob("*.tmp"))  # no half-written file left behind
    assert first.stat().st_mode & 0o777 == 0o755  # a shared cache serves other users too
    assert native_softmax._intact(first)


@needs_native
def test_a_folder_others_can_write_to_is_not_trusted(monkeypatch, tmp_path: Path) -> None:
    # A shared folder: another user could plant a library under the name looked for.
    shared, own = tmp_path / "shared", tmp_path / "own"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(native_softmax, "_cache_dirs", lambda: [shared, own])
    built = native_softmax._build()
    assert built.parent == own
    assert not list(shared.iterdir())
    assert "writable by others" in (native_softmax._trusted(shared) or "")


@needs_native
def test_a_folder_under_a_shared_parent_is_not_trusted(monkeypatch, tmp_path: Path) -> None:
    # Its own mode is fine, but anyone may rename it away and put theirs in its place.
    shared = tmp_path / "shared"
    inner = shared / "cache"
    inner.mkdir(parents=True)
    inner.chmod(0o700)
    shared.chmod(0o777)
    own = tmp_path / "own"
    monkeypatch.setattr(native_softmax, "_cache_dirs", lambda: [inner, own])
    assert "not sticky" in (native_softmax._trusted(inner) or "")
    assert native_softmax._build().parent == own
    shared.chmod(0o777 | 0o1000)  # sticky, as /tmp: entries only renamed by their owners
    assert native_softmax._trusted(inner) is None


@needs_native
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_cached_library_is_rebuilt(monkeypatch, tmp_path: Path, damage: str) -> None:
    monkeypatch.setenv(native_softmax.ENV_CACHE, str(tmp_path))
    first = native_softmax._build()
    good = first.read_bytes()
    first.write_bytes(b"not a library" if damage == "garbage" else good[:5000])
    again = native_softmax._build()  # the digest no longer matches: built anew
    assert again == first and again.read_bytes() == good
    assert native_softmax._intact(again)


@needs_native
def test_a_library_that_fails_to_load_is_removed_and_rebuilt(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(native_softmax.ENV_CACHE, str(tmp_path))
    target = native_softmax._build()
    good = target.read_bytes()
    target.write_bytes(b"not a library")  # with a matching digest: only loading tells
    target.with_suffix(".sha256").write_text(native_softmax._digest(target))
    lib = native_softmax._load_or_rebuild()
    assert lib.fedenc_softmax_panel() == native_softmax.PANEL
    assert target.read_bytes() == good


@needs_native
def test_a_folder_that_cannot_load_libraries_gives_way_to_the_next(monkeypatch, tmp_path) -> None:
    # As a noexec mount: every library in the first folder fails to load, however rebuilt.
    first, second = tmp_path / "noexec", tmp_path / "other"
    monkeypatch.setattr(native_softmax, "_cache_dirs", lambda: [first, second])
    real_load = native_softmax._load

    def load(path: Path):
        if path.parent == first:
            raise OSError(f"{path}: failed to map segment from shared object")
        return real_load(path)

    monkeypatch.setattr(native_softmax, "_load", load)
    lib = native_softmax._load_or_rebuild()
    assert lib.fedenc_softmax_panel() == native_softmax.PANEL
    assert list(second.glob("*.so"))


def test_the_switch_takes_on_and_off_words_and_refuses_others(monkeypatch) -> None:
    monkeypatch.setattr(native_softmax.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    for value, on in [("", True), ("1", True), (" On ", True), ("0", False), ("FALSE", False)]:
        monkeypatch.setenv(native_softmax.ENV_SWITCH, value)
        assert native_softmax.enabled() is on
    monkeypatch.setenv(native_softmax.ENV_SWITCH, "disable")
    with pytest.raises(ValueError, match="FEDENC_NATIVE_SOFTMAX='disable': use 1"):
        native_softmax.enabled()


@needs_native
def test_a_compile_error_names_the_source(monkeypatch, tmp_path: Path) -> None:
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native_softmax, "SOURCE", bad)
    monkeypatch.setenv(native_softmax.ENV_CACHE, str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match=r"broken\.cpp"):
        native_softmax._build()
    assert not list((tmp_path / "cache" / "native").glob("*"))


@needs_native
def test_as_accurate_as_the_pytorch_path_up_to_the_exp_keeping_bound(monkeypatch) -> None:
    # Diginetica's catalog at session norms 12 (the default scale) and 40 (the bound): summed in
    # one float level over ~20k items, the sums lost ~8x the accuracy.
    gen = torch.Generator().manual_seed(11)
    n = 43097
    table = torch.randn(n + 1, 100, generator=gen)
    targets = torch.randint(1, n + 1, (100,), generator=gen)
    for norm in (12.0, 40.0):
        session = F.normalize(torch.randn(100, 100, generator=gen), dim=1) * norm
        t64 = table.double().requires_grad_()
        s64 = session.double().requires_grad_()
        ref = F.cross_entropy(s64 @ F.normalize(t64[1:], dim=1).t(), targets - 1)
        want = (ref.detach(), *torch.autograd.grad(ref, (s64, t64)))
        errors = {}
        for path in (True, False):
            got = _grads(session, table, targets, path, monkeypatch)
            errors[path] = [
                float((g.double() - w).norm() / w.norm()) for g, w in zip(got, want, strict=True)
            ]
        for mine, theirs in zip(errors[True], errors[False], strict=True):
            assert mine <= 2 * theirs + 1e-8, (norm, errors)


@needs_native
def test_each_unit_of_work_fills_its_own_slot_of_partial_sums() -> None:
    # The raw kernel at 2 threads: unit u sums panels [u * CHUNK, (u + 1) * CHUNK).
    chunk = native_softmax.CHUNK
    n = 24 * (2 * chunk + 3) + 5  # 2 whole units and a short third
    table, session, _ = _case(8, 16, n, seed=6, magnitude=3.0)
    items = table[1:]
    lib = native_softmax._ensure_library()
    s = native_softmax._interleave4(session, 8, 16)
    z = torch.empty(-(-n // 24) * 8 * 24)
    sums = torch.full((4, 8), -1.0)  # a fourth slot the kernel must not touch
    acc = torch.full((4, 8, 16), 7.0)  # units zero their own slots
    ptr = native_softmax._ptr
    units = lib.fedenc_softmax_forward(
        ptr(s), 8, 16, 16, ptr(items), items.stride(0), None, items.shape[0], ptr(z),
        ptr(sums), ptr(acc), 2,
    )  # fmt: skip
    assert units == 3
    logits = torch.exp2(session.double() @ items.double().t())  # (8, n): the kernel takes exp2
    for u in range(3):
        lo, hi = 24 * chunk * u, min(n, 24 * chunk * (u + 1))
        part = logits[:, lo:hi]
        torch.testing.assert_close(sums[u].double(), part.sum(1), rtol=1e-5, atol=0)
        torch.testing.assert_close(
            acc[u].double(), part @ items.double()[lo:hi], rtol=1e-4, atol=1e-4
        )
    assert torch.equal(sums[3], torch.full((8,), -1.0)) and torch.equal(
        acc[3], torch.full((8, 16), 7.0)
    )


@needs_native
def test_a_float64_default_dtype_does_not_change_the_float32_loss(monkeypatch) -> None:
    table, session, targets = _case(5, 12, 200, seed=8)
    want = _grads(session, table, targets, True, monkeypatch)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = _grads(session, table, targets, True, monkeypatch)
    finally:
        torch.set_default_dtype(before)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@needs_native
def test_a_second_backward_with_retain_graph_adds_the_same_gradients(monkeypatch) -> None:
    monkeypatch.setenv(native_softmax.ENV_SWITCH, "1")
    table, session, targets = _case(6, 10, 100, seed=12)
    s, t = session.clone().requires_grad_(), table.clone().requires_grad_()
    loss = full_softmax_cross_entropy(s, t, targets, True)
    loss.backward(retain_graph=True)
    once = (s.grad.clone(), t.grad.clone())
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * once[0])
    torch.testing.assert_close(t.grad, 2 * once[1])


def test_a_library_without_the_kernels_falls_back_with_a_warning(monkeypatch, caplog) -> None:
    import ctypes.util

    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand in for a library without the kernels' symbols")
    monkeypatch.setattr(native_softmax, "_library", None)
    monkeypatch.setattr(native_softmax, "_failure", None)
    monkeypatch.setattr(native_softmax, "enabled", lambda: True)
    monkeypatch.setattr(native_softmax, "_build", lambda: Path(libm))
    table, session, _ = _case(2, 8, 30, seed=1)
    with caplog.at_level(logging.WARNING, logger=native_softmax.__name__):
        assert not native_softmax.usable(session, table[1:])
    assert "fedenc_softmax_panel" in (native_softmax.unavailable_reason() or "")
    assert any("unavailable" in r.getMessage() for r in caplog.records)


def test_cxx_may_carry_a_launcher_and_options(monkeypatch) -> None:
    import shutil

    monkeypatch.setenv("CXX", "env g++ -Wall")
    if shutil.which("env") is None:
        pytest.skip("no env(1)")
    command = native_softmax._compiler()
    assert command[0] == shutil.which("env") and command[1:] == ["g++", "-Wall"]


@needs_native
def test_the_encoders_training_loss_uses_the_kernels(monkeypatch) -> None:
    from fedenc.data.batching import batch_from_sessions

    calls = []
    real = native_softmax.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(native_softmax, "forward", counting)
    torch.manual_seed(0)
    model = build_encoder("srgnn", 60, hidden=16)
    batch = batch_from_sessions([[1, 2, 3], [4, 5, 4, 6], [7, 8]])
    batch.targets = torch.tensor([9, 10, 60])
    losses = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(native_softmax.ENV_SWITCH, switch)
        model.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        losses[switch] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    assert calls == [1]  # once, with the switch on
    assert float(losses["1"][0]) == pytest.approx(float(losses["0"][0]), rel=1e-5)
    for a, b in zip(losses["1"][1], losses["0"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
