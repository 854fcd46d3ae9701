"""modalign.core: the bottom layer (errors, typed config I/O, atomic artifacts, world/rank).

Every other subpackage imports it; it imports nothing else of modalign.
"""
