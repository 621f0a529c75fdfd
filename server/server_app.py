"""``flwr run .`` loads the ServerApp from here (``[tool.flwr.app.components]`` in pyproject.toml), as in
Flower's examples. It is fedseg's own, :mod:`fedseg.server.server_app`: the wheel installs only ``fedseg``,
so an installed fleet names ``fedseg.server.server_app:app`` instead (``fedseg-sim`` does)."""

from fedseg.server.server_app import app

__all__ = ["app"]
