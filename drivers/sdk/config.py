"""The config models every driver builds on: tags, commands, status, alerts, equipment, secrets.

A driver subclasses `TagBase`, `CommandBase` and `Model` (for its `[equipment.connection]`) and names them
on its `Driver` class; the core validates each `[[equipment]]` with the driver's models. Unknown keys are
errors everywhere.
"""

from __future__ import annotations

import decimal
import functools
import os
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from drivers.sdk.events import STATUSES

ID_PATTERN = r"^[A-Za-z0-9_-]+$"
Role = Literal["viewer", "operator", "admin"]
Ident = Annotated[str, Field(pattern=ID_PATTERN, min_length=1, max_length=128)]


class Model(BaseModel):
    """Base of every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class SecretHolder(Model):
    """A model with secrets given as `<name>_file` or `<name>_env`, resolved once at load.

    `__secrets__` lists the secret names; the resolved values live in a private map and are never
    part of the model's dump or repr.
    """

    __secrets__: ClassVar[tuple[str, ...]] = ()
    _secrets: dict[str, str] = PrivateAttr(default_factory=dict)

    def secret(self, name: str) -> str | None:
        """The resolved value of a secret, or None when it is not configured."""
        return self._secrets.get(name)

    @model_validator(mode="after")
    def _one_source(self) -> SecretHolder:
        for name in self.__secrets__:
            if getattr(self, f"{name}_file", None) and getattr(self, f"{name}_env", None):
                raise ValueError(f"give {name}_file or {name}_env, not both")
        return self

    def resolve_secrets(self, base: Path, where: tuple[str | int, ...], problems: list[Problem]) -> None:
        """Read every configured secret file or variable; unreadable ones become problems."""
        for name in self.__secrets__:
            file = getattr(self, f"{name}_file", None)
            env = getattr(self, f"{name}_env", None)
            if file:
                path = file if Path(file).is_absolute() else base / file
                try:
                    value = Path(path).read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as err:
                    reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
                    problems.append(Problem((*where, f"{name}_file"), f"cannot read secret file {path}: {reason}"))
                    continue
                if not value:
                    problems.append(Problem((*where, f"{name}_file"), f"secret file {path} is empty"))
                    continue
                self._secrets[name] = value
            elif env:
                value = os.environ.get(env, "")
                if not value:
                    problems.append(Problem((*where, f"{name}_env"), f"environment variable {env} is not set or empty"))
                    continue
                self._secrets[name] = value


class Problem:
    """One config problem: a path into the document and a message."""

    __slots__ = ("message", "path")

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        self.path = path
        self.message = message


class TagBase(Model):
    """Fields every tag has; drivers subclass this with their addressing fields."""

    name: Ident
    unit: str | None = None
    deadband: float = Field(0.0, ge=0)
    scale: float | None = Field(None, allow_inf_nan=False)
    offset: float | None = Field(None, allow_inf_nan=False)

    @field_validator("scale")
    @classmethod
    def _nonzero(cls, v: float | None) -> float | None:
        if v == 0:
            raise ValueError("must not be 0 (a write would divide by it)")
        return v

    def scaled(self, raw: Any) -> Any:
        """raw * scale + offset when either is set, without binary noise; numbers otherwise kept exact.

        An integer raw value (a register, a counter) is exact, so the result is computed in decimal from
        the scale and offset as written: 825 with scale 0.001 is 0.825, never 0.8250000000000001.
        A float raw value (a float32 or float64 from the device) has its own precision, so it is not rounded
        to the config's decimals; only the noise of the multiply and add is dropped by keeping 15
        significant digits. A double holds 15.95 digits and the arithmetic disturbs the last one or two,
        while a float32 reading carries about 7, so no digit the device sent is lost.
        """
        if (self.scale is None and self.offset is None) or isinstance(raw, (bool, str)) or raw is None:
            return raw
        scale = 1.0 if self.scale is None else self.scale
        offset = self.offset or 0.0
        if isinstance(raw, int):
            exact = _DECIMAL.add(_DECIMAL.multiply(Decimal(raw), _written(scale)), _written(offset))
            return float(exact)
        if isinstance(raw, float):
            return float(f"{raw * scale + offset:.15g}")
        return raw * scale + offset

    def unscaled(self, value: float) -> float:
        """Inverse of `scaled`, for writes."""
        if self.scale is None and self.offset is None:
            return value
        scale = 1.0 if self.scale is None else self.scale
        return (value - (self.offset or 0.0)) / scale


# Enough digits for any 64-bit raw value times a scale as written, so integer scaling is exact before the
# one rounding to float; a context of our own, so nothing else's decimal settings can change it.
_DECIMAL = decimal.Context(prec=40)


@functools.lru_cache(maxsize=4096)
def _written(x: float) -> Decimal:
    """The decimal a config float was written as: repr is the shortest text that reads back as it."""
    return Decimal(repr(x))


class CommandBase(Model):
    """Fields every declared command has; drivers subclass this with their own fields."""

    name: Ident
    kind: str
    role: Role = "operator"
    tag: str | None = None
    min: float | None = None
    max: float | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _range(self) -> CommandBase:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self


class StatusConfig(Model):
    tag: str | None = None
    map: dict[str, str] = Field(default_factory=dict)
    progress_tag: str | None = None
    operation_tag: str | None = None
    process_id_tag: str | None = None
    error_tag: str | None = None

    @field_validator("map")
    @classmethod
    def _statuses(cls, v: dict[str, str]) -> dict[str, str]:
        for key, status in v.items():
            if status not in STATUSES:
                raise ValueError(f"map value {status!r} for {key!r} is not one of {', '.join(STATUSES)}")
        return v

    def tag_refs(self) -> dict[str, str]:
        """Field name -> tag name for every tag this status config refers to."""
        refs = {
            "tag": self.tag,
            "progress_tag": self.progress_tag,
            "operation_tag": self.operation_tag,
            "process_id_tag": self.process_id_tag,
            "error_tag": self.error_tag,
        }
        return {k: v for k, v in refs.items() if v}


class AlertConfig(Model):
    tag: str
    above: float | None = None
    below: float | None = None
    clear_below: float | None = None
    clear_above: float | None = None
    severity: Literal["info", "warning", "critical"] = "warning"
    message: str = ""

    @model_validator(mode="after")
    def _thresholds(self) -> AlertConfig:
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of above or below")
        if self.above is not None:
            if self.clear_above is not None:
                raise ValueError("an 'above' alert clears with clear_below")
            if self.clear_below is not None and self.clear_below > self.above:
                raise ValueError("clear_below must not exceed above")
        else:
            if self.clear_below is not None:
                raise ValueError("a 'below' alert clears with clear_above")
            if self.clear_above is not None and self.below is not None and self.clear_above < self.below:
                raise ValueError("clear_above must not be under below")
        return self

    @property
    def threshold(self) -> float:
        return self.above if self.above is not None else self.below  # type: ignore[return-value]

    @property
    def clear_threshold(self) -> float:
        if self.above is not None:
            return self.clear_below if self.clear_below is not None else self.above
        return self.clear_above if self.clear_above is not None else self.threshold


class EquipmentBase(Model):
    """The generic part of `[[equipment]]`; `connection`, `tags` and `commands` come from the driver."""

    id: Ident
    type: Literal[
        "cnc_mill", "cnc_lathe", "3d_printer", "laser_cutter", "sensor", "plc", "robot_arm", "cmm", "other"
    ] = "other"
    driver: str
    name: str | None = None
    # Where the equipment sits in the plant (the UNS profile's topic root): "enterprise/site/area/line/cell".
    location: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
    stale_after_s: float | None = Field(None, ge=0)
    status: StatusConfig | None = None
    parameters: dict[str, str] = Field(default_factory=dict)
    alerts: list[AlertConfig] = Field(default_factory=list)
    # Overridden per driver by the models built in `equipment_variant`.
    connection: Any = None
    tags: list[Any] = Field(default_factory=list)
    commands: list[Any] = Field(default_factory=list)

    def tag(self, name: str) -> Any:
        """The tag config called `name`, or None."""
        for t in self.tags:
            if t.name == name:
                return t
        return None

    def command(self, name: str) -> Any:
        """The declared command called `name`, or None."""
        for c in self.commands:
            if c.name == name:
                return c
        return None


EquipmentConfig = EquipmentBase
