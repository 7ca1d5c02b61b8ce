"""Entry point of a worker process: ``python -m ashard._worker FD PARENT_PID``."""

import sys

from ashard._worker.loop import main

main(sys.argv)
