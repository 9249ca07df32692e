"""The training server: receiver, mixing buffer, split model, trainer."""
