"""One benchmark case in its own interpreter: ``python case.py WORKLOAD PEER [--quick]``.

Prints one line ``RESULT <json>``: the workload's rows, or ``{"error": ...}`` /
``{"na": ...}``. The suite gives it a time limit and kills its whole process group
afterwards, so a peer that hangs or leaves processes behind cannot stall the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import peers  # noqa: E402
from peers._base import NotSupported  # noqa: E402
from workloads import Config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload")
    parser.add_argument("peer", choices=sorted(peers.PEERS))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cfg = Config().quick() if args.quick else Config()
    workload = importlib.import_module(f"workloads.{args.workload}")
    out: dict[str, Any]
    try:
        if getattr(workload, "TAKES_FACTORY", False):
            target: Any = lambda: peers.make(args.peer)
        else:
            target = peers.make(args.peer)
        out = {"rows": asyncio.run(workload.run(target, cfg))}
    except NotSupported as exc:
        out = {"na": str(exc)}
    except BaseException as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        traceback.print_exc()
    out["ashard_file"] = getattr(sys.modules.get("ashard"), "__file__", None)  # which tree ran
    print("RESULT " + json.dumps(out, default=str), flush=True)
    sys.stderr.flush()
    os._exit(0)  # the suite reaps whatever the peer left behind


if __name__ == "__main__":
    main()
