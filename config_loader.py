"""Reads and validates ``config.yaml`` into frozen dataclasses.

Both daemons load their configuration through this module exactly once (and
again only on an explicit reload), so everything downstream can trust it: a
value that reaches a daemon has the right type and an allowed value. Every
problem found is collected and reported together, one line each naming the
key, the bad value and what is allowed, because fixing a file one error per
restart is miserable. Unknown keys are errors: they are almost always typos
that would otherwise be silently ignored.

Secrets may come from the environment (``KPM33B_INTERNAL_USERNAME`` …), which
wins over the file, so that a world-readable ``config.yaml`` never has to hold
a password. The environment is passed in, never read here on the module's own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from data_mapping import PER_PHASE_GROUPS
from topics import METER_ID_PATTERN

ALLOWED_SECONDS_INTERVALS = (30, 60, 300, 600, 900, 1200, 1800, 3600)
ALLOWED_MINUTES_INTERVALS = (1, 5, 10, 15, 20, 30, 60, 1440)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# MQTT versions a broker connection may use: "auto" tries 5 and falls back to 3.1.1
# for the brokers that speak only that (see mqtt_client.ConnectionReporter).
PROTOCOL_AUTO = "auto"
PROTOCOL_5 = "5"
PROTOCOL_311 = "3.1.1"
PROTOCOLS = (PROTOCOL_AUTO, PROTOCOL_5, PROTOCOL_311)


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True)
class TlsSettings:
    """TLS towards a broker; ``None`` files mean the system's trust store."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class BrokerSettings:
    """Where a broker is and how to log in. The password never shows in repr."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsSettings | None = None
    keepalive_seconds: int = 60
    # Clean messages held while the broker is unreachable (central broker only).
    max_queued_messages: int = 100_000
    # One of PROTOCOLS. The internal broker defaults to "5": it is the shipped Mosquitto.
    protocol: str = PROTOCOL_AUTO


@dataclass(frozen=True)
class InternalTopics:
    """The meters' fixed topic names on the internal broker."""

    meter_seconds_data: str = "MQTT_RT_DATA"
    meter_minutes_data: str = "MQTT_ENY_NOW"
    meter_config: str = "MQTT_COMMOD_SET_"
    meter_config_ack: str = "MQTT_COMMOD_SET_REP"
    meter_time: str = "MQTT_SETTIME_"
    meter_time_ack: str = "MQTT_METER_TIME_REP"


@dataclass(frozen=True)
class CentralTopics:
    """The clean topic tree on the central broker."""

    external_main_topic: str = "kpm33b"


@dataclass(frozen=True)
class DeviceSettings:
    """Per-meter settings from ``meters.devices``; ``None`` means the default."""

    name: str | None = None
    upload_frequency_seconds: int | None = None
    upload_frequency_minutes: int | None = None
    # Per-phase groups (PER_PHASE_GROUPS) added to this meter's seconds payload
    # and Home Assistant entities, in canonical order.
    per_phase: tuple[str, ...] = ()
    max_power_kw: float | None = None
    # Whether this meter's minutes payload carries its exported energy (fygsz); None: meters.export_energy.
    export_energy: bool | None = None


# A rise of the energy counter faster than this power is taken for a glitch
# until the next reading confirms it (data_mapping's energy guard). Ten times
# what a directly connected 3 × 80 A meter can measure, and more than most
# current-transformer installations: generous, yet a value such as 1e9 kWh is
# never plausible. Set it per meter for larger installations.
DEFAULT_MAX_POWER_KW = 500.0


