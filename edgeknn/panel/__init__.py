"""The physical controls: buttons and LEDs on gpiozero, the gestures they make, and a keyboard panel for
a desk without buttons.
"""
