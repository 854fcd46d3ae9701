"""The modalign version (the bottom layer holds it so every layer can record it)."""

__version__ = "0.3.0.dev0"
