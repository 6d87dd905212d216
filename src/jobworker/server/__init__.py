"""What only the daemon runs: the gRPC service, authorisation, accounts, the limit policy, the
debug endpoint, the daemon (:mod:`jobworker.server.daemon`) and its ``workerd`` command line
(:mod:`jobworker.server.cli`)."""
