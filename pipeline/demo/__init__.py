"""The built-in synthetic demo scene."""
