"""Session orchestrator for nested Docker desktops."""

__version__ = "0.1.0"
