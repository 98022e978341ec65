"""Command-line interface. Each module here declares one or more sub-commands with ``@command``."""
