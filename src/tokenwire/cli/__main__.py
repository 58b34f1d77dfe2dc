"""``python -m tokenwire.cli``: the same as the ``tokenwire`` command."""

from tokenwire.cli.main import app

app()
