#!/usr/bin/env python3
"""Writes the hand-made seed corpus of the `wire_parsers` fuzz target.

Each seed is one valid NBD message (big-endian, constants from the spec,
doc/proto.md of NetworkBlockDevice/nbd). Re-run after editing:
    python3 fuzz/make_seeds.py
"""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "wire_parsers")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C


def be(fmt, *values):
    return struct.pack(">" + fmt, *values)


def string32(s):
    return be("I", len(s)) + s


def option(code, data=b""):
    return be("QII", IHAVEOPT, code, len(data)) + data


def option_reply(opt, reply_type, data=b""):
    return be("QIII", OPTION_REPLY_MAGIC, opt, reply_type, len(data)) + data


def request(flags, command, cookie, offset, length, payload=b""):
    return be("IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length) + payload


def ext_request(flags, command, cookie, offset, length, payload=b""):
    return be("IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length) + payload


def chunk(flags, chunk_type, cookie, payload):
    return be("IHHQI", STRUCTURED_REPLY_MAGIC, flags, chunk_type, cookie, len(payload)) + payload


def ext_chunk(flags, chunk_type, cookie, offset, payload):
    return be("IHHQQQ", EXTENDED_REPLY_MAGIC, flags, chunk_type, cookie, offset, len(payload)) + payload


DONE = 1
SEEDS = {
    # Handshake
    "greeting_newstyle": be("QQH", NBDMAGIC, IHAVEOPT, 0x0003),  # FIXED_NEWSTYLE | NO_ZEROES
    "export_name_reply": be("QH", 1 << 30, 0x0005),  # HAS_FLAGS | SEND_FLUSH
    # Options
    "opt_export_name": option(1, b"disk"),
    "opt_list": option(3),
    "opt_go": option(7, string32(b"disk") + be("HHH", 2, 3, 1)),  # BLOCK_SIZE, NAME
    "opt_info_default": option(6, string32(b"") + be("H", 0)),
    "opt_structured_reply": option(8),
    "opt_set_meta_context": option(10, string32(b"disk") + be("I", 1) + string32(b"base:allocation")),
    "opt_extended_headers": option(11),
    # Option replies
    "rep_ack": option_reply(7, 1),
    "rep_server": option_reply(3, 2, string32(b"disk") + b"RAM disk"),
    "rep_info_export": option_reply(7, 3, be("HQH", 0, 1 << 30, 0x0005)),
    "rep_info_block_size": option_reply(7, 3, be("HIII", 3, 512, 4096, 1 << 25)),
    "rep_meta_context": option_reply(10, 4, be("I", 1) + b"base:allocation"),
    "rep_err_unsup": option_reply(99, 0x80000001, b"unsupported option"),
    # Requests
    "req_read": request(0, 0, 1, 0, 4096),
    "req_write_fua": request(1, 1, 2, 512, 4, b"data"),
    "req_disc": request(0, 2, 3, 0, 0),
    "req_block_status_ext_payload": ext_request(
        0x20, 7, 4, 0, 12, be("QI", 1 << 20, 1)  # PAYLOAD_LEN: effect length, context 1
    ),
    "req_write_zeroes_ext": ext_request(0x02, 6, 5, 1 << 32, 1 << 33),  # NO_HOLE
    # Replies
    "reply_simple": be("IIQ", SIMPLE_REPLY_MAGIC, 0, 1),
    "chunk_offset_data": chunk(DONE, 1, 1, be("Q", 0) + b"abcd"),
    "chunk_offset_hole": chunk(0, 2, 1, be("QI", 4096, 4096)),
    "chunk_block_status": chunk(DONE, 5, 7, be("III", 1, 4096, 0) + be("II", 8192, 3)),
    "chunk_error": chunk(DONE, 0x8001, 9, be("IH", 5, 3) + b"EIO"),
    "chunk_error_offset": chunk(DONE, 0x8002, 9, be("IH", 22, 0) + be("Q", 512)),
    "chunk_none": chunk(DONE, 0, 2, b""),
    "ext_chunk_block_status_ext": ext_chunk(DONE, 6, 4, 0, be("II", 1, 1) + be("QQ", 1 << 20, 3)),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(SEEDS)} seeds to {OUT}")


if __name__ == "__main__":
    main()
