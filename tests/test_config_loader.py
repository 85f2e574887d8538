"""Unit tests of config_loader: defaults, every validation, problems reported together, secrets kept out of logs."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

from config_loader import (
    ALLOWED_MINUTES_INTERVALS,
    ALLOWED_SECONDS_INTERVALS,
    BrokerSettings,
    CentralTopics,
    Config,
    ConfigError,
    DeviceSettings,
    InternalTopics,
    LoggingSettings,
    MeterSettings,
    TlsSettings,
    describe,
    load_config,
    parse_config,
)
from daemon import EXIT_CONFIG_ERROR, CommandLine, load_or_exit, parse_command_line

ROOT = Path(__file__).resolve().parent.parent
METER = "33B1225950027"
OTHER_METER = "33B1225950028"
SECONDS_ALLOWED = "one of 30, 60, 300, 600, 900, 1200, 1800, 3600"
MINUTES_ALLOWED = "one of 1, 5, 10, 15, 20, 30, 60, 1440"
PORT_ALLOWED = "an integer from 1 to 65535"
# The top-level sections: those of the design, and any added since.
ROOT_KNOWN = ", ".join(sorted(Config.__dataclass_fields__))
DEVICE_KNOWN = ", ".join(sorted(DeviceSettings.__dataclass_fields__))
# The one line an installation sees until it names its central broker.
CENTRAL_HOST_PROBLEM = ("central_broker.host: not set; set it to the address (IP or host name) of your existing "
                        "MQTT broker, for example Home Assistant's")


def with_central_host(document: object) -> object:
    """The document with ``central_broker.host`` (required) added, unless it sets one or is no mapping.

    Most tests here are about other keys: this keeps their documents minimal.
    The tests of the required key itself read files, which get nothing added.
    """
    if document is None:
        document = {}
    if not isinstance(document, dict):
        return document
    central = document.get("central_broker")
    if central is None:
        return {**document, "central_broker": {"host": "127.0.0.1"}}
    if isinstance(central, dict) and "host" not in central:
        return {**document, "central_broker": {"host": "127.0.0.1", **central}}
    return document


def parse(text: str, environ: dict[str, str] | None = None) -> Config:
    """Parse YAML text as config_loader would after reading the file (central_broker.host added)."""
    return parse_config(with_central_host(yaml.safe_load(textwrap.dedent(text))), environ or {})


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    """The problem lines of an invalid configuration."""
    with pytest.raises(ConfigError) as error:
        parse(text, environ)
    return list(error.value.problems)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- defaults ------------------------------------------------------------------------


def test_file_with_only_the_central_broker_host_gives_the_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "central_broker: {host: 127.0.0.1}\n"), {})

    assert config == Config()
    assert config == Config(
        internal_broker=BrokerSettings(host="127.0.0.1", port=11883, username=None, password=None, tls=None,
                                       protocol="5"),
        central_broker=BrokerSettings(host="127.0.0.1", port=1883, username=None, password=None, tls=None,
                                      protocol="auto"),
        internal_broker_topics=InternalTopics(
            meter_seconds_data="MQTT_RT_DATA", meter_minutes_data="MQTT_ENY_NOW", meter_config="MQTT_COMMOD_SET_",
            meter_config_ack="MQTT_COMMOD_SET_REP", meter_time="MQTT_SETTIME_", meter_time_ack="MQTT_METER_TIME_REP",
        ),
        central_broker_topics=CentralTopics(external_main_topic="kpm33b"),
        meters=MeterSettings(upload_frequency_seconds=60, upload_frequency_minutes=1, ack_timeout_seconds=3.0,
                             exclude=frozenset(), devices=MappingProxyType({})),
        logging=LoggingSettings(level="INFO"),
    )


def test_empty_sections_give_the_defaults() -> None:
    config = parse("""
        internal_broker:
        central_broker: {}
        internal_broker_topics:
        central_broker_topics:
        meters: {devices: null, exclude: null}
        logging:
    """)

    assert config == Config()


def test_shipped_config_is_refused_with_one_line_saying_to_set_the_central_broker() -> None:
    """Installed as it is, it must not reach whatever broker listens on this machine's 1883."""
    with pytest.raises(ConfigError) as error:
        load_config(ROOT / "config.yaml", {})

    assert error.value.problems == (CENTRAL_HOST_PROBLEM,)


def test_shipped_config_with_the_central_broker_set_equals_the_defaults() -> None:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    assert raw["central_broker"]["host"] is None
    raw["central_broker"]["host"] = "127.0.0.1"

    assert parse_config(raw, {}) == Config()


def test_shipped_config_sets_every_key_of_the_design() -> None:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))

    assert set(raw) >= {"internal_broker", "central_broker", "internal_broker_topics", "central_broker_topics",
                        "meters", "logging"}
    for broker in ("internal_broker", "central_broker"):
        assert {"host", "port", "username", "password"} <= set(raw[broker])
    assert set(raw["internal_broker_topics"]) == {
        "meter_seconds_data", "meter_minutes_data", "meter_config", "meter_config_ack", "meter_time",
        "meter_time_ack",
    }
    assert {"upload_frequency_seconds", "upload_frequency_minutes", "ack_timeout_seconds", "exclude",
            "devices"} <= set(raw["meters"])


