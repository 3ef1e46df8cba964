"""Every Redis key name hardbatch uses, in one place (docs/store.md explains the layout).

All keys of a run share the hash tag `{RUN}`, so a run lives on one cluster slot, and
`run_pattern(run)` matches every one of them (run names hold no glob characters).

| key                                          | type   | holds                                  |
|----------------------------------------------|--------|----------------------------------------|
| `hb:runs`                                    | set    | names of registered runs               |
| `hb:{RUN}:meta`                              | hash   | size, decay, counters, snapshot pointer |
| `hb:{RUN}:seq`                               | hash   | rank -> last accepted batch seq        |
| `hb:{RUN}:log`                               | stream | one entry per packed batch             |
| `hb:{RUN}:snap:{GEN}:{FIELD}:{K}`            | string | chunk K of one table field             |
| `hb:{RUN}:snapgens`                          | set    | snapshot generations with chunks      |
| `hb:{RUN}:fences`                            | hash   | attempt -> step it resumed after       |
| `hb:{RUN}:plan_config`                       | hash   | the run's plan config                 |
| `hb:{RUN}:round:{INC}:{WORLD}:{ROUND}`       | string | one composed round                     |
| `hb:{RUN}:rounds`                            | zset   | round keys of the run, by round number |
| `hb:{RUN}:fetched:{INC}:{WORLD}:{ROUND}`     | set    | ranks that fetched that round          |
"""

from __future__ import annotations

RUNS = "hb:runs"


def _run(run: str) -> str:
    return f"hb:{{{run}}}"


def meta(run: str) -> str:
    return f"{_run(run)}:meta"


def seq(run: str) -> str:
    return f"{_run(run)}:seq"


def log(run: str) -> str:
    return f"{_run(run)}:log"


def fences(run: str) -> str:
    return f"{_run(run)}:fences"


def snapgens(run: str) -> str:
    return f"{_run(run)}:snapgens"


def snap(run: str, gen: int, field_name: str, chunk: int) -> str:
    return f"{_run(run)}:snap:{gen}:{field_name}:{chunk}"


def plan_config(run: str) -> str:
    return f"{_run(run)}:plan_config"


def round_(run: str, incarnation: str, world_size: int, round_no: int) -> str:
    return f"{_run(run)}:round:{incarnation}:{world_size}:{round_no}"


def rounds(run: str) -> str:
    return f"{_run(run)}:rounds"


def fetched(run: str, incarnation: str, world_size: int, round_no: int) -> str:
    return f"{_run(run)}:fetched:{incarnation}:{world_size}:{round_no}"


def run_pattern(run: str) -> str:
    """A SCAN pattern for every key of `run`."""
    return f"{_run(run)}:*"
