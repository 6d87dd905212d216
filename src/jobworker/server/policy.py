"""The daemon's limit policy: defaults for what a job leaves unset, and maximums it may ask for."""

from __future__ import annotations

from jobworker.errors import InvalidArgument
from jobworker.limits import Limits
from jobworker.units import format_duration, format_size


def check_caps(limits: Limits, caps: Limits) -> None:
    """Refuse limits above the daemon's maximums (``caps``; an unset cap means "no maximum").

    A limit left unset where a cap exists counts as unlimited, so it is refused too: apply
    defaults first (:meth:`Limits.with_defaults`, or :func:`effective_limits`). io caps are
    matched by device string: give both sides the same form
    (:func:`jobworker.cgroup.devices.resolve_limits`).
    Raises :class:`InvalidArgument` naming the field, the request and the maximum.
    """

    def refuse(field: str, asked: str, cap: str) -> None:
        raise InvalidArgument(f"{field}: {asked} is above this daemon's maximum of {cap}")

    if caps.cpu is not None and (limits.cpu is None or limits.cpu > caps.cpu):
        refuse(
            "cpu", "unlimited" if limits.cpu is None else f"{limits.cpu:g} cores", f"{caps.cpu:g}"
        )
    if caps.cpu_weight is not None and (
        limits.cpu_weight is None or limits.cpu_weight > caps.cpu_weight
    ):
        refuse(
            "cpu_weight",
            "the default weight (100)" if limits.cpu_weight is None else str(limits.cpu_weight),
            str(caps.cpu_weight),
        )
    if caps.memory is not None and (limits.memory is None or limits.memory > caps.memory):
        asked = "unlimited" if limits.memory is None else format_size(limits.memory)
        refuse("memory", asked, format_size(caps.memory))
    if caps.pids is not None and (limits.pids is None or limits.pids > caps.pids):
        refuse("pids", "unlimited" if limits.pids is None else str(limits.pids), str(caps.pids))
    asked_io = {i.device: i for i in limits.io}
    for cap in caps.io:
        own = asked_io.get(cap.device)
        for name in ("read_bps", "write_bps", "read_iops", "write_iops"):
            limit = getattr(cap, name)
            if limit is None:
                continue
            value = None if own is None else getattr(own, name)
            if value is None or value > limit:
                refuse(
                    f"io {cap.device} {name}",
                    "unlimited" if value is None else str(value),
                    str(limit),
                )


def effective_limits(requested: Limits, defaults: Limits, caps: Limits) -> Limits:
    """What a job really gets: its request, unset fields from ``defaults`` and then from
    ``caps`` (a maximum is also the limit of a job that asks for nothing), checked against
    ``caps``. Raises :class:`InvalidArgument` when the request is above a cap."""
    limits = requested.with_defaults(defaults).with_defaults(caps)
    check_caps(limits, caps)
    return limits


def effective_timeout(requested: float | None, cap: float | None, where: str) -> float | None:
    """A job's deadline: its request, or the cap when it asks for none. Raises
    :class:`InvalidArgument` naming the cap (and ``where`` it comes from) when the request is
    above it."""
    if cap is None:
        return requested
    if requested is None:
        return cap
    if requested > cap:
        raise InvalidArgument(
            f"timeout: {format_duration(requested)} is above the maximum runtime of "
            f"{format_duration(cap)} ({where}); ask for at most that"
        )
    return requested
