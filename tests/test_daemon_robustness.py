"""Both daemons as real processes under signals and hostile standard output.

- SIGHUP must never kill a daemon (``systemctl reload`` sends it).
- A standard output that nobody reads, or that is closed, must not stop the
  data flow nor print a traceback per log line: log lines are dropped and
  counted instead. In the normal case every line still arrives, in order,
  and the last lines before exit are written.

The config sender is started as a process here (its own tests run it
in-process); the proxy is used as a black box.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

from broker import Mosquitto, wait_for
from daemons import Collector, DaemonProcess, config_dict, publish_all, publisher, write_config

from mqtt_common import install_signal_handlers

METER = "33B1225950027"


def eny_now(meter_id: str, minute: int, energy: float) -> str:
    """A minimal but valid ENY_NOW packet for minute ``minute`` of 2026-01-17."""
    return json.dumps({"id": meter_id, "zygsz": energy, "fygsz": 0.0,
                       "time": f"20260117{minute // 60:02d}{minute % 60:02d}00", "isend": "1"})


def test_proxy_survives_sighup_and_keeps_forwarding(tmp_path: Path, internal_broker: Mosquitto,
                                                    central_broker: Mosquitto) -> None:
    bridge = Collector(central_broker.port, "kpm33b/bridge/state", f"kpm33b/{METER}/minutes")
    proxy = DaemonProcess("kpm33b_proxy.py", write_config(tmp_path, config_dict(internal_broker.port,
                                                                                 central_broker.port)))
    wait_for(lambda: bridge.on("kpm33b/bridge/state")[-1:] == [b"online"], timeout=15)
    proxy.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP received" in proxy.output(), timeout=5)
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, 1, 100.0))])
    wait_for(lambda: bridge.on(f"kpm33b/{METER}/minutes"), timeout=5)
    assert proxy.alive()
    assert proxy.terminate() == 0
    client.disconnect()
    client.loop_stop()
    bridge.close()
    assert "Traceback" not in proxy.output()


def test_sighup_calls_the_reload_callback_and_does_not_stop() -> None:
    stop = threading.Event()
    reloads = threading.Event()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        install_signal_handlers(stop, reload=reloads.set)
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(reloads.is_set, timeout=5)
        assert not stop.is_set()
        install_signal_handlers(stop)  # no callback: SIGHUP is logged and ignored
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(stop.is_set, timeout=5)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
