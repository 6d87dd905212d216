"""What a fleet of workerd hosts writes to etcd, and how both sides read it.

etcd holds who is alive, what each host offers, where each fleet job is and the slot
reservations that keep placement honest; never a job's output, and no secret. The layout,
under :data:`PREFIX` (see docs/fleet.md)::

    /jobworker/v1/hosts/NAME          HostRecord (JSON), on the host's lease
    /jobworker/v1/slots/NAME/INDEX    Slot (JSON), INDEX in [0, capacity); on the host's lease

A host is registered while its key exists: the key lives on a lease the host keeps alive, so a
dead host disappears when the lease expires. A slot key is one of the host's ``capacity`` job
slots: creating it is a transaction that succeeds only if the key does not exist, so no
interleaving of clients puts more jobs on a host than it has slots.

A fleet-wide job id is ``HOST/ID``: the host's registered name and the job's id there.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobworker.errors import InvalidArgument

PREFIX = "/jobworker/v1/"
HOSTS = PREFIX + "hosts/"
SLOTS = PREFIX + "slots/"

DEFAULT_TTL = 10
"""Seconds a host's registration outlives its last keepalive."""
DEFAULT_ETCD_PORT = 2379

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,62}[a-z0-9])?$")
"""A host name: a DNS name (lowercase), which its server certificate must carry as a SAN."""
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,62})$")
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:/@+-]{0,128}$")
ADVERTISE_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$")
"""HOST:PORT, [V6]:PORT: what a record may name (anyone who can write to etcd can write one,
and a client prints it)."""


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"host name {name!r} is not a lowercase DNS name (a-z, 0-9, '.', '-'; at most 64)"
        )
    return name


def host_key(name: str) -> str:
    return HOSTS + name


def slots_prefix(name: str) -> str:
    return f"{SLOTS}{name}/"


def slot_key(name: str, index: int) -> str:
    return f"{slots_prefix(name)}{index}"


def slot_index(key: str) -> int | None:
    tail = key.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True, slots=True)
class Endpoints:
    """etcd's client URLs as etcd writes them: ``http://h1:2379,http://h2:2379`` (or
    ``https://`` for etcd's own TLS)."""

    hosts: tuple[tuple[str, int], ...]
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Endpoints:
        hosts: list[tuple[str, int]] = []
        schemes: set[str] = set()
        for part in (p.strip() for p in url.split(",")):
            if not part:
                continue
            scheme, sep, rest = part.partition("://")
            if not sep or scheme not in ("http", "https"):
                raise InvalidArgument(
                    f"--fleet: {part!r} is not an etcd client URL (http://HOST:PORT or "
                    "https://HOST:PORT, comma-separated)"
                )
            schemes.add(scheme)
            rest = rest.rstrip("/")
            if rest.startswith("["):  # [v6]:port
                host, _, tail = rest[1:].partition("]")
                port = tail.removeprefix(":") or str(DEFAULT_ETCD_PORT)
            else:
                host, sep, port = rest.rpartition(":")
                if not sep:
                    host, port = rest, str(DEFAULT_ETCD_PORT)
            if not port.isdigit() or not 0 < int(port) < 65536 or not host:
                raise InvalidArgument(f"--fleet: {part!r} has no valid HOST:PORT")
            hosts.append((host, int(port)))
        if not hosts:
            raise InvalidArgument("--fleet: no etcd endpoint given")
        if len(schemes) > 1:
            raise InvalidArgument("--fleet: mix of http:// and https:// endpoints")
        return cls(tuple(hosts), schemes == {"https"})


