"""CPU work on whole HTTP bodies, off the event loop: a few threads of their own for the parts that
decode and scan bodies of up to megabytes (the credential proxy: requests searched for secrets and
placeholders, responses with their content codings undone and every form of every secret
scrubbed). Not the decoding or the scanning itself (httpcodings.py, credproxy/swap.py and
secretforms.py), and not file or store I/O (asyncio.to_thread does for those).

Why: that work costs CPU in proportion to the body, about 0.3 s for a 16 MiB response and over a
second for a 60 MiB upload, and the loop carries every VM's traffic. Bodies past INLINE_BYTES, or
with a content coding (a small body may expand to the whole limit), go to WORKERS threads; at most
that many run at once (zlib lets go of the GIL, regular expressions and bytes methods do not, so
more would only contend), the others wait their turn. Smaller bodies without a coding are worked
on in place: the hop to a thread would cost more than the work, and that is the path every
ordinary request takes (bench/credproxy.py).

The content filter (skyguard/content/httpfilter.py) decodes the bodies it judges here too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

WORKERS = 2
INLINE_BYTES = 64 << 10

_T = TypeVar("_T")
_workers = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="sg-body-work")


def is_small(headers, body: bytes) -> bool:
    """Whether a body with these headers (names in lower case) is worked on in place (see the
    opening paragraph). On every request's path: a plain loop, no generator."""
    if len(body) > INLINE_BYTES:
        return False
    for name, _ in headers:
        if name == b"content-encoding":
            return False
    return True


async def off_loop(function: Callable[..., _T], *args) -> _T:
    """function(*args) in one of the WORKERS threads; its exception, if any, raised here."""
    return await asyncio.get_running_loop().run_in_executor(_workers, function, *args)