def test_full_configuration_is_read_into_frozen_settings(tmp_path: Path) -> None:
    ca_file = write(tmp_path, "ca", "ca.crt")
    config = parse(f"""
        internal_broker: {{host: 10.0.0.5, port: 11884, username: proxy, password: inner}}
        central_broker:
          host: broker.example.org
          port: 8883
          username: ha
          password: outer
          tls: {{ca_file: {ca_file}}}
        internal_broker_topics: {{meter_seconds_data: RT, meter_minutes_data: ENY}}
        central_broker_topics: {{external_main_topic: home/energy}}
        meters:
          upload_frequency_seconds: 300
          upload_frequency_minutes: 15
          ack_timeout_seconds: 7.5
          exclude: ["{OTHER_METER}"]
          devices:
            "{METER}": {{name: Heat pump, upload_frequency_seconds: 30}}
        logging: {{level: debug}}
    """)

    assert config.internal_broker == BrokerSettings(host="10.0.0.5", port=11884, username="proxy", password="inner",
                                                    protocol="5")
    assert config.central_broker == BrokerSettings(host="broker.example.org", port=8883, username="ha",
                                                   password="outer", tls=TlsSettings(ca_file=str(ca_file)))
    assert config.internal_broker_topics == InternalTopics(meter_seconds_data="RT", meter_minutes_data="ENY")
    assert config.central_broker_topics == CentralTopics(external_main_topic="home/energy")
    assert config.meters == MeterSettings(
        upload_frequency_seconds=300, upload_frequency_minutes=15, ack_timeout_seconds=7.5,
        exclude=frozenset({OTHER_METER}),
        devices=MappingProxyType({METER: DeviceSettings(name="Heat pump", upload_frequency_seconds=30)}),
    )
    assert config.logging == LoggingSettings(level="DEBUG")
    with pytest.raises(AttributeError):
        config.central_broker.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.meters.devices["33B1225950099"] = DeviceSettings()  # type: ignore[index]


# --- what must be there ----------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n", "   \n\n"])
def test_empty_file_is_a_problem(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as error:
        load_config(path, {})

    assert error.value.problems == (f"{path}: the file is empty",)


@pytest.mark.parametrize("text", ["internal_broker:\n", "# nothing configured yet\n",
                                  "central_broker: {port: 1883}\n", "central_broker:\n",
                                  "central_broker: {host: null}\n"])
def test_file_without_the_central_broker_host_is_a_problem_naming_that_key(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), {})

    assert error.value.problems == (CENTRAL_HOST_PROBLEM,)


def test_check_config_of_an_empty_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "")

    with pytest.raises(SystemExit) as exit_info:
        load_or_exit(CommandLine(config_path=path, check_only=True), {})

    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"Invalid configuration {path}:", f"  {path}: the file is empty"]


# --- validation of single values -----------------------------------------------------


@pytest.mark.parametrize(("port", "shown"), [("0", "0"), ("65536", "65536"), ('"1883"', "'1883'"),
                                             ("true", "True"), ("-1", "-1"), ("1883.0", "1883.0"),
                                             ("null", "None")])
@pytest.mark.parametrize("broker", ["internal_broker", "central_broker"])
def test_port_outside_1_to_65535_or_not_an_integer_is_a_problem(broker: str, port: str, shown: str) -> None:
    assert problems(f"{broker}: {{port: {port}}}") == [
        f"{broker}.port: {shown} is not allowed; expected {PORT_ALLOWED}"
    ]


@pytest.mark.parametrize("port", [1, 1883, 65535])
def test_port_from_1_to_65535_is_accepted(port: int) -> None:
    assert parse(f"central_broker: {{port: {port}}}").central_broker.port == port


@pytest.mark.parametrize("host", ["127.0.0.1", "broker.example.org", "mqtt-1.local", "::1"])
def test_host_names_and_addresses_are_accepted(host: str) -> None:
    assert parse(f'central_broker: {{host: "{host}"}}').central_broker.host == host


@pytest.mark.parametrize(("host", "shown"), [('""', "''"), ('"broker example"', "'broker example'"),
                                             ("1883", "1883"), ('"mqtt://broker"', "'mqtt://broker'")])
def test_host_that_is_not_an_address_or_name_is_a_problem(host: str, shown: str) -> None:
    assert problems(f"central_broker: {{host: {host}}}") == [
        f"central_broker.host: {shown} is not allowed; expected an IPv4/IPv6 address or a host name"
    ]


