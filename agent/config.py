"""Configuration: TOML parsed by tomllib, validated by pydantic models, errors located by line.

The generic parts of `[[equipment]]` live here; each driver module registers its own models for
`connection`, `tags` and `commands`, and the equipment list is validated as a union discriminated on
`driver`, built from the registry at load time.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from agent.errors import ConfigError
from agent.model import STATUSES
from agent.tomlpos import KeyLocator, format_path

DEFAULT_CONFIG = "/etc/edge-agent/agent.toml"
ID_PATTERN = r"^[A-Za-z0-9_-]+$"
# Command kinds the router runs itself, on any driver that has write commands.
ROUTER_KINDS = frozenset({"load_process"})
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


# ---- sections -----------------------------------------------------------------------------------


class AgentSection(Model):
    id: Ident
    site: Ident
    state_dir: Path = Path("/var/lib/edge-agent")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    reconnect_max_s: float = Field(30.0, gt=0)
    driver_modules: list[str] = Field(default_factory=list)
    shutdown_grace_s: float = Field(5.0, ge=0)


class MqttSection(SecretHolder):
    __secrets__ = ("password",)
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    topic_prefix: str = Field("edge", pattern=r"^[^#+\s]+$")
    qos: Literal[0, 1] = 1
    keepalive_s: int = Field(30, ge=1, le=65535)
    telemetry_interval_s: float = Field(1.0, gt=0)
    status_heartbeat_s: float = Field(60.0, gt=0)
    buffer_max_messages: int = Field(1_000_000, ge=1)
    replay_max_per_s: float = Field(2000.0, ge=0)  # pace of the replayed backlog; 0 = unpaced
    commands_enabled: bool = True
    command_max_age_s: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError("must start with mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError("has no host")
        try:
            _ = parts.port
        except ValueError as err:
            raise ValueError("has an invalid port") from err
        return v

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"


class MpmSection(SecretHolder):
    __secrets__ = ("api_key", "token", "client_secret")
    base_url: str
    auth: Literal["none", "api_key", "bearer", "oauth2"] = "api_key"
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)  # a larger quality result is failed at its source
    api_key_file: Path | None = None
    api_key_env: str | None = None
    token_file: Path | None = None
    token_env: str | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret_file: Path | None = None
    client_secret_env: str | None = None
    scope: str | None = None
    ca_file: Path | None = None
    timeout_s: float = Field(30.0, gt=0)
    verify_ssl: bool = True
    retry_on_failure: bool = True
    max_retries: int = Field(3, ge=0)
    rate_limit_per_minute: int | None = Field(600, ge=1)

    @field_validator("base_url", "token_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _auth_fields(self) -> MpmSection:
        if self.auth == "oauth2" and not (self.token_url and self.client_id):
            raise ValueError("auth = oauth2 needs token_url and client_id")
        return self


class ApiKey(SecretHolder):
    __secrets__ = ("key",)
    name: str = Field(min_length=1)
    key_file: Path | None = None
    key_env: str | None = None
    role: Role = "viewer"

    @model_validator(mode="after")
    def _has_key(self) -> ApiKey:
        if not (self.key_file or self.key_env):
            raise ValueError("give key_file or key_env")
        return self


class HttpSection(Model):
    enabled: bool = True
    listen: str = "127.0.0.1:8710"
    metrics_auth: bool = False
    unhealthy_after_s: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(65536, ge=1024)
    rate_limit_per_minute: int = Field(600, ge=1)
    auth_failures_per_minute: int = Field(10, ge=1)  # failed keys from one address before 429
    max_connections: int = Field(256, ge=1)  # concurrent connections; beyond it new ones are refused
    header_timeout_s: float = Field(10.0, gt=0)  # a request's headers must arrive within this
    idle_timeout_s: float = Field(60.0, gt=0)  # an idle keep-alive connection is closed after this
    api_keys: list[ApiKey] = Field(default_factory=list)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:8710' or '[::1]:8710' -> (host, port)."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not m:
        raise ValueError("must be host:port (an IPv6 host in brackets)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError("port out of range")
    if m.group(1):
        ipaddress.ip_address(host)
    return host, port


# ---- equipment: the generic parts ---------------------------------------------------------------


class TagBase(Model):
    """Fields every tag has; drivers subclass this with their addressing fields."""

    name: Ident
    unit: str | None = None
    deadband: float = Field(0.0, ge=0)
    scale: float | None = None
    offset: float | None = None

    def scaled(self, raw: Any) -> Any:
        """raw * scale + offset when either is set; numbers otherwise kept exact."""
        if (self.scale is None and self.offset is None) or isinstance(raw, (bool, str)) or raw is None:
            return raw
        return raw * (1.0 if self.scale is None else self.scale) + (self.offset or 0.0)

    def unscaled(self, value: float) -> float:
        """Inverse of `scaled`, for writes."""
        if self.scale is None and self.offset is None:
            return value
        scale = 1.0 if self.scale is None else self.scale
        return (value - (self.offset or 0.0)) / scale


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
    stale_after_s: float | None = Field(None, ge=0)
    status: StatusConfig | None = None
    parameters: dict[str, str] = Field(default_factory=dict)
    alerts: list[AlertConfig] = Field(default_factory=list)
    # Overridden per driver by the models built in `equipment_model`.
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


class AgentConfig(Model):
    """The whole validated file."""

    agent: AgentSection
    mqtt: MqttSection = Field(default_factory=MqttSection)  # type: ignore[arg-type]
    mpm: MpmSection | None = None
    http: HttpSection = Field(default_factory=HttpSection)  # type: ignore[arg-type]
    equipment: list[EquipmentBase] = Field(default_factory=list)

    _path: Path | None = PrivateAttr(default=None)

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def root_topic(self) -> str:
        return f"{self.mqtt.topic_prefix}/{self.agent.site}/{self.agent.id}"

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-agent-{self.agent.id}"


# ---- loading ------------------------------------------------------------------------------------


def config_path(arg: str | None) -> Path:
    """The contract's order: --config, then $EDGE_AGENT_CONFIG, then the system path."""
    return Path(arg or os.environ.get("EDGE_AGENT_CONFIG") or DEFAULT_CONFIG)


