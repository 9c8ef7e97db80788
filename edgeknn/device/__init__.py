"""The running device: building it from a config, its lifecycle (run, reload, stop), the main loop and
its command table, teaching, saving, status, runtime settings, snapshots and systemd notification.
"""
