"""``python -m workers``: run this sandbox's worker (``orchestrator worker`` runs this)."""

from .worker import main

main()
