"""Flows compose the stage tasks (pipeline, sweep, experiments); `flows.cli` is the `circuitflow` command.

Importing the package first sets OMP_WAIT_POLICY=PASSIVE unless the environment already sets it: torch's
OpenMP threads then sleep between parallel regions instead of spinning. Spinning threads make any
other work on the same cores (a second process, the local Prefect server, the shard writer thread)
slow every parallel region down to the pace of the preempted thread: a forward pass of the default's
first four layers took 7-11x longer under a concurrent 2-thread job with spinning threads, and the
same time with sleeping ones on a quiet machine. It must be set before torch is first imported.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
