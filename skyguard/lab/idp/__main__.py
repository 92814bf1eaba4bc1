"""`python -m skyguard.lab.idp [--fixture FILE]`: the lab's OpenID provider until interrupted (main
in __init__.py)."""

from skyguard.lab.idp import main

raise SystemExit(main())
