"""The only package that touches vLLM private internals.

Every module here is written against vLLM 0.32; :mod:`.version` checks the installed
version before any of them is used with UTIO enabled.
"""
