"""``python -m bert_fast``: the command line of :mod:`bert_fast.cli`."""

from .cli import main

raise SystemExit(main())