@pytest.mark.parametrize("interval", ALLOWED_SECONDS_INTERVALS)
def test_each_allowed_seconds_interval_is_accepted(interval: int) -> None:
    assert parse(f"meters: {{upload_frequency_seconds: {interval}}}").meters.upload_frequency_seconds == interval


@pytest.mark.parametrize("interval", ALLOWED_MINUTES_INTERVALS)
def test_each_allowed_minutes_interval_is_accepted(interval: int) -> None:
    assert parse(f"meters: {{upload_frequency_minutes: {interval}}}").meters.upload_frequency_minutes == interval


@pytest.mark.parametrize(("value", "shown"), [("45", "45"), ("0", "0"), ("1", "1"), ('"60"', "'60'"),
                                              ("60.0", "60.0"), ("true", "True")])
def test_seconds_interval_not_in_the_set_is_a_problem(value: str, shown: str) -> None:
    assert problems(f"meters: {{upload_frequency_seconds: {value}}}") == [
        f"meters.upload_frequency_seconds: {shown} is not allowed; expected {SECONDS_ALLOWED}"
    ]


@pytest.mark.parametrize(("value", "shown"), [("2", "2"), ("0", "0"), ("3600", "3600"), ('"1"', "'1'"),
                                              ("true", "True")])
def test_minutes_interval_not_in_the_set_is_a_problem(value: str, shown: str) -> None:
    assert problems(f"meters: {{upload_frequency_minutes: {value}}}") == [
        f"meters.upload_frequency_minutes: {shown} is not allowed; expected {MINUTES_ALLOWED}"
    ]


@pytest.mark.parametrize(("value", "shown"), [("0", "0"), ("-1", "-1"), ("61", "61"), ('"3"', "'3'"),
                                              (".nan", "nan"), ("true", "True")])
def test_ack_timeout_outside_0_to_60_is_a_problem(value: str, shown: str) -> None:
    assert problems(f"meters: {{ack_timeout_seconds: {value}}}") == [
        f"meters.ack_timeout_seconds: {shown} is not allowed; expected a number greater than 0 and at most 60"
    ]


def test_per_device_overrides_are_validated_like_the_defaults() -> None:
    assert problems(f"""
        meters:
          devices:
            "{METER}": {{upload_frequency_seconds: 45, upload_frequency_minutes: 2, name: ""}}
    """) == [
        f"meters.devices.{METER}.name: '' is not allowed; expected a non-empty string without surrounding spaces",
        f"meters.devices.{METER}.upload_frequency_seconds: 45 is not allowed; expected {SECONDS_ALLOWED}",
        f"meters.devices.{METER}.upload_frequency_minutes: 2 is not allowed; expected {MINUTES_ALLOWED}",
    ]


def test_text_that_is_not_valid_unicode_is_a_problem_not_a_crash_when_it_is_sent() -> None:
    # YAML's "\uD800" is a lone surrogate, which UTF-8 (and so MQTT) cannot carry: a device name or a
    # user name with one would fail each time it is sent, not once when the file is read.
    assert problems(f"""
        central_broker: {{username: "ha\\uDC00"}}
        homeassistant: {{discovery_prefix: "home\\uDC00"}}
        meters:
          devices:
            "{METER}": {{name: "Heat\\uD800pump"}}
    """) == [
        "central_broker.username: 'ha\\udc00' is not allowed; expected a non-empty string or null "
        "(valid Unicode: no lone surrogate)",
        f"meters.devices.{METER}.name: 'Heat\\ud800pump' is not allowed; expected a non-empty string without "
        "surrounding spaces (valid Unicode: no lone surrogate)",
        "homeassistant.discovery_prefix: 'home\\udc00' is not allowed; expected a non-empty topic without '+', "
        "'#' or surrounding spaces (valid Unicode: no lone surrogate)",
    ]


@pytest.mark.parametrize(("key", "shown"), [('"33B12259500/7"', "'33B12259500/7'"), ("heatpump", "'heatpump'"),
                                            ('"33B122595002"', "'33B122595002'"),
                                            ('"33B12259500270"', "'33B12259500270'"),
                                            ("123", "123")])
def test_device_key_that_is_not_a_meter_id_is_a_problem(key: str, shown: str) -> None:
    path_key = shown.strip("'")
    assert problems(f"meters: {{devices: {{{key}: {{name: Heat pump}}}}}}") == [
        f"meters.devices.{path_key}: {shown} is not allowed as a key; "
        "expected a meter id of 13 letters and digits, e.g. 33B1225950027"
    ]


def test_per_phase_groups_are_read_in_canonical_order() -> None:
    config = parse(f'meters: {{devices: {{"{METER}": {{per_phase: [power_factor, voltage]}}}}}}')

    assert config.meters.devices[METER] == DeviceSettings(per_phase=("voltage", "power_factor"))


