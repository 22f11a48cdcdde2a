from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Request(_message.Message):
    __slots__ = ("type", "connect", "stream_open", "stream_handler", "dht", "disconnect", "pubsub")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        IDENTIFY: _ClassVar[Request.Type]
        CONNECT: _ClassVar[Request.Type]
        STREAM_OPEN: _ClassVar[Request.Type]
        STREAM_HANDLER: _ClassVar[Request.Type]
        DHT: _ClassVar[Request.Type]
        LIST_PEERS: _ClassVar[Request.Type]
        DISCONNECT: _ClassVar[Request.Type]
        PUBSUB: _ClassVar[Request.Type]
    IDENTIFY: Request.Type
    CONNECT: Request.Type
    STREAM_OPEN: Request.Type
    STREAM_HANDLER: Request.Type
    DHT: Request.Type
    LIST_PEERS: Request.Type
    DISCONNECT: Request.Type
    PUBSUB: Request.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CONNECT_FIELD_NUMBER: _ClassVar[int]
    STREAM_OPEN_FIELD_NUMBER: _ClassVar[int]
    STREAM_HANDLER_FIELD_NUMBER: _ClassVar[int]
    DHT_FIELD_NUMBER: _ClassVar[int]
    DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    PUBSUB_FIELD_NUMBER: _ClassVar[int]
    type: Request.Type
    connect: ConnectRequest
    stream_open: StreamOpenRequest
    stream_handler: StreamHandlerRequest
    dht: DHTRequest
    disconnect: DisconnectRequest
    pubsub: PubsubRequest
    def __init__(self, type: _Optional[_Union[Request.Type, str]] = ..., connect: _Optional[_Union[ConnectRequest, _Mapping]] = ..., stream_open: _Optional[_Union[StreamOpenRequest, _Mapping]] = ..., stream_handler: _Optional[_Union[StreamHandlerRequest, _Mapping]] = ..., dht: _Optional[_Union[DHTRequest, _Mapping]] = ..., disconnect: _Optional[_Union[DisconnectRequest, _Mapping]] = ..., pubsub: _Optional[_Union[PubsubRequest, _Mapping]] = ...) -> None: ...

class Response(_message.Message):
    __slots__ = ("type", "error", "stream_info", "identify", "dht", "peers", "pubsub")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[Response.Type]
        ERROR: _ClassVar[Response.Type]
    OK: Response.Type
    ERROR: Response.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STREAM_INFO_FIELD_NUMBER: _ClassVar[int]
    IDENTIFY_FIELD_NUMBER: _ClassVar[int]
    DHT_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    PUBSUB_FIELD_NUMBER: _ClassVar[int]
    type: Response.Type
    error: ErrorResponse
    stream_info: StreamInfo
    identify: IdentifyResponse
    dht: DHTResponse
    peers: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    pubsub: PubsubResponse
    def __init__(self, type: _Optional[_Union[Response.Type, str]] = ..., error: _Optional[_Union[ErrorResponse, _Mapping]] = ..., stream_info: _Optional[_Union[StreamInfo, _Mapping]] = ..., identify: _Optional[_Union[IdentifyResponse, _Mapping]] = ..., dht: _Optional[_Union[DHTResponse, _Mapping]] = ..., peers: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., pubsub: _Optional[_Union[PubsubResponse, _Mapping]] = ...) -> None: ...

class IdentifyResponse(_message.Message):
    __slots__ = ("id", "addrs")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    addrs: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, id: _Optional[bytes] = ..., addrs: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("peer", "addrs", "timeout")
    PEER_FIELD_NUMBER: _ClassVar[int]
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    peer: bytes
    addrs: _containers.RepeatedScalarFieldContainer[bytes]
    timeout: int
    def __init__(self, peer: _Optional[bytes] = ..., addrs: _Optional[_Iterable[bytes]] = ..., timeout: _Optional[int] = ...) -> None: ...

class StreamOpenRequest(_message.Message):
    __slots__ = ("peer", "protocols", "timeout")
    PEER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOLS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    peer: bytes
    protocols: _containers.RepeatedScalarFieldContainer[str]
    timeout: int
    def __init__(self, peer: _Optional[bytes] = ..., protocols: _Optional[_Iterable[str]] = ..., timeout: _Optional[int] = ...) -> None: ...

class StreamHandlerRequest(_message.Message):
    __slots__ = ("addr", "protocols", "balanced")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    PROTOCOLS_FIELD_NUMBER: _ClassVar[int]
    BALANCED_FIELD_NUMBER: _ClassVar[int]
    addr: bytes
    protocols: _containers.RepeatedScalarFieldContainer[str]
    balanced: bool
    def __init__(self, addr: _Optional[bytes] = ..., protocols: _Optional[_Iterable[str]] = ..., balanced: _Optional[bool] = ...) -> None: ...

