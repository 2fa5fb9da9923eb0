"""pyagent: a toolkit for agents that dial out to an endpoint and run Python bundles inside a small C host."""

__version__ = "0.1.0"

__all__ = ["__version__"]
