"""Configuration: TOML parsed by tomllib, validated by pydantic models, errors located by line.

The generic parts of `[[equipment]]` live here; each driver module registers its own models for
`connection`, `tags` and `commands`. Each equipment is validated by the model its `driver` names (built
from the registry at load time), each on its own, so that every problem of a file is reported at once.
"""

from __future__ import annotations

import difflib
import importlib
import ipaddress
import os
import re
import tomllib
import types
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from agent.errors import ConfigError
from agent.tomlpos import KeyLocator, format_path
from agent.tomlpos import Path as ConfigPath
from drivers.sdk.config import (
    ID_PATTERN,
    AlertConfig,
    CommandBase,
    EquipmentBase,
    EquipmentConfig,
    Ident,
    Model,
    Problem,
    Role,
    SecretHolder,
    StatusConfig,
    TagBase,
)
from drivers.sdk.registry import get_driver, known_drivers

# The generic equipment models live in the driver SDK; they stay importable from here.
__all__ = [
    "ID_PATTERN",
    "AgentConfig",
    "AlertConfig",
    "CommandBase",
    "EquipmentBase",
    "EquipmentConfig",
    "Ident",
    "Model",
    "Problem",
    "Role",
    "SecretHolder",
    "StatusConfig",
    "TagBase",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG = "/etc/edge-agent/agent.toml"
# Command kinds the router runs itself, on any driver that has write commands.
ROUTER_KINDS = frozenset({"load_process"})
M = TypeVar("M", bound=BaseModel)


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
        """A mode without its credentials would send nothing and fail at the first call: refuse it here."""
        needs = {
            "api_key": [("api_key_file or api_key_env", self.api_key_file or self.api_key_env)],
            "bearer": [("token_file or token_env", self.token_file or self.token_env)],
            "oauth2": [
                ("token_url", self.token_url),
                ("client_id", self.client_id),
                ("client_secret_file or client_secret_env", self.client_secret_file or self.client_secret_env),
            ],
        }.get(self.auth, [])
        missing = [what for what, given in needs if not given]
        if missing:
            raise ValueError(
                f"auth = {self.auth!r} needs {' and '.join(missing)} (auth = 'none' for an MPM without credentials)"
            )
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


_variants: dict[type, type[EquipmentBase]] = {}


def equipment_variant(driver: str) -> type[EquipmentBase]:
    """The `[[equipment]]` model of one driver: the generic fields with the driver's own models."""
    cls = get_driver(driver)
    model = _variants.get(cls)
    if model is None:
        model = create_model(
            f"Equipment[{driver}]",
            __base__=EquipmentBase,
            driver=(Literal[driver], ...),  # type: ignore[arg-type]
            connection=(cls.connection_model, ...),
            tags=(list[cls.tag_model], Field(default_factory=list)),  # type: ignore[name-defined]
            commands=(list[cls.command_model], Field(default_factory=list)),  # type: ignore[name-defined]
        )
        _variants[cls] = model
    return model


def _import_driver_modules(modules: list[str], problems: list[Problem]) -> None:
    for i, mod in enumerate(modules):
        try:
            importlib.import_module(mod)
        except Exception as err:  # any import failure is a config problem, reported with its path
            problems.append(Problem(("agent", "driver_modules", i), f"cannot import driver module {mod!r}: {err}"))


def _unwrap(annotation: Any) -> Any:
    """`Annotated[X, ...]` and `X | None` -> X."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _model_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class that validates the value at `loc` below `model`, or None when it is not a model."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(part, int) and get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        elif isinstance(part, str) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif isinstance(part, str) and get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return None
    annotation = _unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _did_you_mean(word: str, names: Iterable[str]) -> str:
    """The suffix "; did you mean 'port'?" for a near miss among `names`, else ""."""
    close = difflib.get_close_matches(word, list(names), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _validate(model: type[M], value: Any, where: ConfigPath, problems: list[Problem]) -> M | None:
    """`value` validated by `model`, or None with every problem (each located below `where`) appended."""
    try:
        return model.model_validate(value)
    except ValidationError as err:
        for e in err.errors(include_input=False, include_url=False, include_context=False):
            loc = tuple(p for p in e["loc"] if p != "__root__")
            if e["type"] == "missing":
                msg = "field required"
            elif e["type"] == "extra_forbidden":
                parent = _model_at(model, loc[:-1])
                msg = "unknown key" + (_did_you_mean(str(loc[-1]), parent.model_fields) if parent else "")
            elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
                msg = "must be a table"  # pydantic's words name a Python class
            else:
                msg = e["msg"].removeprefix("Value error, ")
            # Model-level checks (one of two keys missing) carry no field: the table's path locates them.
            problems.append(Problem((*where, *loc), msg))
        return None


def _walk_models(obj: BaseModel, where: ConfigPath) -> Iterator[tuple[BaseModel, ConfigPath]]:
    """`obj` and every model below it, each with its path."""
    yield obj, where
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            yield from _walk_models(value, (*where, name))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _walk_models(item, (*where, name, i))


def _resolve_paths(obj: BaseModel, base: Path) -> None:
    """Make every relative path below `obj` absolute against the config file's folder."""
    for model, _ in _walk_models(obj, ()):
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, Path) and not value.is_absolute():
                setattr(model, name, base / value)


