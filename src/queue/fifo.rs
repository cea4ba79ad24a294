//! The quorum queue as a pure state machine.
