"""Entry point of the internet servers' process: `python -m skyguard.lab.serve --lab-dir DIR`, or the
h11 echo alone (tests and their upstreams): `python -m skyguard.lab.serve echo --port N [--cert --key
[--client-ca]] [--log FILE]`.

Kept apart from internet.py so that running it never re-imports a module the package already
loaded (runpy warns about that). Nothing else belongs here.
"""

import sys

from skyguard.lab.internet import main

if __name__ == "__main__":
    sys.exit(main())