def _resolve_secrets(obj: BaseModel, where: ConfigPath, base: Path, problems: list[Problem]) -> None:
    """Read the secrets of every secret holder below `obj`."""
    for model, path in _walk_models(obj, where):
        if isinstance(model, SecretHolder):
            model.resolve_secrets(base, path, problems)


def _equipment_checks(eq: EquipmentBase) -> list[tuple[ConfigPath, str]]:
    """Cross-field checks of one validated equipment: (path below it, message) pairs."""
    driver = get_driver(eq.driver)
    out: list[tuple[ConfigPath, str]] = []
    tag_names: dict[str, int] = {}
    for j, tag in enumerate(eq.tags):
        if tag.name in tag_names:
            out.append((("tags", j, "name"), f"duplicate tag name {tag.name!r}"))
        tag_names.setdefault(tag.name, j)
    if eq.status is not None:
        for field, ref in eq.status.tag_refs().items():
            if ref not in tag_names and not driver.has_builtin_tag(ref):
                out.append((("status", field), f"unknown tag {ref!r}" + _did_you_mean(ref, tag_names)))
    for j, alert in enumerate(eq.alerts):
        if alert.tag not in tag_names and not driver.has_builtin_tag(alert.tag):
            out.append((("alerts", j, "tag"), f"unknown tag {alert.tag!r}" + _did_you_mean(alert.tag, tag_names)))
    cmd_names: set[str] = set()
    for j, cmd in enumerate(eq.commands):
        if cmd.name in cmd_names:
            out.append((("commands", j, "name"), f"duplicate command name {cmd.name!r}"))
        cmd_names.add(cmd.name)
        if cmd.kind not in driver.command_kinds and cmd.kind not in ROUTER_KINDS:
            out.append(
                (
                    ("commands", j, "kind"),
                    f"kind {cmd.kind!r} is not supported by driver {eq.driver!r} "
                    f"(supported: {', '.join(sorted(driver.command_kinds | ROUTER_KINDS))})",
                )
            )
        if cmd.tag is not None and cmd.tag not in tag_names:
            out.append((("commands", j, "tag"), f"unknown tag {cmd.tag!r}" + _did_you_mean(cmd.tag, tag_names)))
    for param, cmd_name in eq.parameters.items():
        cmd = eq.command(cmd_name)
        if cmd is None:
            out.append((("parameters", param), f"unknown command {cmd_name!r}"))
        elif cmd.kind != "write":
            out.append((("parameters", param), f"command {cmd_name!r} is not a write command"))
    out.extend(driver.check_equipment(eq))
    return out


def _equipment(
    item: Any, where: ConfigPath, base: Path, problems: list[Problem], *, resolve_secrets: bool
) -> EquipmentBase | None:
    """One `[[equipment]]` table validated and checked, or None when it has problems of its own fields.

    Without a usable driver only the generic fields are validated, so their problems are still reported.
    """
    driver = item.get("driver") if isinstance(item, dict) else None
    model: type[EquipmentBase] = EquipmentBase
    usable = False
    if isinstance(driver, str):
        if driver not in known_drivers():
            problems.append(
                Problem(
                    (*where, "driver"),
                    f"unknown driver {driver!r} (known: {', '.join(known_drivers())})"
                    + _did_you_mean(driver, known_drivers()),
                )
            )
        else:
            try:
                model = equipment_variant(driver)
                usable = True
            except Exception as err:  # a driver module that fails on import is this equipment's problem
                problems.append(Problem((*where, "driver"), f"driver {driver!r} failed to load: {err}"))
    eq = _validate(model, item, where, problems)
    if eq is None or not usable:
        return None
    _resolve_paths(eq, base)
    problems.extend(Problem((*where, *sub), msg) for sub, msg in _equipment_checks(eq))
    if resolve_secrets:
        _resolve_secrets(eq, where, base, problems)
    return eq


def _valid_id(value: Any) -> str | None:
    if isinstance(value, str) and len(value) <= 128 and re.fullmatch(ID_PATTERN, value):
        return value
    return None


def _equipment_list(
    raw: Any, base: Path, problems: list[Problem], *, resolve_secrets: bool
) -> tuple[list[EquipmentBase], dict[ConfigPath, str]]:
    """Every `[[equipment]]` validated on its own, so one equipment's problems never hide another's.

    Also returns the labels for problem paths: an equipment is named by its id when that id is valid,
    unique and not a number (which would read as an index), else by its index.
    """
    if not isinstance(raw, list):
        problems.append(Problem(("equipment",), "must be an array of tables ([[equipment]])"))
        return [], {}
    ids = [_valid_id(item.get("id")) if isinstance(item, dict) else None for item in raw]
    counts = Counter(i for i in ids if i)
    labels: dict[ConfigPath, str] = {
        ("equipment", i): eid for i, eid in enumerate(ids) if eid and counts[eid] == 1 and not eid.isdigit()
    }
    first: dict[str, int] = {}
    for i, eid in enumerate(ids):
        if eid is not None and eid in first:
            problems.append(
                Problem(("equipment", i, "id"), f"duplicate equipment id {eid!r} (also equipment[{first[eid]}])")
            )
        elif eid is not None:
            first[eid] = i
    equipment = []
    for i, item in enumerate(raw):
        eq = _equipment(item, ("equipment", i), base, problems, resolve_secrets=resolve_secrets)
        if eq is not None:
            equipment.append(eq)
    return equipment, labels


