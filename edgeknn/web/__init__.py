"""The device's own web page: live view, confidence bars, teaching and health, for a phone (``server``),
its password and sessions (``auth``), and what it streams (``live``); ``static/`` is the page itself."""
