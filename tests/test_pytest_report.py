"""The suite's own report: skips are summarised by reason, the final counts line stays."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO, child_env


def test_skips_are_summarised_by_reason_not_listed_per_test():
    # Two specs no machine has, so 3 tests x 2 specs skip everywhere, for 2 distinct reasons.
    env = child_env(GPUFLOW_TEST_DEVICES="cpu,cuda:99,cupy:98")
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "tests/test_nodes.py", "-k", "forward_matches_numpy or "
                           "softmax_cross_entropy_value or (stay_on_the_device and Linear)"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "SKIPPED [" not in out, out  # no line per skipped test
    summary = [line for line in out.splitlines() if re.match(r"\s*\d+ skipped: ", line)]
    assert len(summary) == 2, out
    assert all(re.match(r"\s*3 skipped: (cuda:99|cupy:98) unavailable: ", s) for s in summary)
    last = out.splitlines()[-1]
    assert re.search(r"^=+ 3 passed, 6 skipped, \d+ deselected in [\d.]+s", last), out