_model_cache: dict[tuple[str, ...], type[BaseModel]] = {}


def equipment_model(driver_names: tuple[str, ...]) -> type[BaseModel]:
    """The root model whose equipment list is a union discriminated on `driver`."""
    from drivers.registry import get_driver

    if driver_names in _model_cache:
        return _model_cache[driver_names]
    variants = []
    for name in driver_names:
        cls = get_driver(name)
        variants.append(
            create_model(
                f"Equipment[{name}]",
                __base__=EquipmentBase,
                driver=(Literal[name], ...),  # type: ignore[arg-type]
                connection=(cls.connection_model, ...),
                tags=(list[cls.tag_model], Field(default_factory=list)),  # type: ignore[name-defined]
                commands=(list[cls.command_model], Field(default_factory=list)),  # type: ignore[name-defined]
            )
        )
    if variants:
        union: Any = Annotated[Union[tuple(variants)], Field(discriminator="driver")]  # noqa: UP007
        item: Any = union
    else:
        item = EquipmentBase
    model = create_model("AgentConfigFor", __base__=AgentConfig, equipment=(list[item], Field(default_factory=list)))
    _model_cache[driver_names] = model
    return model


def _import_driver_modules(modules: list[str], problems: list[Problem]) -> None:
    for i, mod in enumerate(modules):
        try:
            importlib.import_module(mod)
        except Exception as err:  # any import failure is a config problem, reported with its path
            problems.append(Problem(("agent", "driver_modules", i), f"cannot import driver module {mod!r}: {err}"))


