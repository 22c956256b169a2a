"""An example driver package: a thermometer that shows its readings as files, as Linux sensors do in sysfs.

It is the smallest complete driver and the template for a new one (see README.md): `config` has the
models, `driver` the `ThermometerDriver`, `sim` the simulated sensor; it imports `drivers.sdk` only. The
line below is all it takes to make it known: the class and the simulator are imported on first use.
"""

from __future__ import annotations

from drivers.sdk import DriverSpec, register

register(DriverSpec("thermometer", "example_driver.driver:ThermometerDriver", "example_driver.sim:simulate"))
