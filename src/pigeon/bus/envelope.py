"""What travels between processes on the bus: frames addressed to users."""

from __future__ import annotations

import msgspec

from pigeon.protocol.frames import Msg, Presence, Receipt, Typing

RoutedFrame = Msg | Receipt | Typing | Presence


class Target(msgspec.Struct, array_like=True):
    user: int
    frames: list[RoutedFrame]
    #: a device of ``user`` that must not get these frames (e.g. the typist's own)
    skip_device: int = 0
    #: read the user's inbox from the store: entries were committed but never pushed
    nudge: bool = False
    #: close this device's sockets: it was revoked (logout)
    revoke_device: int = 0


class Envelope(msgspec.Struct, array_like=True):
    targets: list[Target]


envelope_decoder = msgspec.json.Decoder(Envelope)
