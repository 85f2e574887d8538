"""The project's version, in one place: the Home Assistant discovery ``origin`` reports it."""

__version__ = "0.1.0"
