"""multistream-select client that sends the header and the first proposal together.

Why: py-libp2p 0.8.1's client writes ``/multistream/1.0.0``, waits for the echo,
then writes the protocol and waits again: two round trips per new stream (and per
connection upgrade step). go-multistream's ``SelectProtoOrFail`` writes both
messages in one batch and then reads both answers; listeners read the messages in
order either way, so this is wire-compatible with go, js and py listeners and
saves one round trip. Further proposals (after ``na``) go one at a time as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
from libp2p.abc import IMultiselectCommunicator
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IOException
from libp2p.protocol_muxer.exceptions import (
    MultiselectClientError,
    MultiselectCommunicatorError,
    ProtocolNotSupportedError,
)
from libp2p.protocol_muxer.multiselect_client import (
    MULTISELECT_PROTOCOL_ID,
    PROTOCOL_NOT_FOUND_MSG,
    MultiselectClient,
)
from libp2p.utils.varint import encode_delim


class PipelinedMultiselectClient(MultiselectClient):
    async def select_one_of(
        self,
        protocols: Sequence[TProtocol],
        communicator: IMultiselectCommunicator,
        negotiate_timeout: int = 5,
    ) -> TProtocol:
        writer = getattr(communicator, "read_writer", None)
        if not protocols or writer is None:
            return await super().select_one_of(protocols, communicator, negotiate_timeout)
        first = protocols[0]
        with trio.move_on_after(negotiate_timeout):
            try:
                await writer.write(encode_delim(MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(first.encode()))
                header = await communicator.read()
                if header != MULTISELECT_PROTOCOL_ID:
                    raise MultiselectClientError(
                        f"multiselect protocol ID mismatch: expected {MULTISELECT_PROTOCOL_ID}, got {header!r}"
                    )
                answer = await communicator.read()
            except (IOException, MultiselectCommunicatorError) as exc:
                raise MultiselectClientError(f"multistream-select with {first} failed: {exc}") from exc
            if answer == first:
                return first
            if answer != PROTOCOL_NOT_FOUND_MSG:
                raise MultiselectClientError(f"unrecognized response {answer!r} to proposal {first!r}")
            for protocol in protocols[1:]:
                try:
                    return await self.try_select(communicator, protocol)
                except ProtocolNotSupportedError:
                    continue
            raise MultiselectClientError(f"peer supports none of {list(protocols)}")
        raise MultiselectClientError(f"response timed out after {negotiate_timeout}s, protocols tried: {list(protocols)}")
