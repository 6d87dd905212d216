"""What only the daemon runs: the gRPC service, authorisation, accounts, the limit policy, the
debug endpoint and the ``workerd`` entry point (:mod:`jobworker.server.daemon`)."""