@pytest.mark.parametrize(("per_phase", "shown"), [
    ("[voltage, voltage]", "['voltage', 'voltage']"),
    ("[frequency]", "['frequency']"),
    ("voltage", "'voltage'"),
    ("[[voltage]]", "[['voltage']]"),
])
def test_per_phase_that_is_not_a_list_of_known_groups_is_a_problem(per_phase: str, shown: str) -> None:
    assert problems(f'meters: {{devices: {{"{METER}": {{per_phase: {per_phase}}}}}}}') == [
        f"meters.devices.{METER}.per_phase: {shown} is not allowed; "
        "expected a list without duplicates of voltage, current, power, power_factor"
    ]


def test_device_without_settings_uses_the_defaults() -> None:
    config = parse(f'meters: {{devices: {{"{METER}": null}}}}')

    assert dict(config.meters.devices) == {METER: DeviceSettings()}
    assert config.meters.seconds_interval(METER) == 60


@pytest.mark.parametrize(("exclude", "shown"), [
    ('["33B12259500/7"]', "['33B12259500/7']"),
    (f'["{METER}", "short"]', f"['{METER}', 'short']"),
    (f'"{METER}"', f"'{METER}'"),
    ("[3312259500270]", "[3312259500270]"),
])
def test_exclude_entry_that_is_not_a_meter_id_is_a_problem(exclude: str, shown: str) -> None:
    assert problems(f"meters: {{exclude: {exclude}}}") == [
        f"meters.exclude: {shown} is not allowed; expected a list of meter ids of 13 letters and digits"
    ]


def test_exclude_list_is_read_as_a_set_of_meter_ids() -> None:
    config = parse(f'meters: {{exclude: ["{METER}", "{OTHER_METER}", "{METER}"]}}')

    assert config.meters.exclude == frozenset({METER, OTHER_METER})


@pytest.mark.parametrize(("text", "line"), [
    ("foo: 1", f"foo: unknown key; known keys here are {ROOT_KNOWN}"),
    ("logging: {levle: INFO}", "logging.levle: unknown key; known keys here are level"),
    ("central_broker_topics: {main_topic: x}",
     "central_broker_topics.main_topic: unknown key; known keys here are external_main_topic"),
    ("internal_broker_topics: {meter_data: x}",
     "internal_broker_topics.meter_data: unknown key; known keys here are meter_config, meter_config_ack, "
     "meter_minutes_data, meter_seconds_data, meter_time, meter_time_ack"),
    (f'meters: {{devices: {{"{METER}": {{nmae: x}}}}}}',
     f"meters.devices.{METER}.nmae: unknown key; known keys here are {DEVICE_KNOWN}"),
    ("central_broker: {tls: {ca: x}}", "central_broker.tls.ca: unknown key; known keys here are ca_file, "
                                       "cert_file, key_file"),
])
def test_unknown_key_is_a_problem_naming_the_known_keys(text: str, line: str) -> None:
    assert problems(text) == [line]


@pytest.mark.parametrize("section", ["internal_broker", "central_broker", "meters"])
def test_unknown_key_in_broker_and_meter_sections_is_a_problem(section: str) -> None:
    (line,) = problems(f"{section}: {{prot: 1883}}")

    assert line.startswith(f"{section}.prot: unknown key; known keys here are ")
    known = line.split("known keys here are ")[1].split(", ")
    assert known == sorted(known)
    assert ("port" in known) is (section != "meters")
    assert ("upload_frequency_seconds" in known) is (section == "meters")


@pytest.mark.parametrize(("text", "line"), [
    ("meters: [1, 2]", "meters: [1, 2] is not allowed; expected a mapping of keys"),
    ("central_broker: broker.example.org",
     "central_broker: 'broker.example.org' is not allowed; expected a mapping of keys"),
    ("meters: {devices: [33B1225950027]}",
     "meters.devices: ['33B1225950027'] is not allowed; expected a mapping of keys"),
])
def test_section_that_is_not_a_mapping_is_a_problem(text: str, line: str) -> None:
    assert problems(text) == [line]


def test_document_that_is_not_a_mapping_is_a_problem() -> None:
    (line,) = problems("- internal_broker\n- central_broker\n")

    assert "['internal_broker', 'central_broker'] is not allowed; expected a mapping of keys" in line


# --- TLS and log-in --------------------------------------------------------------------


def test_tls_false_or_absent_means_plain_mqtt() -> None:
    assert parse("central_broker: {tls: false}").central_broker.tls is None
    assert parse("central_broker: {tls: null}").central_broker.tls is None
    assert parse("central_broker: {}").central_broker.tls is None


def test_tls_true_means_the_system_trust_store() -> None:
    assert parse("central_broker: {tls: true}").central_broker.tls == TlsSettings()


def test_tls_mapping_with_existing_files_is_read(tmp_path: Path) -> None:
    ca, cert, key = (write(tmp_path, name, name) for name in ("ca.crt", "client.crt", "client.key"))

    config = parse(f"central_broker: {{tls: {{ca_file: {ca}, cert_file: {cert}, key_file: {key}}}}}")

    assert config.central_broker.tls == TlsSettings(ca_file=str(ca), cert_file=str(cert), key_file=str(key))


