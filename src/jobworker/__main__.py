"""``python -m jobworker``: the ``worker`` command line client."""

from jobworker.client.cli import main

if __name__ == "__main__":
    main()
