"""The CPU's float32 FMA peak, against MKL's matrix products in the same run.

A register-only loop (12 independent 8-wide FMA chains, no memory traffic) is compiled with the
C++ compiler the native loss kernels use and run on one core, then on every core at once; then
MKL (torch.mm, all threads) runs a square 2048² product and the full-softmax loss's shapes
(4096 x 100 x 100, as the logits and both gradients). The peak is what a hand-written kernel can
aim at; the ratio says how far MKL's products are from it.

    python benchmarks/fma_peak.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from _common import interleaved, load_avg, median

_LOOP = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
int main(int argc, char** argv) {
  const long n = argc > 1 ? atol(argv[1]) : 100000000L;
  __m256 a[12];
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(static_cast<float>(i));
  const auto t = std::chrono::steady_clock::now();
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  float sink = 0;
  for (int i = 0; i < 12; ++i) sink += _mm256_cvtss_f32(a[i]);
  std::printf("%.3f %g\n", n * 12.0 * 16.0 / s / 1e9, sink);
  return 0;
}
"""


def _build(folder: Path) -> Path:
    src, exe = folder / "fma_loop.cpp", folder / "fma_loop"
    src.write_text(_LOOP)
    cxx = os.environ.get("CXX", "g++")
    subprocess.run([cxx, "-O2", "-mavx2", "-mfma", str(src), "-o", str(exe)], check=True)
    return exe


def _run(exe: Path, copies: int, n: int) -> list[float]:
    procs = [
        subprocess.Popen([str(exe), str(n)], stdout=subprocess.PIPE, text=True)
        for _ in range(copies)
    ]
    return [float(p.communicate()[0].split()[0]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=100_000_000, help="loop trips per run")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)  # MKL on every core, as the peak it is compared with
    with tempfile.TemporaryDirectory() as tmp:
        exe = _build(Path(tmp))
        one = [_run(exe, 1, args.iterations)[0] for _ in range(args.repeats)]
        every = [sum(_run(exe, cores, args.iterations)) for _ in range(args.repeats)]
    square = (torch.randn(2048, 2048), torch.randn(2048, 2048), torch.empty(2048, 2048))
    e, s = torch.randn(4096, 100), torch.randn(100, 100)
    z, g = torch.empty(4096, 100), torch.empty(4096, 100)
    acc = torch.empty(100, 100)

    def mm_square() -> None:
        torch.mm(square[0], square[1], out=square[2])

    def mm_loss() -> None:
        for _ in range(10):
            torch.mm(e, s.t(), out=z)  # logits, item-major
            torch.mm(z.t(), e, out=acc)  # the session-gradient sum
            torch.mm(z, s, out=g)  # the table gradient

    mm_square()
    mm_loss()
    t = interleaved({"square": mm_square, "loss": mm_loss}, args.repeats)
    rate_square = 2 * 2048**3 / median(t["square"]) / 1e9
    rate_loss = 10 * 3 * 2 * 4096 * 100 * 100 / median(t["loss"]) / 1e9
    peak = median(every)
    print(
        f"{cores} cores, torch threads {torch.get_num_threads()}, load avg {load_avg()}, "
        f"medians of {args.repeats} repeats"
    )
    rows = [
        ("FMA peak, one core", median(one), f"runs {min(one):.1f}-{max(one):.1f}"),
        (f"FMA peak, {cores} cores at once", peak, f"runs {min(every):.1f}-{max(every):.1f}"),
        ("MKL, a 2048² product", rate_square, f"{100 * rate_square / peak:.0f}% of the peak"),
        ("MKL, the loss's 3 products", rate_loss, f"{100 * rate_loss / peak:.0f}% of the peak"),
    ]
    for what, rate, note in rows:
        print(f"{what:30s}{rate:8.1f} GFLOP/s   ({note})")


if __name__ == "__main__":
    main()
