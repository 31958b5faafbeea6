"""Peak live bytes of real tensors on the CPU, measured from torch's own allocation events.

A torch-dispatch mode cannot watch a compiled graph (Dynamo refuses to run under one), so the
measurement reads the profiler's allocation and free events (``profile_memory=True``), which see
every byte torch's CPU allocator hands out, from compiled graphs, custom ops and eager code alike,
in this process (every thread). The peak is over the block, relative to what was live when it
started.

    with PeakMemory() as peak:
        loss = model(**batch).loss
        loss.backward()
    print(peak.bytes)
"""
from __future__ import annotations

from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


class PeakMemory:
    """``bytes``: the highest live total inside the block (allocations minus frees);
    ``end_bytes``: what was still live at its end."""

    def __enter__(self):
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        self._profile.__exit__(*exc)
        events = [e for e in self._profile.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for event in events:
            live += event.nbytes()
            peak = max(peak, live)
        self.bytes, self.end_bytes = peak, live
        return False
