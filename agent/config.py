"""Configuration: TOML parsed by tomllib, validated by pydantic models, errors located by line.

The sections and the whole file's model live here, with the entry points; each driver registers its own
models for `connection`, `tags` and `commands`. The checks are in `agent.config_check` (each equipment by
the model its `driver` names, each on its own, so that every problem of a file is reported at once) and
the problem lines in `agent.config_report`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr, field_validator, model_validator

from agent.config_check import (
    ROUTER_KINDS,
    SPARKPLUG_NAMESPACE,
    did_you_mean,
    equipment_list,
    equipment_variant,
    import_driver_modules,
    model_at,
    northbound_problems,
    read_secrets,
    resolve_paths,
    validate_model,
)
from agent.config_report import format_problems, one_line, syntax_error
from agent.errors import ConfigError
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
from drivers.sdk.net import check_url

# The generic equipment models live in the driver SDK; they and the checks' names stay importable here.
__all__ = [
    "ID_PATTERN",
    "ROUTER_KINDS",
    "AgentConfig",
    "AgentSection",
    "AlertConfig",
    "ApiKey",
    "CommandBase",
    "ConfigError",
    "EquipmentBase",
    "EquipmentConfig",
    "HttpSection",
    "Ident",
    "Model",
    "MpmSection",
    "MqttSection",
    "Problem",
    "Role",
    "SecretHolder",
    "SparkplugSection",
    "StatusConfig",
    "TagBase",
    "config_path",
    "equipment_variant",
    "load_config",
    "parse_config",
    "parse_listen",
    "validate_data",
]

DEFAULT_CONFIG = "/etc/edge-agent/agent.toml"
Profile = Literal["edge-agent", "sparkplug", "uns"]
SPARKPLUG_ID = r"^[^#+/\s]+$"  # a Sparkplug topic element: no wildcard, no level separator


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


class SparkplugSection(Model):
    """`[mqtt.sparkplug]`: the Sparkplug B edge node (with "sparkplug" in `[mqtt] profiles`)."""

    group_id: str | None = Field(None, pattern=SPARKPLUG_ID)  # default: the agent's site
    primary_host_id: str | None = Field(None, pattern=SPARKPLUG_ID)
    dcmd_enabled: bool = False
    history_window_s: float | None = Field(None, gt=0)  # default: 2.5x the keep-alive
    client_id: str | None = None  # default: the [mqtt] client id + "-sparkplug"


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
    # Northbound streams: today's contract and a UNS tree on this connection, a Sparkplug B edge node on its own.
    profiles: list[Profile] = Field(default_factory=lambda: list[Profile](["edge-agent"]))
    sparkplug: SparkplugSection = Field(default_factory=SparkplugSection)  # type: ignore[arg-type]

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one profile")
        if len(set(v)) != len(v):
            raise ValueError("a profile is named twice")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _not_sparkplug(cls, v: str) -> str:
        if v.split("/", 1)[0] == SPARKPLUG_NAMESPACE:
            raise ValueError(f"{SPARKPLUG_NAMESPACE} is the Sparkplug namespace, not a prefix for these topics")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_url(v, ("mqtt", "mqtts"))

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


def parse_config(text: str, path: Path, *, resolve_secrets: bool = True) -> AgentConfig:
    """Validate a config text; raise ConfigError with the contract's lines on any problem."""
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as err:
        raise ConfigError([f"{path.name}: {one_line(syntax_error(err, text))}"]) from None
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
    import_driver_modules(modules + env_modules, problems)

    base = path.resolve().parent
    fields = AgentConfig.model_fields
    for key in data:
        if key not in fields:
            problems.append(Problem((key,), "unknown key" + did_you_mean(key, fields)))
    sections: dict[str, Any] = {}
    for name, field in fields.items():
        if name == "equipment":
            continue
        if name not in data:
            if field.is_required():
                problems.append(Problem((name,), "field required"))
            continue
        model = model_at(AgentConfig, (name,))
        assert model is not None, name
        section = validate_model(model, data[name], (name,), problems)
        if section is not None:
            resolve_paths(section, base)
            if resolve_secrets:
                read_secrets(section, (name,), base, problems)
            sections[name] = section
    equipment, labels = equipment_list(data.get("equipment", []), base, problems, resolve_secrets=resolve_secrets)
    northbound_problems(data, sections, problems)
    if problems:
        raise ConfigError(format_problems(problems, text, labels))
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
