"""Benchmarks of the plugin (run as scripts: python benchmarks/overhead.py); a package so the type checker names them."""