def _format(problems: list[Problem], text: str | None, labels: dict[ConfigPath, str]) -> list[str]:
    """The contract's lines, in the order of the file.

    A problem is located at its key, else at the nearest enclosing table, else at line 1 (an empty file,
    a missing top-level table). Without a TOML text (the Python API) there are no lines.
    """
    if text is None:
        return [f"{format_path(p.path, labels) or 'agent.toml'}: {_one_line(p.message)}" for p in problems]
    # Keys are located only when there is something to report: a valid file never pays for it.
    locator = KeyLocator(text)
    located = []
    for p in problems:
        line = locator.line_of(p.path) or 1
        located.append((line, f"{format_path(p.path, labels) or 'agent.toml'}: {_one_line(p.message)} (line {line})"))
    located.sort(key=lambda item: item[0])
    return [msg for _, msg in located]


def _one_line(text: str) -> str:
    """Control characters and line separators escaped: one problem is always one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _syntax_error(err: Exception, text: str) -> str:
    """A TOML syntax error as "message (line N, column M)"."""
    if isinstance(err, RecursionError):
        # tomllib recurses per nested array or inline table; point at the first deep run of openers.
        m = re.search(r"(?:[\[{]\s*){64}", text)
        pos = m.start() if m else 0
        line = text.count("\n", 0, pos) + 1
        column = pos - text.rfind("\n", 0, pos)
        return f"values nested too deeply (line {line}, column {column})"
    # tomllib says "... (at line N, column M)" or "... (at end of document)".
    msg = str(err)
    if m := re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg):
        return f"{msg[: m.start()]} (line {m.group(1)}, column {m.group(2)})"
    if m := re.search(r"\s*\(at end of document\)$", msg):
        lines = text.split("\n")
        return f"{msg[: m.start()]} (line {len(lines)}, column {len(lines[-1]) + 1})"
    return f"{msg} (line 1, column 1)"


def parse_config(text: str, path: Path, *, resolve_secrets: bool = True) -> AgentConfig:
    """Validate a config text; raise ConfigError with the contract's lines on any problem."""
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as err:
        raise ConfigError([f"{path.name}: {_one_line(_syntax_error(err, text))}"]) from None
    return validate_data(data, path, text, resolve_secrets=resolve_secrets)


def validate_data(
    data: dict[str, Any], path: Path, text: str | None = None, *, resolve_secrets: bool = True
) -> AgentConfig:
    """Validate an already parsed config and report every problem at once.

    `path` anchors relative paths; `text` (the TOML) gives line numbers. Each top-level table and each
    equipment is validated on its own, and the cross-field checks run for every equipment whose own fields
    are valid, so no problem hides another.
    """
    problems: list[Problem] = []
    agent = data.get("agent")
    modules: list[str] = []
    if isinstance(agent, dict) and isinstance(agent.get("driver_modules"), list):
        modules = [m for m in agent["driver_modules"] if isinstance(m, str)]
    env_modules = [m.strip() for m in os.environ.get("EDGE_AGENT_DRIVER_MODULES", "").split(",") if m.strip()]
    _import_driver_modules(modules + env_modules, problems)

    base = path.resolve().parent
    fields = AgentConfig.model_fields
    for key in data:
        if key not in fields:
            problems.append(Problem((key,), "unknown key" + _did_you_mean(key, fields)))
    sections: dict[str, Any] = {}
    for name, field in fields.items():
        if name == "equipment":
            continue
        if name not in data:
            if field.is_required():
                problems.append(Problem((name,), "field required"))
            continue
        model = _model_at(AgentConfig, (name,))
        assert model is not None, name
        section = _validate(model, data[name], (name,), problems)
        if section is not None:
            _resolve_paths(section, base)
            if resolve_secrets:
                _resolve_secrets(section, (name,), base, problems)
            sections[name] = section
    equipment, labels = _equipment_list(data.get("equipment", []), base, problems, resolve_secrets=resolve_secrets)
    if problems:
        raise ConfigError(_format(problems, text, labels))
    # Validated models are taken as they are (pydantic does not revalidate instances): no second pass.
    cfg = AgentConfig.model_validate({**sections, "equipment": equipment})
    cfg._path = path
    return cfg


def load_config(path: Path) -> AgentConfig:
    """Read and validate a config file."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror or err}"]) from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        start = raw.rfind(b"\n", 0, err.start) + 1
        column = len(raw[start : err.start].decode("utf-8", errors="replace")) + 1
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError([f"{path.name}: not UTF-8 text (line {line}, column {column})"]) from None
    return parse_config(text, path)
