"""Benchmark scripts run by hand; a package so its conftest never shadows tests/conftest.py."""
