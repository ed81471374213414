"""Print the environment and argv that start one server of a preset (for launch/serve.sh)."""

from __future__ import annotations

import sys

from .config import ROLES, load_preset, load_settings
from .errors import RelayGenError
from .launcher import server_command, sglang_api_key


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[0] not in ROLES:
        sys.stderr.write("usage: launch/serve.sh ROLE PRESET [HOST]   (ROLE: large|small; HOST default 127.0.0.1)\n")
        return 2
    try:
        # With $RELAYGEN_SGLANG_API_KEY the key goes to SGLang in a 0600 --config file, never
        # on the command line (which serve.sh prints, and `ps` shows)
        cmd = server_command(load_preset(argv[1]), argv[0], load_settings(),
                             host=argv[2] if len(argv) == 3 else "127.0.0.1", api_key=sglang_api_key())
    except RelayGenError as e:
        sys.stderr.write(f"relaygen: {e}\n")
        return 2
    for key, value in cmd.env.items():
        print(f"export {key}={value}")
    for item in cmd.argv:
        print(item)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
