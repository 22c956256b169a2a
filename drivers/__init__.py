"""Protocol drivers: one module per protocol, each registering itself by name."""
