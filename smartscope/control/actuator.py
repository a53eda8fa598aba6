"""The one door to the hardware for every automated or API-driven change.

Maps actuator names (`activation_mw`, `z_um`, ...) to Micro-Manager calls using
the device labels from the config, and keeps the last value of each so the
acquisition loop can stamp frames without querying devices on its hot path.
Only the engine (after the safety envelope) and the API's checked setters call
`write`.

`interval_ms` is always available: it is the interval of the upcoming time
points, which the event feed turns into each event's start time (on any
camera). Where the camera has an interval property (config
`hardware.devices.interval`) it is written there too, the fast path that
paces hardware-sequenced bursts.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from smartscope.control.policy import ACTUATORS

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus

    from smartscope.config import DevicesConfig, PropertyRef


class Actuator:
    def __init__(self, core: CMMCorePlus, devices: DevicesConfig) -> None:
        self._core = core
        self._lock = threading.Lock()
        self._props: dict[str, PropertyRef] = {}
        for name, ref in (
            ("activation_mw", devices.activation_laser),
            ("excitation_mw", devices.excitation_laser),
            ("angle_deg", devices.rotation),
            ("interval_ms", devices.interval),
        ):
            if ref is not None:
                self._props[name] = ref
        self._focus = devices.focus
        self._state: dict[str, float | None] = dict.fromkeys(ACTUATORS)
        self.refresh()

    def available(self) -> list[str]:
        return [n for n in ACTUATORS if n in self._props or (n == "z_um" and self._focus) or n == "interval_ms"]

    def property_of(self, actuator: str) -> PropertyRef | None:
        return self._props.get(actuator)

    def actuator_for_property(self, label: str, prop: str) -> str | None:
        """Which actuator (if any) a device property is, so API writes pass the envelope."""
        for name, ref in self._props.items():
            if ref.label == label and ref.property == prop:
                return name
        return None

    def _read(self, name: str) -> float | None:
        if name == "z_um":
            return float(self._core.getPosition(self._focus)) if self._focus else None
        ref = self._props.get(name)
        if ref is None:
            return self._state[name] if name == "interval_ms" else None  # software interval: ours alone
        return float(self._core.getProperty(ref.label, ref.property))

    def refresh(self) -> dict[str, float | None]:
        with self._lock:
            for name in ACTUATORS:
                self._state[name] = self._read(name)
            return dict(self._state)

    def snapshot(self) -> dict[str, float | None]:
        """Last known values, without touching the hardware."""
        with self._lock:
            return dict(self._state)

    def write(self, name: str, value: float) -> None:
        if name not in self.available():
            raise KeyError(f"actuator {name!r} is not configured (hardware.devices)")
        with self._lock:
            if name == "z_um":
                self._core.setPosition(self._focus, value)
            elif name in self._props:
                ref = self._props[name]
                self._core.setProperty(ref.label, ref.property, value)
            self._state[name] = float(value)

    def note(self, name: str, value: float | None) -> None:
        """Record a value the hardware already has (e.g. Z set by the MDA plan), without writing it."""
        with self._lock:
            self._state[name] = None if value is None else float(value)
