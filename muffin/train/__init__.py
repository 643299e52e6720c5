"""DPO training: pure losses, preference data, the reference log-probs cache, the config and the trainer."""

from muffin.train.loss import LOSS_TYPES, preference_loss, preference_losses, sequence_logps

__all__ = ["LOSS_TYPES", "preference_loss", "preference_losses", "sequence_logps"]
