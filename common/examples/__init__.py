"""Worked examples of the plug-in interface, shipped as built-ins (see docs/plugins.md)."""
