"""`edgeknn web password [--reset]`: show or reset the web page's password from the shell.

``main`` builds the parser and maps its errors to exit codes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgeknn.cli.errors import InputError, UsageError
from edgeknn.cli.options import load_config


def web_password(args) -> int:
    """`edgeknn web password [--reset]`: the configured password says where it is set; the generated
    one is shown (made now if the device has not made it yet) or replaced."""
    from edgeknn.web.auth import AuthError, Passwords, reset_password

    cfg = load_config(args)
    if args.state_dir and not Path(args.state_dir).is_dir():  # a typo must not make a password nobody uses
        raise InputError(
            f"--state-dir {args.state_dir}: no such folder (the device's, e.g. /var/lib/edgeknn)"
        )
    state_dir = args.state_dir or cfg.resolved_state_dir()
    passwords = Passwords(cfg.web, state_dir)
    configured = bool(cfg.web.password or cfg.web.password_file)
    if args.reset:
        if configured:
            raise UsageError(f"the password is set by {passwords.source}: change it there")
        print(reset_password(state_dir))
        print(f"(kept in {passwords.source}; every login of the page has ended)", file=sys.stderr)
        return 0
    try:
        passwords.ensure()
        print(passwords.current())
    except AuthError as e:
        raise InputError(str(e)) from None
    print(f"(from {passwords.source})", file=sys.stderr)
    return 0
