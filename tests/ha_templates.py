"""Render a discovery config's ``value_template`` the way Home Assistant's MQTT sensor does.

What is modelled, from Home Assistant's source (``helpers/template``, ``components/mqtt``):

- ``Template.async_render_with_possible_json_value``: the variables are
  ``value`` (the payload as text) and ``value_json`` only when the payload
  parses as JSON (otherwise ``value_json`` is undefined); the result is the
  rendered text, stripped;
- the environment is Jinja's ``ImmutableSandboxedEnvironment`` with Home
  Assistant's logging undefined (``make_logging_undefined``): printing,
  iterating or testing the truth of an undefined value logs a WARNING
  (``Template variable warning: 'dict object' has no attribute …``), and any
  other use (an attribute of it, a comparison, arithmetic) logs an ERROR and
  fails the rendering;
- the MQTT sensor takes the rendered text ``None`` (``PAYLOAD_NONE``) as
  "unknown".

A template Home Assistant would log about records an entry in ``Rendered.logged``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

PAYLOAD_NONE = "None"


@dataclass
class Rendered:
    """The text a template gave (None: it failed) and what Home Assistant would have logged."""

    text: str | None
    logged: list[str] = field(default_factory=list)

    @property
    def value(self) -> Any:
        """The state Home Assistant takes: None for ``None`` (unknown), else the text (a number parsed)."""
        if self.text is None or self.text == PAYLOAD_NONE:
            return None
        try:
            return json.loads(self.text)
        except ValueError:
            return self.text


def _recording_undefined(logged: list[str]) -> type[jinja2.Undefined]:
    """Home Assistant's ``LoggingUndefined``, recording instead of logging."""

    class RecordingUndefined(jinja2.Undefined):
        def _record(self) -> None:
            logged.append(f"WARNING {self._undefined_message}")

        def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super()._fail_with_undefined_error(*args, **kwargs)
            except self._undefined_exception:
                logged.append(f"ERROR {self._undefined_message}")
                raise

        def __str__(self) -> str:
            self._record()
            return super().__str__()

        def __iter__(self) -> Any:
            self._record()
            return super().__iter__()

        def __bool__(self) -> bool:
            self._record()
            return super().__bool__()

    return RecordingUndefined


def render(template: str, payload: bytes | str) -> Rendered:
    """Render ``template`` for one MQTT payload as Home Assistant's MQTT sensor would."""
    value = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else payload
    logged: list[str] = []
    environment = ImmutableSandboxedEnvironment(undefined=_recording_undefined(logged))
    variables: dict[str, Any] = {"value": value}
    with contextlib.suppress(ValueError):  # as Home Assistant: no value_json unless the payload is JSON
        variables["value_json"] = json.loads(value)
    try:
        text = environment.from_string(template).render(variables).strip()
    except (jinja2.TemplateError, TypeError, ValueError) as error:
        logged.append(f"ERROR Error parsing value: {error}")
        return Rendered(None, logged)
    return Rendered(text, logged)
