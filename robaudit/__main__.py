"""``python -m robaudit``."""

from robaudit.console import run

run()
