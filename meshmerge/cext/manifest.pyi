from collections.abc import Callable
from typing import Any

def entries(
    raw: list[Any],
    with_digest: bool,
    itemsize: dict[str, int],
    make: Callable[..., Any],
    max_dims: int,
    max_dim: int,
    max_name: int,
) -> tuple[Any, ...] | None: ...
