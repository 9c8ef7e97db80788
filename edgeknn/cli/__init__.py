"""The ``edgeknn`` command: its entry point (``main``) and each command family."""
