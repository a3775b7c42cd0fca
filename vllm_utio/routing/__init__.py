"""Importance signals, routers (score requests -> depth levels) and bucketing."""