def _pydantic_problems(err: ValidationError, data: dict[str, Any]) -> list[Problem]:
    problems = []
    for e in err.errors(include_input=False, include_url=False):
        loc = list(e["loc"])
        msg = e["msg"]
        # Drop the discriminator tag pydantic inserts after the list index.
        if len(loc) >= 3 and loc[0] == "equipment" and isinstance(loc[1], int) and isinstance(loc[2], str):
            eq = data.get("equipment", [])
            if isinstance(eq, list) and loc[1] < len(eq) and isinstance(eq[loc[1]], dict):
                if eq[loc[1]].get("driver") == loc[2]:
                    loc.pop(2)
        if e["type"] == "union_tag_invalid" or e["type"] == "union_tag_not_found":
            loc.append("driver")
            from drivers.registry import known_drivers

            got = None
            eq = data.get("equipment", [])
            if isinstance(loc[1], int) and isinstance(eq, list) and loc[1] < len(eq) and isinstance(eq[loc[1]], dict):
                got = eq[loc[1]].get("driver")
            msg = (
                f"unknown driver {got!r} (known: {', '.join(known_drivers())})" if got is not None else "field required"
            )
        elif e["type"] == "missing":
            msg = "field required"
        elif e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        # Model-level checks (missing one of two keys) carry no field; keep the table's path.
        problems.append(Problem(tuple(p for p in loc if p != "__root__"), msg))
    return problems


def _semantic_problems(cfg: AgentConfig) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, eq in enumerate(cfg.equipment):
        where: tuple[str | int, ...] = ("equipment", i)
        if eq.id in seen:
            problems.append(
                Problem((*where, "id"), f"duplicate equipment id {eq.id!r} (also equipment[{seen[eq.id]}])")
            )
        else:
            seen[eq.id] = i
        tag_names: dict[str, int] = {}
        for j, tag in enumerate(eq.tags):
            if tag.name in tag_names:
                problems.append(Problem((*where, "tags", j, "name"), f"duplicate tag name {tag.name!r}"))
            tag_names.setdefault(tag.name, j)
        from drivers.registry import get_driver

        driver = get_driver(eq.driver)
        if eq.status is not None:
            for field, ref in eq.status.tag_refs().items():
                if ref not in tag_names and not driver.has_builtin_tag(ref):
                    problems.append(Problem((*where, "status", field), f"unknown tag {ref!r}"))
        for j, alert in enumerate(eq.alerts):
            if alert.tag not in tag_names and not driver.has_builtin_tag(alert.tag):
                problems.append(Problem((*where, "alerts", j, "tag"), f"unknown tag {alert.tag!r}"))
        cmd_names: set[str] = set()
        for j, cmd in enumerate(eq.commands):
            if cmd.name in cmd_names:
                problems.append(Problem((*where, "commands", j, "name"), f"duplicate command name {cmd.name!r}"))
            cmd_names.add(cmd.name)
            if cmd.kind not in driver.command_kinds and cmd.kind not in ROUTER_KINDS:
                problems.append(
                    Problem(
                        (*where, "commands", j, "kind"),
                        f"kind {cmd.kind!r} is not supported by driver {eq.driver!r} "
                        f"(supported: {', '.join(sorted(driver.command_kinds | ROUTER_KINDS))})",
                    )
                )
            if cmd.tag is not None and cmd.tag not in tag_names:
                problems.append(Problem((*where, "commands", j, "tag"), f"unknown tag {cmd.tag!r}"))
        for j, (param, cmd_name) in enumerate(eq.parameters.items()):
            del j
            cmd = eq.command(cmd_name)
            if cmd is None:
                problems.append(Problem((*where, "parameters", param), f"unknown command {cmd_name!r}"))
            elif cmd.kind != "write":
                problems.append(Problem((*where, "parameters", param), f"command {cmd_name!r} is not a write command"))
        for msg in driver.check_equipment(eq):
            problems.append(Problem((*where, *msg[0]), msg[1]))
    return problems


def _resolve_paths(cfg: AgentConfig, base: Path) -> None:
    """Make every relative path in the config absolute against the config file's folder."""

    def fix(obj: BaseModel) -> None:
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            if isinstance(value, Path) and not value.is_absolute():
                setattr(obj, name, (base / value))
            elif isinstance(value, BaseModel):
                fix(value)
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, BaseModel):
                        fix(item)

    fix(cfg)


