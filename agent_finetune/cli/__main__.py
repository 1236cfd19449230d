"""``python -m agent_finetune.cli``: the ``agent-finetune`` command, as torchrun and accelerate
launch run it."""

import sys

from agent_finetune.cli.app import main

sys.exit(main())
