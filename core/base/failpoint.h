// Failpoints: named places that fail on purpose when the environment asks, so that tests can
// drive the error paths a real fault would take (an exception in a request handler, an engine
// step that throws) through the real executable. Off unless ANDYLLM_FAILPOINTS is set:
//
//   ANDYLLM_FAILPOINTS="serve.request:1,engine.step"   # name[:N]: fire N times (no N: always)
//
// The variable is read once, at the first call. Thread-safe.
//
//   if (failpoint_fires("serve.request")) throw std::runtime_error("failpoint serve.request");
#pragma once

namespace andy {

// True when `name` is armed and has firings left (one is used up).
bool failpoint_fires(const char* name);

}  // namespace andy