def test_tls_file_that_does_not_exist_is_a_problem(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.crt"

    assert problems(f"central_broker: {{tls: {{ca_file: {missing}}}}}") == [
        f"central_broker.tls.ca_file: '{missing}' is not allowed; expected an existing, readable file"
    ]


def test_tls_file_that_is_a_directory_is_a_problem(tmp_path: Path) -> None:
    assert problems(f"central_broker: {{tls: {{ca_file: {tmp_path}}}}}") == [
        f"central_broker.tls.ca_file: '{tmp_path}' is not allowed; expected an existing, readable file"
    ]


def test_client_certificate_without_key_is_a_problem(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert", "client.crt")

    assert problems(f"central_broker: {{tls: {{cert_file: {cert}}}}}") == [
        "central_broker.tls: cert_file and key_file go together; give both for a client certificate, or neither"
    ]


def test_client_key_without_certificate_is_a_problem(tmp_path: Path) -> None:
    key = write(tmp_path, "key", "client.key")

    assert problems(f"internal_broker: {{tls: {{key_file: {key}}}}}") == [
        "internal_broker.tls: cert_file and key_file go together; give both for a client certificate, or neither"
    ]


def test_tls_that_is_neither_a_boolean_nor_a_mapping_is_a_problem() -> None:
    (line,) = problems('central_broker: {tls: "yes please"}')

    assert line.startswith("central_broker.tls: 'yes please' is not allowed; expected ")


# --- MQTT protocol version -----------------------------------------------------------


PROTOCOL_ALLOWED = "one of auto, 5, 3.1.1"


def test_protocol_defaults_to_auto_centrally_and_5_internally() -> None:
    config = parse("central_broker: {}")

    assert config.central_broker.protocol == "auto"
    assert config.internal_broker.protocol == "5"


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("5", "5"), ('"5"', "5"), ("3.1.1", "3.1.1"),
                                                 ('"3.1.1"', "3.1.1")])
@pytest.mark.parametrize("broker", ["internal_broker", "central_broker"])
def test_each_allowed_protocol_is_accepted(broker: str, value: str, expected: str) -> None:
    assert getattr(parse(f"{broker}: {{protocol: {value}}}"), broker).protocol == expected


@pytest.mark.parametrize(("value", "shown"), [("3", "3"), ("5.0", "5.0"), ("3.1", "3.1"), ("mqtt5", "'mqtt5'"),
                                              ("AUTO", "'AUTO'"), ("null", "None"), ("true", "True"),
                                              ('"3.1.1 "', "'3.1.1 '")])
@pytest.mark.parametrize("broker", ["internal_broker", "central_broker"])
def test_any_other_protocol_is_a_problem_naming_the_allowed_ones(broker: str, value: str, shown: str) -> None:
    assert problems(f"{broker}: {{protocol: {value}}}") == [
        f"{broker}.protocol: {shown} is not allowed; expected {PROTOCOL_ALLOWED}"
    ]


def test_check_config_rejects_an_unknown_protocol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "central_broker: {host: 127.0.0.1, protocol: 4}\n")

    with pytest.raises(SystemExit) as exit_info:
        load_or_exit(CommandLine(config_path=path, check_only=True), {})

    assert exit_info.value.code == EXIT_CONFIG_ERROR
    assert capsys.readouterr().err.splitlines() == [
        f"Invalid configuration {path}:", f"  central_broker.protocol: 4 is not allowed; expected {PROTOCOL_ALLOWED}"]


def test_password_without_username_is_a_problem() -> None:
    assert problems("central_broker: {password: secret}") == [
        "central_broker.password: a password needs a username too"
    ]


def test_username_without_password_is_accepted() -> None:
    assert parse("central_broker: {username: ha}").central_broker == BrokerSettings(
        host="127.0.0.1", port=1883, username="ha", password=None)


def test_invalid_password_is_not_echoed_in_the_problem() -> None:
    # An unquoted numeric password is a YAML integer: the problem must say so
    # without printing the secret into the terminal or the journal.
    (line,) = problems("central_broker: {username: ha, password: 73104682}")

    assert line.startswith("central_broker.password: ")
    assert "73104682" not in line


# --- logging and topics ----------------------------------------------------------------


@pytest.mark.parametrize(("level", "expected"), [("info", "INFO"), ("Debug", "DEBUG"), ("WARNING", "WARNING"),
                                                 ("error", "ERROR"), ("critical", "CRITICAL")])
def test_logging_level_is_case_insensitive(level: str, expected: str) -> None:
    assert parse(f"logging: {{level: {level}}}").logging == LoggingSettings(level=expected)


