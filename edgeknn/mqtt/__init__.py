"""The MQTT edge: ``link`` (transport, reconnects, acknowledgements), ``commands`` (the command table and
``parse_command``), ``discovery`` (Home Assistant payloads). Import from the submodule you need.
"""
