"""Print the environment and argv that start one server of a preset (for launch/serve.sh).
The server gets the first GPU block of its role, as `relaygen up` with one replica per role
would give it (large first, then small, within $CUDA_VISIBLE_DEVICES when set), so the two
roles started by hand on one machine do not share GPUs; where only this role fits (a machine
for one role) it takes the first visible devices. With DRY_RUN set and no GPU visible,
devices 0..N-1 are assumed. Both cases are said on stderr."""

from __future__ import annotations

import os
import sys

from .config import ROLES, load_preset, load_settings
from .errors import ConfigError, RelayGenError
from .gpus import devices_for
from .launcher import server_command, sglang_api_key


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[0] not in ROLES:
        sys.stderr.write("usage: launch/serve.sh ROLE PRESET [HOST]   (ROLE: large|small; HOST default 127.0.0.1)\n")
        return 2
    try:
        # With $RELAYGEN_SGLANG_API_KEY the key goes to SGLang in a 0600 --config file, never
        # on the command line (which serve.sh prints, and `ps` shows)
        preset = load_preset(argv[1])
        assume = bool(os.environ.get("DRY_RUN"))
        try:
            devices, note = devices_for(preset, {"large": 1, "small": 1}, assume=assume)
        except ConfigError as both:  # not enough for both roles: this one alone?
            try:
                devices, note = devices_for(preset, {r: int(r == argv[0]) for r in ROLES}, assume=assume)
            except ConfigError:
                raise both from None
            note = f"{both}; the {argv[0]} server alone takes the first {preset.roles[argv[0]].gpus}"
        cmd = server_command(preset, argv[0], load_settings(), host=argv[2] if len(argv) == 3 else "127.0.0.1",
                             api_key=sglang_api_key(), devices=devices[(argv[0], 0)])
    except RelayGenError as e:
        sys.stderr.write(f"relaygen: {e}\n")
        return 2
    if note:
        sys.stderr.write(f"relaygen: note: {note}\n")
    for key, value in cmd.env.items():
        print(f"export {key}={value}")
    for item in cmd.argv:
        print(item)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
