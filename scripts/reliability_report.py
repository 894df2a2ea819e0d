"""Run the reliability tests, count what they tried, and write the README's table to reports/reliability.md.

    python scripts/reliability_report.py                 # runs tests/reliability, reads reports/soak/soak.csv
    python scripts/reliability_report.py --log FILE      # only render an existing log (no test run)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from zoo.experiments.reliability import read_log, read_soak, render, summarize  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "reports" / "reliability.md"))
    p.add_argument("--soak", default=str(ROOT / "reports" / "soak" / "soak.csv"), help="long soak CSV (optional)")
    p.add_argument("--soak-load", default=None, help="machine load to quote for the long soak")
    p.add_argument("--log", default=None, help="render this log instead of running the tests")
    a = p.parse_args()
    rc = 0
    if a.log is None:
        a.log = tempfile.mktemp(prefix="zoo-reliability-", suffix=".jsonl")
        env = {**os.environ, "ZOO_RELIABILITY_LOG": a.log}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/reliability"],
                             cwd=ROOT, env=env)
    soak = read_soak(a.soak) if Path(a.soak).is_file() else None
    text = render(summarize(read_log(a.log)), soak, load=os.getloadavg(), soak_load=a.soak_load)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
