"""The Operator Engine: queues jobs and runs them as configure, compute (the sandbox) and
publish."""

import os

# The engine forks the sandbox's launchers while gRPC's threads are busy; each child execs at
# once and never uses gRPC, so gRPC's fork handlers have nothing to do, and would only print an
# unstructured warning on every fork. Read when gRPC starts: set before any module imports it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
