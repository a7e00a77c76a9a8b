"""The prefill peak of a `sonett benchmark` worker is its own: the peak resident memory a process reports is inherited
across fork and exec, so a worker started by a run that had trained models reported the parent's gigabytes (issue 17,
first full run: 3,096 MiB for a 16k prefill that peaks near 50 MiB). `reset_peak_rss` starts it afresh."""

import subprocess
import sys
import textwrap

import pytest

from sonett.evaluation.benchmark import peak_rss_bytes, reset_peak_rss


def test_a_reset_peak_forgets_what_was_freed():
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not available here")
    ballast = bytearray(300 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page
    high = peak_rss_bytes()
    del ballast
    assert reset_peak_rss()
    assert peak_rss_bytes() < high - 200 * 2**20


def test_a_child_started_by_a_large_parent_reports_its_own_peak():
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not available here")
    script = textwrap.dedent(
        """
        import resource
        from sonett.evaluation.benchmark import peak_rss_bytes, reset_peak_rss
        inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        reset_peak_rss()
        print(inherited, peak_rss_bytes())
        """
    )
    ballast = bytearray(2**30)  # more than the child's own peak (importing torch alone takes a few hundred MiB)
    ballast[::4096] = b"x" * len(ballast[::4096])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    inherited, own = int(out[0]), int(out[1])
    del ballast
    assert inherited > 2**30 > own + 200 * 2**20  # the parent's GiB shows in ru_maxrss, not in the reset peak
