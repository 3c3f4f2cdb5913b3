"""What the demo's processes share: one JSON object in an environment variable.

The runner builds :class:`DemoSettings` once; the workers and the publisher
processes it starts read the same object from ``CELERY_DEDUP_DEMO``, as the
test suite's scenario app reads ``DEDUP_TEST_*``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Final

ENV_VAR: Final = "CELERY_DEDUP_DEMO"
#: The incidents of DESIGN.md the demo replays, in its order (see .scenarios).
SCENARIO_IDS: Final = ("s1", "s3", "s4", "s5", "s9")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Where the demo keeps its messages, keys, records and database."""

    redis_url: str
    #: Every Redis key the demo writes starts with ``namespace + ":"``.
    namespace: str
    queue: str
    database_url: str
    #: True on a Redis the demo did not start: kombu prefixes its keys too.
    shared_redis: bool = False

    @property
    def key_prefix(self) -> str:
        """``dedup_key_prefix``: the dedup keys live under the namespace."""
        return f"{self.namespace}:dedup"

    def record_key(self, run: str, kind: str) -> str:
        """The Redis list where the bodies of ``run`` record ``kind``."""
        return f"{self.namespace}:record:{run}:{kind}"

    def to_env(self) -> dict[str, str]:
        return {ENV_VAR: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_env(cls) -> DemoSettings | None:
        """The settings the runner passed down, or None outside the demo."""
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return None
        return cls(**json.loads(raw))
