"""ckptavg: post-hoc checkpoint averaging of language-model training trajectories."""

__version__ = "0.1.0"

__all__ = ["__version__", "average_checkpoints", "open_checkpoint", "plan_average"]


def __getattr__(name: str):
    # Lazy, so that `ckptavg --help` and pure planning never pay for importing torch.
    if name == "average_checkpoints":
        from .average import average_checkpoints

        return average_checkpoints
    if name == "open_checkpoint":
        from .tensors import open_checkpoint

        return open_checkpoint
    if name == "plan_average":
        from .plan import plan_average

        return plan_average
    raise AttributeError(name)
