"""The send writer's process (`pigeon.store.sqlite.writer_process`), as the store starts it:
``python -m pigeon.store.sqlite FD SETTINGS_JSON``."""

import sys

from pigeon.store.sqlite.writer_process import main

main(sys.argv[1:])
