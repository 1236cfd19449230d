"""``python -m agent_finetune.cli``: what torchrun and accelerate launch run."""

import sys

from agent_finetune.cli.app import main

sys.exit(main())
