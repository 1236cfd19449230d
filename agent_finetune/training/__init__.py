"""Training: config -> data -> prompts -> backend (Unsloth or transformers+PEFT+TRL) -> train.

``train.train(config, data)`` reads top to bottom and publishes through ``agent_finetune.registry``.
``inference`` loads a trained adapter for local generation; ``tiny_model`` builds the small
random models that tests, benchmarks and the demo use instead of a hub download;
``numpy_adapter`` writes random adapter folders at any model's shapes without torch.
Imports run one way: this package uses ``agent_finetune.registry`` and never the CLI or the
server plugin.
"""
