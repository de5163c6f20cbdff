"""Protocol edge cases over libnbd (Debian's python3-libnbd), client-side checks disabled.

Usage: nbd_errnos.py RW_URI RO_URI ALIGNED_URI
Prints one line per case: the case name and "ok", or the errno name the server replied with.
The same script runs against blockjobd and qemu-storage-daemon; the outputs are compared.
"""
import errno
import sys

import nbd


def conn(uri):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def case(name, f):
    try:
        r = f()
        print(name, "ok" if r is None or isinstance(r, (bytes, bytearray)) else r)
    except nbd.Error as e:
        print(name, errno.errorcode.get(e.errno, e.errno))


rw, ro, aligned = (conn(u) for u in sys.argv[1:4])
size = rw.get_size()
print("size", size)
print("min block", aligned.get_block_size(nbd.SIZE_MINIMUM) > 1)
case("read", lambda: rw.pread(4096, 0))
case("read past end", lambda: rw.pread(4096, size - 512))
case("read offset past end", lambda: rw.pread(1, size + 4096))
case("write past end", lambda: rw.pwrite(b"x" * 4096, size - 512))
case("zero past end", lambda: rw.zero(4096, size - 512))
case("trim past end", lambda: rw.trim(4096, size - 512))
case("cache past end", lambda: rw.cache(4096, size - 512))
case("read too large", lambda: rw.pread(33 << 20, 0))
case("cache", lambda: rw.cache(1 << 20, 0))
case("flush", lambda: rw.flush())
case("write fua", lambda: rw.pwrite(b"\x5a" * 4096, 8192, nbd.CMD_FLAG_FUA))
case("read back", lambda: rw.pread(4096, 8192) == b"\x5a" * 4096)
case("read with fua flag", lambda: rw.pread(512, 0, nbd.CMD_FLAG_FUA))
case("zero no-hole", lambda: rw.zero(65536, 65536, nbd.CMD_FLAG_NO_HOLE))
case("zero fast", lambda: rw.zero(65536, 131072, nbd.CMD_FLAG_FAST_ZERO))
case("read zeroed", lambda: rw.pread(65536 * 2, 65536) == bytes(65536 * 2))
case("trim", lambda: rw.trim(65536, 1 << 20))
extents = []
case("block status", lambda: rw.block_status(1 << 20, 0,
     lambda ctx, off, ents, err: extents.append((ctx, list(ents))) or 0))
print("extents", extents)
one = []
case("block status req_one", lambda: rw.block_status(4 << 20, 0,
     lambda ctx, off, ents, err: one.append(len(ents)) or 0, nbd.CMD_FLAG_REQ_ONE))
print("req_one extents", one)
case("ro write", lambda: ro.pwrite(b"x" * 512, 0))
case("ro zero", lambda: ro.zero(512, 0))
case("ro trim", lambda: ro.trim(512, 0))
case("ro read", lambda: ro.pread(512, 0))
case("misaligned read", lambda: aligned.pread(512, 1))
case("misaligned write", lambda: aligned.pwrite(b"y" * 100, 4096))
case("aligned read", lambda: aligned.pread(4096, 4096))
for h in (rw, ro, aligned):
    h.shutdown()
print("done")