class ErrorResponse(_message.Message):
    __slots__ = ("msg",)
    MSG_FIELD_NUMBER: _ClassVar[int]
    msg: str
    def __init__(self, msg: _Optional[str] = ...) -> None: ...

class StreamInfo(_message.Message):
    __slots__ = ("peer", "addr", "protocol")
    PEER_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    peer: bytes
    addr: bytes
    protocol: str
    def __init__(self, peer: _Optional[bytes] = ..., addr: _Optional[bytes] = ..., protocol: _Optional[str] = ...) -> None: ...

class DHTRequest(_message.Message):
    __slots__ = ("type", "peer", "cid", "key", "value", "count", "timeout")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FIND_PEER: _ClassVar[DHTRequest.Type]
        FIND_PEERS_CONNECTED_TO_PEER: _ClassVar[DHTRequest.Type]
        FIND_PROVIDERS: _ClassVar[DHTRequest.Type]
        GET_CLOSEST_PEERS: _ClassVar[DHTRequest.Type]
        GET_PUBLIC_KEY: _ClassVar[DHTRequest.Type]
        GET_VALUE: _ClassVar[DHTRequest.Type]
        SEARCH_VALUE: _ClassVar[DHTRequest.Type]
        PUT_VALUE: _ClassVar[DHTRequest.Type]
        PROVIDE: _ClassVar[DHTRequest.Type]
    FIND_PEER: DHTRequest.Type
    FIND_PEERS_CONNECTED_TO_PEER: DHTRequest.Type
    FIND_PROVIDERS: DHTRequest.Type
    GET_CLOSEST_PEERS: DHTRequest.Type
    GET_PUBLIC_KEY: DHTRequest.Type
    GET_VALUE: DHTRequest.Type
    SEARCH_VALUE: DHTRequest.Type
    PUT_VALUE: DHTRequest.Type
    PROVIDE: DHTRequest.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    CID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    type: DHTRequest.Type
    peer: bytes
    cid: bytes
    key: bytes
    value: bytes
    count: int
    timeout: int
    def __init__(self, type: _Optional[_Union[DHTRequest.Type, str]] = ..., peer: _Optional[bytes] = ..., cid: _Optional[bytes] = ..., key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., count: _Optional[int] = ..., timeout: _Optional[int] = ...) -> None: ...

class DHTResponse(_message.Message):
    __slots__ = ("type", "peer", "value")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        BEGIN: _ClassVar[DHTResponse.Type]
        VALUE: _ClassVar[DHTResponse.Type]
        END: _ClassVar[DHTResponse.Type]
    BEGIN: DHTResponse.Type
    VALUE: DHTResponse.Type
    END: DHTResponse.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type: DHTResponse.Type
    peer: PeerInfo
    value: bytes
    def __init__(self, type: _Optional[_Union[DHTResponse.Type, str]] = ..., peer: _Optional[_Union[PeerInfo, _Mapping]] = ..., value: _Optional[bytes] = ...) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("id", "addrs")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    addrs: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, id: _Optional[bytes] = ..., addrs: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DisconnectRequest(_message.Message):
    __slots__ = ("peer",)
    PEER_FIELD_NUMBER: _ClassVar[int]
    peer: bytes
    def __init__(self, peer: _Optional[bytes] = ...) -> None: ...

class PubsubRequest(_message.Message):
    __slots__ = ("type", "topic", "data")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        GET_TOPICS: _ClassVar[PubsubRequest.Type]
        LIST_PEERS: _ClassVar[PubsubRequest.Type]
        PUBLISH: _ClassVar[PubsubRequest.Type]
        SUBSCRIBE: _ClassVar[PubsubRequest.Type]
    GET_TOPICS: PubsubRequest.Type
    LIST_PEERS: PubsubRequest.Type
    PUBLISH: PubsubRequest.Type
    SUBSCRIBE: PubsubRequest.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    type: PubsubRequest.Type
    topic: str
    data: bytes
    def __init__(self, type: _Optional[_Union[PubsubRequest.Type, str]] = ..., topic: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class PubsubMessage(_message.Message):
    __slots__ = ("data", "seqno", "topics", "signature", "key")
    FROM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SEQNO_FIELD_NUMBER: _ClassVar[int]
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    seqno: bytes
    topics: _containers.RepeatedScalarFieldContainer[str]
    signature: bytes
    key: bytes
    def __init__(self, data: _Optional[bytes] = ..., seqno: _Optional[bytes] = ..., topics: _Optional[_Iterable[str]] = ..., signature: _Optional[bytes] = ..., key: _Optional[bytes] = ..., **kwargs) -> None: ...

class PubsubResponse(_message.Message):
    __slots__ = ("topics", "peer_ids")
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    PEER_IDS_FIELD_NUMBER: _ClassVar[int]
    topics: _containers.RepeatedScalarFieldContainer[str]
    peer_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, topics: _Optional[_Iterable[str]] = ..., peer_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...
