"""``python -m pacsai.cli``: the same as the ``pacsai`` command."""

from pacsai.cli import main

main()
