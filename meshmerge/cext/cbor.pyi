class ScanError(ValueError):
    offset: int
    reason: str

def scan(
    data: bytes, max_depth: int, max_items: int, max_text: int, max_bytes: int, max_container: int
) -> None: ...
def dumps(value: object) -> bytes: ...
