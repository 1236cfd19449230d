"""``python -m agent_finetune.cli``: the same as the ``agent-finetune`` command."""

import sys

from agent_finetune.cli.app import main

sys.exit(main())
