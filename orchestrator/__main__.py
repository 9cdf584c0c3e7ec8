"""``python -m orchestrator``: the same as the ``orchestrator`` command."""

from .cli import main

if __name__ == "__main__":
    main()
