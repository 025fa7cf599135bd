"""Benchmarks of the service: the HTTP harness (``python -m bench``), its peers, reload and training.

See bench/README.md.
"""