def _format(problems: list[Problem], text: str) -> list[str]:
    # Keys are located only when there is something to report: a valid file never pays for it.
    locator = KeyLocator(text)
    out = []
    for p in problems:
        line = locator.line_of(p.path)
        suffix = f" (line {line})" if line else ""
        where = format_path(p.path) or "agent.toml"
        out.append(f"{where}: {p.message}{suffix}")
    return out


def parse_config(text: str, path: Path, *, resolve_secrets: bool = True) -> AgentConfig:
    """Validate a config text; raise ConfigError with the contract's lines on any problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib says "... (at line N, column M)"; the contract's form is "(line N, column M)".
        msg = re.sub(r"\s*\(at line (\d+), column (\d+)\)$", r" (line \1, column \2)", str(err))
        if msg == str(err) and (m := re.search(r"\(at end of document\)$", msg)):
            lines = text.count("\n") + 1
            msg = msg[: m.start()].rstrip() + f" (line {lines}, column 1)"
        raise ConfigError([f"{path.name}: {msg}"]) from err
    return validate_data(data, path, text, resolve_secrets=resolve_secrets)


def validate_data(data: dict[str, Any], path: Path, text: str = "", *, resolve_secrets: bool = True) -> AgentConfig:
    """Validate an already parsed config; `path` anchors relative paths, `text` (the TOML) gives line numbers."""
    problems: list[Problem] = []
    agent = data.get("agent")
    modules: list[str] = []
    if isinstance(agent, dict) and isinstance(agent.get("driver_modules"), list):
        modules = [m for m in agent["driver_modules"] if isinstance(m, str)]
    env_modules = [m.strip() for m in os.environ.get("EDGE_AGENT_DRIVER_MODULES", "").split(",") if m.strip()]
    _import_driver_modules(modules + env_modules, problems)

    from drivers.registry import get_driver, known_drivers

    names: list[str] = []
    eq_list = data.get("equipment", [])
    keep: list[int] = []  # equipment indexes whose driver is usable; the others are reported here
    if isinstance(eq_list, list):
        for i, item in enumerate(eq_list):
            d = item.get("driver") if isinstance(item, dict) else None
            if not isinstance(item, dict) or d is None:
                keep.append(i)  # pydantic reports the missing or mistyped driver
                continue
            if not isinstance(d, str) or d not in known_drivers():
                problems.append(
                    Problem(("equipment", i, "driver"), f"unknown driver {d!r} (known: {', '.join(known_drivers())})")
                )
                continue
            try:
                get_driver(d)
            except Exception as err:
                problems.append(Problem(("equipment", i, "driver"), f"driver {d!r} failed to load: {err}"))
                continue
            keep.append(i)
            if d not in names:
                names.append(d)
        data = {**data, "equipment": [eq_list[i] for i in keep]}
    model = equipment_model(tuple(sorted(names)))
    try:
        cfg = model.model_validate(data)
    except ValidationError as err:
        for p in _pydantic_problems(err, data):
            if len(p.path) >= 2 and p.path[0] == "equipment" and isinstance(p.path[1], int) and p.path[1] < len(keep):
                p.path = ("equipment", keep[p.path[1]], *p.path[2:])
            problems.append(p)
        raise ConfigError(_format(problems, text)) from None
    if problems:
        raise ConfigError(_format(problems, text))
    assert isinstance(cfg, AgentConfig)
    cfg._path = path
    base = path.resolve().parent
    _resolve_paths(cfg, base)
    problems.extend(_semantic_problems(cfg))
    if resolve_secrets:
        cfg.mqtt.resolve_secrets(base, ("mqtt",), problems)
        if cfg.mpm is not None:
            cfg.mpm.resolve_secrets(base, ("mpm",), problems)
        for i, key in enumerate(cfg.http.api_keys):
            key.resolve_secrets(base, ("http", "api_keys", i), problems)
        for i, eq in enumerate(cfg.equipment):
            if isinstance(eq.connection, SecretHolder):
                eq.connection.resolve_secrets(base, ("equipment", i, "connection"), problems)
    if problems:
        raise ConfigError(_format(problems, text))
    return cfg


def load_config(path: Path) -> AgentConfig:
    """Read and validate a config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError([f"{path}: cannot read: {reason}"]) from err
    return parse_config(text, path)
