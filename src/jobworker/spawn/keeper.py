"""The manager's spawner, kept alive: replaced as soon as it dies, so the next start works.

A spawner's death does not end its jobs: they run on, re-parented to the nearest subreaper or
init, and the manager sees their ends through their cgroups (their exit statuses are lost)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from jobworker.cgroup.discovery import own_cgroup_dir
from jobworker.cgroup.tree import open_procs
from jobworker.errors import HostError
from jobworker.spawn.parent import Spawner

log = logging.getLogger(__name__)


class SpawnerKeeper:
    """Holds the current :class:`Spawner`; get one with :meth:`start`."""

    def __init__(self, spawner: Spawner, fast: bool) -> None:
        self.current = spawner
        self.fast = fast
        """Whether the spawner knows its own cgroup, so the posix_spawn path may be used."""
        self._respawning: asyncio.Future[None] | None = None
        self._closing = False
        self._watch = asyncio.create_task(self._keep(), name="spawner keeper")

    @classmethod
    async def start(cls) -> SpawnerKeeper:
        spawner = await Spawner.start()
        try:
            fast = await _give_spawner_its_home(spawner)
        except BaseException:
            await spawner.close()
            raise
        return cls(spawner, fast)

    async def live(self) -> Spawner:
        """The spawner, replaced first if it has died."""
        while not self.current.alive:
            if self._respawning is None:
                self._respawning = asyncio.ensure_future(self._respawn())
            await asyncio.shield(self._respawning)
        return self.current

    async def _respawn(self) -> None:
        old = self.current
        try:
            new = await Spawner.start()
            self.fast = await _give_spawner_its_home(new)
            self.current = new
        finally:
            self._respawning = None
        await old.close()
        log.warning("a new spawner (pid %d) replaced the one that died", new.pid)

    async def _keep(self) -> None:
        while not self._closing:
            died = await self.current.wait_dead()
            if died is None or self._closing:
                return
            log.error("the spawner died (%s); starting a new one; its jobs run on", died)
            try:
                await self.live()
            except Exception:
                log.exception("no new spawner; the next start tries again")
                return

    async def close(self) -> None:
        self._closing = True
        if self._respawning is not None:
            await asyncio.gather(self._respawning, return_exceptions=True)
        await self.current.close()
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch


async def _give_spawner_its_home(spawner: Spawner) -> bool:
    """Tell the spawner where it lives (found after ``controllers.enable`` may have moved it)
    so it can step back there after a fast spawn. ``False``: only the fork path is used."""
    try:
        home = own_cgroup_dir(cgroup_path=f"/proc/{spawner.pid}/cgroup")
        fd = open_procs(home)
    except HostError as e:
        log.warning("spawner's own cgroup not found (%s); jobs start by fork+exec", e)
        return False
    try:
        await spawner.set_home(fd)
    finally:
        os.close(fd)
    return True
