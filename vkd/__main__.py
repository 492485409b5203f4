# `python -m vkd ...` and `accelerate launch -m vkd distill config.yaml` enter here.
from vkd.cli import main

main()
