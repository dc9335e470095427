"""Experiment configs: one family per folder, each file a ``get_config()`` with its command and
expected result in the docstring (``qflax train --config experiments/<family>/<name>.py``)."""
