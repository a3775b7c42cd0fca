"""Offline evaluation tools for UTIO: an exact reference forward and quality measures."""
