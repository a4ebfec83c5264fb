"""adapterkit's built-in plugins.

Each module here is an ordinary plugin: it imports only ``adapterkit``'s public API and is found
through the ``adapterkit`` entry-point group in ``pyproject.toml``, exactly as a third-party
plugin would be. Copy one to start your own.
"""
