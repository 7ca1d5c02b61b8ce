"""joblib's own `test_parallel.py` against the ``"ashard"`` backend.

Not part of the test run (a minute and a half on 2 cores). Run it with the joblib that
is installed:

    python tests/conformance/joblib_parallel.py            # ashard is the default backend
    python tests/conformance/joblib_parallel.py --named    # only the tests that name it

The test file is copied to a temporary folder. With ``--named``, ``"ashard"`` joins its
list of process backends, so every test parametrized over them runs on it too. Without
it, ashard replaces loky as joblib's default backend, so every test that does not name a
backend runs on ashard. A `sitecustomize` registers the backend in every interpreter
(the tests start subprocesses and nest loky workers). Other arguments go to pytest.

Known differences, the whole list (joblib 1.5-1.6):
- `test_backend_hinting_and_constraints`: it expects ``prefer="processes"`` to pick
  loky. With ashard as the default backend, joblib picks ashard.
- `test_error_capture[ashard]`: it reads the backend's `_workers` or `_pool`, and
  expects an error to replace the workers. ashard keeps its workers warm after an error.
- `test_auto_memmap_on_arrays_from_generator[ashard]` and
  `test_memmapping_leaks[ashard]`: joblib's memmapping of array arguments
  (``max_nbytes``) belongs to its loky and multiprocessing backends. Under ashard, an
  array argument is pickled with its task, as under the threading and dask backends.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

import joblib.test

_SITE = """\
import os
if os.environ.get("ASHARD_JOBLIB_DEFAULT") is not None:
    from joblib import register_parallel_backend
    from ashard._joblib import AshardBackend
    register_parallel_backend(
        "ashard", AshardBackend, make_default=os.environ["ASHARD_JOBLIB_DEFAULT"] == "1"
    )
"""
_PROCESS_BACKENDS = 'PROCESS_BACKENDS = ["multiprocessing", "loky"]'


def main(argv: list[str]) -> int:
    named = "--named" in argv
    args = [a for a in argv if a != "--named"]
    source = pathlib.Path(joblib.test.__file__).with_name("test_parallel.py").read_text()
    if _PROCESS_BACKENDS not in source:
        raise SystemExit(f"this joblib's test_parallel.py has no line {_PROCESS_BACKENDS!r}")
    if named:
        source = source.replace(_PROCESS_BACKENDS, _PROCESS_BACKENDS[:-1] + ', "ashard"]')
        args = ["-k", "ashard", *args]
    with tempfile.TemporaryDirectory() as folder:
        here = pathlib.Path(folder)
        (here / "test_parallel.py").write_text(source)
        (here / "site").mkdir()
        (here / "site" / "sitecustomize.py").write_text(_SITE)
        path = os.pathsep.join(filter(None, [str(here / "site"), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "ASHARD_JOBLIB_DEFAULT": "0" if named else "1"}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "--timeout", "120", "-W", "ignore", "test_parallel.py", *args]  # fmt: skip
        return subprocess.call(command, cwd=here, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
