"""``python -m robaudit``."""

from robaudit.cli import run

run()