@pytest.mark.parametrize(("level", "shown"), [("verbose", "'verbose'"), ("10", "10"), ("WARN", "'WARN'")])
def test_unknown_logging_level_is_a_problem(level: str, shown: str) -> None:
    assert problems(f"logging: {{level: {level}}}") == [
        f"logging.level: {shown} is not allowed; expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    ]


@pytest.mark.parametrize("topic", ["MQTT_RT_DATA/#", "+/RT", "MQTT#", " MQTT_RT_DATA", ""])
def test_internal_topic_with_wildcard_or_spaces_is_a_problem(topic: str) -> None:
    assert problems(f'internal_broker_topics: {{meter_seconds_data: "{topic}"}}') == [
        f"internal_broker_topics.meter_seconds_data: {topic!r} is not allowed; "
        "expected a non-empty topic without '+', '#' or surrounding spaces"
    ]


@pytest.mark.parametrize("topic", ["kpm33b/#", "kpm+33b", "kpm33b/+/seconds"])
def test_main_topic_with_wildcard_is_a_problem(topic: str) -> None:
    assert problems(f'central_broker_topics: {{external_main_topic: "{topic}"}}') == [
        f"central_broker_topics.external_main_topic: {topic!r} is not allowed; "
        "expected a non-empty topic without '+', '#' or surrounding spaces"
    ]


@pytest.mark.parametrize("topic", ["/kpm33b", "kpm33b/", "/kpm33b/", "home//kpm33b"])
def test_main_topic_with_leading_trailing_or_doubled_slash_is_a_problem(topic: str) -> None:
    assert problems(f'central_broker_topics: {{external_main_topic: "{topic}"}}') == [
        f"central_broker_topics.external_main_topic: {topic!r} is not allowed; "
        "expected a topic without leading, trailing or doubled '/'"
    ]


def test_main_topic_with_levels_is_accepted() -> None:
    assert parse("central_broker_topics: {external_main_topic: home/energy/kpm33b}").central_broker_topics == (
        CentralTopics(external_main_topic="home/energy/kpm33b"))


# --- all problems together ---------------------------------------------------------------


def test_all_problems_are_reported_together_one_line_each() -> None:
    lines = problems(f"""
        internal_broker: {{port: "1883"}}
        central_broker: {{port: 0, password: secret}}
        central_broker_topics: {{external_main_topic: /kpm33b/}}
        meters:
          upload_frequency_seconds: 45
          upload_frequency_minutes: 2
          exclude: [nope]
          devices:
            ABC: {{name: x}}
            "{METER}": {{upload_frequency_seconds: 45}}
        logging: {{level: verbose}}
        foo: 1
    """)

    assert lines == [
        f"internal_broker.port: '1883' is not allowed; expected {PORT_ALLOWED}",
        f"central_broker.port: 0 is not allowed; expected {PORT_ALLOWED}",
        "central_broker.password: a password needs a username too",
        "central_broker_topics.external_main_topic: '/kpm33b/' is not allowed; "
        "expected a topic without leading, trailing or doubled '/'",
        f"meters.upload_frequency_seconds: 45 is not allowed; expected {SECONDS_ALLOWED}",
        f"meters.upload_frequency_minutes: 2 is not allowed; expected {MINUTES_ALLOWED}",
        "meters.exclude: ['nope'] is not allowed; expected a list of meter ids of 13 letters and digits",
        "meters.devices.ABC: 'ABC' is not allowed as a key; "
        "expected a meter id of 13 letters and digits, e.g. 33B1225950027",
        f"meters.devices.{METER}.upload_frequency_seconds: 45 is not allowed; expected {SECONDS_ALLOWED}",
        "logging.level: 'verbose' is not allowed; expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        f"foo: unknown key; known keys here are {ROOT_KNOWN}",
    ]
    assert all("\n" not in line for line in lines)


def test_config_error_message_has_one_line_per_problem() -> None:
    with pytest.raises(ConfigError) as error:
        parse("internal_broker: {port: 0}\ncentral_broker: {port: 0}\n")

    assert str(error.value).splitlines() == list(error.value.problems)
    assert len(error.value.problems) == 2


def test_long_bad_value_is_shortened_in_the_problem() -> None:
    (line,) = problems(f"logging: {{level: {'x' * 200}}}")

    assert line == (
        f"logging.level: '{'x' * 76}... is not allowed; expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    )


# --- environment --------------------------------------------------------------------------


def test_environment_credentials_win_over_the_file() -> None:
    environ = {
        "KPM33B_INTERNAL_USERNAME": "env-inner", "KPM33B_INTERNAL_PASSWORD": "env-inner-pw",
        "KPM33B_CENTRAL_USERNAME": "env-outer", "KPM33B_CENTRAL_PASSWORD": "env-outer-pw",
    }

    config = parse("""
        internal_broker: {username: file-inner, password: file-inner-pw}
        central_broker: {username: file-outer, password: file-outer-pw}
    """, environ)

    assert (config.internal_broker.username, config.internal_broker.password) == ("env-inner", "env-inner-pw")
    assert (config.central_broker.username, config.central_broker.password) == ("env-outer", "env-outer-pw")


def test_environment_credentials_apply_without_any_in_the_file() -> None:
    config = parse("", {"KPM33B_CENTRAL_USERNAME": "ha", "KPM33B_CENTRAL_PASSWORD": "pw"})

    assert config.central_broker == BrokerSettings(host="127.0.0.1", port=1883, username="ha", password="pw")
    assert config.internal_broker == BrokerSettings(host="127.0.0.1", port=11883, protocol="5")


def test_environment_password_for_the_file_username() -> None:
    config = parse("internal_broker: {username: proxy}", {"KPM33B_INTERNAL_PASSWORD": "pw"})

    assert (config.internal_broker.username, config.internal_broker.password) == ("proxy", "pw")


def test_environment_password_without_any_username_is_a_problem() -> None:
    assert problems("", {"KPM33B_INTERNAL_PASSWORD": "pw"}) == [
        "internal_broker.password: a password needs a username too"
    ]


def test_empty_environment_value_does_not_override_the_file() -> None:
    config = parse("central_broker: {username: ha, password: pw}",
                   {"KPM33B_CENTRAL_USERNAME": "", "KPM33B_CENTRAL_PASSWORD": ""})

    assert (config.central_broker.username, config.central_broker.password) == ("ha", "pw")


def test_password_is_absent_from_repr_and_describe() -> None:
    config = parse("""
        internal_broker: {username: proxy, password: inner-s3cret}
        central_broker: {username: ha, password: outer-s3cret}
    """)

    for text in (repr(config), str(config), repr(config.central_broker), describe(config)):
        assert "s3cret" not in text
    assert "ha" in describe(config)


def test_describe_summarises_the_configuration() -> None:
    config = parse(f"""
        central_broker: {{host: broker.example.org, port: 8883, username: ha, password: pw, tls: true}}
        meters:
          upload_frequency_seconds: 30
          upload_frequency_minutes: 5
          exclude: ["{OTHER_METER}"]
          devices: {{"{METER}": {{name: Heat pump}}}}
    """)

    assert describe(config) == (
        "internal broker mqtt://127.0.0.1:11883, central broker mqtts://ha:***@broker.example.org:8883, "
        "main topic 'kpm33b', intervals 30 s / 5 min, 1 configured and 1 excluded meters"
    )


# --- per-meter settings -------------------------------------------------------------------


def test_intervals_and_name_without_overrides_are_the_defaults() -> None:
    meters = parse("meters: {upload_frequency_seconds: 300, upload_frequency_minutes: 15}").meters

    assert (meters.seconds_interval(METER), meters.minutes_interval(METER), meters.device_name(METER)) == (
        300, 15, "KPM33B 33B1225950027")


def test_per_device_overrides_win_for_that_meter_only() -> None:
    meters = parse(f"""
        meters:
          upload_frequency_seconds: 300
          upload_frequency_minutes: 15
          devices:
            "{METER}": {{name: Heat pump, upload_frequency_seconds: 30, upload_frequency_minutes: 1}}
            "{OTHER_METER}": {{upload_frequency_minutes: 60}}
    """).meters

    assert (meters.seconds_interval(METER), meters.minutes_interval(METER), meters.device_name(METER)) == (
        30, 1, "Heat pump")
    assert (meters.seconds_interval(OTHER_METER), meters.minutes_interval(OTHER_METER),
            meters.device_name(OTHER_METER)) == (300, 60, "KPM33B 33B1225950028")
    assert meters.seconds_interval("33B1225950099") == 300


# --- reading the file ------------------------------------------------------------------------


def test_invalid_yaml_is_one_problem_naming_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "meters:\n  upload_frequency_seconds: 60\n  devices: {a: b: c}\n")

    with pytest.raises(ConfigError) as error:
        load_config(path, {})

    (line,) = error.value.problems
    assert line.startswith(f"{path}: not valid YAML at line 3, column ")


def test_tab_indentation_is_one_problem_naming_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "meters:\n\tupload_frequency_seconds: 60\n")

    with pytest.raises(ConfigError) as error:
        load_config(path, {})

    assert error.value.problems == (
        f"{path}: not valid YAML at line 2, column 1: found character '\\t' that cannot start any token",
    )


