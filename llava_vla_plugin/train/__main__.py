"""`python -m llava_vla_plugin.train`: the training entry point the launcher runs."""
from llava_vla_plugin.train.run import main

main()