@dataclass(frozen=True, slots=True)
class HostRecord:
    """What a host publishes about itself."""

    name: str
    advertise: str
    """HOST:PORT where clients reach its gRPC service."""
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: int = 1
    running: int = 0
    used: int = 0
    """Slots held at the host's last reconcile (a placement reads the live count)."""
    controllers: tuple[str, ...] = ()
    version: str = ""
    lease: int = 0
    registered_at: float = 0.0
    updated_at: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "advertise": self.advertise,
                "labels": dict(self.labels),
                "capacity": self.capacity,
                "running": self.running,
                "used": self.used,
                "controllers": list(self.controllers),
                "version": self.version,
                "lease": self.lease,
                "registered_at": self.registered_at,
                "updated_at": self.updated_at,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> HostRecord:
        """Raises :class:`InvalidArgument` for a record that is not one."""
        try:
            d: dict[str, Any] = json.loads(data)
            labels = {str(k): str(v) for k, v in dict(d.get("labels", {})).items()}
            bad = [k for k, v in labels.items() if not LABEL_KEY_RE.match(k)]
            bad += [v for v in labels.values() if not LABEL_VALUE_RE.match(v)]
            if bad or not ADVERTISE_RE.match(str(d["advertise"])):
                raise ValueError("a label or the address has characters it may not have")
            if not str(d.get("version", "")).isprintable() or int(d["capacity"]) < 1:
                raise ValueError("bad version or capacity")
            return cls(
                name=check_name(str(d["name"])),
                advertise=str(d["advertise"]),
                labels=labels,
                capacity=int(d["capacity"]),
                running=int(d.get("running", 0)),
                used=int(d.get("used", 0)),
                controllers=tuple(str(c) for c in d.get("controllers", ())),
                version=str(d.get("version", "")),
                lease=int(d.get("lease", 0)),
                registered_at=float(d.get("registered_at", 0.0)),
                updated_at=float(d.get("updated_at", 0.0)),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(f"not a host record: {e}") from e


PENDING = "pending"
JOB = "job"


@dataclass(frozen=True, slots=True)
class Slot:
    """One of a host's job slots: ``pending`` (reserved by a client whose Start is under way;
    ``token`` is that client's) or ``job`` (held by the running job ``job``)."""

    state: str
    token: str = ""
    job: str = ""
    at: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        return json.dumps(
            {"state": self.state, "token": self.token, "job": self.job, "at": self.at}
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Slot | None:
        try:
            d = json.loads(data)
            slot = cls(str(d["state"]), str(d.get("token", "")), str(d.get("job", "")))
            return cls(slot.state, slot.token, slot.job, float(d.get("at", 0.0)))
        except (ValueError, KeyError, TypeError):
            return None


def parse_labels(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``KEY=VALUE`` (or a bare ``KEY``, value ``""``) items into a mapping."""
    labels: dict[str, str] = {}
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            key, _, value = part.partition("=")
            if not LABEL_KEY_RE.match(key) or not LABEL_VALUE_RE.match(value):
                raise InvalidArgument(
                    f"--label: {part!r} is not KEY=VALUE (KEY: A-Z a-z 0-9 _.-; VALUE also :/@+)"
                )
            labels[key] = value
    return labels


@dataclass(frozen=True, slots=True)
class Selector:
    """``any`` / ``all`` (every host), or ``key=value,key,!key`` (all must hold)."""

    equal: Mapping[str, str] = field(default_factory=dict)
    present: frozenset[str] = frozenset()
    absent: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> Selector:
        text = text.strip()
        if text in ("any", "all", "*"):
            return cls()
        equal: dict[str, str] = {}
        present: set[str] = set()
        absent: set[str] = set()
        for part in (p.strip() for p in text.split(",")):
            key, sep, value = part.partition("=")
            bare = key.removeprefix("!")
            if not part or not LABEL_KEY_RE.match(bare) or (sep and key != bare):
                raise InvalidArgument(
                    f"--on: {part!r} is not a label selector (any, all, KEY=VALUE, KEY or "
                    "!KEY, comma-separated)"
                )
            if sep:
                equal[key] = value
            elif key != bare:
                absent.add(bare)
            else:
                present.add(key)
        return cls(equal, frozenset(present), frozenset(absent))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (
            all(labels.get(k) == v for k, v in self.equal.items())
            and all(k in labels for k in self.present)
            and not any(k in labels for k in self.absent)
        )


def split_fleet_id(text: str) -> tuple[str, str] | None:
    """``HOST/ID`` -> ``(HOST, ID)``; ``None`` for a plain job id."""
    host, sep, job = text.partition("/")
    if not sep:
        return None
    if not NAME_RE.match(host) or not job or "/" in job:
        raise InvalidArgument(f"{text!r} is not a fleet job id (HOST/ID)")
    return host, job
