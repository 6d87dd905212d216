"""The service's settings: roles, limit policy, sandbox and run-as rules for each caller."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobworker.errors import InvalidArgument, PermissionDenied
from jobworker.identity import Role
from jobworker.limits import Limits
from jobworker.server.accounts import Accounts
from jobworker.server.authz import Identity, Policy
from jobworker.server.policy import effective_timeout
from jobworker.spec import Credentials, Network, Sandbox, TerminalSize


@dataclass(frozen=True, slots=True)
class Settings:
    """What the service adds to the library: roles and limit policy."""

    policy: Policy | None = None
    default_limits: Limits = field(default_factory=Limits)
    """Applied to every field a Start request leaves unset."""
    max_limits: Limits = field(default_factory=Limits)
    """Caps: a request above one is refused; an unset field gets the cap."""
    job_account: str | None = None
    """Unix account (``user[:group]``) for every identity the policy does not map; ``None``:
    each identity's own uid from ``accounts.uids``."""
    accounts: Accounts = field(default_factory=Accounts)
    default_network: Network = Network.HOST
    """The network of a sandboxed job that does not say."""
    host_network_roles: frozenset[Role] = frozenset(Role)
    """Roles whose jobs may use the host's network; the others must ask for ``none``."""
    max_runtime: float | None = None
    """Seconds a job may run at most (``--max-runtime``); a job asking for none gets it. The
    policy's ``[runtime]`` entry for a role replaces it for that role."""

    def timeout_for(self, identity: Identity, requested: float | None) -> float | None:
        """The deadline of a job ``identity`` asks to run ``requested`` seconds: capped by its
        role's ``[runtime]`` entry, else by :attr:`max_runtime`."""
        role_cap = self.policy.runtime_roles.get(identity.role) if self.policy else None
        if role_cap is not None:
            return effective_timeout(requested, role_cap, f"the policy's [runtime] {identity.role}")
        return effective_timeout(requested, self.max_runtime, "workerd --max-runtime")

    def terminal_for(self, identity: Identity, size: TerminalSize | None) -> TerminalSize | None:
        """``size`` if ``identity`` may have a terminal (the policy's ``[terminal]``); raises
        :class:`PermissionDenied` otherwise. Also the check for typing into one."""
        policy = self.policy
        if size is not None and policy is not None and not policy.may_use_terminal(identity.role):
            raise PermissionDenied(
                f"{identity.name} (role {identity.role}) may not use a terminal (-t): the "
                "daemon's policy [terminal] does not allow that role"
            )
        return size

    def sandbox_for(
        self, identity: Identity, network: Network | None, no_sandbox: bool
    ) -> Sandbox | None:
        """The sandbox of a job ``identity`` asks for; raises :class:`PermissionDenied` or
        :class:`InvalidArgument` for what it may not have."""
        if no_sandbox:
            if identity.role is not Role.ADMIN:
                raise PermissionDenied(
                    f"{identity.name} (role {identity.role}) may not start a job without the "
                    "sandbox; only admins may"
                )
            if network is not None:
                raise InvalidArgument("network applies to the sandbox: drop it, or no_sandbox")
            return None
        network = self.default_network if network is None else network
        if network is Network.HOST and identity.role not in self.host_network_roles:
            raise PermissionDenied(
                f"{identity.name} (role {identity.role}) may not use the host's network; "
                "ask for network none"
            )
        return Sandbox(network)

    def credentials_for(self, identity: Identity) -> Credentials | None:
        """Who ``identity``'s jobs run as: the policy's ``[run_as.identities]`` entry, else its
        ``[run_as.roles]`` entry, else ``job_account``, else the identity's own uid."""
        named = self.policy.account_for(identity) if self.policy else None
        return self.accounts.for_identity(
            identity.name, named if named is not None else self.job_account
        )
