//! End-to-end test harness: starts QEMU or Bochs with a hard timeout, captures the serial console and
//! decides from markers.
