// Protobuf wire format, just enough to read and edit a serialized sentencepiece ModelProto
// (Debian ships no sentencepiece_model.pb.h, and linking a protobuf next to LibTorch's is what
// docs/DEPENDENCIES.md forbids). Header-only: data/sp_module.cpp (a dlopen'ed module) and
// data/sp_vocab.cpp both include it.
// Convention: nothing here throws; a malformed message makes next_field() return false, and a
// field's offsets are relative to the string_view it was read from.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace andy::data::wire {

// Wire types.
constexpr int kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5;

// One field of a message.
struct Field {
  uint64_t tag = 0;    // (number << 3) | wire type, as on the wire
  uint64_t value = 0;  // kVarint: the value; kFixed32/kFixed64: the little-endian bits
  size_t payload = 0;  // kLengthDelimited: the bytes are [payload, payload + len)
  uint64_t len = 0;
  uint32_t number() const { return static_cast<uint32_t>(tag >> 3); }
  int wire_type() const { return static_cast<int>(tag & 7); }
  // kFixed32 as a float (sentencepiece's scores).
  float as_float() const {
    const auto bits = static_cast<uint32_t>(value);
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  // kVarint as a (sign-extended) int32, as protobuf encodes negative int32 fields.
  int32_t as_int32() const { return static_cast<int32_t>(static_cast<int64_t>(value)); }
};

// Reads a varint at s[i]; i moves past it. False when it runs off the end or past 10 bytes.
inline bool read_varint(std::string_view s, size_t& i, uint64_t& v) {
  v = 0;
  for (int shift = 0; i < s.size() && shift < 64; shift += 7) {
    const auto b = static_cast<unsigned char>(s[i++]);
    v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (!(b & 0x80)) return true;
  }
  return false;
}

// Appends v as a varint.
inline void write_varint(std::string& out, uint64_t v) {
  do {
    unsigned char b = v & 0x7f;
    v >>= 7;
    out.push_back(static_cast<char>(v ? b | 0x80 : b));
  } while (v);
}

// The field of `msg` starting at i; on return i is past it. False when malformed: a bad tag,
// a group (wire types 3, 4: unused by sentencepiece), or a field running past the end.
inline bool next_field(std::string_view msg, size_t& i, Field& f) {
  f = Field{};
  if (!read_varint(msg, i, f.tag) || (f.tag >> 3) == 0) return false;
  const auto left = [&] { return msg.size() - i; };
  auto fixed = [&](size_t n) {
    if (left() < n) return false;
    for (size_t k = 0; k < n; ++k)
      f.value |= static_cast<uint64_t>(static_cast<unsigned char>(msg[i + k])) << (8 * k);
    i += n;
    return true;
  };
  switch (f.wire_type()) {
    case kVarint:
      return read_varint(msg, i, f.value);
    case kFixed64:
      return fixed(8);
    case kFixed32:
      return fixed(4);
    case kLengthDelimited:
      if (!read_varint(msg, i, f.len) || f.len > left()) return false;
      f.payload = i;
      i += static_cast<size_t>(f.len);
      return true;
    default:
      return false;
  }
}

// The bytes of a kLengthDelimited field read from `msg`.
inline std::string_view payload_of(std::string_view msg, const Field& f) {
  return msg.substr(f.payload, static_cast<size_t>(f.len));
}

}  // namespace andy::data::wire
