"""Request schemas of the OpenAI-compatible endpoints (pydantic): unknown fields, wrong
types and out-of-range numbers are refused with a message that names the field, before
anything is admitted or generated.

May import: pydantic and the bottom layers.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "MAX_TOKENS_LIMIT"]

MAX_TOKENS_LIMIT = 1 << 20  # beyond any context: a larger request is a mistake, not a wish


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_Strict):
    model: Optional[str] = None
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    n: Literal[1] = 1
    user: Optional[str] = Field(None, max_length=256)
    # OpenAI's: token id (as a string) -> a bias in [-100, 100] added to its logit
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=1024)

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value):
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids, got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias of token {token} must be in [-100, 100], got {bias}")
        return value

    def token_biases(self) -> dict[int, float]:
        return {int(token): bias for token, bias in (self.logit_bias or {}).items()}


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]] = Field(..., min_length=1)

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else "".join(self.prompt)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    name: Optional[str] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)

    def output_limit(self) -> int:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
