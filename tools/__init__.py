"""Offline build tools (the draft model's training pipeline), not part of the installed engine."""