def test_missing_file_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError) as error:
        load_config(path, {})

    assert error.value.problems == (
        f"{path}: cannot be read ([Errno 2] No such file or directory: '{path}')",
    )


def test_directory_instead_of_file_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path, {})

    (line,) = error.value.problems
    assert line.startswith(f"{tmp_path}: cannot be read (")


def test_file_that_is_not_utf8_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"logging: {level: \xff}\n")

    with pytest.raises(ConfigError) as error:
        load_config(path, {})

    (line,) = error.value.problems
    assert line.startswith(f"{path}: cannot be read (")


# --- command line ------------------------------------------------------------------------------


def test_config_path_defaults_to_the_environment_variable(tmp_path: Path) -> None:
    command_line = parse_command_line([], {"KPM33B_CONFIG": "/etc/kpm33b/config.yaml"}, tmp_path, "proxy")

    assert command_line == CommandLine(config_path=Path("/etc/kpm33b/config.yaml"), check_only=False)


def test_config_path_defaults_to_config_yaml_beside_the_script(tmp_path: Path) -> None:
    command_line = parse_command_line([], {}, tmp_path, "proxy")

    assert command_line == CommandLine(config_path=tmp_path / "config.yaml", check_only=False)


def test_config_option_wins_over_the_environment_variable(tmp_path: Path) -> None:
    command_line = parse_command_line(["--config", "/srv/other.yaml", "--check-config"],
                                      {"KPM33B_CONFIG": "/etc/kpm33b/config.yaml"}, tmp_path, "proxy")

    assert command_line == CommandLine(config_path=Path("/srv/other.yaml"), check_only=True)


