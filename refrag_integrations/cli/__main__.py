"""``python -m refrag_integrations.cli``: the ``refrag`` command, for environments whose scripts
folder is not on PATH (a notebook kernel, a virtualenv that was never activated)."""

from . import app

app(prog_name="refrag")
