"""torch._int_mm against an fp32 matmul of the same shape, one thread, side by side (eager and torch.compile).

Whether the int8-mm quantization methods are fast depends on this ratio, which depends on the CPU (VNNI or not):

    .venv/bin/python benchmarks/bench_int_mm.py
"""

import time

import torch

from pudding.core.provenance import cpu_description


def median_seconds(function, a, b, repeats: int = 10) -> float:
    function(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(a, b)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def main() -> None:
    torch.set_num_threads(1)
    m, k, n = 512, 576, 1536  # 512 tokens through SmolLM2's gate projection
    a8 = torch.randint(-127, 127, (m, k), dtype=torch.int8)
    b8 = torch.randint(-127, 127, (k, n), dtype=torch.int8)
    af, bf = a8.float(), b8.float()
    int_mm = torch._int_mm
    compiled = torch.compile(lambda a, b: torch._int_mm(a, b))
    assert torch.equal(int_mm(a8, b8).float(), af @ bf) and torch.equal(compiled(a8, b8), int_mm(a8, b8))
    print(cpu_description())
    for round_index in range(3):
        fp32 = median_seconds(lambda a, b: a @ b, af, bf)
        eager, comp = median_seconds(int_mm, a8, b8), median_seconds(compiled, a8, b8)
        print(f"round {round_index}: fp32 {fp32 * 1e3:.2f} ms, _int_mm {eager * 1e3:.2f} ms "
              f"({fp32 / eager:.1f}x faster), compiled {comp * 1e3:.2f} ms ({fp32 / comp:.1f}x faster)")


if __name__ == "__main__":
    main()
