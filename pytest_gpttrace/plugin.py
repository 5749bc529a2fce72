"""pytest adapter of pytest-gpttrace: options, fixtures and report hooks.

Only pytest glue lives here; the logic is in plain modules of this package.
"""
