"""The model and the one inference thread that batches requests.

Requests never call the model themselves. They take an admission slot, submit a job and read its
outputs from an asyncio queue; the inference thread prefills new jobs at step boundaries, then runs
one decode step for every running job together (left-padded KV caches merged into one batch), and
drops finished, failed or cancelled jobs without disturbing the others.
"""

from .core import Engine
from .jobs import Choices, EngineOutput, Generation, Prompt, Slot

__all__ = ["Choices", "Engine", "EngineOutput", "Generation", "Prompt", "Slot"]
