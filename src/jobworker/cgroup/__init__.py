"""cgroup v2 layer: discovery, the one cgroupfs gateway, the jobworker tree and per-controller
limit and stats modules."""
