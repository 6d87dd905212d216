"""Starting jobs: a spawner process (:mod:`~jobworker.spawn.child`) forks every job into its
cgroup; the daemon side (:mod:`~jobworker.spawn.parent`) talks to it."""

from __future__ import annotations

from jobworker.errors import SpawnerDied
from jobworker.spawn.parent import Spawned, Spawner, describe_wait_status

__all__ = ["Spawned", "Spawner", "SpawnerDied", "describe_wait_status"]
