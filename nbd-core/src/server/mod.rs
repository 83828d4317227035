//! Per-connection server state machine.
