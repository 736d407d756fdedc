"""Generation settings: greedy decoding by default, sampling when a temperature is given.

Kept apart from `generate.py` (which needs torch) so that `infer.py --help` can show these
defaults without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationSettings:
    """How the next token is chosen; infer.py's generation flags and their defaults come from here."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def kwargs(self) -> dict:
        if self.temperature and self.temperature > 0:
            args = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
            if self.top_k:
                args["top_k"] = self.top_k
        else:
            args = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if self.repetition_penalty != 1.0:
            args["repetition_penalty"] = self.repetition_penalty
        return {"max_new_tokens": self.max_new_tokens, **args}
