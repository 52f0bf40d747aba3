"""Subcommands of `fastsae` beyond the core ones in `fastsae/cli.py`, one module per command.

Each module defines `register(subparsers)`, which adds its parser and sets `func=handler`; handlers
import what they need lazily (so `fastsae --help` stays fast), parse flags and call one library function.
`fastsae.cli.main` finds the modules here by name; nothing needs to list them.
"""
