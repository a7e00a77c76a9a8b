"""Peak memory of one call on CPU, from the allocation events of `torch.profiler` (psutil's RSS is too coarse and
`tracemalloc` does not see torch's allocations)."""

from collections.abc import Callable

from torch._C._profiler import _EventType
from torch.profiler import profile


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The most bytes that torch allocations made during `fn()` held at once (what was allocated before the call
    does not count; the result of `fn` is kept alive until the end, so it counts)."""
    with profile(profile_memory=True) as prof:
        result = fn()
    sizes = []

    def walk(event) -> None:
        if event.typed[0] == _EventType.Allocation:
            sizes.append((event.start_time_ns, event.typed[1].alloc_size))
        for child in event.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(sizes, key=lambda item: item[0]):
        live += size
        peak = max(peak, live)
    del result
    return peak
