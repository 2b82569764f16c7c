"""CLI sub-commands. Each module defines ``register(subparsers)`` and is discovered by ``cli``."""
