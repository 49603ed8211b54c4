"""
The matrix-product peak of this machine, for train.py's MFU: --peak_tflops takes the number it prints.

    python bench/peak_flops.py                  # fp32 and bf16, 1024 x 1024 products, all threads

A CPU's peak depends on its cores, vector units (AVX2, AVX-512, AMX) and clocks, so it is measured rather than
looked up: the median of --repeats timings of products of two n x n matrices, each timing about half a second.
On CUDA train.py uses an H100's bf16 dense peak (989 TFLOP/s) unless --peak_tflops says otherwise.
"""

import argparse
import statistics
import time

import torch


def tflops(dtype, n: int, seconds: float = 0.5) -> float:
    a = torch.randn(n, n, dtype=dtype)
    a @ a                                           # warm-up
    t, count = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        a @ a
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t) / 1e12


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--n", type=int, default=1024, help="matrix size")
    p.add_argument("--repeats", type=int, default=5, help="timings per number format (the median is printed)")
    args = p.parse_args(argv)
    amx = torch.cpu._is_amx_tile_supported()
    for dtype in (torch.float32, torch.bfloat16):
        median = statistics.median(tflops(dtype, args.n) for _ in range(args.repeats))
        print(f"{str(dtype)[6:]:9s} {args.n}x{args.n} products: {median:.3g} TFLOP/s on {torch.get_num_threads()} "
              f"threads (AMX: {'yes' if amx else 'no'}) -> --peak_tflops {median:.3g}")


if __name__ == "__main__":
    main()
