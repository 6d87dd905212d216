"""jobworker's benchmark harness (``make bench``)."""
