"""The framework-free core of horovod-local: one sync pipeline for both front ends.

- :mod:`.config`: :class:`SyncConfig`, every argument check and the replica fingerprint.
- :mod:`.protocol`: the wire protocol of a round (collective names, control element).
- :mod:`.ops`: the op interface a front end implements (pack, sum-allreduce, fused unpacks...).
- :mod:`.algorithms`: one class per algorithm and per state policy: what each puts into the
  sync buffer and what it does when the sum comes back.
- :mod:`.pipeline`: :class:`RoundPipeline`, one sync from plan to result.

See ``docs/ARCHITECTURE.md``.
"""
from horovod_local.core.config import SyncConfig  # noqa: F401
