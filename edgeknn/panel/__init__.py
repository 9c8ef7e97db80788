"""The physical controls: buttons and LEDs on gpiozero, the gestures they make, and a keyboard panel for
a desk without buttons.

``PanelError`` lives here so that the device can refuse a panel without importing gpiozero (2.5 MB
of a small board's memory when the panel is the keyboard or none): ``gpio.py`` is imported only for
``panel.kind = "gpio"``.
"""


class PanelError(Exception):
    """The panel cannot start; the message says, in one line, what to change."""
