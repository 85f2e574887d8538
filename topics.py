"""Every MQTT topic of the system, built and parsed here and nowhere else.

Three trees meet in this project, and each topic string of them is written
once, in this module:

- the **central tree** under ``<main>`` (``external_main_topic``, ``kpm33b``
  by default) that consumers read: ``<main>/<id>/seconds``, ``…/minutes``,
  ``…/availability``, and the bridge's own ``<main>/bridge/…``;
- the **internal broker's** topics the meters use: their data topics are
  configured names (``MQTT_RT_DATA`` …), their command topics a configured
  prefix plus the last 8 characters of the meter id;
- **Home Assistant's discovery** tree under its prefix (``homeassistant``).

The meter id is what makes a topic level: only ids of exactly 13 ASCII
letters and digits are ever put into a topic (``is_valid_meter_id``), so a
hostile id can neither add levels (``/``) nor match others (``+``, ``#``).
Pure functions, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

METER_ID_PATTERN = re.compile(r"[0-9A-Za-z]{13}")

# The leaves of a meter's topics on the central broker.
SECONDS = "seconds"  # active power (and the per-phase values), from MQTT_RT_DATA
MINUTES = "minutes"  # active energy, from MQTT_ENY_NOW
AVAILABILITY = "availability"  # online / offline
CONFIG_STATUS = "config_status"  # the config sender's retained result of the last push to a meter
# What the config sender follows per meter, availability first: Mosquitto delivers
# retained messages subscription by subscription, so a restarted sender learns
# which meters are offline before their old readings arrive.
METER_LEAVES = (AVAILABILITY, SECONDS, MINUTES)
# What kpm33b_status reads per meter: the config sender's result too.
STATUS_LEAVES = (*METER_LEAVES, CONFIG_STATUS)
ONLINE = "online"
OFFLINE = "offline"

# Home Assistant discovery: our configs are sensors under node ids kpm33b_<meter id>, and the
# bridge's entities under the node id kpm33b_bridge (kpm33b_bridge_<main> for another main topic).
DISCOVERY_COMPONENT = "sensor"
BINARY_SENSOR_COMPONENT = "binary_sensor"
NODE_PREFIX = "kpm33b_"
NODE_ID_PATTERN = re.compile(r"kpm33b_([0-9A-Za-z]{13})")
OBJECT_ID_PATTERN = re.compile(r"[0-9A-Za-z_-]+")
BRIDGE_IDENTIFIER = "kpm33b_bridge"
DEFAULT_MAIN_TOPIC = "kpm33b"
_NOT_IN_NODE_ID = re.compile(r"[^0-9A-Za-z_-]")


def is_valid_meter_id(value: object) -> bool:
    """Exactly 13 letters and digits: nothing that could add or match topic levels."""
    return isinstance(value, str) and METER_ID_PATTERN.fullmatch(value) is not None


# --- the central tree ---------------------------------------------------------------


def reading_topic(main_topic: str, meter_id: str, kind: str) -> str:
    """``<main>/<id>/seconds`` or ``<main>/<id>/minutes``; ``meter_id`` must be valid already."""
    return f"{main_topic}/{meter_id}/{kind}"


def availability_topic(main_topic: str, meter_id: str) -> str:
    """A meter's ``online``/``offline`` state."""
    return f"{main_topic}/{meter_id}/{AVAILABILITY}"


def retained_meter_topics(main_topic: str, meter_id: str) -> tuple[str, ...]:
    """The retained topics the proxy keeps per meter: cleared when the meter is excluded."""
    return (reading_topic(main_topic, meter_id, SECONDS), reading_topic(main_topic, meter_id, MINUTES),
            availability_topic(main_topic, meter_id))


def config_status_topic(main_topic: str, meter_id: str) -> str:
    """A meter's configuration status, retained by the config sender, read by Home Assistant and kpm33b_status."""
    return f"{main_topic}/{meter_id}/{CONFIG_STATUS}"


def bridge_state_topic(main_topic: str) -> str:
    """The proxy's own ``online``/``offline`` state (backed by its last will)."""
    return f"{main_topic}/bridge/state"


def bridge_stats_topic(main_topic: str) -> str:
    """The proxy's counters, retained."""
    return f"{main_topic}/bridge/stats"


def bridge_devices_topic(main_topic: str) -> str:
    """The proxy's retained list of every known meter (``fleet.device_list``)."""
    return f"{main_topic}/bridge/devices"


def sender_stats_topic(main_topic: str) -> str:
    """The config sender's counters, retained."""
    return f"{main_topic}/bridge/config_sender/stats"


def meter_subscription(main_topic: str, leaf: str) -> str:
    """The filter for one leaf of every meter: ``<main>/+/<leaf>``."""
    return f"{main_topic}/+/{leaf}"


def meter_subscriptions(main_topic: str) -> list[str]:
    """What the config sender subscribes to on the central broker, availability first (see METER_LEAVES)."""
    return [meter_subscription(main_topic, leaf) for leaf in METER_LEAVES]


@dataclass(frozen=True)
class MeterTopic:
    """A per-meter topic on the central broker: ``<main>/<meter id>/<leaf>``."""

    meter_id: str
    leaf: str  # availability, seconds or minutes (config_status with STATUS_LEAVES)


