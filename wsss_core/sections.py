"""The building blocks of every params section: `Section` (strict, frozen, no unknown key) and the constrained
number types. Packages below `config` (the data readers) define their own sections from these."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Scales = Annotated[list[PositiveFloat], Field(min_length=1)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy's legacy seeding (and so every library) takes 32 bits


class Section(BaseModel):
    """A params section: strict types, frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