@dataclass(frozen=True)
class MeterSettings:
    """Upload intervals, reply timing, exclusions and per-meter overrides."""

    upload_frequency_seconds: int = 60
    upload_frequency_minutes: int = 1
    ack_timeout_seconds: float = 3.0
    max_clock_drift_seconds: int = 300
    clock_sync: bool = True
    exclude: frozenset[str] = frozenset()
    max_power_kw: float = DEFAULT_MAX_POWER_KW
    # Solar installations: the minutes payload adds active_energy_export (the meter's fygsz).
    export_energy: bool = False
    devices: Mapping[str, DeviceSettings] = field(default_factory=lambda: MappingProxyType({}))

    def seconds_interval(self, meter_id: str) -> int:
        """The RT_DATA interval (s) for one meter: its override, else the default."""
        device = self.devices.get(meter_id)
        if device is not None and device.upload_frequency_seconds is not None:
            return device.upload_frequency_seconds
        return self.upload_frequency_seconds

    def minutes_interval(self, meter_id: str) -> int:
        """The ENY_NOW interval (min) for one meter: its override, else the default."""
        device = self.devices.get(meter_id)
        if device is not None and device.upload_frequency_minutes is not None:
            return device.upload_frequency_minutes
        return self.upload_frequency_minutes

    def max_power(self, meter_id: str) -> float:
        """The fastest (kW) a meter's energy counter may plausibly rise: its override, else the default."""
        device = self.devices.get(meter_id)
        if device is not None and device.max_power_kw is not None:
            return device.max_power_kw
        return self.max_power_kw

    def exports_energy(self, meter_id: str) -> bool:
        """Whether a meter's minutes payload carries its exported energy: its override, else the default."""
        device = self.devices.get(meter_id)
        if device is not None and device.export_energy is not None:
            return device.export_energy
        return self.export_energy

    def device_name(self, meter_id: str) -> str:
        """The friendly name of a meter, ``KPM33B <id>`` unless configured."""
        device = self.devices.get(meter_id)
        if device is not None and device.name:
            return device.name
        return f"KPM33B {meter_id}"


@dataclass(frozen=True)
class HomeAssistantSettings:
    """Home Assistant MQTT discovery, published by the proxy on the central broker."""

    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    # Shown by Home Assistant as the support link of the discovering software.
    origin_url: str | None = None


@dataclass(frozen=True)
class LoggingSettings:
    """How much the daemons log."""

    level: str = "INFO"


# Above this many meters the retained device list (about 200 bytes per meter) is not published.
DEFAULT_DEVICE_LIST_MAX_METERS = 10_000


