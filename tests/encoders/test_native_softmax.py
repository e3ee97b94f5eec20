"""The native full-softmax kernels give the loss and gradients of autograd's expression, are
deterministic for a thread count, fall back to the PyTorch path when they cannot be built, and
are used by the encoders' training loss."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from fedenc.encoders.layers import native_softmax
from fedenc.encoders.layers.full_softmax import full_softmax_cross_entropy, inverse_norms
from fedenc.encoders.registry import build_encoder

needs_native = pytest.mark.skipif(
    not native_softmax.enabled() or native_softmax.library() is None,
    reason=f"native kernels not usable here: {native_softmax.unavailable_reason() or 'no AVX2'}",
)


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
def test_same_threads_same_bits_and_other_counts_agree(monkeypatch) -> None:
    table, session, targets = _case(33, 40, 3001, seed=5)
    before = torch.get_num_threads()
    try:
        runs = {}
        for threads in (1, 2, 2, 3):
            torch.set_num_threads(threads)
            runs.setdefault(threads, []).append(_grads(session, table, targets, True, monkeypatch))
    finally:
        torch.set_num_threads(before)
    first, second = runs[2]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for threads in (1, 3):
        for a, b in zip(runs[threads][0], first, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@needs_native
@pytest.mark.parametrize("normalized", [True, False])
def test_kernels_without_normalisation_and_without_the_session_sum(normalized: bool) -> None:
    # The kernels also take items as they are (no inverse norms) and skip the session sum.
    table, session, _ = _case(6, 12, 50, seed=9, magnitude=2.0)
    items = table[1:]
    inv = inverse_norms(items) if normalized else None
    unit = items * inv[:, None] if inv is not None else items
    blocks, sums, acc = native_softmax.forward(session * 1.4426950408889634, items, inv, True)
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
    _, sums_only, none = native_softmax.forward(session * 1.4426950408889634, items, inv, False)
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
    blocks, _, _ = native_softmax.forward(session, table[1:], None, False)
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
