"""A stand-in entry point for the runner's tests (tests/test_launch.py): takes ``--run_dir``, ``--resume``,
``--input FILE`` and ``key=value`` overrides like the real ones, and writes ``summary.json``.

Overrides it understands: ``value=X`` (written into the summary, plus the input's value when given),
``fail=true`` (one error line, exit 2), ``hang=S`` (write ``ckpt-last.pth``, then sleep S seconds before
finishing: a run to kill), ``marker=FILE`` (append one line per start, to count starts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run_dir", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--input", default=None)
    p.add_argument("opts", nargs="*")
    args = p.parse_args()
    opts = dict(o.split("=", 1) for o in args.opts)
    out = Path(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "marker" in opts:
        with open(opts["marker"], "a") as f:
            f.write(f"start resume={args.resume}\n")
    if opts.get("fail") == "true":
        print("ERROR main: ConfigError: this job was told to fail", file=sys.stderr)
        return 2
    value = float(opts.get("value", 0))
    if args.input:
        value += json.loads(Path(args.input).read_text())["value"]
    if "hang" in opts and not args.resume:
        (out / "ckpt-last.pth").write_text("partial")
        time.sleep(float(opts["hang"]))
    (out / "summary.json").write_text(json.dumps({"value": value, "resumed": args.resume}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
