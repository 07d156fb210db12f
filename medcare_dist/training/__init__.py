"""The training loop and what it needs: the recipe both launchers share, the trainer, the LM loss, ZeRO-3 setup, resume checks, metrics sinks."""
