"""Thin click commands, nothing else: each module here parses arguments, calls the library, and
prints. Errors are caught once, in main.py."""