@dataclass(frozen=True)
class HealthSettings:
    """How often the daemons publish and log their counters; how large the device list may grow."""

    stats_interval_seconds: int = 60
    device_list_max_meters: int = DEFAULT_DEVICE_LIST_MAX_METERS


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration."""

    internal_broker: BrokerSettings = BrokerSettings(host="127.0.0.1", port=11883, protocol=PROTOCOL_5)
    central_broker: BrokerSettings = BrokerSettings(host="127.0.0.1", port=1883, protocol=PROTOCOL_AUTO)
    internal_broker_topics: InternalTopics = InternalTopics()
    central_broker_topics: CentralTopics = CentralTopics()
    meters: MeterSettings = MeterSettings()
    logging: LoggingSettings = LoggingSettings()
    homeassistant: HomeAssistantSettings = HomeAssistantSettings()
    health: HealthSettings = HealthSettings()


# --- validation -------------------------------------------------------------

Validator = Callable[[Any], Any]


class _Invalid(Exception):
    """Raised by a validator with what is allowed; the reader adds key and value."""


class _Section:
    """A mapping being read: remembers which keys were used, collects problems.

    ``readable`` is False when this mapping, or one it lies in, was not a
    mapping at all: that one problem is reported, not every key missing below it.
    """

    def __init__(self, data: object, path: str, problems: list[str], readable: bool = True) -> None:
        self.path = path
        self.problems = problems
        self.used: set[str] = set()
        self.readable = readable
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.append(f"{path or 'the document'}: {_show(data)} is not allowed; expected a mapping of keys")
            data = {}
            self.readable = False
        self.data: dict[Any, Any] = data

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, validator: Validator, default: Any, secret: bool = False) -> Any:
        """The validated value of ``key``, or ``default`` when absent or invalid.

        A ``secret`` value is never echoed in the problem, even when invalid.
        """
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        try:
            return validator(value)
        except _Invalid as allowed:
            shown = "the value (hidden)" if secret else _show(value)
            self.problems.append(f"{self.key_path(key)}: {shown} is not allowed; expected {allowed}")
            return default

    def section(self, key: str) -> _Section:
        self.used.add(key)
        return _Section(self.data.get(key), self.key_path(key), self.problems, self.readable)

    def require(self, key: str, problem: str) -> bool:
        """Report ``key`` with ``problem`` (what to set it to) when absent or null; whether it was.

        A default would silently mean something else, so the line must tell the
        operator what the value is, not only that it is missing. A reported key
        is not validated as well: ``host: null`` is one problem, not two.
        """
        if self.data.get(key) is not None:
            return False
        self.used.add(key)
        if self.readable:
            self.problems.append(f"{self.key_path(key)}: {problem}")
        return True

    def finish(self) -> None:
        """Report every key that nothing asked for: almost always a typo."""
        for key in self.data:
            if key not in self.used:
                known = ", ".join(sorted(self.used))
                self.problems.append(f"{self.key_path(str(key))}: unknown key; known keys here are {known}")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _integer(low: int, high: int) -> Validator:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Invalid(f"an integer from {low} to {high}")
        return value

    return check


def _one_of(allowed: tuple[int, ...]) -> Validator:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
            raise _Invalid("one of " + ", ".join(str(a) for a in allowed))
        return value

    return check


def _number(low: float, high: float) -> Validator:
    def check(value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not low < value <= high
        ):
            raise _Invalid(f"a number greater than {low} and at most {high}")
        return float(value)

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _unicode(value: str, expected: str) -> str:
    """``value`` if UTF-8 can carry it (MQTT's strings are UTF-8), else the problem.

    YAML's ``"\\uD800"`` escapes give a lone surrogate, which it cannot: a
    name, topic or user name with one would fail each time it is sent.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{expected} (valid Unicode: no lone surrogate)") from None
    return value


def _text(value: Any) -> str:
    expected = "a non-empty string without surrounding spaces"
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise _Invalid(expected)
    return _unicode(value, expected)


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    expected = "a non-empty string or null"
    if not isinstance(value, str) or not value:
        raise _Invalid(expected)
    return _unicode(value, expected)


def _protocol(value: Any) -> str:
    """``5`` may come as a YAML integer; ``3.1.1`` is always a string. Nothing else, not even ``5.0``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or value not in PROTOCOLS:
        raise _Invalid("one of " + ", ".join(PROTOCOLS))
    return value


def _host(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9A-Za-z.:\-_\[\]]{1,253}", value):
        raise _Invalid("an IPv4/IPv6 address or a host name")
    return value


def _topic_prefix(value: Any) -> str:
    """A topic or topic prefix we publish to or subscribe to: no wildcards."""
    expected = "a non-empty topic without '+', '#' or surrounding spaces"
    if (
        not isinstance(value, str)
        or not value
        or any(c in value for c in "+#\0")
        or value != value.strip()
    ):
        raise _Invalid(expected)
    return _unicode(value, expected)


def _main_topic(value: Any) -> str:
    value = _topic_prefix(value)
    if value.startswith("/") or value.endswith("/") or "//" in value:
        raise _Invalid("a topic without leading, trailing or doubled '/'")
    return value


def _meter_id(value: Any) -> str:
    if not isinstance(value, str) or not METER_ID_PATTERN.fullmatch(value):
        raise _Invalid("a meter id of 13 letters and digits, e.g. 33B1225950027")
    return value


def _per_phase(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or not all(isinstance(group, str) and group in PER_PHASE_GROUPS for group in value)
        or len(set(value)) != len(value)
    ):
        raise _Invalid("a list without duplicates of " + ", ".join(PER_PHASE_GROUPS))
    return tuple(group for group in PER_PHASE_GROUPS if group in value)


def _url(value: Any) -> str | None:
    if value is None:
        return None
    expected = "an http:// or https:// URL, or null"
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+\S*", value):
        raise _Invalid(expected)
    return _unicode(value, expected)


def _read_homeassistant(section: _Section) -> HomeAssistantSettings:
    defaults = HomeAssistantSettings()
    settings = HomeAssistantSettings(
        discovery=section.get("discovery", _boolean, defaults.discovery),
        discovery_prefix=section.get("discovery_prefix", _main_topic, defaults.discovery_prefix),
        origin_url=section.get("origin_url", _url, defaults.origin_url),
    )
    section.finish()
    return settings


def _read_health(section: _Section) -> HealthSettings:
    defaults = HealthSettings()
    settings = HealthSettings(
        stats_interval_seconds=section.get("stats_interval_seconds", _integer(1, 86400),
                                           defaults.stats_interval_seconds),
        device_list_max_meters=section.get("device_list_max_meters", _integer(0, 1_000_000),
                                           defaults.device_list_max_meters),
    )
    section.finish()
    return settings


def _log_level(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise _Invalid("one of " + ", ".join(LOG_LEVELS))
    return value.upper()


def _existing_file(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _Invalid("a file path or null")
    if not Path(value).is_file():
        raise _Invalid("an existing, readable file")
    return value


def _read_tls(section: _Section) -> TlsSettings | None:
    raw = section.data.get("tls", False)
    section.used.add("tls")
    if raw is False or raw is None:
        return None
    if raw is True:
        return TlsSettings()
    if not isinstance(raw, dict):
        section.problems.append(f"{section.key_path('tls')}: {_show(raw)} is not allowed; expected true, false "
                                "or a mapping with ca_file, cert_file and key_file")
        return None
    tls = section.section("tls")
    settings = TlsSettings(
        ca_file=tls.get("ca_file", _existing_file, None),
        cert_file=tls.get("cert_file", _existing_file, None),
        key_file=tls.get("key_file", _existing_file, None),
    )
    tls.finish()
    if isinstance(raw, dict) and ("cert_file" in raw) != ("key_file" in raw):
        section.problems.append(
            f"{tls.path}: cert_file and key_file go together; give both for a client certificate, or neither"
        )
    return settings


def _read_broker(section: _Section, default: BrokerSettings, env_prefix: str,
                 environ: Mapping[str, str], queued: bool = False, host_required: str | None = None) -> BrokerSettings:
    """One broker section; ``host_required`` (the problem reported without a host) makes the host a must."""
    host_missing = host_required is not None and section.require("host", host_required)
    username = section.get("username", _optional_text, None)
    password = section.get("password", _optional_text, None, secret=True)
    settings = BrokerSettings(
        host=default.host if host_missing else section.get("host", _host, default.host),
        port=section.get("port", _integer(1, 65535), default.port),
        username=environ.get(f"{env_prefix}_USERNAME") or username,
        password=environ.get(f"{env_prefix}_PASSWORD") or password,
        tls=_read_tls(section),
        keepalive_seconds=section.get("keepalive_seconds", _integer(5, 3600), default.keepalive_seconds),
        max_queued_messages=(section.get("max_queued_messages", _integer(1, 10_000_000), default.max_queued_messages)
                             if queued else default.max_queued_messages),
        protocol=section.get("protocol", _protocol, default.protocol),
    )
    section.finish()
    if settings.password is not None and settings.username is None:
        section.problems.append(f"{section.path}.password: a password needs a username too")
    return settings


def _read_topics(section: _Section, defaults: Any, validator: Validator) -> Any:
    values = {
        name: section.get(name, validator, getattr(defaults, name))
        for name in defaults.__dataclass_fields__
    }
    section.finish()
    return type(defaults)(**values)


def _read_meters(section: _Section) -> MeterSettings:
    defaults = MeterSettings()
    seconds = _one_of(ALLOWED_SECONDS_INTERVALS)
    minutes = _one_of(ALLOWED_MINUTES_INTERVALS)
    max_power = _number(0, 1_000_000)

    def meter_id_list(value: Any) -> frozenset[str]:
        if value is None:
            return frozenset()
        if not isinstance(value, list) or not all(
            isinstance(v, str) and METER_ID_PATTERN.fullmatch(v) for v in value
        ):
            raise _Invalid("a list of meter ids of 13 letters and digits")
        return frozenset(value)

    settings = {
        "upload_frequency_seconds": section.get("upload_frequency_seconds", seconds,
                                                defaults.upload_frequency_seconds),
        "upload_frequency_minutes": section.get("upload_frequency_minutes", minutes,
                                                defaults.upload_frequency_minutes),
        "ack_timeout_seconds": section.get("ack_timeout_seconds", _number(0, 60), defaults.ack_timeout_seconds),
        "max_clock_drift_seconds": section.get("max_clock_drift_seconds", _integer(1, 86400 * 366),
                                               defaults.max_clock_drift_seconds),
        "clock_sync": section.get("clock_sync", _boolean, defaults.clock_sync),
        "exclude": section.get("exclude", meter_id_list, frozenset()),
        "max_power_kw": section.get("max_power_kw", max_power, defaults.max_power_kw),
        "export_energy": section.get("export_energy", _boolean, defaults.export_energy),
    }
    devices_section = section.section("devices")
    devices: dict[str, DeviceSettings] = {}
    for meter_id in list(devices_section.data):
        key = str(meter_id)
        try:
            _meter_id(meter_id)
        except _Invalid as allowed:
            devices_section.used.add(meter_id)
            devices_section.problems.append(
                f"{devices_section.key_path(key)}: {_show(meter_id)} is not allowed as a key; expected {allowed}"
            )
            continue
        device = devices_section.section(key)
        devices[key] = DeviceSettings(
            name=device.get("name", _text, None),
            upload_frequency_seconds=device.get("upload_frequency_seconds", seconds, None),
            upload_frequency_minutes=device.get("upload_frequency_minutes", minutes, None),
            per_phase=device.get("per_phase", _per_phase, ()),
            max_power_kw=device.get("max_power_kw", max_power, None),
            export_energy=device.get("export_energy", _boolean, None),
        )
        device.finish()
    section.finish()
    return MeterSettings(devices=MappingProxyType(devices), **settings)


def parse_config(raw: object, environ: Mapping[str, str]) -> Config:
    """Validate an already-parsed YAML document; raise ConfigError listing every problem."""
    problems: list[str] = []
    root = _Section(raw, "", problems)
    defaults = Config()
    config = Config(
        internal_broker=_read_broker(root.section("internal_broker"), defaults.internal_broker,
                                     "KPM33B_INTERNAL", environ),
        # No default: an empty or cut-off file, or the shipped one, must not silently mean "the broker on
        # this machine" (Debian's own mosquitto package listens on 127.0.0.1:1883).
        central_broker=_read_broker(root.section("central_broker"), defaults.central_broker,
                                    "KPM33B_CENTRAL", environ, queued=True,
                                    host_required="not set; set it to the address (IP or host name) of your "
                                                  "existing MQTT broker, for example Home Assistant's"),
        internal_broker_topics=_read_topics(root.section("internal_broker_topics"), InternalTopics(),
                                            _topic_prefix),
        central_broker_topics=_read_topics(root.section("central_broker_topics"), CentralTopics(),
                                           _main_topic),
        meters=_read_meters(root.section("meters")),
        logging=_read_topics(root.section("logging"), LoggingSettings(), _log_level),
        homeassistant=_read_homeassistant(root.section("homeassistant")),
        health=_read_health(root.section("health")),
    )
    root.finish()
    if problems:
        raise ConfigError(problems)
    return config


def load_config(path: Path, environ: Mapping[str, str]) -> Config:
    """Read ``path`` and validate it; raise ConfigError listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([f"{path}: cannot be read ({error})"]) from None
    if not text.strip():
        # Truncated (a full disk, `> config.yaml`, an editor caught half-way): never the defaults.
        raise ConfigError([f"{path}: the file is empty"])
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from None
    return parse_config(raw, environ)


RESTART_ONLY_SECTIONS = ("internal_broker", "central_broker", "internal_broker_topics", "central_broker_topics")


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The sections of a reloaded configuration that only a restart applies (new connections, topics)."""
    return [name for name in RESTART_ONLY_SECTIONS if getattr(old, name) != getattr(new, name)]


def keep_connection_settings(old: Config, new: Config) -> Config:
    """``new`` with the sections only a restart applies taken from ``old``: what a running daemon uses."""
    return replace(new, **{name: getattr(old, name) for name in RESTART_ONLY_SECTIONS})


def describe(config: Config) -> str:
    """A one-line summary for the start-up log; secrets are redacted."""

    def broker(settings: BrokerSettings) -> str:
        login = f"{settings.username}:***@" if settings.username else ""
        scheme = "mqtts" if settings.tls else "mqtt"
        return f"{scheme}://{login}{settings.host}:{settings.port}"

    meters = config.meters
    return (
        f"internal broker {broker(config.internal_broker)}, central broker {broker(config.central_broker)}, "
        f"main topic '{config.central_broker_topics.external_main_topic}', "
        f"intervals {meters.upload_frequency_seconds} s / {meters.upload_frequency_minutes} min, "
        f"{len(meters.devices)} configured and {len(meters.exclude)} excluded meters"
    )


# --- command line shared by both daemons -----------------------------------
