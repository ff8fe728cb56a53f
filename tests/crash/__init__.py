"""The crash harness shared by the engine, workflow and sync suites.

* ``zygote.py`` / ``children.py``: a fork server that imports the engine once
  and forks each crash child in a few ms; children report on a pipe, line by
  line; the parent kills them through a pidfd.
* ``killpoints.py``: inside a child, the n-th call of any file-layer function,
  LMDB seam or named failpoint, before or after it, can SIGKILL the child;
  children can also report which points they reach.
* ``ledger.py``: the acknowledgement ledger and its checker, for any side that
  holds keyed commits (a store, or a sync server: see its docstring).
* ``seeds.py``: the seed of a run and the one-line command that replays it.
* ``store_load.py`` / ``store_lane.py``: the engine workload and the cycle of
  kill, verify, reopen and check; ``workflow_load.py`` / ``workflow_lane.py``:
  the same for a workflow run.
* ``rounds.py``: bounded rounds of the above for the soak (``tests/soak.py``).
* ``summary.py``: the per-test kill counts printed at the end of a crash module.
"""