def test_unknown_option_exits_with_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(["--confg", "x"], {}, tmp_path, "proxy")

    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_check_config_of_a_valid_file_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "central_broker: {host: 127.0.0.1, port: 1884}\n")

    with pytest.raises(SystemExit) as exit_info:
        load_or_exit(CommandLine(config_path=path, check_only=True), {})

    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out == (
        f"{path}: valid (internal broker mqtt://127.0.0.1:11883, central broker mqtt://127.0.0.1:1884, "
        "main topic 'kpm33b', intervals 60 s / 1 min, 0 configured and 0 excluded meters)\n"
    )
    assert captured.err == ""


def test_check_config_of_an_invalid_file_exits_2_with_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = write(tmp_path, "central_broker: {host: 127.0.0.1, port: 0}\nmeters: {upload_frequency_seconds: 45}\n"
                           "foo: 1\n")

    with pytest.raises(SystemExit) as exit_info:
        load_or_exit(CommandLine(config_path=path, check_only=True), {})

    assert exit_info.value.code == EXIT_CONFIG_ERROR == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"Invalid configuration {path}:",
        f"  central_broker.port: 0 is not allowed; expected {PORT_ALLOWED}",
        f"  meters.upload_frequency_seconds: 45 is not allowed; expected {SECONDS_ALLOWED}",
        f"  foo: unknown key; known keys here are {ROOT_KNOWN}",
    ]
    assert "Traceback" not in captured.err


def test_start_up_with_an_invalid_file_exits_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = write(tmp_path, "meters: {devices: {a: b: c}}\n")

    with pytest.raises(SystemExit) as exit_info:
        load_or_exit(CommandLine(config_path=path, check_only=False), {})

    assert exit_info.value.code == 2
    err_lines = capsys.readouterr().err.splitlines()
    assert err_lines[0] == f"Invalid configuration {path}:"
    assert len(err_lines) == 2
    assert err_lines[1].startswith(f"  {path}: not valid YAML at line 1")
    assert "Traceback" not in "\n".join(err_lines)


def test_start_up_with_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.yaml"

    with pytest.raises(SystemExit) as exit_info:
        load_or_exit(CommandLine(config_path=path, check_only=False), {})

    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[1].startswith(f"  {path}: cannot be read (")


def test_start_up_with_a_valid_file_returns_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "central_broker: {host: 127.0.0.1}\nlogging: {level: warning}\n")

    config = load_or_exit(CommandLine(config_path=path, check_only=False), {"KPM33B_CENTRAL_USERNAME": "ha"})

    assert config == Config(logging=LoggingSettings(level="WARNING"),
                            central_broker=BrokerSettings(host="127.0.0.1", port=1883, username="ha"))
    assert capsys.readouterr() == ("", "")


def test_export_energy_defaults_to_off_and_is_overridden_per_meter() -> None:
    other = "33B1225950028"
    config = parse(f'meters: {{export_energy: true, devices: {{"{METER}": {{export_energy: false}}, '
                   f'"{other}": {{name: Garage}}}}}}')

    assert Config().meters.export_energy is False
    assert MeterSettings().exports_energy(METER) is False
    assert config.meters.devices[METER] == DeviceSettings(export_energy=False)
    assert config.meters.exports_energy(METER) is False
    assert config.meters.exports_energy(other) is True
    assert config.meters.exports_energy("33B1225950029") is True


def test_export_energy_that_is_not_a_boolean_is_a_problem() -> None:
    assert problems(f'meters: {{export_energy: "yes", devices: {{"{METER}": {{export_energy: 1}}}}}}') == [
        "meters.export_energy: 'yes' is not allowed; expected true or false",
        f"meters.devices.{METER}.export_energy: 1 is not allowed; expected true or false",
    ]


def test_device_list_max_meters_defaults_to_10000_and_is_validated() -> None:
    assert Config().health.device_list_max_meters == 10_000
    assert parse("health: {device_list_max_meters: 0}").health.device_list_max_meters == 0
    assert problems("health: {device_list_max_meters: -1}") == [
        "health.device_list_max_meters: -1 is not allowed; expected an integer from 0 to 1000000"]
