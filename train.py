"""Entry point: ``python train.py fit --config configs/tool_agent/default.yaml`` (see README.md)."""

from experiment.cli import main

if __name__ == "__main__":
    main()
