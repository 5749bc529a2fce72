"""pytest-gpttrace: numerics assertions for GPT language models.

The package imports torch only when one of its tools is used, so loading the pytest plugin
costs nothing for test sessions that never trace a model.
"""

__version__ = "0.1.0"
