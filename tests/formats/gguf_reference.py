#!/usr/bin/python3
"""Independent GGUF reader and q8_0 reference quantizer (numpy), for tests/formats/test_gguf.cpp.

Parses a GGUF v3 file from the format's description (ggml/docs/gguf.md): magic, version, counts,
typed key/values, tensor infos, alignment padding, data. Prints JSON: the key/values (arrays as
lists), and per tensor its dims, type, offset, and whether its bytes equal
  F32/F16: the raw values of the companion .npy-free dump (DIR/NAME.f32, float32 row-major)
  Q8_0:    ggml's quantize_row_q8_0_ref of those values: per 32 values d = max|x| / 127,
           id = 1/d (0 when d is 0), q = roundf(x * id) (half away from zero), d stored as fp16.
  /usr/bin/python3 gguf_reference.py FILE.gguf DIR
"""
import json
import os
import struct
import sys

import numpy as np

SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        v = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self):
        n = self.take("<Q")
        s = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, t):
        if t == 8:
            return self.string()
        if t == 9:
            et, n = self.take("<I"), self.take("<Q")
            return [self.value(et) for _ in range(n)]
        return self.take(SCALAR[t])


def q8_0_reference(x):
    x = x.astype(np.float32).reshape(-1, 32)
    amax = np.abs(x).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    v = (x * inv[:, None]).astype(np.float32)
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)
    out = bytearray()
    for i in range(x.shape[0]):
        out += np.float16(d[i]).tobytes() + q[i].tobytes()
    return bytes(out)


def main(path, ref_dir):
    data = open(path, "rb").read()
    r = Reader(data)
    assert data[:4] == b"GGUF", "magic"
    r.pos = 4
    version, n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
    kv = {}
    for _ in range(n_kv):
        k = r.string()
        kv[k] = r.value(r.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        infos.append({"name": name, "dims": dims, "type": r.take("<I"), "offset": r.take("<Q")})
    align = kv.get("general.alignment", 32)
    start = (r.pos + align - 1) // align * align
    sizes = {0: 4, 1: 2}
    for t in infos:
        n = int(np.prod(t["dims"]))
        nbytes = n * sizes[t["type"]] if t["type"] in sizes else n // 32 * 34
        raw = data[start + t["offset"]:start + t["offset"] + nbytes]
        t["aligned"] = t["offset"] % align == 0
        ref_file = os.path.join(ref_dir, t["name"] + ".f32")
        if os.path.exists(ref_file):
            x = np.fromfile(ref_file, dtype="<f4")
            if t["type"] == 0:
                want = x.astype("<f4").tobytes()
            elif t["type"] == 1:
                want = x.astype("<f2").tobytes()
            else:
                want = q8_0_reference(x)
            t["equal"] = raw == want
    print(json.dumps({"version": version, "kv": kv, "tensors": infos, "file_size": len(data),
                      "data_start": start}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