def parse_meter_topic(main_topic: str, topic: str, leaves: tuple[str, ...] = METER_LEAVES) -> MeterTopic | None:
    """The meter and leaf of a central topic; None for anything else (``bridge/state``, a leaf not in ``leaves`` …)."""
    prefix = main_topic + "/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix):].split("/")
    if len(parts) != 2 or parts[1] not in leaves or not METER_ID_PATTERN.fullmatch(parts[0]):
        return None
    return MeterTopic(meter_id=parts[0], leaf=parts[1])


def parse_state(payload: bytes) -> str | None:
    """``online`` or ``offline`` (availability, bridge state); None for anything else."""
    text = payload.strip().decode("ascii", errors="replace")
    return text if text in (ONLINE, OFFLINE) else None


# --- the internal broker -----------------------------------------------------------------


def command_topic(prefix: str, meter_id: str) -> str:
    """A meter's own command topic: a fixed prefix (``MQTT_COMMOD_SET_`` …) plus the last 8 characters of its id."""
    return prefix + meter_id[-8:]


# --- Home Assistant discovery ------------------------------------------------------------


def node_id(meter_id: str) -> str:
    """The discovery node id of a meter: ``kpm33b_<id>``, also its device identifier."""
    return f"{NODE_PREFIX}{meter_id}"


def discovery_topic(prefix: str, meter_id: str, object_id: str) -> str:
    """``<prefix>/sensor/kpm33b_<id>/<object id>/config``."""
    return f"{prefix}/{DISCOVERY_COMPONENT}/{node_id(meter_id)}/{object_id}/config"


def bridge_identifier(main_topic: str) -> str:
    """The bridge's Home Assistant device identifier: ``kpm33b_bridge``, or ``kpm33b_bridge_<main>``.

    The main topic is appended when it is not the default one, so that two
    proxies with their own main topics on one broker are two bridge devices.
    """
    return BRIDGE_IDENTIFIER if main_topic == DEFAULT_MAIN_TOPIC else f"{BRIDGE_IDENTIFIER}_{main_topic}"


def bridge_node_id(main_topic: str) -> str:
    """The bridge's discovery node id: its identifier with anything but ``[0-9A-Za-z_-]`` made ``_``.

    A node id is one topic level and Home Assistant accepts only those
    characters in it (``site/a`` → ``kpm33b_bridge_site_a``). It never
    matches a meter's node id (``kpm33b_`` and 13 letters and digits): the
    part after ``kpm33b_`` is ``bridge`` or contains ``_``.
    """
    return _NOT_IN_NODE_ID.sub("_", bridge_identifier(main_topic))


def bridge_discovery_topic(prefix: str, main_topic: str, component: str, object_id: str) -> str:
    """``<prefix>/<component>/<bridge node id>/<object id>/config``: one entity of the bridge device."""
    return f"{prefix}/{component}/{bridge_node_id(main_topic)}/{object_id}/config"


def bridge_binary_sensor_subscription(prefix: str, main_topic: str) -> str:
    """The filter that finds this bridge's binary sensor configs (its sensors are under ``discovery_subscription``)."""
    return f"{prefix}/{BINARY_SENSOR_COMPONENT}/{bridge_node_id(main_topic)}/+/config"


def parse_bridge_discovery_topic(topic: str, prefix: str, main_topic: str) -> tuple[str, str] | None:
    """``(component, object id)`` of a config of this proxy's bridge device; None for anything else.

    Only this main topic's bridge node is ours: another proxy's bridge
    (another main topic) and other software's configs are never touched.
    """
    start = f"{prefix}/"
    if not topic.startswith(start):
        return None
    levels = topic[len(start):].split("/")
    if len(levels) != 4 or levels[3] != "config" or levels[1] != bridge_node_id(main_topic):
        return None
    component, object_id = levels[0], levels[2]
    if component not in (DISCOVERY_COMPONENT, BINARY_SENSOR_COMPONENT) or not OBJECT_ID_PATTERN.fullmatch(object_id):
        return None
    return component, object_id


def discovery_subscription(prefix: str) -> str:
    """The filter that finds every sensor config on the broker, ours among them."""
    return f"{prefix}/{DISCOVERY_COMPONENT}/+/+/config"


def ha_status_topic(prefix: str) -> str:
    """Where Home Assistant announces ``online`` (its birth message) and ``offline``."""
    return f"{prefix}/status"


def parse_discovery_topic(topic: str, prefix: str) -> tuple[str, str] | None:
    """``(meter id, object id)`` of one of our config topics; None for anything else.

    Only node ids ``kpm33b_<13 letters and digits>`` are ours: configs of other
    software under the same prefix are never touched.
    """
    start = f"{prefix}/{DISCOVERY_COMPONENT}/"
    if not topic.startswith(start):
        return None
    levels = topic[len(start):].split("/")
    if len(levels) != 3 or levels[2] != "config":
        return None
    node, object_id = levels[0], levels[1]
    match = NODE_ID_PATTERN.fullmatch(node)
    if match is None or not OBJECT_ID_PATTERN.fullmatch(object_id):
        return None
    return match.group(1), object_id
