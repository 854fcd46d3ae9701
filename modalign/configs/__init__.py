"""modalign subpackage."""
